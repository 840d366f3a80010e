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
``config``         ``--config file.yaml``: ``target: pkg.mod.Class`` + ``params:`` (also nested
                   at ``model.params.unet_config``), code importable from PYTHONPATH,
                   optional ``--weights`` (safetensors or a ``weights_only`` torch checkpoint)
``pt2``            a ``torch.export`` program; refused if it carries pickled entries
``pickle``         a whole pickled module (``torch.save(model)``), only with ``trust_pickle``
=================  ==========================================================================

Capture: every source becomes a ``torch.export`` program of a thin adapter with the uniform
signature ``(x, t[, y]) -> eps`` and a dynamic batch dimension; :func:`bqc.ir.from_exported`
turns it into the one IR form used downstream (see ``bqc/ir.py``).
``torch.fx.symbolic_trace`` is not used: it fails on the code people actually ship (len() on
shapes, asserts, ``torch.tensor(timestep)``, required label arguments).
"""
from __future__ import annotations

import importlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bqc.errors import BqcError, require_file


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


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def load_source(
    model: str | None = None,
    *,
    config: str | None = None,
    weights: str | None = None,
    trust_pickle: bool = False,
) -> ModelSource:
    """Load a model from a zoo name, a directory, a file or an instantiate-from-config YAML."""
    if config is not None:
        return _load_from_yaml(config, weights)
    if model is None:
        raise BqcError("no model given", hint="pass a zoo name (e.g. mnist16), a model directory, a .pt2 file, or --config file.yaml")
    if not Path(model).exists() and _is_zoo_name(model):
        return _load_zoo(model)
    path = require_file(model, "model")
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise BqcError(f"{path} is a directory without config.json, so it is neither a bqc checkpoint nor a diffusers model directory")
        cfg = _read_json(cfg_path)
        if "_class_name" in cfg:
            return _load_diffusers(path, cfg)
        return _load_bqc_dir(path, weights)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return _load_pt2(path, trust_pickle)
    if suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return _load_pickled_module(path, trust_pickle)
    if suffix in (".yaml", ".yml"):
        return _load_from_yaml(str(path), weights)
    if suffix == ".json":
        return _load_bqc_dir(path, weights)
    raise BqcError(
        f"don't know how to load {path}",
        hint="give a zoo name, a model directory (bqc or diffusers), a .pt2 export, --config file.yaml, or a pickled module with --trust-pickle",
    )


def _is_zoo_name(name: str) -> bool:
    from bqc.models import zoo

    return name in zoo.CONFIGS


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BqcError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e


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
            hint="pass --input-shape C,H,W",
        )
    return int(in_ch), int(size), getattr(module, "num_classes", None)


def _from_module(module: nn.Module, kind: str, description: str, call: str = "plain", **info) -> ModelSource:
    module = module.eval()
    in_ch, size, ncls = _model_facts(module)
    return ModelSource(kind, description, module=module, in_channels=in_ch, image_size=size,
                       num_classes=ncls, call=call, info=info)


def _load_zoo(name: str) -> ModelSource:
    from bqc.models import zoo

    shipped = Path(zoo.__file__).parent / "checkpoints" / name
    pretrained = (shipped / zoo.WEIGHTS_FILE).exists()
    if pretrained:
        module, cfg = zoo.load_model(shipped)
    else:
        module, cfg = zoo.build_model(name), zoo.model_config(name)
    desc = f"zoo model {name}" + (" (shipped pretrained weights)" if pretrained else " (random init: no shipped weights)")
    return _from_module(module, "zoo", desc, name=name, config=cfg, pretrained=pretrained)


def _load_bqc_dir(path: Path, weights: str | None) -> ModelSource:
    from bqc.models import zoo

    module, cfg = zoo.load_model(path, weights=weights)
    return _from_module(module, "bqc", f"bqc checkpoint {path}", path=str(path), config=cfg)


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
    module = cls.from_config(cfg)
    module.load_state_dict(load_safetensors(weights), strict=True)
    if cls_name == "UNet2DConditionModel":
        raise BqcError("UNet2DConditionModel needs text conditioning inputs, which bqc does not thread yet", hint="use a UNet2DModel")
    return _from_module(module, "diffusers", f"diffusers {cls_name} {path}", call="diffusers", path=str(path), config=cfg)


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


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors or a torch checkpoint loaded with ``weights_only=True``.

    Lightning-style ``{"state_dict": ...}`` is unwrapped and the LDM prefix
    ``model.diffusion_model.`` stripped (other keys, e.g. the autoencoder's, are dropped).
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
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in sd):
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


def _load_from_yaml(config: str, weights: str | None) -> ModelSource:
    import yaml

    path = require_file(config, "config")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BqcError(f"{path} is not valid YAML: {e}") from e
    spec = _find_target_config(doc, str(path))
    target, params = spec["target"], dict(spec.get("params") or {})
    mod_name, _, cls_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise BqcError(f"cannot import {target} named in {path}: {e}", hint="put the model's code on PYTHONPATH") from e
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
    src = _from_module(module, "config", f"{target} from {path}", config_path=str(path), target=target, params=params)
    return src


# --------------------------------------------------------------------------------------------
# torch.export programs and pickles
# --------------------------------------------------------------------------------------------
def vet_pt2(path: Path) -> None:
    """Refuse a .pt2 archive that would make ``torch.export.load`` unpickle anything."""
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise BqcError(f"{path} is not a torch.export archive (not a zip file); it may be truncated") from e
    with z:
        names = z.namelist()
        for name in names:
            if name.endswith("_config.json") and ("/data/weights/" in name or "/data/constants/" in name):
                cfg = json.loads(z.read(name)).get("config", {})
                pickled = [k for k, v in cfg.items() if v.get("use_pickle") or "tensor_meta" not in v]
                if pickled:
                    raise BqcError(
                        f"{path} stores {len(pickled)} entries as pickles (e.g. {pickled[0]}); loading them could run code",
                        hint="re-export the model with plain tensors, or pass --trust-pickle if you trust the file",
                    )
            if re.search(r"/data/weights/[^/]+\.pt$", name):
                raise BqcError(f"{path} uses the legacy pickled weights format", hint="re-export with torch.export.save, or pass --trust-pickle")


def _load_pt2(path: Path, trust_pickle: bool) -> ModelSource:
    if not trust_pickle:
        vet_pt2(path)
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise BqcError(f"{path} could not be loaded as a torch.export program ({type(e).__name__}: {str(e)[:200]})") from e
    x = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in _user_input_names(ep)]
    shape = x[0].meta["val"].shape if x else None
    if shape is None or len(shape) != 4:
        raise BqcError(f"{path}: the first input is not an image batch (N,C,H,W)")
    ncls = 1 if len(_user_input_names(ep)) >= 3 else None
    return ModelSource("pt2", f"torch.export program {path}", exported=ep, in_channels=int(shape[1]),
                       image_size=int(shape[2]), num_classes=ncls, info={"path": str(path)})


def _user_input_names(ep) -> list[str]:
    from torch.export.graph_signature import InputKind

    return [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]


def _load_pickled_module(path: Path, trust_pickle: bool) -> ModelSource:
    if not trust_pickle:
        try:  # a weights-only file is a state dict, not a model
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            raise BqcError(
                f"{path} is a pickled Python object; unpickling it can run arbitrary code, so bqc refuses by default",
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


def example_inputs(src: ModelSource, batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, src.in_channels, src.image_size, src.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    if src.num_classes:
        return x, t, torch.randint(0, max(int(src.num_classes), 1), (batch,), generator=g)
    return x, t


def capture(src: ModelSource):
    """Export ``src`` with a dynamic batch; failures become a BqcError naming op and line."""
    if src.exported is not None:
        return src.exported
    args = example_inputs(src)
    adapter = UNetAdapter(src.module, src.call, conditional=len(args) == 3).eval()
    dyn = tuple({0: torch.export.Dim.AUTO} for _ in args)
    try:
        with torch.no_grad():
            return torch.export.export(adapter, args, dynamic_shapes=dyn, strict=False)
    except Exception as e:  # export raises many types; all become one explanation
        raise capture_error(e, src) from e


def capture_error(e: Exception, src: ModelSource) -> BqcError:
    """Explain a failed capture: where in the user's code, which op, and what to do."""
    text = str(e)
    frames = re.findall(r'File "([^"]+)", line (\d+)', text)
    import traceback

    tb = traceback.extract_tb(e.__traceback__)
    user = [f for f in tb if "/torch/" not in f.filename and "/bqc/" not in f.filename]
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
