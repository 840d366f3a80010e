"""Deploy artifacts: a folded model saved as safetensors + JSON, loaded without replaying anything.

A QAT artifact (:mod:`bqc.artifact`) is loaded by replaying its recipe on the captured float
program and needs the float weights (~9 MB for mnist16). A deploy artifact is the folded graph
itself, in its smallest faithful form (a few hundred KB for a binary mnist16)::

    deploy.json          "format": "bqc-deploy", "version" (:data:`VERSIONS`: 1, or 2 when the
                         graph holds a module class added in 2, :data:`SINCE`), "layout_version"
                         (bqc.packing);
                         provenance: "source" (model kind/name), "recipe" (name), "wbits",
                         "abits", "ebb", "train" (the source artifact's train record),
                         "calibration", "artifact" (the source folder's name and content
                         hashes) -- host absolute paths are reduced to their last part;
                         "diffusion" (schedule + prediction, as in bqc.json);
                         "signature" (:meth:`bqc.signature.Signature.to_json`: inputs, TBS
                         state inputs/outputs and flag, outputs);
                         "sizes" and "layers" (deploy_summary: a layer table for humans);
                         "graph": "meta" (graph annotations) and "nodes" in order, each with
                         name, op, target, args, kwargs and its bqc annotation;
                         "modules": the module tree in order, each with its path, class name,
                         plain attributes (deploy modules only) and tensors (dtype, shape)
    deploy.safetensors   every parameter and buffer by dotted path; packed sign words stay
                         packed (uint32), weight codes int8, activation steps float64

Loading parses JSON and safetensors only. It never unpickles, and it imports or calls nothing
the file names except what these allowlists hold:

* call_function targets: :data:`ATEN_OPS` (resolved as ``torch.ops.aten.<op>.<overload>`` by
  name, only names in the list), :data:`OPERATORS` (``operator.getitem`` / ``mul``: tuple
  outputs and symbolic batch sizes), and bqc's own ``bqc::*`` ops (:data:`bqc.deploy.ops.OP_NAMES`);
* modules: plain ``torch.nn.Module`` containers and the deploy modules of :data:`MODULES`,
  rebuilt without running their constructors from their recorded attributes (each checked
  against the class's declared ones) and tensors (checked against the recorded dtype/shape
  and each layer's geometry);
* argument values: JSON scalars and lists, and tagged ``{"$tuple"|"$node"|"$dtype"|"$device"|
  "$layout"|"$memory_format"|"$slice"|"$float"|"$set": ...}``.

Anything else (an unknown op or class, an unexpected attribute, a tensor that does not fit, a
corrupt file) is a :class:`~bqc.errors.BqcError` (exit 2) before anything runs.
:data:`ATEN_OPS` is frozen: the ops of the deploy graphs of the zoo models (mnist16,
ddim-cifar10, ldm4-bedrooms) and of the text-conditioned UNets of both families (LDM
SpatialTransformer, diffusers UNet2DConditionModel; tests/test_text2img.py's tiny configs) under
every recipe, found by :func:`graph_functions` over their transformed graphs (folding rewrites
modules only, never ATen ops). A model that needs another
op is refused by :meth:`DeployArtifact.save` with the op's name.
"""
from __future__ import annotations

import dataclasses
import json
import keyword
import math
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

import bqc.models as _models
from bqc import __version__, ir, packing
from bqc.errors import BqcError, json_object_or_empty, read_text_file
from bqc.signature import Signature

from . import modules as M
from .ops import LAYOUT_VERSION, OP_NAMES
from .summary import deploy_summary, is_deployed

FORMAT = "bqc-deploy"
#: the deploy.json versions this bqc reads: 2 added the ``UnsignedBinarize`` input (``"bits01"``
#: binary layers); a file is written with the lowest version that can hold its modules
#: (:func:`format_version`), so one without them stays version 1, readable by older bqc
VERSIONS = (1, 2)
VERSION = VERSIONS[-1]
#: module class -> the deploy.json version that added it (a file of an older version holding it is refused)
SINCE = {"UnsignedBinarize": 2}
DEPLOY_JSON = "deploy.json"
DEPLOY_TENSORS = "deploy.safetensors"
DEPLOY_FILES = (DEPLOY_JSON, DEPLOY_TENSORS)

#: where shipped models live (``bqc.models``); a folder here holding deploy.json is reachable by its name
CHECKPOINTS = Path(_models.__file__).parent / "checkpoints"

#: ATen ops a saved deploy graph may call (see the module docstring for how it was derived)
ATEN_OPS = (
    "aten.add.Tensor", "aten.arange.start", "aten.bmm.default", "aten.cat.default", "aten.conv1d.default",
    "aten.conv2d.default", "aten.cos.default", "aten.div.Tensor", "aten.dropout.default", "aten.exp.default",
    "aten.group_norm.default", "aten.linear.default", "aten.mul.Tensor", "aten.reshape.default",
    "aten.silu.default", "aten.sin.default", "aten.slice.Tensor", "aten.softmax.int", "aten.split.Tensor",
    "aten.squeeze.dim", "aten.sym_size.int", "aten.to.dtype", "aten.to.dtype_layout", "aten.transpose.int",
    "aten.unsqueeze.default", "aten.upsample_nearest2d.vec",
    # text-conditioned UNets (LDM SpatialTransformer, diffusers Transformer2DModel; issue 16)
    "aten._softmax.default", "aten.chunk.default", "aten.contiguous.default", "aten.expand.default",
    "aten.gelu.default", "aten.layer_norm.default", "aten.matmul.default", "aten.permute.default",
    "aten.view.default",
)
#: Python operators a saved deploy graph may call
OPERATORS = (operator.getitem, operator.mul)
#: the largest dimension a deploy graph's input or state may declare (a 100000x100000 input asked 40 GB)
MAX_DIM = 8192

_PAIR = "pair"
_CONV = {"in_channels": int, "out_channels": int, "kernel_size": _PAIR, "stride": _PAIR, "padding": _PAIR,
         "dilation": _PAIR, "groups": int}
_LINEAR = {"in_features": int, "out_features": int}
_ACTS = ("SignBinarize", "QuantizeCodes")
_LAYER_PARTS = {"act": _ACTS, "post": ("RPReLU",)}
_CONV_PARTS = {**_LAYER_PARTS, "kmap": ("KMap",), "out_scale": ("OutScale",), "shortcut": ("Shortcut",)}
# binary-weight layers also take packed {0, 1} activations
_BINARY_LAYER_PARTS = {**_LAYER_PARTS, "act": _ACTS + ("UnsignedBinarize",)}
_BINARY_CONV_PARTS = {**_CONV_PARTS, "act": _BINARY_LAYER_PARTS["act"]}

#: deploy module class name -> (class, plain attributes and their kind (int, "pair" or the
#: allowed strings), buffers, child slots and the classes allowed in each)
MODULES: dict[str, tuple[type, dict, tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "SignBinarize": (M.SignBinarize, {"ch_axis": int}, ("tau",), {}),
    "QuantizeCodes": (M.QuantizeCodes, {"qmin": int, "qmax": int, "bits": int}, ("step",), {}),
    "UnsignedBinarize": (M.UnsignedBinarize, {"ch_axis": int}, ("step",), {}),
    "KMap": (M.KMap, {"stride": _PAIR, "padding": _PAIR, "dilation": _PAIR}, ("weight",), {}),
    "OutScale": (M.OutScale, {}, ("alpha", "beta", "gamma"), {}),
    "Shortcut": (M.Shortcut, {"stride": _PAIR, "channels": ("same", "pool", "conv"), "out_channels": int},
                 ("scale", "proj"), {}),
    "RPReLU": (M.RPReLU, {"ch_axis": int}, ("gamma", "slope", "zeta"), {}),
    "TBSBlend": (M.TBSBlend, {"groups": int, "timesteps": int}, ("alpha",), {}),
    "OutputSkip": (M.OutputSkip, {}, ("c_in", "c_out"), {}),
    "BinaryConv2d": (M.BinaryConv2d, _CONV, ("bias", "w_packed", "w_scale"), _BINARY_CONV_PARTS),
    "IntConv2d": (M.IntConv2d, {**_CONV, "w_bits": int}, ("bias", "w_codes", "w_scale"), _CONV_PARTS),
    "FloatConv2d": (M.FloatConv2d, _CONV, ("bias", "weight"), _CONV_PARTS),
    "BinaryLinear": (M.BinaryLinear, _LINEAR, ("bias", "w_packed", "w_scale"), _BINARY_LAYER_PARTS),
    "IntLinear": (M.IntLinear, {**_LINEAR, "w_bits": int}, ("bias", "w_codes", "w_scale"), _LAYER_PARTS),
    "FloatLinear": (M.FloatLinear, _LINEAR, ("bias", "weight"), _LAYER_PARTS),
    "IntMatmul": (M.IntMatmul, {}, (), {"act_a": _ACTS, "act_b": _ACTS}),
}
_CONTAINERS = ("Module", "GraphModule")  # plain nn.Module folders; GraphModule only at the root
_OPTIONAL = ("bias", "tau", "proj")  # the deploy-module buffers that may be None

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.uint32)}
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve_format": torch.preserve_format}
_DEVICE = re.compile(r"(cpu|cuda|meta)(:\d{1,3})?")
_NAME = re.compile(r"(?!__)[A-Za-z0-9_]{1,200}")  # one part of a module path (no dots, no dunders)
_ZOO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")
_NODE_OPS = ("placeholder", "get_attr", "call_function", "call_module", "output")
#: node annotation field -> its type (:class:`bqc.ir.NodeInfo`: report and ir.dump read them)
_ANNOTATION_TYPES = {f.name: {"int": int, "str": str}.get(str(f.type), list) for f in dataclasses.fields(ir.NodeInfo)}


# ---------------------------------------------------------------------------------------------
# the call_function allowlist
# ---------------------------------------------------------------------------------------------
def _function_name(fn) -> str:
    if isinstance(fn, torch._ops.OpOverload):
        return str(fn)  # "aten.conv2d.default", "bqc.sign_pack.default"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', fn)}".replace("_operator.", "operator.")


def functions() -> dict[str, object]:
    """Name -> callable for every call_function target a deploy artifact may hold. Nothing
    outside these lists is ever resolved: a name from a file is only a key here."""
    from . import ops  # noqa: F401 - registers torch.ops.bqc.*

    out = {_function_name(f): f for f in OPERATORS}
    for name in ATEN_OPS:
        _, op, overload = name.split(".")
        out[name] = getattr(getattr(torch.ops.aten, op), overload)
    for op in OP_NAMES:
        out[f"bqc.{op}.default"] = getattr(torch.ops.bqc, op).default
    return out


def graph_functions(gm: fx.GraphModule) -> set[str]:
    """The names of the call_function targets of ``gm`` (how :data:`ATEN_OPS` was derived)."""
    return {_function_name(n.target) for n in gm.graph.nodes if n.op == "call_function"}


# ---------------------------------------------------------------------------------------------
# values: JSON with a few tags
# ---------------------------------------------------------------------------------------------
def _encode(v, where: str):
    if isinstance(v, fx.Node):
        return {"$node": v.name}
    if v is None or type(v) in (bool, int, str):
        return v
    if type(v) is float:
        return v if math.isfinite(v) else {"$float": repr(v)}
    if isinstance(v, tuple):
        return {"$tuple": [_encode(x, where) for x in v]}
    if isinstance(v, list):
        return [_encode(x, where) for x in v]
    if isinstance(v, (set, frozenset)) and all(type(x) is str for x in v):
        return {"$set": sorted(v)}
    if isinstance(v, dict) and all(type(k) is str and not k.startswith("$") for k in v):
        return {k: _encode(x, where) for k, x in v.items()}
    if isinstance(v, torch.dtype) and str(v).removeprefix("torch.") in _DTYPES:
        return {"$dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"$device": str(v)}
    if isinstance(v, torch.layout) and v in _LAYOUTS.values():
        return {"$layout": next(k for k, x in _LAYOUTS.items() if x == v)}
    if isinstance(v, torch.memory_format) and v in _MEMORY_FORMATS.values():
        return {"$memory_format": next(k for k, x in _MEMORY_FORMATS.items() if x == v)}
    if isinstance(v, slice):
        return {"$slice": [_encode(x, where) for x in (v.start, v.stop, v.step)]}
    raise BqcError(f"cannot save {where}: a value of type {type(v).__name__} ({v!r:.60}) has no deploy-artifact form")


def _decode(v, where: str, nodes: dict | None = None):
    """A value from deploy.json; ``nodes`` (name -> fx.Node defined so far) where node
    references are allowed."""
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is list:
        return [_decode(x, where, nodes) for x in v]
    if type(v) is not dict:
        raise BqcError(f"{where}: unexpected value {v!r:.60}")
    tags = [k for k in v if k.startswith("$")]
    if not tags:
        return {k: _decode(x, where, nodes) for k, x in v.items()}
    if len(v) != 1:
        raise BqcError(f"{where}: a tagged value has other keys: {sorted(v)[:4]}")
    tag, x = tags[0], v[tags[0]]
    if type(x) is str:
        if tag == "$node" and nodes is not None and x in nodes:
            return nodes[x]
        named = {"$dtype": _DTYPES, "$layout": _LAYOUTS, "$memory_format": _MEMORY_FORMATS,
                 "$float": {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}}.get(tag, {})
        if x in named:
            return named[x]
        if tag == "$device" and _DEVICE.fullmatch(x):
            return torch.device(x)
    elif type(x) is list:
        if tag == "$tuple":
            return tuple(_decode(a, where, nodes) for a in x)
        if tag == "$slice" and len(x) == 3:
            return slice(*(_decode(a, where, nodes) for a in x))
        if tag == "$set" and all(type(a) is str for a in x):
            return set(x)
    raise BqcError(f"{where}: invalid value {v!r:.80}")


def _identifier(name, where: str) -> str:
    if type(name) is not str or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
        raise BqcError(f"{where}: {name!r:.60} is not a valid name")
    return name


# ---------------------------------------------------------------------------------------------
# host paths out of provenance
# ---------------------------------------------------------------------------------------------
_ABS_PATH = re.compile(r"(?:^|(?<=[\s(\[='\"]))(?:/|~/|[A-Za-z]:[\\/])[^\s)\]'\"]*")


def _no_host_paths(v):
    """``v`` with every absolute path in its strings reduced to ``<path>/<last part>`` (and
    non-finite floats, which strict JSON has no word for, as strings)."""
    if isinstance(v, str):
        return _ABS_PATH.sub(lambda m: "<path>/" + re.split(r"[\\/]", m.group(0).rstrip("/\\"))[-1], v)
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return [_no_host_paths(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _no_host_paths(x) for k, x in v.items()}
    return v


def _without_meta(config_file: Path) -> dict | None:
    cfg = json_object_or_empty(config_file)
    return {k: v for k, v in cfg.items() if k != "meta"} if cfg else None


def zoo_twin(src: dict) -> str | None:
    """The zoo model a ``bqc`` checkpoint folder source (``{"kind": "bqc", "path": ...}``) is a copy
    of: the same weights file byte for byte and the same architecture config (its ``meta``, the
    training record with host paths, aside); None otherwise. A model trained from a copy of a
    shipped model then records that model by name, so ``bqc bench`` finds its FP teacher."""
    if src.get("kind") != "bqc" or not src.get("path"):
        return None
    weights = Path(src["path"]) / "model.safetensors"
    if not weights.is_file():
        return None
    digest, size = None, weights.stat().st_size
    for twin in sorted(CHECKPOINTS.glob("*/model.safetensors")):
        if twin.stat().st_size != size:
            continue
        digest = digest or file_sha256(weights)
        if file_sha256(twin) == digest and _without_meta(twin.parent / "config.json") == _without_meta(
                weights.parent / "config.json") is not None:
            return twin.parent.name
    return None


def _provenance(manifest: dict, calibration: str | None) -> dict:
    """What a deploy artifact records of the artifact it was folded from (no recipe to replay)."""
    src = manifest.get("source") or {}
    twin = zoo_twin(src)
    if twin:
        src = {"kind": "zoo", "name": twin,
               "description": f"{twin} (the shipped weights: trained from a byte-identical copy, {src.get('description')})"}
    recipe = manifest.get("recipe") or {}
    return _no_host_paths({
        "source": {k: src[k] for k in ("kind", "name", "description") if k in src},
        "recipe": recipe.get("name") if isinstance(recipe, dict) else recipe,
        "paper": recipe.get("paper") if isinstance(recipe, dict) else None,
        "wbits": manifest.get("wbits"),
        "abits": manifest.get("abits"),
        "train": manifest.get("train"),
        "calibration": calibration,
        "diffusion": manifest.get("diffusion"),
    })


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def _encode_nodes(gm: fx.GraphModule) -> list[dict]:
    names = {f: n for n, f in functions().items()}
    out = []
    for n in gm.graph.nodes:
        where = f"node {n.name}"
        if n.op not in _NODE_OPS:
            raise BqcError(f"cannot save {where}: deploy artifacts hold no {n.op} nodes")
        target = n.target
        if n.op == "call_function":
            if target not in names:
                raise BqcError(f"cannot save {where}: it calls {_function_name(target)}, which deploy artifacts do not "
                               "allow (the allowlist is the ops of the zoo models' deploy graphs)",
                               hint="add the op to bqc.deploy.artifact.ATEN_OPS if a supported model needs it")
            target = names[target]
        elif n.op == "placeholder" and target != n.name:
            raise BqcError(f"cannot save {where}: its argument name {target!r} differs from the node name")
        e = {"name": n.name, "op": n.op, "target": target, "args": [_encode(a, where) for a in n.args]}
        if n.kwargs:
            e["kwargs"] = {k: _encode(v, where) for k, v in n.kwargs.items()}
        if "bqc" in n.meta:
            e["bqc"] = _encode(n.meta["bqc"], where)
        out.append(e)
    return out


def _class_name(gm: fx.GraphModule, path: str, mod: nn.Module) -> str:
    if mod is gm:
        return "GraphModule"
    if type(mod) is nn.Module:
        return "Module"
    name = type(mod).__name__
    if name in MODULES and MODULES[name][0] is type(mod):
        return name
    raise BqcError(f"cannot save module {path}: a {type(mod).__module__}.{type(mod).__qualname__} is not a "
                   "deploy module",
                   hint="deploy artifacts hold folded graphs (bqc.deploy.to_deploy) only")


def _attrs(path: str, name: str, mod: nn.Module) -> dict:
    """A deploy module's plain attributes, exactly the declared ones."""
    _, kinds, _, slots = MODULES[name]
    plain = {k for k, v in vars(mod).items() if not k.startswith("_") and k != "training" and v is not None}
    extra = plain - set(kinds) - set(slots)
    if extra:  # a deploy module gained state this format does not record
        raise BqcError(f"cannot save module {path}: {name} has undeclared attributes {sorted(extra)}",
                       hint="declare them in bqc.deploy.artifact.MODULES")
    return {k: list(getattr(mod, k)) if kinds[k] == _PAIR else getattr(mod, k) for k in kinds}


def _encode_modules(gm: fx.GraphModule) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The module tree (in ``named_modules`` order) and every tensor by dotted path."""
    entries, tensors, first = [], {}, {}
    for path, mod in gm.named_modules(remove_duplicate=False):
        name = _class_name(gm, path, mod)
        e: dict = {"path": path, "class": name}
        if name in MODULES:
            e["attrs"] = _attrs(path, name, mod)
        for kind, table in (("parameters", mod._parameters), ("buffers", mod._buffers)):
            specs = {}
            for k, t in table.items():
                full = f"{path}.{k}" if path else k
                if t is None:
                    specs[k] = None
                elif id(t) in first:  # the same tensor under a second name
                    specs[k] = {"alias": first[id(t)]}
                else:
                    first[id(t)] = full
                    tensors[full] = t.detach().contiguous()
                    specs[k] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            if specs:
                e[kind] = specs
        if mod._non_persistent_buffers_set:
            e["non_persistent"] = sorted(mod._non_persistent_buffers_set)
        entries.append(e)
    return entries, tensors


def _dump(doc: dict, lines: tuple[str, ...] = ("layers", "nodes", "modules")) -> str:
    """JSON with one entry per line in the long lists (diff-friendly, compact)."""
    marks = {}

    def mark(v):
        if isinstance(v, dict):
            return {k: (_mark_list(x) if k in lines and isinstance(x, list) else mark(x)) for k, x in v.items()}
        return v

    def _mark_list(xs):
        out = []
        for x in xs:
            key = f"@@{len(marks)}@@"
            marks[key] = json.dumps(x, separators=(",", ":"), allow_nan=False)
            out.append(key)
        return out

    text = json.dumps(mark(doc), indent=1, allow_nan=False)
    return re.sub(r'"(@@\d+@@)"', lambda m: marks[m.group(1)], text) + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _new_module(name: str, e: dict, where: str) -> nn.Module:
    """A module of an allowlisted class with its recorded plain attributes (no constructor runs)."""
    if name == "Module":
        if "attrs" in e:
            raise BqcError(f"{where}: a plain Module has no attributes")
        return nn.Module()
    cls, kinds, _, _ = MODULES[name]
    attrs = e.get("attrs")
    if type(attrs) is not dict or set(attrs) != set(kinds):
        raise BqcError(f"{where}: {name} takes the attributes {sorted(kinds)}, the file has "
                       f"{sorted(attrs) if type(attrs) is dict else attrs!r:.80}")
    mod = cls.__new__(cls)
    nn.Module.__init__(mod)
    for k, kind in kinds.items():
        v = attrs[k]
        if kind is int and type(v) is int:
            setattr(mod, k, v)
        elif kind == _PAIR and type(v) is list and len(v) == 2 and all(type(a) is int for a in v):
            setattr(mod, k, tuple(v))
        elif isinstance(kind, tuple) and v in kind:
            setattr(mod, k, v)
        else:
            raise BqcError(f"{where}: attribute {k} of {name} is {v!r:.40}")
    return mod


def _tensor(spec, full: str, file: dict, by_path: dict, where: str) -> torch.Tensor | None:
    if spec is None:
        return None
    if type(spec) is not dict:
        raise BqcError(f"{where}: invalid tensor entry {full}")
    if set(spec) == {"alias"}:
        if type(spec["alias"]) is not str or spec["alias"] not in by_path:
            raise BqcError(f"{where}: {full} aliases {spec['alias']!r:.60}, which is not an earlier tensor")
        return by_path[spec["alias"]]
    if set(spec) != {"dtype", "shape"} or type(spec["dtype"]) is not str or spec["dtype"] not in _DTYPES:
        raise BqcError(f"{where}: invalid tensor entry {full}: {spec!r:.80}")
    if full not in file:
        raise BqcError(f"{where}: {DEPLOY_TENSORS} has no tensor {full}")
    t = file[full]
    if t.dtype != _DTYPES[spec["dtype"]] or list(t.shape) != spec["shape"]:
        raise BqcError(f"{where}: tensor {full} is {str(t.dtype).removeprefix('torch.')}{list(t.shape)} in "
                       f"{DEPLOY_TENSORS}, deploy.json says {spec['dtype']}{spec['shape']}")
    by_path[full] = t
    return t


def _attach(parent: nn.Module, parent_class: str, name: str, child: nn.Module, child_class: str, where: str) -> None:
    if parent_class in MODULES:
        slots = MODULES[parent_class][3]
        if name not in slots or child_class not in slots[name]:
            raise BqcError(f"{where}: a {parent_class} has no part {name!r} of class {child_class}")
        setattr(parent, name, child)
        return
    if child_class == "GraphModule" or hasattr(parent, name):
        raise BqcError(f"{where}: cannot place a {child_class} at {name!r}")
    parent.add_module(name, child)


def format_version(class_names) -> int:
    """The deploy.json version a file holding modules of these classes is written with."""
    return max([VERSIONS[0]] + [SINCE.get(c, VERSIONS[0]) for c in class_names])


def _build_modules(entries, file: dict, version: int = VERSION) -> tuple[nn.Module, dict[str, str], set[str]]:
    """(root, path -> class name, tensor paths) of the recorded module tree (of a deploy.json of
    ``version``: classes added later are refused)."""
    if type(entries) is not list or not entries or type(entries[0]) is not dict or entries[0].get("path") != "":
        raise BqcError(f"{DEPLOY_JSON}: the module list must start with the root")
    mods: dict[str, nn.Module] = {}
    classes: dict[str, str] = {}
    by_path: dict[str, torch.Tensor] = {}
    tensor_paths: set[str] = set()
    for e in entries:
        if type(e) is not dict or not set(e) <= {"path", "class", "attrs", "parameters", "buffers", "non_persistent"}:
            raise BqcError(f"{DEPLOY_JSON}: invalid module entry {e!r:.80}")
        path, name = e.get("path"), e.get("class")
        where = f"{DEPLOY_JSON}: module {path!r:.60}"
        non_persistent = e.get("non_persistent", [])
        if type(path) is not str or path in mods or type(name) is not str or type(non_persistent) is not list:
            raise BqcError(f"{where}: invalid or repeated path, class or buffer list")
        if name not in MODULES and name not in _CONTAINERS:
            raise BqcError(f"{where}: unknown module class {name!r:.60}",
                           hint=f"deploy artifacts hold {', '.join(_CONTAINERS + tuple(MODULES))} modules only")
        if SINCE.get(name, VERSIONS[0]) > version:
            raise BqcError(f"{where}: a {name} module needs deploy format {SINCE[name]}, the file says {version}")
        if (name == "GraphModule") != (path == ""):
            raise BqcError(f"{where}: the root (and only the root) is the GraphModule")
        if path == "" and "attrs" in e:
            raise BqcError(f"{where}: the root has no attributes")
        mod = nn.Module() if path == "" else _new_module(name, e, where)
        if path:
            owner, _, local = path.rpartition(".")
            if owner not in mods or not _NAME.fullmatch(local):
                raise BqcError(f"{where}: its parent is not listed before it, or {local!r:.40} is not a valid name")
            _attach(mods[owner], classes[owner], local, mod, name, where)
        allowed = set(MODULES[name][2]) if name in MODULES else None
        seen = []
        for kind in ("parameters", "buffers"):
            specs = e.get(kind, {})
            if type(specs) is not dict:
                raise BqcError(f"{where}: invalid {kind}")
            for k, spec in specs.items():
                full = f"{path}.{k}" if path else k
                if not _NAME.fullmatch(k) or (allowed is not None and (k not in allowed or kind == "parameters")) \
                        or hasattr(mod, k):
                    raise BqcError(f"{where}: unexpected tensor {k!r:.60}")
                seen.append(k)
                t = _tensor(spec, full, file, by_path, where)
                if t is None and allowed is not None and k not in _OPTIONAL:
                    raise BqcError(f"{where}: a {name} needs its tensor {k}")
                tensor_paths.add(full)
                if kind == "parameters":
                    mod.register_parameter(k, None if t is None else nn.Parameter(t, requires_grad=False))
                else:
                    mod.register_buffer(k, t, persistent=k not in non_persistent)
        if allowed is not None and set(seen) != allowed:
            raise BqcError(f"{where}: a {name} holds the buffers {sorted(allowed)}, the file has {sorted(seen)}")
        mods[path], classes[path] = mod, name
    for path, mod in mods.items():  # parts a layer does not have are None
        for slot in MODULES.get(classes[path], (None, {}, (), {}))[3]:
            if slot not in mod._modules:
                setattr(mod, slot, None)
        if isinstance(mod, M.DEPLOY_LAYERS):
            _check_layer(mod, f"{DEPLOY_JSON}: layer {path}")
    unused = set(file) - set(by_path)
    if unused:
        raise BqcError(f"{DEPLOY_TENSORS} holds tensors deploy.json does not list: {sorted(unused)[:4]}")
    return mods[""], classes, tensor_paths


def _check_layer(mod: nn.Module, where: str) -> None:
    """The weight tensors of a rebuilt layer fit its recorded geometry and kind."""
    want: dict[str, tuple[tuple, torch.dtype | None]] = {}
    if isinstance(mod, M._DeployConv):
        oc, c = mod.out_channels, mod.in_channels // max(mod.groups, 1)
        kh, kw = mod.kernel_size
        packed, codes = (oc, kh, kw, packing.num_words(c)), (oc, c, kh, kw)
    elif isinstance(mod, M._DeployLinear):
        oc, c = mod.out_features, mod.in_features
        packed, codes = (oc, packing.num_words(c)), (oc, c)
    else:
        return
    if isinstance(mod, (M.BinaryConv2d, M.BinaryLinear)):
        b = mod.w_packed.shape[0] if mod.w_packed.dim() else 0
        want = {"w_packed": ((b, *packed), torch.uint32), "w_scale": ((b, oc), None)}
        if b not in (1, 2):
            raise BqcError(f"{where}: {b} weight bases (1 or 2 expected)")
    elif isinstance(mod, (M.IntConv2d, M.IntLinear)):
        want = {"w_codes": (codes, torch.int8), "w_scale": ((oc,), None)}
    else:
        want = {"weight": (codes, None)}
    if mod.bias is not None:
        want["bias"] = ((oc,), None)
    for k, (shape, dtype) in want.items():
        t = getattr(mod, k)
        if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype) or (
                dtype is None and not t.is_floating_point()):
            raise BqcError(f"{where}: {k} is {str(t.dtype).removeprefix('torch.')}{list(t.shape)}, its geometry "
                           f"needs {list(shape)}" + (f" {str(dtype).removeprefix('torch.')}" if dtype else " float"))


def _build_graph(entries, classes: dict[str, str], tensor_paths: set[str]) -> fx.Graph:
    if type(entries) is not list or not entries:
        raise BqcError(f"{DEPLOY_JSON}: the graph has no nodes")
    allowed = functions()
    graph, nodes = fx.Graph(), {}
    for i, e in enumerate(entries):
        if type(e) is not dict or not {"name", "op", "target", "args"} <= set(e) <= \
                {"name", "op", "target", "args", "kwargs", "bqc"}:
            raise BqcError(f"{DEPLOY_JSON}: invalid node entry {e!r:.80}")
        name = _identifier(e["name"], f"{DEPLOY_JSON}: node {i}")
        op, target, where = e["op"], e["target"], f"{DEPLOY_JSON}: node {name}"
        last = i == len(entries) - 1
        if name in nodes or op not in _NODE_OPS or (op == "output") != last or type(target) is not str:
            raise BqcError(f"{where}: repeated name, unknown op {op!r:.40}, a target that is not a name, "
                           "or the output is not the last node")
        if op == "call_function":
            if target not in allowed:
                raise BqcError(f"{where}: unknown op {target!r:.80}",
                               hint="deploy artifacts call only bqc's ops and those of bqc.deploy.artifact.ATEN_OPS")
            target = allowed[target]
        elif op == "placeholder" and (target != name or e["args"]):
            raise BqcError(f"{where}: a graph input is named by its node, without a default")
        elif op == "get_attr" and target not in tensor_paths:
            raise BqcError(f"{where}: no tensor {target!r:.80}")
        elif op == "call_module" and classes.get(target) not in MODULES:
            raise BqcError(f"{where}: no deploy module {target!r:.80}")
        elif op == "output" and target != "output":
            raise BqcError(f"{where}: invalid output target")
        kwargs = e.get("kwargs", {})
        if type(e["args"]) is not list or type(kwargs) is not dict:
            raise BqcError(f"{where}: invalid arguments")
        args = tuple(_decode(a, where, nodes) for a in e["args"])
        kwargs = {_identifier(k, where): _decode(v, where, nodes) for k, v in kwargs.items()}
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise BqcError(f"{where}: the name is not usable in a graph")
        if "bqc" in e:
            ann = _decode(e["bqc"], where)
            if type(ann) is not dict or any(k in ann and type(ann[k]) is not t for k, t in _ANNOTATION_TYPES.items()):
                raise BqcError(f"{where}: invalid annotation")
            node.meta["bqc"] = ann
        nodes[name] = node
    return graph


def _check_meta(meta, graph: fx.Graph) -> dict:
    """The graph annotations the runtime relies on (the signature) have their types."""
    ok = type(meta) is dict and isinstance(meta.get("facts"), set) and "deployed" in meta["facts"]
    if ok:
        placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
        shape = meta.get("input_shape")
        ok = (meta.get("inputs") == placeholders and type(shape) is list and len(shape) == 3
              and all(type(d) is int and 0 < d <= MAX_DIM for d in shape) and type(meta.get("conditional")) is bool
              and all(type(s) is dict and type(s.get("name")) is str and type(s.get("shape")) is list
                      and all(type(d) is int and 0 < d <= MAX_DIM for d in s["shape"]) for s in meta.get("state_inputs") or [])
              and all(type(s) is dict and type(s.get("name")) is str for s in meta.get("state_outputs") or [])
              and _context_ok(meta.get("context"), "context" in placeholders))
    if not ok:
        raise BqcError(f"{DEPLOY_JSON}: the graph's signature annotations are missing or inconsistent")
    return meta


def _context_ok(ctx, takes_context: bool) -> bool:
    """A text-conditioned graph (a ``context`` input) records its ``[L, D]``; no other graph does."""
    if not takes_context:
        return ctx is None
    return type(ctx) is list and len(ctx) == 2 and all(type(d) is int and d > 0 for d in ctx)


def _graph_module(root: nn.Module, graph: fx.Graph, meta: dict) -> fx.GraphModule:
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    for name, child in root.named_children():
        gm.add_module(name, child)
    for name, p in root._parameters.items():
        gm.register_parameter(name, p)
    for name, b in root._buffers.items():
        gm.register_buffer(name, b, persistent=name not in root._non_persistent_buffers_set)
    try:
        gm.graph = graph
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - fx reports an inconsistent graph as various errors
        raise BqcError(f"{DEPLOY_JSON}: the graph is inconsistent ({type(e).__name__}: {str(e)[:200]})") from e
    gm.meta["bqc"] = meta
    return gm.eval()


def read_deploy_manifest(path) -> dict:
    """deploy.json of a deploy artifact folder without the graph: provenance (``train``, as in
    bqc.json), ``diffusion``, signature, sizes, layer table."""
    doc = _read_json(Path(path))
    return {k: v for k, v in doc.items() if k not in ("graph", "modules")}


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(read_text_file(path / DEPLOY_JSON, "deploy manifest"), parse_constant=lambda c: _bad_constant(c))
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise BqcError(f"{path / DEPLOY_JSON} is corrupt: {str(e)[:200]}") from e
    if type(doc) is not dict or doc.get("format") != FORMAT:
        raise BqcError(f"{path / DEPLOY_JSON} is not a bqc deploy artifact (format {FORMAT!r})")
    version = doc.get("version")
    if type(version) is not int or version not in VERSIONS or doc.get("layout_version") != LAYOUT_VERSION:
        raise BqcError(f"{path / DEPLOY_JSON} has deploy format {doc.get('version')!r:.20} / packing layout "
                       f"{doc.get('layout_version')!r:.20}; this bqc reads deploy formats "
                       f"{', '.join(map(str, VERSIONS))} with packing layout {LAYOUT_VERSION}",
                       hint="fold the trained artifact again with this bqc version (bqc fold)")
    return doc


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    doc = _read_json(path)
    try:
        file = load_file(str(path / DEPLOY_TENSORS))
    except FileNotFoundError as e:
        raise BqcError(f"{path / DEPLOY_TENSORS} is missing") from e
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError / OSError variants
        raise BqcError(f"{path / DEPLOY_TENSORS} is not a readable safetensors file ({str(e)[:200]})",
                       hint="it is probably truncated or corrupt; copy or fold it again") from e
    return doc, file


def _bad_constant(c: str):
    raise ValueError(f"non-standard JSON constant {c}")


# ---------------------------------------------------------------------------------------------
# the artifact
# ---------------------------------------------------------------------------------------------
@dataclass
class DeployArtifact:
    """A deploy graph with what it needs to run on its own: signature, diffusion process and
    provenance (``manifest``, the deploy.json fields other than the graph)."""

    gm: fx.GraphModule
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, source_manifest: dict | None = None, *,
                   calibration: str | None = None, source_path=None,
                   ebb_stage1_layers: int | None = None) -> "DeployArtifact":
        """Wrap a deploy graph; ``source_manifest`` is the ``bqc.json`` of the artifact it was
        folded from (provenance and diffusion process), ``source_path`` its folder (recorded by
        name and content hashes, :func:`source_artifact_record`), ``ebb_stage1_layers`` how many
        of its EBB quantizers were still in stage 1 (two bases) when it was folded."""
        if not is_deployed(gm):
            raise BqcError("a deploy artifact holds a deploy graph", hint="fold it first: bqc.deploy.fold(artifact)")
        summary = deploy_summary(gm)
        roles = {n.name: ir.info(n).get("role", "") for n in gm.graph.nodes}
        manifest = {
            "format": FORMAT, "version": format_version(type(m).__name__ for m in gm.modules()),
            "bqc_version": __version__, "layout_version": LAYOUT_VERSION,
            **_provenance(source_manifest or {}, calibration),
            **({} if ebb_stage1_layers is None else {"ebb_stage1_layers": int(ebb_stage1_layers)}),
            "artifact": source_artifact_record(source_path),
            "signature": Signature.of(gm).to_json(),
            "sizes": {k: summary[k] for k in ("total_bytes", "layer_bytes", "float_bytes", "nominal_bytes")},
            "layers": [{"name": r["name"], "role": roles.get(r["name"], ""),
                        **{k: v for k, v in r.items() if k != "name"}} for r in summary["layers"]],
        }
        return cls(gm, manifest)

    # --- what the commands use --------------------------------------------------------------
    @property
    def schedule(self):
        """The model's diffusion process (recorded from the source artifact's manifest)."""
        from bqc.diffusion.schedule import NoiseSchedule

        return NoiseSchedule.from_manifest(self.manifest)

    @property
    def model(self):
        """A sampler-ready :class:`~bqc.graph.BqcModel` over the graph, with ``.schedule``."""
        from bqc.graph import BqcModel

        m = BqcModel(self.gm)
        m.schedule = self.schedule
        return m

    @property
    def provenance(self) -> dict:
        return {k: self.manifest.get(k) for k in ("source", "recipe", "paper", "wbits", "abits", "ebb_stage1_layers", "train",
                                                  "calibration", "artifact")}

    def title(self) -> str:
        """``deploy artifact: RECIPE WxAy``, plus the layers of other precisions than the recipe's
        and the 8-bit head/tail (``--bits`` mixes): ``... W1A1 + W1A4 (9 layers)``."""
        from bqc.report import precision_counts

        m = self.manifest
        wa = (m.get("wbits", "?"), m.get("abits", "?"))
        other = [f" + W{w}A{a} ({n} layer{'s' if n > 1 else ''})"
                 for (w, a), n in sorted(precision_counts(m.get("layers", [])).items()) if (w, a) not in (wa, (8, 8))]
        return f"deploy artifact: {m.get('recipe') or '?'} W{wa[0]}A{wa[1]}" + "".join(other)

    def bits(self) -> str:
        """The recipe's ``WxAy`` plus the other activation widths of layers with its weight bits
        (a ``--bits`` mix): ``W1A1+A4`` for a W1A1 model whose decoder runs at 4-bit activations."""
        from bqc.report import precision_counts

        m = self.manifest
        wb, ab = m.get("wbits", "?"), m.get("abits", "?")
        extra = sorted(a for w, a in precision_counts(m.get("layers", [])) if w == wb and a != ab)
        return f"W{wb}A{ab}" + "".join(f"+A{a}" for a in extra)

    def tensors_sha256(self) -> str:
        """The content hash of ``deploy.safetensors`` (of the bytes :meth:`save` writes when the
        artifact is not on disk yet): what a lowered bundle records of the weights it holds."""
        import hashlib

        from safetensors.torch import save

        if self.path is not None and (Path(self.path) / DEPLOY_TENSORS).is_file():
            return file_sha256(Path(self.path) / DEPLOY_TENSORS)
        return hashlib.sha256(save(_encode_modules(self.gm)[1], metadata={"format": FORMAT})).hexdigest()

    # --- disk -------------------------------------------------------------------------------
    def save(self, out) -> Path:
        """Write ``deploy.safetensors`` then ``deploy.json`` into ``out`` (created if needed; each
        file replaced atomically, nothing else in the folder touched). Check the folder with
        :func:`bqc.outputs.check_output` (kind ``"deploy"``) first."""
        from safetensors.torch import save

        out = Path(out)
        if (out.exists() or out.is_symlink()) and not out.is_dir():
            raise BqcError(f"cannot write the deploy artifact {out}: it is a file, not a folder")
        nodes = _encode_nodes(self.gm)
        modules, tensors = _encode_modules(self.gm)
        doc = {**self.manifest, "version": format_version(e["class"] for e in modules),
               "graph": {"meta": _encode(ir.graph_meta(self.gm), "graph annotations"), "nodes": nodes},
               "modules": modules}
        text = _dump(doc)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / DEPLOY_TENSORS, save(tensors, metadata={"format": FORMAT}))
        _atomic_write(out / DEPLOY_JSON, text.encode())
        self.path = out
        return out

    @classmethod
    def load(cls, path) -> "DeployArtifact":
        """Read a deploy artifact folder (see the module docstring for what is allowed)."""
        path = Path(path)
        if not (path / DEPLOY_JSON).is_file():
            raise BqcError(f"{path} is not a deploy artifact (no {DEPLOY_JSON})",
                           hint="pass the output folder of `bqc fold`, or a shipped deploy model's name")
        doc, file = _read(path)
        graph_doc = doc.pop("graph", None)
        if type(graph_doc) is not dict or set(graph_doc) != {"meta", "nodes"}:
            raise BqcError(f"{path / DEPLOY_JSON}: no graph")
        try:
            root, classes, tensor_paths = _build_modules(doc.pop("modules", None), file, doc["version"])
            graph = _build_graph(graph_doc["nodes"], classes, tensor_paths)
            meta = _check_meta(_decode(graph_doc["meta"], f"{DEPLOY_JSON}: graph annotations"), graph)
        except RecursionError as e:
            raise BqcError(f"{path / DEPLOY_JSON}: values nested too deeply") from e
        art = cls(_graph_module(root, graph, meta), doc, path)
        try:
            art.schedule
        except BqcError:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed diffusion entry
            raise BqcError(f"{path / DEPLOY_JSON}: invalid diffusion process "
                           f"({type(e).__name__}: {str(e)[:120]})") from e
        return art


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content (hex), read in blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_artifact_record(path) -> dict | None:
    """What a deploy artifact records of the artifact folder it was folded from (``artifact``):
    its folder name and the content hashes of its weights (``sha256``) and FP teacher program
    (``teacher_sha256``: ``bqc bench --teacher`` checks it), no host path. None without a folder."""
    if path is None:
        return None
    path = Path(path)
    files = {"sha256": path / "model.safetensors", "teacher_sha256": path / "base.pt2"}
    return {"name": path.name, **{k: file_sha256(f) if f.is_file() else None for k, f in files.items()}}


def as_deploy_artifact(src) -> DeployArtifact:
    """What a backend takes: a :class:`DeployArtifact`, its folder or a shipped deploy model's zoo
    name, or a deploy graph (the in-memory form of one). Anything else (a QAT artifact or graph)
    is refused: folding and calibrating happen before a backend (``bqc fold``, or ``bqc lower``
    on a trained artifact, which folds it first: :func:`bqc.deploy.fold`)."""
    if isinstance(src, DeployArtifact):
        return src
    if isinstance(src, fx.GraphModule) and is_deployed(src):
        return DeployArtifact.from_graph(src)
    if isinstance(src, (str, Path)):
        found = find_deploy_artifact(src)
        if found is not None:
            return DeployArtifact.load(found)
        raise BqcError(f"{src} is not a deploy artifact (no {DEPLOY_JSON}): backends take the output of `bqc fold`",
                       hint=f"fold it first (`bqc fold {src} -o DIR`), or let `bqc lower {src}` fold it")
    raise BqcError(f"backends take a deploy artifact, not a {type(src).__name__}",
                   hint="fold it first: bqc.deploy.fold(artifact_or_graph)")


def load(path) -> DeployArtifact:
    """``DeployArtifact.load``: a deploy artifact folder, or a shipped deploy model's zoo name."""
    found = find_deploy_artifact(path)
    return DeployArtifact.load(found if found is not None else path)


def is_deploy_artifact(path) -> bool:
    return path is not None and (Path(path) / DEPLOY_JSON).is_file()


def find_deploy_artifact(target) -> Path | None:
    """The deploy artifact folder ``target`` names: a folder holding ``deploy.json``, or a zoo
    name ``NAME`` with ``models/checkpoints/NAME/deploy.json`` (an existing path wins over a zoo
    name); None for anything else. The one resolver every command uses."""
    if target is None or not isinstance(target, (str, Path)):
        return None
    if is_deploy_artifact(target):
        return Path(target)
    name = str(target)
    if not Path(name).exists() and _ZOO_NAME.fullmatch(name):
        shipped = CHECKPOINTS / name
        if is_deploy_artifact(shipped):
            return shipped
    return None
