"""Named UNet configurations and the model file format (``config.json`` + ``model.safetensors``).

A *model config* is a JSON object ``{"arch": "openai-unet", "params": {...}}`` whose
``params`` are the keyword arguments of :class:`bqc.models.unet.UNetModel`. A *model
directory* holds ``config.json`` (that object) and ``model.safetensors`` (the state dict).

Public entry points:

* :data:`CONFIGS` - named ``UNetModel`` keyword-argument dicts (JSON-serialisable);
  :data:`CONFIG_INFO` - per-config metadata (image size, channels, parameter count, what it
  reproduces).
* :func:`build_model` - a freshly initialised model from a name, a params dict or a full
  model config.
* :func:`save_model` / :func:`load_model` - write / read a model directory.

Everything a user can get wrong raises :class:`bqc.errors.BqcError`.
"""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from bqc.errors import BqcError, normal_permissions

from .unet import UNetModel

__all__ = [
    "ARCH",
    "CONFIGS",
    "CONFIG_INFO",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "build_model",
    "count_parameters",
    "load_model",
    "model_config",
    "save_model",
    "valid_param_keys",
]

ARCH = "openai-unet"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Top-level keys of a model config file: "arch" and "params" are required, "name" and "meta"
# are free-form annotations that bqc carries along.
_TOP_LEVEL_KEYS = ("arch", "params", "name", "meta")


# --------------------------------------------------------------------------- named configs

CONFIGS: dict[str, dict[str, Any]] = {
    # The embedded default: small enough to train on 2 CPU cores, but with every structural
    # feature of the big UNets: 3 resolution levels (16, 8, 4), 19 timestep-embedded blocks
    # (9 input, 1 middle, 9 output), channel changes (1x1 skip convs), learned up/downsampling,
    # single-head attention at 8x8 (ds 2) and two-head attention in the middle block (4x4).
    # 1,105,665 parameters. FROZEN: checkpoints are trained against it; do not edit.
    "mnist16": {
        "image_size": 16,
        "in_channels": 1,
        "model_channels": 32,
        "out_channels": 1,
        "num_res_blocks": 2,
        "attention_resolutions": [2],
        "dropout": 0.0,
        "channel_mult": [1, 1, 2],
        "conv_resample": True,
        "num_heads": 1,
        "num_head_channels": 32,
        "use_scale_shift_norm": False,
    },
    # The DDPM (Ho et al.) / DDIM (Song et al.) CIFAR-10 UNet: ch 128, ch_mult (1,2,2,2),
    # 2 res blocks, single-head attention at 16x16, dropout 0.1. The DDIM repo's
    # models/diffusion.py model has 35,746,307 parameters and so does this one, exactly: the
    # two designs differ only in ways that do not change the count (separate q/k/v 1x1 conv2d
    # vs one 3C conv1d, asymmetric-padding vs padding-1 stride-2 downsampling conv).
    "ddim-cifar10": {
        "image_size": 32,
        "in_channels": 3,
        "model_channels": 128,
        "out_channels": 3,
        "num_res_blocks": 2,
        "attention_resolutions": [2],
        "dropout": 0.1,
        "channel_mult": [1, 2, 2, 2],
        "conv_resample": True,
        "num_heads": 1,
        "num_head_channels": -1,
        "use_scale_shift_norm": False,
    },
    # LDM-4 LSUN-Bedrooms (Rombach et al., configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml):
    # the UNet on 64x64x3 VQ latents. Exactly 274,056,163 parameters (1045.4 MiB in fp32).
    "ldm4-bedrooms": {
        "image_size": 64,
        "in_channels": 3,
        "model_channels": 224,
        "out_channels": 3,
        "num_res_blocks": 2,
        "attention_resolutions": [8, 4, 2],
        "dropout": 0.0,
        "channel_mult": [1, 2, 3, 4],
        "conv_resample": True,
        "num_heads": 1,
        "num_head_channels": 32,
        "use_scale_shift_norm": False,
    },
}

CONFIG_INFO: dict[str, dict[str, Any]] = {
    "mnist16": {
        "image_size": 16,
        "in_channels": 1,
        "out_channels": 1,
        "parameters": 1_105_665,
        "reproduces": "bqc's embedded default: a small openaimodel UNet for 16x16 MNIST "
        "(not a published model)",
    },
    "ddim-cifar10": {
        "image_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "parameters": 35_746_307,
        "reproduces": "DDPM/DDIM CIFAR-10 UNet (ermongroup/ddim models/diffusion.py, 35,746,307 parameters)",
    },
    "ldm4-bedrooms": {
        "image_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "parameters": 274_056_163,
        "reproduces": "LDM-4 LSUN-Bedrooms UNet on 64x64x3 latents (274,056,163 parameters, "
        "1045.4 MiB fp32), the full-scale model of BinaryDM and BiDM",
    },
}


# --------------------------------------------------------------------------- configs


def valid_param_keys() -> list[str]:
    """The keyword arguments :class:`UNetModel` accepts."""
    return [n for n in inspect.signature(UNetModel.__init__).parameters if n != "self"]


def _required_param_keys() -> list[str]:
    sig = inspect.signature(UNetModel.__init__)
    return [n for n, p in sig.parameters.items() if n != "self" and p.default is inspect.Parameter.empty]


def model_config(name_or_config: str | Mapping[str, Any]) -> dict[str, Any]:
    """Normalise a config name, a params dict or a full model config to a full model config.

    Returns a new ``{"arch": "openai-unet", "params": {...}, ...}`` dict; the params are
    checked against :class:`UNetModel`'s signature (unknown and missing keys raise BqcError).
    """
    if isinstance(name_or_config, Path) or (
        isinstance(name_or_config, str) and name_or_config not in CONFIGS and name_or_config.endswith(".json")
    ):
        path = Path(name_or_config)
        if not path.is_file():
            raise BqcError(f"model config file not found: {path}")
        return model_config(_read_config_file(path))
    if isinstance(name_or_config, str):
        if name_or_config not in CONFIGS:
            raise BqcError(
                f"unknown model config name {name_or_config!r}; the named configs are: "
                f"{', '.join(sorted(CONFIGS))}. Pass one of these names, or a config dict / "
                f"config.json file of the form {{\"arch\": \"{ARCH}\", \"params\": {{...}}}}."
            )
        return {"arch": ARCH, "name": name_or_config, "params": copy.deepcopy(CONFIGS[name_or_config])}
    if not isinstance(name_or_config, Mapping):
        raise BqcError(
            f"a model config must be a config name or a dict, got {type(name_or_config).__name__}"
        )
    cfg = dict(copy.deepcopy(name_or_config))
    if "arch" not in cfg and "params" not in cfg:
        # a bare UNetModel params dict
        cfg = {"arch": ARCH, "params": cfg}
    unknown_top = [k for k in cfg if k not in _TOP_LEVEL_KEYS]
    if unknown_top:
        raise BqcError(
            f"unknown key {unknown_top[0]!r} at the top level of the model config; valid keys "
            f"are: {', '.join(_TOP_LEVEL_KEYS)} (the UNet's keyword arguments go under \"params\")."
        )
    arch = cfg.get("arch")
    if arch != ARCH:
        raise BqcError(
            f"unknown model arch {arch!r}; bqc's model zoo knows only {ARCH!r} (the openaimodel "
            f"UNetModel). Set \"arch\": \"{ARCH}\" in the config."
        )
    params = cfg.get("params")
    if not isinstance(params, Mapping):
        raise BqcError(
            f"the model config's \"params\" must be an object of UNetModel keyword arguments, "
            f"got {type(params).__name__}"
        )
    valid = valid_param_keys()
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise BqcError(
            f"unknown model config key {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more: {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else "")
            + f"; valid keys are: {', '.join(valid)}."
        )
    missing = [k for k in _required_param_keys() if k not in params]
    if missing:
        raise BqcError(
            f"the model config lacks required key(s) {', '.join(map(repr, missing))}; required keys "
            f"are: {', '.join(_required_param_keys())}."
        )
    cfg["params"] = dict(params)
    return cfg


def build_model(name_or_config: str | Path | Mapping[str, Any]) -> UNetModel:
    """A freshly initialised :class:`UNetModel` from a config name (see :data:`CONFIGS`), a
    params dict, a full model config ``{"arch": "openai-unet", "params": {...}}`` or the path
    of a ``config.json`` holding one.

    Builds on the current default device (``with torch.device("meta"): build_model(...)``
    builds without allocating memory, e.g. to count parameters).
    """
    cfg = model_config(name_or_config)
    try:
        return UNetModel(**cfg["params"])
    except (ValueError, TypeError, NotImplementedError) as e:
        raise BqcError(f"invalid model config: {e}") from e


def count_parameters(model_or_config) -> int:
    """Number of parameters of a model, or of a config (built on the meta device, no memory)."""
    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
    else:
        with torch.device("meta"):
            model = build_model(model_or_config)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- files


def save_model(model: torch.nn.Module, config: str | Mapping[str, Any], dir: str | Path) -> Path:
    """Write ``dir/config.json`` and ``dir/model.safetensors``; return ``dir``.

    ``config`` is the model's config (name, params dict or full model config). Tensors that
    share storage (tied weights) are written as separate copies, since safetensors refuses
    shared storage; :func:`load_model` restores the values (not the tying).
    """
    from safetensors.torch import save_file

    cfg = model_config(config)
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in model.state_dict().items():
        v = v.detach()
        if v.device.type == "meta":
            raise BqcError(f"cannot save a model built on the meta device (tensor {k!r} has no data)")
        v = v.cpu()
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
        if key in seen or not v.is_contiguous() or v.storage_offset() != 0 or v.numel() * v.element_size() != v.untyped_storage().nbytes():
            v = v.contiguous().clone()
        else:
            seen.add(key)
        tensors[k] = v
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "bqc_model_config": json.dumps(cfg, sort_keys=True)})
    normal_permissions(out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def _read_config_file(path: Path) -> dict[str, Any]:
    """A model folder's ``config.json``, read bounded (a FIFO or ``/dev/zero`` in its place is
    refused, not read until memory runs out) and parsed as a JSON object."""
    from bqc.errors import read_json_object

    try:
        return read_json_object(path, "model config file")
    except OSError as e:
        raise BqcError(f"cannot read model config file {path}: {e}") from e


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as e:
        raise BqcError(
            f"weights file {path} is corrupt or truncated and cannot be read as safetensors "
            f"({type(e).__name__}: {e}). Re-copy or re-download it, or re-save the model with "
            f"bqc.models.zoo.save_model."
        ) from e


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], weights: Path, cfg) -> None:
    """Refuse (BqcError) weights whose keys or shapes differ from ``model``'s (built from ``cfg``, e.g. on
    the meta device: nothing is allocated before the file is known to fit)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} (file {tuple(sd[k].shape)}, config {tuple(v.shape)})"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    n = 3

    def few(items):
        return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")

    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {few(shapes)}")
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the file: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) in the file: {few(unexpected)}")
    name = cfg.get("name")
    raise BqcError(
        f"weights {weights} do not match the model config"
        + (f" {name!r}" if name else "")
        + ": " + "; ".join(parts)
        + ". The weights were probably saved from a different config; use the config.json "
        "written next to them."
    )


def load_model(
    dir_or_config_json: str | Path, weights: str | Path | None = None
) -> tuple[UNetModel, dict[str, Any]]:
    """Load a model directory (or a ``config.json`` path) and its weights.

    ``weights`` defaults to ``model.safetensors`` next to the config. Returns
    ``(model, config)`` with the model in eval mode on the CPU.
    """
    p = Path(dir_or_config_json)
    if not p.exists():
        raise BqcError(
            f"model not found: {p}",
            hint="pass a model directory (holding config.json and model.safetensors) or a config.json path",
        )
    config_path = p / CONFIG_FILE if p.is_dir() else p
    if not config_path.exists():
        raise BqcError(f"model config file not found: {config_path} (a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = model_config(_read_config_file(config_path))

    weights_path = Path(weights) if weights is not None else config_path.parent / WEIGHTS_FILE
    if weights_path.is_dir():
        weights_path = weights_path / WEIGHTS_FILE
    if not weights_path.exists():
        raise BqcError(f"weights file not found: {weights_path}", hint="pass weights=PATH, or save the model with bqc.models.zoo.save_model")
    return model_with_weights(cfg, weights_path), cfg


def model_with_weights(cfg: dict[str, Any], weights_path: str | Path) -> UNetModel:
    """The model ``cfg`` describes, holding the weights of the safetensors file ``weights_path``
    (checked against the config first), in eval mode on the CPU."""
    weights_path = Path(weights_path)
    sd = _load_weights(weights_path)

    # Build without allocating or initialising (fast for the 274M-parameter LDM-4), check the
    # file against the config, then adopt the loaded tensors (cast to the model's dtypes).
    with torch.device("meta"):
        model = build_model(cfg)
    check_state_dict(model, sd, weights_path, cfg)
    expected = model.state_dict()
    sd = {k: v.to(expected[k].dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    return model
