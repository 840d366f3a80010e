"""Front end: load a diffusion UNet from any supported source and capture it as a bqc graph.

Sources (see :func:`load_source`):

=================  ==========================================================================
kind               how it is given
=================  ==========================================================================
``zoo``            a name from ``bqc.models.zoo`` (``mnist16``, ``ddim-cifar10``, ...); the
                   shipped pretrained weights are used when the zoo has them
``bqc``            a directory with ``config.json`` (``{"arch": ..., "params": ...}``) and
                   ``model.safetensors``
``diffusers``      a diffusers model directory (``config.json`` with ``_class_name`` +
                   ``diffusion_pytorch_model.safetensors``)
``config``         ``--config file.yaml``: ``target: pkg.mod.Class`` (an ``nn.Module`` class,
                   checked before it is called) + ``params:`` (also nested
                   at ``model.params.unet_config``), code importable from PYTHONPATH,
                   optional ``--weights`` (safetensors or a ``weights_only`` torch checkpoint)
``pt2``            a ``torch.export`` archive, recognised by content whatever its suffix; vetted
                   member by member (:func:`vet_pt2`) and never unpickled or eval()ed
``pickle``         a whole pickled module (``torch.save(model)``), only with ``trust_pickle``
=================  ==========================================================================

Capture: every source becomes a ``torch.export`` program of a thin adapter with the uniform
signature ``(x, t[, y]) -> eps`` and a dynamic batch dimension; :func:`bqc.ir.from_exported`
turns it into the one IR form used downstream (see ``bqc/ir.py``).

Text-conditioned UNets (diffusers ``UNet2DConditionModel``; LDM / SD-1.x ``UNetModel`` with
``use_spatial_transformer`` + ``context_dim``) capture with the text embedding as a graph input
named ``context``: ``(x, t, context[, y]) -> eps``, ``context`` of shape ``(N, L, D)`` with ``D``
from the model's config and ``L`` static (``context_len``, default :data:`CONTEXT_LEN`, CLIP's 77
tokens), the batch dynamic. ``ModelSource.context`` and the artifact manifest's ``source``
record ``(L, D)``.
``torch.fx.symbolic_trace`` is not used: it fails on the code people actually ship (len() on
shapes, asserts, ``torch.tensor(timestep)``, required label arguments).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bqc.errors import BqcError, read_json_object, read_yaml_file, require_file


@dataclass
class ModelSource:
    """A loaded eager model and what is needed to capture it again."""

    kind: str  # zoo | bqc | diffusers | config | pt2 | pickle
    description: str
    module: nn.Module | None = None  # eager model (None for pt2)
    exported: Any = None  # torch.export.ExportedProgram for pt2 sources
    in_channels: int = 0
    image_size: int = 0
    num_classes: int | None = None
    call: str = "plain"  # plain: module(x, t[, y]); diffusers: module(x, t[, class_labels]).sample
    info: dict = field(default_factory=dict)  # JSON-able facts to keep (config, paths)
    # the model's diffusion process (bqc.diffusion.NoiseSchedule) read from the source, and from where;
    # None: the source records none (see diffusion_of)
    schedule: Any = None
    schedule_from: str = ""
    # text conditioning: (sequence length, width) of the ``context`` input; None: not text-conditioned
    context: tuple[int, int] | None = None


#: default token count of the text embedding (CLIP's max length, what SD-1.x is trained with)
CONTEXT_LEN = 77


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def load_source(
    model: str | None = None,
    *,
    config: str | None = None,
    weights: str | None = None,
    trust_pickle: bool = False,
    context_len: int | None = None,
    trust_code: bool = False,
) -> ModelSource:
    """Load a model from a zoo name, a directory, a file or an instantiate-from-config YAML.

    ``context_len``: the token count of a text-conditioned model's ``context`` input (default
    :data:`CONTEXT_LEN`); ignored for other models. ``trust_code``: a config's ``target:`` may
    name a module outside :data:`TRUSTED_PACKAGES` that is not imported yet (importing it runs
    its code; see :func:`_resolve_module_class`)."""
    src = _load_source(model, config=config, weights=weights, trust_pickle=trust_pickle, trust_code=trust_code)
    if context_len is not None:
        set_context_len(src, context_len)
    return src


#: the longest text context (--context-len) a capture takes (CLIP: 77, T5 encoders: 512)
MAX_CONTEXT_LEN = 65536


def set_context_len(src: ModelSource, length: int) -> ModelSource:
    """Capture a text-conditioned source with ``length`` text tokens (no-op for other models)."""
    if not 1 <= int(length) <= MAX_CONTEXT_LEN:  # the capture's example context is (batch, length, D) floats
        raise BqcError(f"the context length must be in [1, {MAX_CONTEXT_LEN}], got {length}")
    if src.context is not None and src.exported is None:
        src.context = (int(length), src.context[1])
        src.info["context"] = list(src.context)
    return src


def _load_source(model, *, config, weights, trust_pickle, trust_code=False) -> ModelSource:
    if config is not None:
        return _load_from_yaml(config, weights, trust_code)
    if model is None:
        raise BqcError("no model given", hint="pass a zoo name (e.g. mnist16), a model directory, a .pt2 file, or --config file.yaml")
    if not Path(model).exists() and _is_zoo_name(model):
        return _load_zoo(model, weights)
    path = require_file(model, "model")
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.exists() and (path / "model_index.json").is_file() and (path / "unet" / "config.json").is_file():
            path, cfg_path = path / "unet", path / "unet" / "config.json"  # a diffusers pipeline folder: its UNet
        if not cfg_path.exists():
            raise BqcError(f"{path} is a directory without config.json, so it is neither a bqc checkpoint nor a diffusers model directory")
        cfg = _read_json(cfg_path)
        if "_class_name" in cfg:
            _no_weights_option(weights, path, "a diffusers folder reads its diffusion_pytorch_model.safetensors")
            return _load_diffusers(path, cfg)
        return _load_bqc_dir(path, weights)
    kind = sniff_file(path)  # by content: a .pt may be a .pt2 archive, TorchScript, a pickle ...
    if kind in ("pt2", "torch-save", "pickle"):
        _no_weights_option(weights, path, "its weights are in the file")
    if kind == "pt2":
        return _load_pt2(path, trust_pickle)
    if kind in ("torch-save", "pickle"):
        return _load_pickled_module(path, trust_pickle, kind)
    if kind != "unknown":
        raise _unloadable(path, kind)
    suffix = path.suffix.lower()
    if suffix in (".pt2", ".pt", ".pth", ".ckpt", ".bin"):
        raise BqcError(f"{path} is neither a torch.export archive nor a torch checkpoint (unrecognised content); "
                       "it may be truncated or corrupt")
    if suffix in (".yaml", ".yml"):
        return _load_from_yaml(str(path), weights, trust_code)
    if suffix == ".json":
        return _load_bqc_dir(path, weights)
    raise BqcError(
        f"don't know how to load {path}",
        hint="give a zoo name, a model directory (bqc or diffusers), a .pt2 export, --config file.yaml, or a pickled module with --trust-pickle",
    )


#: what each recognised file kind is, in words
FILE_KINDS = {
    "pt2": "a torch.export archive (.pt2)",
    "pt2-legacy": "a torch.export file in the pre-2.8 format (version + serialized_exported_program.json)",
    "torchscript": "a TorchScript archive (torch.jit.save)",
    "torch-save": "a torch.save zip archive (pickled Python objects)",
    "pickle": "a raw pickle (e.g. legacy torch.save)",
    "safetensors": "a safetensors weights file",
    "zip": "a zip file of unknown layout",
}


def _describe_zip(rel: set[str]) -> str:
    """What a zip archive is, from its member names (relative to its root folder)."""
    if "archive_format" in rel:
        return FILE_KINDS["pt2"]
    if "serialized_exported_program.json" in rel:
        return FILE_KINDS["pt2-legacy"]
    if "constants.pkl" in rel or any(r.startswith("code/") for r in rel):
        return FILE_KINDS["torchscript"]
    if "data.pkl" in rel:
        return FILE_KINDS["torch-save"]
    return ""


def sniff_file(path: str | Path) -> str:
    """Recognise a model file by its bytes, not its name: one of :data:`FILE_KINDS` or 'unknown'."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        rel = {n.split("/", 1)[1] if "/" in n else n for n in names}
        top = set(names)
        if "archive_format" in rel:
            return "pt2"
        if "serialized_exported_program.json" in top | rel:
            return "pt2-legacy"
        if "constants.pkl" in rel or any(r.startswith("code/") for r in rel):
            return "torchscript"
        if "data.pkl" in rel:
            return "torch-save"
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= 100_000_000 and head[8:9] == b"{" and n + 8 <= path.stat().st_size:
            return "safetensors"
    return "unknown"


def _unloadable(path: Path, kind: str) -> BqcError:
    what = f"{path} is {FILE_KINDS[kind]}"
    if kind == "torchscript":
        return BqcError(f"{what}; bqc does not load TorchScript (loading it runs the code it holds)",
                        hint="export the eager model with torch.export.export(...) and torch.export.save(ep, 'model.pt2')")
    if kind == "pt2-legacy":
        return BqcError(f"{what}, which this torch cannot load without unpickling",
                        hint="re-export it with torch.export.save from a current torch")
    if kind == "safetensors":
        return BqcError(f"{what}: it holds weights, not a model",
                        hint="give the architecture with --config model.yaml --weights FILE, or put the weights in a bqc "
                        "(config.json + model.safetensors) or diffusers model directory")
    return BqcError(f"{what}, not a model bqc can load",
                    hint="give a zoo name, a model directory (bqc or diffusers), a .pt2 export, or --config file.yaml")


def _is_zoo_name(name: str) -> bool:
    from bqc.models import zoo

    return name in zoo.CONFIGS


def _read_json(path: Path) -> dict:
    return read_json_object(path, "config")


def _model_facts(module: nn.Module) -> tuple[int, int, int | None]:
    """(in_channels, image_size, num_classes) read from a model's config-like attributes."""
    cfg = getattr(module, "config", None)  # diffusers
    if cfg is not None and hasattr(cfg, "in_channels"):
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return cfg.in_channels, size, getattr(cfg, "num_class_embeds", None)
    in_ch = getattr(module, "in_channels", None)
    size = getattr(module, "image_size", None)
    if in_ch is None or size is None:
        raise BqcError(
            f"cannot tell the input shape of {type(module).__name__}: it has no in_channels/image_size attributes",
            hint="set in_channels and image_size attributes on the model, or export it yourself with "
                 "torch.export.export(model, (x, t)) and pass the .pt2",
        )
    return int(in_ch), int(size), getattr(module, "num_classes", None)


def _context_width(module: nn.Module, params: dict | None = None) -> int | None:
    """The width of a text-conditioned model's ``context`` tokens, None for other models:
    diffusers ``cross_attention_dim`` (UNet2DConditionModel), a ``context_dim`` attribute (bqc's
    UNetModel), or LDM's ``use_spatial_transformer`` + ``context_dim`` params (LDM's own class
    keeps no such attribute)."""
    cfg = getattr(module, "config", None)
    if type(module).__name__ == "UNet2DConditionModel" and cfg is not None:
        dim = cfg.cross_attention_dim
    elif getattr(module, "context_dim", None) is not None:
        dim = module.context_dim
    elif params and params.get("use_spatial_transformer") and params.get("context_dim") is not None:
        dim = params["context_dim"]
    else:
        return None
    if isinstance(dim, (list, tuple)):
        if len(set(dim)) != 1:
            raise BqcError(f"{type(module).__name__} has a different text-embedding width per block ({list(dim)}); "
                           "bqc threads one context tensor", hint="use a model with one cross_attention_dim / context_dim")
        dim = dim[0]
    return int(dim)


def _from_module(module: nn.Module, kind: str, description: str, call: str = "plain", *,
                 ldm_params: dict | None = None, **info) -> ModelSource:
    module = module.eval()
    in_ch, size, ncls = _model_facts(module)
    width = _context_width(module, ldm_params)
    context = (CONTEXT_LEN, width) if width is not None else None
    if context is not None:
        info["context"] = list(context)
    return ModelSource(kind, description, module=module, in_channels=in_ch, image_size=size,
                       num_classes=ncls, call=call, info=info, context=context)


def _no_weights_option(weights, path, why: str) -> None:
    """``--weights`` given with a source that takes none: refused (it was silently ignored)."""
    if weights is not None:
        raise BqcError(f"--weights {weights} does not apply to {path}: {why}",
                       hint="--weights replaces the weights of a zoo model, a bqc model folder or a --config model; drop it")


def _load_zoo(name: str, weights: str | None = None) -> ModelSource:
    from bqc.models import zoo

    if weights is not None:  # the zoo's architecture with the user's weights (was silently ignored)
        cfg = zoo.model_config(name)
        module = zoo.model_with_weights(cfg, require_file(weights, "weights file"))
        # kind "bqc", not "zoo": nothing may resolve it by the zoo name to the shipped weights
        return _with_bqc_schedule(_from_module(module, "bqc", f"zoo architecture {name} with the weights {weights}",
                                               path=str(weights), config=cfg), cfg, f"zoo config {name} (meta.diffusion)")
    shipped = Path(zoo.__file__).parent / "checkpoints" / name
    pretrained = (shipped / zoo.WEIGHTS_FILE).exists()
    if pretrained:
        module, cfg = zoo.load_model(shipped)
    else:
        module, cfg = zoo.build_model(name), zoo.model_config(name)
    desc = f"zoo model {name}" + (" (shipped pretrained weights)" if pretrained else " (random init: no shipped weights)")
    return _with_bqc_schedule(_from_module(module, "zoo", desc, name=name, config=cfg, pretrained=pretrained), cfg,
                              f"zoo config {name} (meta.diffusion)")


def _load_bqc_dir(path: Path, weights: str | None) -> ModelSource:
    from bqc.models import zoo

    module, cfg = zoo.load_model(path, weights=weights)
    return _with_bqc_schedule(_from_module(module, "bqc", f"bqc checkpoint {path}", path=str(path), config=cfg), cfg,
                              f"{path} config.json (meta.diffusion)")


def _load_diffusers(path: Path, cfg: dict) -> ModelSource:
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the install
        raise BqcError("this is a diffusers model directory but diffusers is not installed", hint="pip install 'bqc[diffusers]'") from e
    cls_name = cfg["_class_name"]
    cls = getattr(diffusers, cls_name, None)
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel") or cls is None:
        raise BqcError(f"diffusers class {cls_name} is not supported", hint="bqc captures UNet2DModel (and UNet2DConditionModel)")
    weights = path / "diffusion_pytorch_model.safetensors"
    require_file(weights, "diffusers weights")
    module = _meta_checked(lambda: cls.from_config(cfg), load_safetensors(weights), weights, cfg)
    if cls_name == "UNet2DConditionModel":
        _check_text_unet_config(path, cfg)
    src = _from_module(module, "diffusers", f"diffusers {cls_name} {path}", call="diffusers", path=str(path), config=cfg)
    src.schedule, src.schedule_from = _diffusers_schedule(path)
    return src


def _meta_checked(build, sd: dict, weights: Path, cfg: dict):
    """The module ``build()`` makes, with the weights ``sd``: built first on the meta device (nothing
    allocated) and checked against the file, so a config.json that declares a model of 100s of GB
    (or one the weights do not fit) is refused before any memory is taken, not in the allocator or
    the OOM killer."""
    from bqc.models.zoo import check_state_dict

    with torch.device("meta"):
        module = build()
    check_state_dict(module, sd, weights, cfg)
    expected = module.state_dict()
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True, assign=True)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):  # a non-persistent buffer: build it for real
        real = build()
        real.load_state_dict(module.state_dict(), strict=True)
        module = real
    return module.eval()


#: UNet2DConditionModel config keys whose non-default values need inputs besides (x, t, context[, y])
_EXTRA_CONDITIONING = ("addition_embed_type", "encoder_hid_dim_type", "class_embed_type")


def _check_text_unet_config(path: Path, cfg: dict) -> None:
    """Refuse a UNet2DConditionModel that needs more conditioning than the text embedding and
    class labels (SDXL's added text/time embeddings, image embeddings, timestep-class embeddings)."""
    extra = [f"{k}={cfg[k]!r}" for k in _EXTRA_CONDITIONING if cfg.get(k) is not None]
    if extra:
        raise BqcError(f"{path}: this UNet2DConditionModel needs conditioning inputs besides the text embedding "
                       f"({', '.join(extra)}), which bqc does not thread",
                       hint="bqc captures text-conditioned UNets of the SD-1.x/2.x kind: (x, t, context[, class labels])")


# --------------------------------------------------------------------------------------------
# the model's diffusion process
# --------------------------------------------------------------------------------------------
def _with_bqc_schedule(src: ModelSource, cfg: dict, where: str) -> ModelSource:
    from bqc.diffusion.schedule import NoiseSchedule

    sched = NoiseSchedule.from_bqc_config(cfg)
    if sched is not None:
        src.schedule, src.schedule_from = sched, where
    return src


def _diffusers_schedule(path: Path):
    """(schedule, where) from the ``scheduler_config.json`` beside a diffusers model folder or in
    its pipeline's ``scheduler/`` folder; (None, "") when there is none."""
    from bqc.diffusion.schedule import NoiseSchedule

    for cand in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json",
                 path.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return NoiseSchedule.from_diffusers(_read_json(cand), str(cand)), str(cand)
    return None, ""


def diffusion_of(src: ModelSource, schedule: str | None = None, prediction: str | None = None):
    """``(NoiseSchedule, where)``: the source's diffusion process with the ``--schedule`` /
    ``--prediction`` overrides applied. A source that records none gets the DDPM default
    (linear 1e-4..2e-2, T = 1000, eps) and ``where`` says it was assumed."""
    from bqc.diffusion.schedule import NoiseSchedule, apply_overrides

    sched = src.schedule if src.schedule is not None else NoiseSchedule()
    where = src.schedule_from or ("assumed: the DDPM default (linear 1e-4..2e-2, T=1000, eps); "
                                  f"{src.description} records no diffusion process")
    if schedule:
        where = f"--schedule {schedule}"
    if prediction:
        where += f"; --prediction {prediction}"
    return apply_overrides(sched, schedule, prediction), where


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning corrupt/truncated files into a clear BqcError."""
    from safetensors.torch import load_file

    path = require_file(path, "weights file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError variants
        raise BqcError(
            f"{path} is not a readable safetensors file ({e}); it is probably truncated or corrupt",
            hint="re-copy or re-export the weights",
        ) from e


def load_state_dict_file(path: str | Path, *, prefix: str | None = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """Weights from safetensors or a torch checkpoint loaded with ``weights_only=True``.

    Lightning-style ``{"state_dict": ...}`` is unwrapped. When some keys start with ``prefix``
    (default: the LDM UNet's ``model.diffusion_model.``), only those are kept, prefix stripped
    (other keys, e.g. the autoencoder's, are dropped); ``prefix=None`` keeps every key as stored.
    """
    path = require_file(path, "weights file")
    if path.suffix == ".safetensors":
        sd = load_safetensors(path)
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise BqcError(
                f"{path} could not be read as a weights-only torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                hint="it may be truncated or corrupt, or contain pickled objects; bqc never unpickles weights by default",
            ) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BqcError(f"{path} does not hold a state dict of tensors")
    if prefix and any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _find_target_config(doc: Any, path: str) -> dict:
    """The ``{target, params}`` mapping of the UNet inside an LDM/guided-diffusion YAML."""
    if isinstance(doc, dict):
        try:
            unet = doc["model"]["params"]["unet_config"]
            if isinstance(unet, dict) and "target" in unet:
                return unet
        except (KeyError, TypeError):
            pass
        if "target" in doc:
            return doc
    raise BqcError(f"{path} has no 'target:' entry (looked at the top level and at model.params.unet_config)")


#: packages a config's ``target:`` may import without ``--trust-code``: bqc itself and the
#: libraries it runs on (their code runs anyway). A module outside them that this process has not
#: imported yet runs its code when imported, so the file would choose code to run.
TRUSTED_PACKAGES = ("bqc", "torch", "diffusers")


def _resolve_module_class(target: Any, path, trust_code: bool = False) -> type:
    """The ``nn.Module`` subclass named by a config's dotted ``target:``, found without calling anything.

    Importing the target's module runs that module's code (from PYTHONPATH): without
    ``trust_code`` only modules of :data:`TRUSTED_PACKAGES` and modules already imported are
    looked up (``target: antigravity.X`` opened a web browser, a package next to the YAML on
    PYTHONPATH ran). Nothing else is called before the check that the target is a class that
    builds an ``nn.Module``.
    """
    if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", target):
        raise BqcError(f"{path}: target: {target!r} is not a dotted path to a class (pkg.module.Class)")
    parts = target.split(".")
    if trust_code or parts[0] in TRUSTED_PACKAGES:
        obj = _import_target(target, parts, path)
    else:
        obj = _imported_target(target, parts, path)
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise BqcError(
            f"{path}: target: {target} is not an nn.Module class (it is {_what(obj)}); bqc only builds models from classes",
            hint="name the UNet class, e.g. target: ldm.modules.diffusionmodules.openaimodel.UNetModel",
        )
    return obj


def _import_target(target: str, parts: list[str], path) -> Any:
    """``target`` imported: the longest importable module prefix, then attributes."""
    err = None
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError as e:
            err = err or e
            continue
        try:
            for name in parts[i:]:
                obj = inspect.getattr_static(obj, name) if not inspect.ismodule(obj) else getattr(obj, name)
        except AttributeError as e:
            raise BqcError(f"cannot import {target} named in {path}: {e}", hint="put the model's code on PYTHONPATH") from e
        return obj
    raise BqcError(f"cannot import {target} named in {path}: {err}", hint="put the model's code on PYTHONPATH")


def _imported_target(target: str, parts: list[str], path) -> Any:
    """``target`` looked up without importing anything (no ``--trust-code``): from the longest
    prefix this process has imported already, attribute by attribute, static lookups only (a
    module's ``__getattr__`` runs no code here); a nested class (``pkg.mod.Outer.Inner``) is found
    when ``pkg.mod`` is imported. Anything that would need an import is refused."""
    for i in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:i]))
        if obj is None:
            continue
        try:
            for name in parts[i:]:
                obj = inspect.getattr_static(obj, name)
        except AttributeError:
            break
        return obj
    module = ".".join(parts[:-1])
    raise BqcError(
        f"{path} names target: {target}; importing {module} runs that package's code, which bqc does only when you "
        "say so",
        hint=f"pass --trust-code if you trust the package installed as '{parts[0]}' (it is imported from PYTHONPATH); "
             "bqc's own LDM-compatible UNet needs no flag: target: bqc.models.unet.UNetModel",
    )


def _what(obj: Any) -> str:
    if inspect.isclass(obj):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj):
        return f"the callable {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    return f"a {type(obj).__name__}"


def _load_from_yaml(config: str, weights: str | None, trust_code: bool = False) -> ModelSource:
    path = require_file(config, "config")
    doc = read_yaml_file(path, "config")
    spec = _find_target_config(doc, str(path))
    target, params = spec["target"], spec.get("params") or {}
    if not isinstance(params, dict):
        raise BqcError(f"{path}: params: of {target} must be a mapping, not {type(params).__name__}")
    params = dict(params)
    cls = _resolve_module_class(target, path, trust_code)
    try:
        module = cls(**params)
    except TypeError as e:
        raise BqcError(f"{target}(**params) from {path} failed: {e}", hint="check the params: keys") from e
    if weights is not None:
        sd = load_state_dict_file(weights)
        missing, unexpected = module.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise BqcError(
                f"weights {weights} do not match {target}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}",
            )
    src = _from_module(module, "config", f"{target} from {path}", ldm_params=params, config_path=str(path), target=target,
                       params=params)
    ldm = doc.get("model") if isinstance(doc, dict) else None
    if isinstance(ldm, dict) and isinstance(ldm.get("params"), dict):  # LDM: model.params holds the process
        from bqc.diffusion.schedule import NoiseSchedule

        src.schedule = NoiseSchedule.from_ldm(ldm["params"], f"{path} model.params")
        src.schedule_from = f"{path} (LDM model.params)"
    return src


# --------------------------------------------------------------------------------------------
# torch.export programs and pickles
# --------------------------------------------------------------------------------------------
#: members of a torch.export archive (relative to its root folder) that are read without
#: unpickling: plain text / JSON, and raw tensor bytes named by the JSON payload configs
_PT2_TEXT_MEMBERS = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_PT2_MODEL_RX = re.compile(r"^models/([^/]+)\.json$")
_PT2_RAW_RX = re.compile(r"^data/(?:weights/weight_\d+|constants/tensor_\d+)$")
_PT2_CONFIG_RX = re.compile(r"^data/(weights|constants)/([^/]+)_(?:weights|constants)_config\.json$")
_PT2_SAMPLE_RX = re.compile(r"^data/sample_inputs/([^/]+)\.pt$")


def _refuse_pickle(path, what: str) -> BqcError:
    return BqcError(
        f"{path} {what}; loading it could run code from the file, so bqc refuses it",
        hint="re-export the model with torch.export.save from plain tensors, or pass --trust-pickle if you trust the file",
    )


def vet_pt2(path: Path, data: bytes | None = None) -> bytes:
    """Refuse a .pt2 archive that would make ``torch.export.load`` unpickle anything or load native code.

    Every member is checked against what torch 2.x reads from it: text and JSON members, raw
    tensor bytes named by the payload configs (no config entry may be a pickle, a torchbind or an
    opaque object), and the sample inputs, which ``torch.export.load`` unpickles *without*
    restriction when the restricted (weights-only) load fails, so they must load weights-only
    here. Anything else (AOTInductor libraries, legacy pickled weights, unknown members) is
    refused. Returns the bytes that were vetted, to be loaded from memory (no re-read).
    """
    import io

    if data is None:
        data = Path(path).read_bytes()
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise BqcError(f"{path} is not a torch.export archive (not a zip file); it may be truncated") from e
    with z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        if not names:
            raise BqcError(f"{path} is an empty zip file, not a torch.export archive")
        from bqc.runtime import require_memory

        # members are read (inflated) into memory, at most their declared size each: a zip bomb of a
        # few KB declaring 100s of GB is refused here, not by the OOM killer
        require_memory(sum(i.file_size for i in infos), f"{path}: its {len(infos)} zip members need, unpacked,",
                       hint="a torch.export archive of a UNet is its weights' size; this one may be a zip bomb")
        if len(set(names)) != len(names):
            raise BqcError(f"{path} has duplicate zip members; refusing an archive that readers may read differently")
        root = names[0].split("/", 1)[0] + "/"
        if any(not n.startswith(root) for n in names):
            raise BqcError(f"{path} is not a torch.export archive (its members are not under one root folder)")
        rel = {n[len(root):]: n for n in names}
        if "archive_format" not in rel or z.read(rel["archive_format"]).strip() != b"pt2":
            raise BqcError(f"{path} is a zip file but not a torch.export archive (no archive_format 'pt2' member)",
                           hint=f"it holds {_describe_zip(set(rel))}" if _describe_zip(set(rel)) else None)
        models = {m.group(1) for r in rel if (m := _PT2_MODEL_RX.match(r))}
        if "model" not in models:
            raise BqcError(f"{path} is a torch.export archive without a program named 'model' (models/model.json)")
        for r, full in rel.items():
            if _PT2_MODEL_RX.match(r):
                _vet_program_json(path, r, z.read(full))
                continue
            if r in _PT2_TEXT_MEMBERS or r.endswith("/") or _PT2_RAW_RX.match(r) \
                    or (r.startswith("extra/") and r.count("/") == 1):
                continue
            m = _PT2_CONFIG_RX.match(r)
            if m:
                try:
                    cfg = json.loads(z.read(full)).get("config", {})
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError) as e:
                    raise BqcError(f"{path}: {r} is not valid JSON") from e
                prefix = "weight_" if m.group(1) == "weights" else "tensor_"
                bad = [k for k, v in cfg.items() if not isinstance(v, dict) or v.get("use_pickle")
                       or not v.get("tensor_meta") or not str(v.get("path_name", "")).startswith(prefix)]
                if bad:
                    raise _refuse_pickle(path, f"stores {len(bad)} {m.group(1)} entries as pickled or custom objects "
                                               f"(e.g. {bad[0]})")
                continue
            if _PT2_SAMPLE_RX.match(r):
                _vet_torch_save(path, r, z.read(full))
                continue
            if r.startswith("data/aotinductor/"):
                raise BqcError(f"{path} holds an AOTInductor-compiled library ({r}); loading it runs native code",
                               hint="save the program with torch.export.save (no AOTInductor package)")
            if re.match(r"^data/(weights|constants)/[^/]+\.pt$", r):
                raise _refuse_pickle(path, f"uses the legacy pickled weights format ({r})")
            raise BqcError(f"{path}: unexpected member {r} in a torch.export archive; refusing what bqc cannot vet",
                           hint="re-export with torch.export.save from this torch version, or pass --trust-pickle if you trust the file")
    return data


# The program JSON is not inert either: torch's deserializer passes every symbolic expression to
# sympy.sympify (which eval()s it), ep.module() exec()s the ``guards_code`` strings, and fx
# writes stack traces into the Python source it generates. So each of those is checked against
# the narrow grammar torch.export itself writes.
_SYMBOL_RX = re.compile(r"^[a-z]{1,4}\d+$")  # s0, u3, zuf0 ...
_SYMPY_CALLS = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "sqrt",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
}
_SYMPY_NAMES = {"oo", "zoo", "nan", "true", "false", "pi", "E"}
_GUARD_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_GUARD_CALLS = {"IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"}
_MATH_ATTRS = {"isnan", "inf", "floor", "ceil", "trunc", "sqrt"}


def _safe_expr(text: str, *, guard: bool) -> bool:
    """Whether ``text`` is an arithmetic/comparison expression over the allowed names only
    (no attribute access beyond size()/stride()/math.*, no strings except symbol names and
    ``L['input']`` keys): such an expression cannot reach code when eval()ed."""
    import ast

    if not isinstance(text, str) or len(text) > 20_000 or "\r" in text or "\x00" in text:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    ok_ops = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not,
              ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Load)

    def ok(n) -> bool:
        if isinstance(n, ast.Expression):
            return ok(n.body)
        if isinstance(n, ok_ops):
            return True
        if isinstance(n, ast.Constant):
            return isinstance(n.value, (int, float, bool)) or n.value is None
        if isinstance(n, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare)):
            return all(ok(c) for c in ast.iter_child_nodes(n))
        if isinstance(n, ast.Name):
            if guard:
                return n.id in ("L", "math") or n.id in _GUARD_CALLS
            return n.id in _SYMPY_CALLS or n.id in _SYMPY_NAMES or bool(_SYMBOL_RX.match(n.id))
        if isinstance(n, ast.Call):
            if not guard:
                if not (isinstance(n.func, ast.Name) and n.func.id in _SYMPY_CALLS):
                    return False
                args = list(n.args)
                if n.func.id == "Symbol" and args and isinstance(args[0], ast.Constant):
                    if not (isinstance(args[0].value, str) and _SYMBOL_RX.match(args[0].value)):
                        return False
                    args = args[1:]
                return all(ok(a) for a in args) and all(
                    k.arg is not None and k.arg.isidentifier() and isinstance(k.value, ast.Constant)
                    and isinstance(k.value.value, bool) for k in n.keywords)
            if n.keywords:
                return False
            f = n.func
            if isinstance(f, ast.Attribute) and f.attr in _GUARD_METHODS and not n.args:
                return ok(f.value)
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "math" \
                    and f.attr in _MATH_ATTRS:
                return all(ok(a) for a in n.args)
            if isinstance(f, ast.Name) and f.id in _GUARD_CALLS:
                return all(ok(a) for a in n.args)
            return False
        if guard and isinstance(n, ast.Attribute):
            return isinstance(n.value, ast.Name) and n.value.id == "math" and n.attr in _MATH_ATTRS
        if guard and isinstance(n, ast.Subscript):
            key = n.slice
            if not isinstance(key, ast.Constant):
                return False
            if isinstance(key.value, str):
                return key.value.isidentifier() and ok(n.value)
            return isinstance(key.value, int) and ok(n.value)
        return False

    return ok(tree)


def _vet_program_json(path, member: str, blob: bytes) -> None:
    try:
        doc = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BqcError(f"{path}: {member} is not valid JSON") from e

    def refuse(what: str) -> BqcError:
        return BqcError(
            f"{path}: {member} holds {what}; torch would evaluate it as code while loading, so bqc refuses the file",
            hint="re-export the model with torch.export.save, or pass --trust-pickle if you trust the file",
        )

    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if k == "expr_str" and not _safe_expr(item, guard=False):
                    raise refuse(f"a symbolic expression that is not plain arithmetic ({str(item)[:80]!r})")
                if k == "guards_code":
                    for g in item if isinstance(item, list) else [item]:
                        if not _safe_expr(g, guard=True):
                            raise refuse(f"a guard that is not a plain shape check ({str(g)[:80]!r})")
                    continue
                stack.append(item)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str) and ("\r" in v or "\x00" in v):
            raise refuse("a string with a carriage return or NUL (it could break out of generated code)")


def _vet_program(path, ep) -> None:
    """After deserialising (which calls nothing in the graph) and before ``ep.module()`` (which
    generates and exec()s Python code): every op must be an operator, not an arbitrary callable
    reachable from ``torch``/``math``/``operator``, and every name that ends up in generated code
    must be a plain dotted identifier."""
    import operator

    from torch._export.serde.serialize import _SYM_OPS
    from torch.export.graph_signature import ConstantArgument, TensorArgument

    allowed = set(_SYM_OPS) | {operator.getitem}
    ident = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")

    def refuse(what: str) -> BqcError:
        return BqcError(f"{path}: the program {what}; bqc runs only programs made of operators",
                        hint="re-export the model with torch.export.export/save, or pass --trust-pickle if you trust the file")

    for gm in ep.graph_module.modules():
        graph = getattr(gm, "graph", None)
        if graph is None:
            continue
        for n in graph.nodes:
            if n.op == "call_function":
                t = n.target
                if not (isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator))
                        or t in allowed):
                    raise refuse(f"calls {getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', t)!s}, which is not an operator")
            elif n.op in ("call_method", "call_module"):
                raise refuse(f"has a {n.op} node ({n.target})")
            elif n.op == "get_attr" and not ident.match(str(n.target)):
                raise refuse(f"reads an attribute with an odd name ({str(n.target)[:60]!r})")
    names = [*ep.state_dict, *ep.constants, *(s.target for s in ep.graph_signature.input_specs if s.target)]
    bad = [k for k in names if not ident.match(str(k))]
    if bad:
        raise refuse(f"names a weight oddly ({str(bad[0])[:60]!r})")
    for spec in ep.graph_signature.input_specs:
        arg = spec.arg
        if isinstance(arg, ConstantArgument):
            if not (arg.value is None or isinstance(arg.value, (int, float, bool))):
                raise refuse(f"has a constant input of type {type(arg.value).__name__}")
        elif not isinstance(arg, TensorArgument):
            raise refuse(f"has an input of kind {type(arg).__name__}")
    for spec in (ep.call_spec.in_spec, ep.call_spec.out_spec):
        todo = [spec] if spec is not None else []
        while todo:
            sp = todo.pop()
            if sp.type not in (None, tuple, list, dict) and not sp.is_leaf():
                raise refuse(f"takes or returns a {getattr(sp.type, '__name__', sp.type)} (only tuples, lists, dicts)")
            if sp.type is dict and not all(isinstance(k, (str, int)) for k in (sp.context or [])):
                raise refuse("has dict inputs with odd keys")
            todo.extend(sp.children())


def _vet_torch_save(path, member: str, blob: bytes) -> None:
    """A ``torch.save`` member must load with the restricted weights-only unpickler."""
    import io

    if not blob:
        return
    try:
        torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception:
        raise _refuse_pickle(path, f"has a member ({member}) that does not load as plain tensors (a pickle of objects)") from None


class _MemoTypeHints:
    """Stands in for the ``typing`` module inside torch's export deserializer, with
    ``get_type_hints`` memoised: the deserializer asks it again for every node of the program
    (always the same few schema dataclasses), about a third of loading an artifact's base.pt2."""

    def __init__(self, typing_module):
        self._typing, self._hints = typing_module, {}

    def __getattr__(self, name):
        return getattr(self._typing, name)

    def get_type_hints(self, obj, globalns=None, localns=None, include_extras=False):
        key = (obj, id(globalns), id(localns), include_extras)
        if key not in self._hints:
            self._hints[key] = self._typing.get_type_hints(obj, globalns=globalns, localns=localns,
                                                           include_extras=include_extras)
        return self._hints[key]


@contextlib.contextmanager
def _fast_export_load():
    """:class:`_MemoTypeHints` in torch's deserializer for the duration (a no-op if torch moved it)."""
    try:
        from torch._export.serde import serialize as serde
    except ImportError:
        yield
        return
    orig = getattr(serde, "typing", None)
    if orig is None or not hasattr(orig, "get_type_hints"):
        yield
        return
    serde.typing = _MemoTypeHints(orig)
    try:
        yield
    finally:
        serde.typing = orig


def _torch_export_load(data: bytes):
    import io

    with _fast_export_load():
        return torch.export.load(io.BytesIO(data))


def load_exported(path: str | Path, *, trust_pickle: bool = False):
    """``torch.export.load`` that never unpickles (unless ``trust_pickle``) or loads native code.

    The archive is read once, vetted (:func:`vet_pt2`) and loaded from those bytes; while it
    loads, ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` makes every ``torch.load`` inside torch restricted.
    """
    import os

    path = Path(path)
    data = path.read_bytes() if trust_pickle else vet_pt2(path)
    if trust_pickle:
        try:
            return _torch_export_load(data)
        except Exception as e:
            raise BqcError(f"{path} could not be loaded as a torch.export program ({type(e).__name__}: {str(e)[:200]})") from e
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        ep = _torch_export_load(data)
        _vet_program(path, ep)
        return ep
    except BqcError:
        raise
    except Exception as e:
        raise BqcError(f"{path} could not be loaded as a torch.export program ({type(e).__name__}: {str(e)[:200]})") from e
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


def _load_pt2(path: Path, trust_pickle: bool) -> ModelSource:
    ep = load_exported(path, trust_pickle=trust_pickle)
    x = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in _user_input_names(ep)]
    shape = x[0].meta["val"].shape if x else None
    if shape is None or len(shape) != 4:
        raise BqcError(f"{path}: the first input is not an image batch (N,C,H,W)")
    names = _user_input_names(ep)
    ctx = next((n for n in ep.graph.nodes if n.op == "placeholder" and n.name == CONTEXT_INPUT and n.name in names), None)
    context = None
    if ctx is not None:
        cshape = ctx.meta["val"].shape
        if len(cshape) != 3:
            raise BqcError(f"{path}: the input named context is not a batch of token embeddings (N, L, D)")
        context = (int(cshape[1]), int(cshape[2]))
    ncls = 1 if len(names) - (ctx is not None) >= 3 else None
    info = {"path": str(path), **({"context": list(context)} if context else {})}
    return ModelSource("pt2", f"torch.export program {path}", exported=ep, in_channels=int(shape[1]),
                       image_size=int(shape[2]), num_classes=ncls, info=info, context=context)


def _user_input_names(ep) -> list[str]:
    from torch.export.graph_signature import InputKind

    return [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]


def _load_pickled_module(path: Path, trust_pickle: bool, kind: str = "pickle") -> ModelSource:
    if not trust_pickle:
        try:  # a weights-only file is a state dict, not a model
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            raise BqcError(
                f"{path} is {FILE_KINDS.get(kind, 'a pickled Python object')}; unpickling it can run arbitrary code, "
                "so bqc refuses by default",
                hint="if you trust the file, pass --trust-pickle; better, export it once with torch.export.save (.pt2) "
                "or save a state dict and load it with --config model.yaml --weights file",
            ) from None
        raise BqcError(
            f"{path} holds a state dict ({len(sd)} entries), not a model",
            hint="give the architecture with --config model.yaml (or a bqc config.json) and pass this file as --weights",
        )
    module = torch.load(str(path), map_location="cpu", weights_only=False)  # explicitly trusted
    if not isinstance(module, nn.Module):
        raise BqcError(f"{path} holds a {type(module).__name__}, not an nn.Module")
    call = "diffusers" if hasattr(getattr(module, "config", None), "sample_size") else "plain"
    return _from_module(module, "pickle", f"pickled module {path}", call=call, path=str(path))


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------
#: the graph input that carries the text embedding (the adapter's argument name)
CONTEXT_INPUT = "context"


class UNetAdapter(nn.Module):
    """Gives every UNet the signature ``(x, t[, y]) -> eps`` before export."""

    def __init__(self, unet: nn.Module, call: str, conditional: bool):
        super().__init__()
        self.unet = unet
        self.call = call
        self.conditional = conditional

    def forward(self, x, t, y=None):
        if self.call == "diffusers":
            out = self.unet(x, t, class_labels=y) if self.conditional else self.unet(x, t)
            return out.sample
        return self.unet(x, t, y) if self.conditional else self.unet(x, t)


class TextUNetAdapter(UNetAdapter):
    """``(x, t, context[, y]) -> eps`` for text-conditioned UNets (the text embedding is the third
    graph input, named ``context``). The model is called with keywords, as both families name
    them: diffusers ``encoder_hidden_states``/``class_labels``, LDM ``context``/``y``."""

    def forward(self, x, t, context, y=None):
        cond = {"y": y} if self.conditional else {}
        if self.call == "diffusers":
            cond = {"class_labels": y} if self.conditional else {}
            return self.unet(x, t, encoder_hidden_states=context, **cond).sample
        return self.unet(x, t, context=context, **cond)


def example_inputs(src: ModelSource, batch: int = 2) -> tuple:
    """``(x, t[, context][, y])`` for ``src``: random images, timesteps, text embeddings, labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, src.in_channels, src.image_size, src.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = (torch.randn(batch, *src.context, generator=g),) if src.context is not None else ()
    y = (torch.randint(0, max(int(src.num_classes), 1), (batch,), generator=g),) if src.num_classes else ()
    p = next(src.module.parameters(), None) if src.module is not None else None
    dev = p.device if p is not None else torch.device("cpu")  # e.g. a model built on the meta device: shapes only
    return tuple(a.to(dev) for a in (x, t, *ctx, *y))


def capture(src: ModelSource):
    """Export ``src`` with a dynamic batch; failures become a BqcError naming op and line."""
    if src.exported is not None:
        return require_dynamic_batch(src.exported, src)
    args = example_inputs(src)
    cls = TextUNetAdapter if src.context is not None else UNetAdapter
    adapter = cls(src.module, src.call, conditional=bool(src.num_classes)).eval()
    dyn = tuple({0: torch.export.Dim.AUTO} for _ in args)
    try:
        with torch.no_grad():
            ep = torch.export.export(adapter, args, dynamic_shapes=dyn, strict=False)
    except Exception as e:  # export raises many types; all become one explanation
        raise capture_error(e, src) from e
    return require_dynamic_batch(ep, src)


def require_dynamic_batch(ep, src: ModelSource):
    """Refuse a program whose batch dimension is fixed: it would transform, then fail in
    ``bqc train`` / ``sample`` / ``eval``, which run other batch sizes."""
    names = _user_input_names(ep)
    x = next((n for n in ep.graph.nodes if n.op == "placeholder" and n.name in names), None)
    val = x.meta.get("val") if x is not None else None
    if val is None or not hasattr(val, "shape") or not len(val.shape) or not isinstance(val.shape[0], int):
        return ep
    b = int(val.shape[0])
    if src.exported is not None:
        raise BqcError(
            f"{src.description} has a static batch size ({b}): torch.export fixes every dimension not marked "
            f"dynamic, so the program only runs batches of {b}, and bqc train / sample / eval run other sizes",
            hint="re-export with a dynamic batch: b = torch.export.Dim('batch'); torch.export.export(model, (x, t), "
            "dynamic_shapes={'x': {0: b}, 't': {0: b}}) (keys: your forward's argument names; add 'y': {0: b} "
            "for class labels), then torch.export.save(ep, 'model.pt2')",
        )
    raise BqcError(
        f"capturing {src.description} fixed the batch size to {b}: the model's code depends on the batch size "
        "(e.g. a reshape or expand with a literal batch), so the program would only run batches of that size",
        hint="use x.shape[0] (or -1) instead of a fixed batch size in the model's forward",
    )


def capture_error(e: Exception, src: ModelSource) -> BqcError:
    """Explain a failed capture: where in the user's code, which op, and what to do."""
    text = str(e)
    frames = re.findall(r'File "([^"]+)", line (\d+)', text)
    import traceback

    tb = traceback.extract_tb(e.__traceback__)
    # library frames are those inside the installed torch / bqc packages (by location, not by a
    # "/bqc/" substring: a clone of the repository is itself usually called bqc/)
    import os
    import sys

    pkgs = [sys.modules[k] for k in ("torch", "bqc", "bqc.passes", "bqc.backends") if k in sys.modules]
    libs = tuple(str(Path(d).resolve()) + os.sep for m in pkgs for d in m.__path__)

    def is_user(filename: str) -> bool:
        return not filename.startswith("<") and not str(Path(filename).resolve()).startswith(libs)

    user = [f for f in tb if is_user(f.filename)]
    frames = [fr for fr in frames if is_user(fr[0])]
    where = f"{user[-1].filename}:{user[-1].lineno} ({(user[-1].line or '').strip()})" if user else (
        f"{frames[-1][0]}:{frames[-1][1]}" if frames else "unknown location")
    first = next((ln for ln in text.splitlines() if ln.strip()), type(e).__name__)[:300]
    hint = (
        "make the failing line independent of tensor values (no .item(), no data-dependent if/while), "
        "give a concrete argument (e.g. class labels for a conditional model), or export the model "
        "yourself with torch.export.export and pass the .pt2; untraceable helper modules can be kept whole "
        "by exporting a wrapper that calls them as one op"
    )
    return BqcError(f"capturing {src.description} failed at {where}: {type(e).__name__}: {first}", hint=hint)
