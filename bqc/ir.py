"""The bqc graph IR: one ``torch.fx.GraphModule`` form used by every pass and backend.

Form
----
The graph of ``torch.export.export(adapter, (x, t[, y])).module()`` (ATen-level training IR,
non-strict export, dynamic batch), normalised by :func:`from_exported`:

* plain fx code generation (no pytree in/out specs), flat placeholders
  ``x, t[, context][, y]`` followed by any cross-timestep state inputs that passes add
  (``context``: the text embedding of a text-conditioned UNet, ``(N, L, D)``; its ``(L, D)`` is
  ``gm.meta["bqc"]["context"]``, None for other models);
* the output is always a tuple ``(eps, *state_outputs)``;
* export's runtime guard module and tensor-metadata asserts are removed (bqc checks input shapes
  itself, see :class:`bqc.graph.BqcModel`);
* every node keeps export's ``nn_module_stack`` (module paths) and ``val`` (fake tensor, shapes).

Annotations
-----------
Analysis runs once (:func:`annotate`) and is stored per node as ``node.meta["bqc"]``, a
:class:`NodeInfo`-shaped dict; graph-level facts (signature, blocks) are stored in
``gm.meta["bqc"]``. Passes read these; they never re-derive them.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

import networkx as nx
import torch
import torch.fx as fx

aten = torch.ops.aten

#: the graph input carrying a text-conditioned UNet's text embedding (bqc.frontend.CONTEXT_INPUT)
CONTEXT = "context"

# op kinds -------------------------------------------------------------------------------------
_KIND_BY_OP: dict[str, str] = {}
for _k, _ops in {
    "conv": ["conv2d", "conv1d", "convolution", "_convolution"],
    "linear": ["linear", "addmm"],
    "matmul": ["matmul", "bmm", "baddbmm", "mm", "einsum"],
    "attention": ["scaled_dot_product_attention"],
    "norm": ["group_norm", "layer_norm", "batch_norm", "native_group_norm", "native_layer_norm"],
    "activation": ["silu", "gelu", "relu", "sigmoid", "tanh", "mish", "leaky_relu", "hardtanh"],
    "softmax": ["softmax", "_softmax", "log_softmax"],
    "pool": ["avg_pool2d", "max_pool2d", "adaptive_avg_pool2d"],
    "upsample": ["upsample_nearest2d", "upsample_bilinear2d", "interpolate"],
    "concat": ["cat", "concat"],
    "embedding": ["embedding"],
    "elementwise": ["add", "sub", "mul", "div", "neg", "exp", "sin", "cos", "pow", "sqrt", "rsqrt"],
}.items():
    for _o in _ops:
        _KIND_BY_OP[_o] = _k

#: blocks at each end of the UNet whose layers are "head" / "tail" (BinaryDM keeps 8-bit weights
#: or EBB there; the annotate pass's default; recipes may override it)
HEAD_TAIL_BLOCKS = 6

#: kinds of node that carry weights and can be quantized
WEIGHTED_KINDS = ("conv", "linear")
QUANTIZABLE_KINDS = ("conv", "linear", "matmul")


def op_name(node: fx.Node) -> str:
    """``aten.conv2d.default`` -> ``conv2d``; call_module targets keep their class name."""
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", str(t))
        if hasattr(t, "_schema"):
            name = t._schema.name.split("::")[-1]
        return name.split(".")[0]
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__
    return node.op


def op_kind(node: fx.Node) -> str:
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_module":
        mod = node.graph.owning_module.get_submodule(node.target)
        return getattr(mod, "bqc_kind", "module")
    return _KIND_BY_OP.get(op_name(node), "other")


# node annotation ------------------------------------------------------------------------------
@dataclass
class NodeInfo:
    kind: str
    module: str = ""  # innermost owning module path (from nn_module_stack)
    role: str = ""  # input | output | time-embed | emb-proj | res-proj | cross-kv | head | body | tail ('' if not a layer)
    place: str = ""  # head | body | tail: where a layer inside the blocks sits (whatever its role)
    level: int = 0  # spatial downsample factor relative to the input (1, 2, 4 ...); 0: no H,W
    block: int = -1  # timestep-embedded block index in execution order, -1 outside blocks
    section: str = ""  # input | middle | output (of the UNet) for nodes inside blocks
    params: int = 0  # weight (+bias) elements of conv/linear
    macs: int = 0  # multiply-accumulates per sample (batch 1)
    dist_in: int = -1  # hops from the image input x
    dist_out: int = -1  # hops to the graph output
    w_bits: int = 32
    a_bits: int = 32
    part: str = ""  # inside a transformer block: proj-in, self-q/k/v/out/attn, cross-q/k/v/out/attn, ff-in, ff-out, proj-out, norm


def info(node: fx.Node) -> dict:
    """The node's annotation dict (empty dict if not annotated)."""
    return node.meta.setdefault("bqc", {})


def graph_meta(gm: fx.GraphModule) -> dict:
    return gm.meta.setdefault("bqc", {})


# normalisation --------------------------------------------------------------------------------
def from_exported(ep, *, conditional: bool | None = None) -> fx.GraphModule:
    """Normalise ``ep.module()`` into the bqc IR form (see module docstring).

    Every call returns a graph with its *own* parameters: ``ep.module()`` hands out the
    program's tensors themselves, and a student and its teacher built from one program must
    not share (and co-train) their float weights.
    """
    gm = ep.module()
    with torch.no_grad():
        for mod in gm.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = b.clone()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in (aten._assert_tensor_metadata.default,):
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph._codegen = fx.graph.CodeGen()
    out = graph.output_node()
    outs = out.args[0]
    if not isinstance(outs, (tuple, list)):
        outs = (outs,)
    out.args = (tuple(outs),)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # drop placeholders that exported as unused (e.g. y=None in an unconditional adapter)
    for p in placeholders:
        if not p.users and p.name not in ("x", "t", CONTEXT):
            graph.erase_node(p)
    graph.eliminate_dead_code()
    graph.lint()
    gm = fx.GraphModule(gm, graph)
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    shape = tuple(x.meta["val"].shape)
    ctx = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == CONTEXT), None)
    graph_meta(gm).update(
        inputs=inputs,
        outputs=["eps"],
        state_inputs=[],
        state_outputs=[],
        input_shape=[int(d) for d in shape[1:]],
        conditional=len(inputs) - (ctx is not None) >= 3 if conditional is None else conditional,
    )
    if ctx is not None:  # only text-conditioned graphs carry the key: others' meta stays as it was
        graph_meta(gm)["context"] = [int(d) for d in ctx.meta["val"].shape[1:]]
    return gm


def fresh_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy with node meta (annotations) and graph meta preserved."""
    import copy

    new = copy.deepcopy(gm)
    new.meta = copy.deepcopy(gm.meta)
    return new


# analysis -------------------------------------------------------------------------------------
def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _int(d) -> int:
    try:
        return int(d)
    except Exception:  # symbolic dim (batch)
        return 1


def module_path(node: fx.Node) -> str:
    """Innermost owning module path, as named in the user's model (wrapper prefix removed)."""
    chain = _module_chain(node)
    return chain[-1] if chain else ""


def _raw_module_chain(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _cls in stack.values() if path and not path.startswith("_empty_nn_module_stack")]


def wrapper_prefix(gm: fx.GraphModule) -> str:
    """The module path that wraps the whole UNet, whatever the wrapper calls it.

    bqc's capture adapter holds the model as ``unet``; a user's own export may call it ``net``,
    ``model.diffusion_model`` ... It is the longest chain of modules that owns every op inside a
    module (structure, not names), stopping before a timestep-embedded block."""
    chains = [c for n in gm.graph.nodes if n.op == "call_function" and (c := _raw_module_chain(n))]
    prefix, k = "", 0
    while chains and all(len(c) > k for c in chains) and len({c[k] for c in chains}) == 1:
        if _block_key([_strip(chains[0][k], prefix)]) is not None:
            break
        prefix, k = chains[0][k], k + 1
    return prefix


def _strip(path: str, prefix: str) -> str:
    if prefix and (path == prefix or path.startswith(prefix + ".")):
        return path[len(prefix) + 1:]
    return path


def _module_chain(node: fx.Node, prefix: str | None = None) -> list[str]:
    if prefix is None:  # set by annotate(); graphs not annotated yet keep full paths
        gm = node.graph.owning_module
        prefix = (getattr(gm, "meta", None) or {}).get("bqc", {}).get("module_prefix", "") if gm is not None else ""
    return [p for p in (_strip(path, prefix) for path in _raw_module_chain(node)) if p]


def weight_node(node: fx.Node) -> fx.Node | None:
    if op_kind(node) in WEIGHTED_KINDS and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        return node.args[1]
    return None


def bias_node(node: fx.Node) -> fx.Node | None:
    if op_kind(node) in WEIGHTED_KINDS and len(node.args) > 2 and isinstance(node.args[2], fx.Node):
        return node.args[2]
    return None


def _get_attr_tensor(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    if node is None or node.op != "get_attr":
        return None
    return gm.get_parameter(node.target) if node.target in dict(gm.named_parameters()) else getattr_path(gm, node.target)


def getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _params_and_macs(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    kind = op_kind(node)
    out = _shape(node)
    if kind in WEIGHTED_KINDS:
        w = _get_attr_tensor(gm, weight_node(node))
        b = _get_attr_tensor(gm, bias_node(node))
        params = (w.numel() if w is not None else 0) + (b.numel() if b is not None else 0)
        if w is None or out is None:
            return params, 0
        out_elems = math.prod(_int(d) for d in out[1:])  # per sample
        if kind == "conv":
            macs = out_elems * math.prod(w.shape[1:])
        else:
            macs = out_elems * w.shape[-1]
        return params, int(macs)
    if kind == "matmul" and out is not None:
        a = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if a is None:
            return 0, 0
        return 0, int(math.prod(_int(d) for d in out[1:]) * _int(a[-1]))
    if kind == "attention" and out is not None:
        q = _shape(node.args[0])
        k = _shape(node.args[1])
        if q is None or k is None:
            return 0, 0
        # QK^T and PV: 2 * heads * Lq * Lk * d
        return 0, int(2 * math.prod(_int(d) for d in q[1:-1]) * _int(k[-2]) * _int(q[-1]))
    return 0, 0


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name)
        for inp in n.all_input_nodes:
            g.add_edge(inp.name, n.name)
    return g


# block patterns: (regex on module path, section, key function) in priority order -------------
_BLOCK_RULES: list[tuple[re.Pattern, str]] = [
    # openaimodel / guided-diffusion / bqc.models
    (re.compile(r"^(input_blocks\.\d+)$"), "input"),
    (re.compile(r"^(middle_block)$"), "middle"),
    (re.compile(r"^(output_blocks\.\d+)$"), "output"),
    # diffusers UNet2DModel: a resnet and the attention after it form one block
    (re.compile(r"^(down_blocks\.\d+)\.(?:resnets|attentions)\.(\d+)$"), "input"),
    (re.compile(r"^(down_blocks\.\d+\.downsamplers)\.0$"), "input"),
    (re.compile(r"^(mid_block)$"), "middle"),
    (re.compile(r"^(up_blocks\.\d+)\.(?:resnets|attentions)\.(\d+)$"), "output"),
    (re.compile(r"^(up_blocks\.\d+\.upsamplers)\.0$"), "output"),
]


def _block_key(chain: list[str]) -> tuple[str, str] | None:
    for path in chain:
        parts = path.split(".")
        for i in range(len(parts)):  # a block may sit below a wrapper prefix not stripped
            lead, rest = ".".join(parts[:i]), ".".join(parts[i:])
            for rx, section in _BLOCK_RULES:
                m = rx.match(rest)
                if m:
                    return ".".join(([lead] if lead else []) + list(m.groups())), section
    return None


def _time_only_nodes(gm: fx.GraphModule) -> set[str]:
    """Nodes that depend on t (or y) but not on x: the time/label embedding computation."""
    g = to_networkx(gm)
    ph = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name != CONTEXT]
    x = ph[0]
    cond = [p for p in ph[1:3]]
    from_x = nx.descendants(g, x) | {x}
    from_t = set().union(*(nx.descendants(g, p) for p in cond)) if cond else set()
    return from_t - from_x


def _text_only_nodes(gm: fx.GraphModule) -> set[str]:
    """Nodes that depend on the text embedding ``context`` but not on x: the cross-attention
    key/value projections (the same at every sampling step of one prompt)."""
    if not any(n.op == "placeholder" and n.name == CONTEXT for n in gm.graph.nodes):
        return set()
    g = to_networkx(gm)
    x = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    return nx.descendants(g, CONTEXT) - nx.descendants(g, x)


def annotate(gm: fx.GraphModule, *, head_tail_blocks: int = HEAD_TAIL_BLOCKS) -> fx.GraphModule:
    """Run the analysis once and store it on the nodes (see :class:`NodeInfo`)."""
    g = to_networkx(gm)
    nodes = list(gm.graph.nodes)
    x = next(n for n in nodes if n.op == "placeholder")
    in_h = _shape(x)[-1]
    dist_in = nx.single_source_shortest_path_length(g, x.name)
    dist_out = nx.single_source_shortest_path_length(g.reverse(copy=False), gm.graph.output_node().name)
    time_only = _time_only_nodes(gm)
    text_only = _text_only_nodes(gm)
    graph_meta(gm)["module_prefix"] = wrapper_prefix(gm)

    block_order: dict[str, int] = {}
    block_section: dict[str, str] = {}
    for n in nodes:
        ni = NodeInfo(kind=op_kind(n), module=module_path(n))
        shape = _shape(n)
        if n.name in dist_in and ".transformer_blocks." in f".{ni.module}":
            # tokens inside a transformer block (B, L, C), split into heads (B, L, h, d) or
            # (B, h, L, d): no 4-D tensor there is an image, all sit at the block's level
            ni.level = max((n2.meta["bqc"]["level"] for n2 in n.all_input_nodes if "bqc" in n2.meta), default=0)
        elif shape is not None and len(shape) == 4 and n.name in dist_in:
            ni.level = max(1, round(in_h / max(_int(shape[-1]), 1)))
        elif n.name in dist_in:  # token-shaped (B, L, C) nodes inherit the level of their inputs
            ni.level = max((n2.meta["bqc"]["level"] for n2 in n.all_input_nodes if "bqc" in n2.meta), default=0)
        ni.params, ni.macs = _params_and_macs(gm, n)
        ni.dist_in = dist_in.get(n.name, -1)
        ni.dist_out = dist_out.get(n.name, -1)
        key = _block_key(_module_chain(n)) if n.op == "call_function" and (
            n.name in dist_in or n.name in time_only or n.name in text_only) else None
        if key is not None:
            bkey, section = key
            if bkey not in block_order:
                block_order[bkey] = len(block_order)
                block_section[bkey] = section
            ni.block = block_order[bkey]
            ni.section = section
        n.meta["bqc"] = asdict(ni)
        n.meta["bqc"]["time_only"] = n.name in time_only
        if text_only:  # text-conditioned graphs only (others' annotations stay as they were)
            n.meta["bqc"]["text_only"] = n.name in text_only

    blocks = [{"id": i, "name": k, "section": block_section[k]} for k, i in block_order.items()]
    meta = graph_meta(gm)
    meta["blocks"] = blocks
    _annotate_skips(gm, g, meta)
    assign_parts(gm)
    assign_roles(gm, head_tail_blocks=head_tail_blocks)
    return gm


_ALIAS_OPS = {"to", "_to_copy", "clone", "contiguous", "alias", "detach", "type_as"}


def _annotate_skips(gm: fx.GraphModule, g: nx.DiGraph, meta: dict) -> None:
    """Skip connections: (input block, output block) pairs joined by a concat.

    For each concat, the block of every operand is its nearest producer inside a block, and the
    consuming block is the nearest consumer inside a block (networkx BFS both ways).
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    rev = g.reverse(copy=False)

    def nearest(graph, start):
        for name in nx.bfs_tree(graph, start):
            if info(by_name[name]).get("block", -1) >= 0:
                return info(by_name[name])
        return None

    pairs = set()
    for n in gm.graph.nodes:
        if info(n).get("kind") != "concat" or not isinstance(n.args[0], (list, tuple)):
            continue
        dst = nearest(g, n.name)
        if dst is None or dst["section"] != "output":
            continue
        for src_node in n.args[0]:
            if not isinstance(src_node, fx.Node):
                continue
            while src_node.op == "call_function" and op_name(src_node) in _ALIAS_OPS and src_node.args:
                src_node = src_node.args[0]  # dtype no-ops alias their input (e.g. GroupNorm32's .float())
            src = nearest(rev, src_node.name)
            if src is not None and src["section"] in ("input", "middle") and src["block"] != dst["block"]:
                if src["section"] == "input":
                    pairs.add((src["block"], dst["block"]))
    meta["skips"] = sorted(pairs)


def _through_aliases(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and op_name(node) in _ALIAS_OPS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _alias_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node``, looking through dtype/copy no-ops."""
    out, todo = [], list(node.users)
    while todo:
        u = todo.pop()
        if u.op == "call_function" and op_name(u) in _ALIAS_OPS:
            todo.extend(u.users)
        else:
            out.append(u)
    return out


def is_residual_projection(node: fx.Node) -> bool:
    """A residual projection (openaimodel ``skip_connection``, diffusers ``conv_shortcut``,
    LDM ``nin_shortcut``), found by structure rather than by name: a 1x1 conv (or a linear)
    whose input also feeds a normalisation (the block's main path starts with a norm) and whose
    output is an operand of an ``add`` (the residual sum). An attention block's ``proj_out`` reads
    the attention output, not the block input, so it is not one."""
    kind = op_kind(node)
    if kind not in WEIGHTED_KINDS or node.op != "call_function" or not node.args:
        return False
    if kind == "conv":
        w = node.args[1] if len(node.args) > 1 else None
        shape = _shape(w) if isinstance(w, fx.Node) else None
        if shape is None or tuple(_int(d) for d in shape[2:]) not in ((1, 1), (1,)):
            return False
    x = node.args[0]
    if not isinstance(x, fx.Node):
        return False
    src = _through_aliases(x)
    if not any(op_kind(u) == "norm" for u in _alias_users(src)):
        return False
    return any(op_name(u) == "add" for u in _alias_users(node))


# transformer blocks (LDM SpatialTransformer, diffusers Transformer2DModel: the same module names)
_TRANSFORMER = r"(?:^|.*\.)transformer_blocks\.\d+\."
_PART_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(_TRANSFORMER + r"(attn\d+)\.to_(q|k|v)$"), "{attn}-{2}"),
    (re.compile(_TRANSFORMER + r"(attn\d+)\.to_out(?:\.0)?$"), "{attn}-out"),
    (re.compile(_TRANSFORMER + r"(attn\d+)$"), "{attn}-attn"),  # the attention products (bmm / SDPA)
    (re.compile(_TRANSFORMER + r"ff\.net\.0(?:\.proj)?$"), "ff-in"),  # GEGLU's projection (value and gate)
    (re.compile(_TRANSFORMER + r"ff\.net\.2$"), "ff-out"),
    (re.compile(_TRANSFORMER + r"norm\d+$"), "norm"),
]
_CONTAINER_PARTS = {"proj_in": "proj-in", "proj_out": "proj-out", "norm": "norm"}


def assign_parts(gm: fx.GraphModule) -> None:
    """``part``: what a layer (or norm) is inside a transformer block. Names give the slot (the
    module names LDM and diffusers share: ``attnN.to_q``, ``ff.net.0.proj``, ``proj_in`` ...);
    structure decides self- vs cross-attention: an attention module is cross-attention when some
    layer in it reads only the text embedding (``text_only``: its K/V projections)."""
    members = [n for n in gm.graph.nodes if info(n).get("kind") in QUANTIZABLE_KINDS + ("attention", "norm")]
    modules = {info(n).get("module", "") for n in gm.graph.nodes}
    containers = {m.rsplit(".transformer_blocks.", 1)[0] for m in modules if ".transformer_blocks." in m}
    cross = {info(n)["module"].rsplit(".", 1)[0] for n in gm.graph.nodes if info(n).get("text_only")
             and op_kind(n) in WEIGHTED_KINDS}
    for n in members:
        path = info(n).get("module", "")
        owner, _, last = path.rpartition(".")
        part = _CONTAINER_PARTS.get(last, "") if owner in containers else ""
        for rx, fmt in _PART_RULES:
            m = rx.match(path)
            if m:
                attn = path[:m.start(1)] + m.group(1) if m.groups() else ""
                part = fmt.format(*((None,) + m.groups()), attn="cross" if attn in cross else "self")
                break
        info(n)["part"] = part


def assign_roles(gm: fx.GraphModule, *, head_tail_blocks: int = HEAD_TAIL_BLOCKS) -> None:
    """Roles of weighted layers: input/output conv, time-embed, emb-proj, res-proj (residual
    projections), head/tail/body by block. ``place`` keeps head/body/tail for every layer
    inside the blocks, so a role of its own (res-proj) can still default to its position."""
    nodes = [n for n in gm.graph.nodes if info(n).get("kind") in QUANTIZABLE_KINDS + ("attention",)]
    nblocks = len(graph_meta(gm).get("blocks", []))
    image = [n for n in nodes if info(n)["kind"] in WEIGHTED_KINDS and not info(n)["time_only"]
             and not info(n).get("text_only")]
    first = min(image, key=lambda n: info(n)["dist_in"], default=None)
    last = min(image, key=lambda n: info(n)["dist_out"], default=None)
    for n in nodes:
        ni = info(n)
        if 0 <= ni["block"] < head_tail_blocks:
            ni["place"] = "head"
        elif ni["block"] >= 0 and ni["block"] >= nblocks - head_tail_blocks:
            ni["place"] = "tail"
        else:
            ni["place"] = "body"
        if ni["time_only"]:  # the global MLP, or a block's own projection of the embedding
            ni["role"] = "emb-proj" if ni["block"] >= 0 else "time-embed"
        elif ni.get("text_only"):  # cross-attention K/V: read the text embedding, not the image
            ni["role"] = "cross-kv"
        elif n is first:
            ni["role"] = "input"
        elif n is last:
            ni["role"] = "output"
        elif ni["block"] >= 0 and is_residual_projection(n):
            ni["role"] = "res-proj"
        else:
            ni["role"] = ni["place"]
    graph_meta(gm)["head_tail_blocks"] = head_tail_blocks


# tables and dumps -----------------------------------------------------------------------------
LAYER_FIELDS = ("name", "kind", "role", "level", "block", "params", "macs", "w_bits", "a_bits", "module", "part")


def layers(gm: fx.GraphModule, kinds: Iterable[str] = QUANTIZABLE_KINDS + ("attention",)) -> list[dict]:
    """One row per conv/linear/matmul (the things a recipe can quantize)."""
    rows = []
    for n in gm.graph.nodes:
        ni = info(n)
        if ni.get("kind") in kinds:
            rows.append({"name": n.name, **{k: ni.get(k) for k in LAYER_FIELDS[1:]}})
    return rows


def blocks_summary(gm: fx.GraphModule) -> list[dict]:
    rows = []
    for b in graph_meta(gm).get("blocks", []):
        members = [n for n in gm.graph.nodes if info(n).get("block") == b["id"]]
        levels = [info(n)["level"] for n in members if info(n).get("level")]
        rows.append({
            **b,
            "level": max(levels) if levels else 0,
            "layers": sum(1 for n in members if info(n)["kind"] in QUANTIZABLE_KINDS),
            "params": sum(info(n)["params"] for n in members),
            "macs": sum(info(n)["macs"] for n in members),
        })
    return rows


def _fmt_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_fmt_arg(x) for x in a) + "]"
    if isinstance(a, float):
        return f"{a:g}"
    return str(a)


def _target_name(n: fx.Node) -> str:
    if n.op == "call_function":
        return op_name(n)
    if n.op == "call_module":
        return f"{n.target}:{type(n.graph.owning_module.get_submodule(n.target)).__name__}"
    return str(n.target)


def _fmt_option(v: Any) -> str:
    """One option value in a dump note: bools as 0/1, lists as AxB, tables as {k=v,...}."""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, dict):
        return "{" + _fmt_options(v) + "}"
    if isinstance(v, (list, tuple)):
        return "x".join(_fmt_option(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fmt_options(d: dict, skip: tuple = ()) -> str:
    return ",".join(f"{k}={_fmt_option(v)}" for k, v in d.items() if k not in skip)


def _layer_note(ni: dict, plan: bool = True) -> str:
    """The annotation of a layer: kind, role, place in the UNet, bits and (once ``plan_quant``
    ran) its plan, i.e. the quantizer names of its spec (the bits are in ``wXaY``)."""
    note = (f"{ni['kind']} role={ni['role']} level={ni['level']} block={ni['block']}"
            f" w{ni['w_bits']}a{ni['a_bits']}")
    plan = ni.get("plan") if plan else None
    return note if plan is None else f"{note} plan({_fmt_options(plan, skip=('w_bits', 'a_bits'))})"


#: ``describe()`` keys a module note leaves out: the class name says the op, the layer's
#: ``wXaY`` the bits; ``parts`` come first, one ``name=kind(options)`` each
_MODULE_NOTE_SKIP = ("op", "parts", "w_bits", "a_bits", "w_bases")


def _module_note(n: fx.Node) -> str:
    """What a module a pass inserted says about itself (its ``describe()``), e.g.
    ``wq=ebb(bits=1,bases=2,stage=1) aq=lsq(bits=4,signed=1) bias=1 active=1``: which quantizer
    each part is, with the options that define its behaviour (never tensor values), so a
    recipe that swaps a binarizer changes the dump. '' for nodes that are not such modules."""
    if n.op != "call_module":
        return ""
    describe = getattr(n.graph.owning_module.get_submodule(n.target), "describe", None)
    if describe is None:
        return ""
    d = describe()
    parts = [f"{name}={p.get('kind', '?')}({_fmt_options(p, skip=('kind',))})"
             for name, p in d.get("parts", {}).items()]
    return " ".join(parts + [f"{k}={_fmt_option(v)}" for k, v in d.items() if k not in _MODULE_NOTE_SKIP])


def block_output(gm: fx.GraphModule, block: int) -> Optional[fx.Node]:
    """The output feature of UNet block ``block`` (annotate's ``block`` ids): the last node of the
    block whose value leaves it. Found from the annotations each time (not stored), so it stays
    right after passes replace nodes. TBS edges, distillation taps and the teacher's taps use it."""
    members = [n for n in gm.graph.nodes if info(n).get("block") == block]
    for n in reversed(members):
        if any(info(u).get("block") != block for u in n.users):
            return n
    return members[-1] if members else None


def dump(gm: fx.GraphModule, *, annotations: bool = True, details: bool = True) -> str:
    """A stable, diff-friendly text form of the graph (golden tests compare these).

    One line a node; with ``annotations`` a layer's line ends with its annotation
    (:func:`_layer_note`) and a module a pass inserted with its options (:func:`_module_note`),
    ``  # conv role=head level=1 block=1 w1a4 plan(weight=ebb,act=lsq) | wq=ebb(...) aq=lsq(...)``;
    the last line is the graph's signature (inputs and cross-timestep state). ``details=False``
    leaves out the plan and the module notes: the form bqc wrote into artifacts' graph.txt
    before Dec 2026, still accepted when they load."""
    lines = []
    for n in gm.graph.nodes:
        args = ", ".join(_fmt_arg(a) for a in n.args)
        line = f"{n.name} = {n.op} {_target_name(n)}({args})"
        ni = n.meta.get("bqc")
        if annotations:
            layer = _layer_note(ni, details) if ni and ni.get("kind") in QUANTIZABLE_KINDS + ("attention",) else ""
            notes = [note for note in (layer, _module_note(n) if details else "") if note]
            if notes:
                line += "  # " + " | ".join(notes)
        lines.append(line)
    meta = graph_meta(gm)
    lines.append(f"# inputs={meta.get('inputs')} state_inputs={meta.get('state_inputs')} state_outputs={meta.get('state_outputs')}")
    return "\n".join(lines) + "\n"


def with_outputs(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A view of ``gm`` (same parameters and submodules) that also returns the named nodes.

    Returns ``(*original outputs, *named)``. Used by the trainer to read distillation taps
    without hooks.
    """
    graph = fx.Graph()
    val_map: dict = {}
    outs = graph.graph_copy(gm.graph, val_map, return_output_node=False)
    by_name = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(f"no such nodes: {missing}")
    graph.output(tuple(outs) + tuple(val_map[by_name[n]] for n in names))
    view = fx.GraphModule(gm, graph)
    view.meta = gm.meta
    return view


def state_view(gm: fx.GraphModule) -> fx.GraphModule:
    """A view of ``gm`` (same parameters and submodules) that returns only its state outputs
    (``(*state_outputs,)``, the TBS caches), with the nodes only ``eps`` needs removed: BiDM's
    no-grad cache pass at t + d reads nothing else."""
    graph = fx.Graph()
    outs = graph.graph_copy(gm.graph, {}, return_output_node=False)
    graph.output(tuple(outs[1:]))
    view = fx.GraphModule(gm, graph)
    view.graph.eliminate_dead_code()
    view.recompile()
    view.meta = gm.meta
    return view


#: the torch meta a node made by a pass copies from the node it stands for (``val`` only when asked)
_INHERITED_META = ("nn_module_stack", "stack_trace")


def node_like(new: fx.Node, like: fx.Node, *, val: bool = False, **bqc) -> fx.Node:
    """Give ``new`` (a node a pass just made for ``like``) its meta: ``like``'s module stack and
    stack trace (and ``val`` if ``val=True``), and ``like``'s annotation updated with ``bqc``
    (e.g. ``kind="tbs", params=0, macs=0, role=""``). The one way passes annotate new nodes, so
    each new node is attributed to the module and block it belongs to. Returns ``new``."""
    keep = _INHERITED_META + (("val",) if val else ())
    new.meta = {k: v for k, v in like.meta.items() if k in keep}
    new.meta["bqc"] = {**info(like), **bqc}
    return new


def replace_node(old: fx.Node, new: fx.Node) -> fx.Node:
    """Replace ``old`` by ``new`` everywhere and give ``new`` the old node's name and meta.

    Layer names are stable across passes (they name quantizer modules, explanations, golden
    dumps and teacher/student taps), so a rewritten layer keeps its name. fx does not release
    an erased node's name, hence the one touch of its namespace here.
    """
    name = old.name
    new.meta = {**old.meta, **new.meta}
    old.replace_all_uses_with(new)
    graph = old.graph
    graph.erase_node(old)
    ns = graph._graph_namespace
    ns._used_names.discard(name)
    new._rename(name)
    if new.name != name:  # pragma: no cover - fx internals changed
        raise RuntimeError(f"could not keep node name {name!r} (got {new.name!r})")
    return new
