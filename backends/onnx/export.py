"""``export_onnx``: a deploy graph -> ``model.onnx`` (ai.bqc custom domain) + ``model_fakequant.onnx``.

Route: the deploy graph (``bqc.deploy``) is copied, each deploy layer is wrapped in an export
adapter, and the result goes through torch's TorchScript-based exporter
(``torch.onnx.export(dynamo=False)``), then onnx-graphsurgeon folds constants, removes dead
nodes and names tensors. Two forms:

* ``model.onnx``: binary / integer layers as ``ai.bqc`` ops (``SignPack``, ``QuantizeCodes``,
  ``BinaryConv2d``, ``BinaryGemm``, ``IntConv2d``, ``IntGemm``, ``IntMatMul``; see
  :mod:`.ops` and docs/onnx.md) with packed ``uint32`` weight initializers named
  ``<layer>.w_packed``; the real-valued epilogue (K map, bias, shortcut, TBS blend) and the
  float parts of the UNet are standard ONNX. Runs in :mod:`.reference` (onnx's reference
  evaluator with the ai.bqc ops implemented on bqc.packing's bit-level references).
* ``model_fakequant.onnx``: standard ops only: ``sign(x + tau)`` as ``Where(x + tau >= 0, 1,
  -1)``, codes as ``Round(Clip(x / s))``, each binary layer a ``Conv``/``MatMul`` with ±1
  float weights followed by a per-channel ``Mul`` (integer-valued operands keep the float32
  accumulation exact below 2^24). onnxruntime runs it.

Both keep the deploy graph's signature: inputs ``x, t[, context][, y], tbs_cache_*, tbs_flag``
(``context``: a text-conditioned model's embedding ``(N, L, D)``; ``export.json`` records its
``[L, D]``), outputs ``eps, tbs_feat_*``, batch dimension dynamic (``tbs_flag`` is a scalar).
The export and its onnxruntime check use seeded inputs (:func:`bqc.deploy.step_inputs`,
``context`` included).
"""
from __future__ import annotations

import io
import json
import operator
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bqc import deploy as D
from bqc import ir
from bqc.deploy import step_inputs
from bqc.errors import BqcError
from bqc.signature import Signature

from . import ops

OPSET = 17
FORMS = ("custom", "fakequant")
FILES = {"custom": "model.onnx", "fakequant": "model_fakequant.onnx"}

aten = torch.ops.aten


@dataclass
class OnnxExport:
    out_dir: Path
    paths: dict[str, Path]
    manifest: dict
    verify: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def io_names(gm: fx.GraphModule) -> tuple[list[str], list[str]]:
    """The graph's input and output names (:class:`bqc.signature.Signature`)."""
    sig = Signature.of(gm)
    return list(sig.inputs), list(sig.outputs)


# ---------------------------------------------------------------------------------------------
# export adapters
# ---------------------------------------------------------------------------------------------
class _ExportShortcut(nn.Module):
    """Shortcut with the parameter-free channel pooling in standard ops: a Gather when every
    output channel copies one input channel (expansion by an integer factor), a
    reshape-and-mean when channels reduce by an integer factor, else a fixed 1x1 conv."""

    def __init__(self, sc: D.Shortcut, in_channels: int):
        super().__init__()
        self.sc, self.mode = sc, sc.channels
        self.register_buffer("index", None)
        self.register_buffer("chan", None)
        if sc.channels == "pool":
            m = sc.channel_matrix(in_channels)
            nz = (m != 0).sum(1)
            o, c = m.shape
            if bool((nz == 1).all()):
                self.mode, self.index = "gather", m.argmax(1)
            elif c % o == 0 and bool((nz == c // o).all()):
                self.mode, self.group = "mean", c // o
            else:
                self.mode, self.chan = "matrix", m.float()[:, :, None, None]

    def forward(self, x, out_hw):
        sc = self.sc
        if sc.stride != (1, 1):
            x = F.avg_pool2d(x, sc.stride, sc.stride, ceil_mode=True)
        if tuple(x.shape[-2:]) != tuple(out_hw):
            x = F.interpolate(x, size=tuple(out_hw), mode="nearest")
        if self.mode == "conv":
            x = F.conv2d(x, sc.proj)
        elif self.mode == "gather":
            x = torch.index_select(x, 1, self.index)
        elif self.mode == "mean":
            b, c, h, w = x.shape
            x = x.reshape(b, c // self.group, self.group, h, w).mean(2)
        elif self.mode == "matrix":
            x = F.conv2d(x, self.chan)
        return sc.scale * x


class _Adapter(nn.Module):
    """A deploy layer written for export: ``form`` "custom" (ai.bqc ops) or "fakequant"."""

    def __init__(self, mod: nn.Module, layer: str, form: str):
        super().__init__()
        self.m, self.layer, self.form = mod, layer, form
        if isinstance(mod, D._DeployConv) and mod.shortcut is not None:
            mod.shortcut = _ExportShortcut(mod.shortcut, mod.in_channels)
        if isinstance(mod, (D.BinaryConv2d, D.BinaryLinear, D.IntConv2d, D.IntLinear)):
            self.register_buffer("scale", mod.scale(torch.float32).contiguous())
        if form == "fakequant":
            if isinstance(mod, (D.BinaryConv2d, D.BinaryLinear)):
                self.register_buffer("signs", mod.signs().float())
            elif isinstance(mod, (D.IntConv2d, D.IntLinear)):
                self.register_buffer("wq", mod.w_codes.float())
        if isinstance(mod, (D.BinaryConv2d, D.BinaryLinear)):
            mod.w_packed = ops._i32(mod.w_packed)  # the TorchScript exporter has no uint32

    # activation quantizers ---------------------------------------------------------------
    def _quant(self, act, x, channels: int):
        """What the core consumes: bits / codes (custom form) or their values (fakequant)."""
        if act is None:
            return x
        if self.form == "custom":
            if act.kind == "bits":
                return ops.SignPack.apply(x, act.tau, act.ch_axis, channels, self.layer)
            if act.kind == "bits01":
                return ops.UnsignedPack.apply(x, act.step.float(), act.ch_axis, channels, self.layer)
            return ops.QuantizeCodes.apply(x, act.step.float(), act.qmin, act.qmax, act.bits, self.layer)
        if act.kind == "bits":
            v = act.shifted(x)
            return torch.where(v >= 0, 1.0, -1.0)
        return torch.round(torch.clamp(x / act.step.float(), act.qmin, act.qmax))

    def _codes(self, act, x, tag: str):
        """Integer codes of a matmul operand (custom form): ±1 int8 for signs."""
        if act.kind == "bits":
            return torch.where(act.shifted(x) >= 0, 1, -1).to(torch.int8)
        return ops.QuantizeCodes.apply(x, act.step.float(), act.qmin, act.qmax, act.bits, self.layer + tag)

    def _value(self, act, x, channels: int):
        """The fake-quant value of the input (for float-weight layers and float matmuls)."""
        if act is None:
            return x
        q = self._quant(act, x, channels)
        if act.kind == "bits":
            return act(x) if self.form == "custom" else q
        return q.float() * act.step.float()

    # layers --------------------------------------------------------------------------------
    def forward(self, x, *rest):
        m = self.m
        if isinstance(m, D.IntMatmul):
            return self._matmul(x, rest[0])
        if isinstance(m, D._DeployConv):
            y = self._conv(x)
        else:
            y = self._linear(x)
        return m.epilogue(x, y)

    def _conv(self, x):
        m = self.m
        if isinstance(m, D.FloatConv2d):
            return F.conv2d(self._value(m.act, x, m.in_channels), m.weight, None, m.stride, m.padding,
                            m.dilation, m.groups)
        xin = self._quant(m.act, x, m.in_channels)
        if self.form == "custom":
            fn = ops.BinaryConv2d if isinstance(m, D.BinaryConv2d) else ops.IntConv2d
            w = m.w_packed if isinstance(m, D.BinaryConv2d) else m.w_codes
            return fn.apply(xin, w, self.scale, m, self.layer)
        return self._sum_bases(isinstance(m, D.BinaryConv2d),
                               lambda w: F.conv2d(xin, w, None, m.stride, m.padding, m.dilation, m.groups),
                               lambda s: s.view(1, -1, 1, 1))

    def _sum_bases(self, binary: bool, op, per_channel):
        """Fake-quant form: sum over weight bases of ``op(W_b) * scale_b`` (one basis for
        integer weights), ``per_channel`` shaping the scale for the output."""
        weights = self.signs if binary else self.wq.unsqueeze(0)
        scale = self.scale if binary else self.scale.unsqueeze(0)
        y = None
        for b in range(weights.shape[0]):
            term = op(weights[b]) * per_channel(scale[b])
            y = term if y is None else y + term
        return y

    def _linear(self, x):
        m = self.m
        if isinstance(m, D.FloatLinear):
            return F.linear(self._value(m.act, x, m.in_features), m.weight)
        xin = self._quant(m.act, x, m.in_features)
        if self.form == "custom":
            fn = ops.BinaryGemm if isinstance(m, D.BinaryLinear) else ops.IntGemm
            w = m.w_packed if isinstance(m, D.BinaryLinear) else m.w_codes
            return fn.apply(xin, w, self.scale, m, self.layer)
        return self._sum_bases(isinstance(m, D.BinaryLinear), lambda w: torch.matmul(xin, w.t()), lambda s: s)

    def _matmul(self, a, b):
        m = self.m
        if m.integer:
            sa, sb = m.act_a.scale(torch.float32), m.act_b.scale(torch.float32)
            if self.form == "custom":
                qa, qb = self._codes(m.act_a, a, ".a"), self._codes(m.act_b, b, ".b")
                return ops.IntMatMul.apply(qa, qb, sa * sb, self.layer)
            return torch.matmul(self._quant(m.act_a, a, 0), self._quant(m.act_b, b, 0)) * (sa * sb)
        return torch.matmul(self._value(m.act_a, a, 0), self._value(m.act_b, b, 0))


def _is_symbolic(a) -> bool:
    if isinstance(a, fx.Node):
        return a.op == "call_method" and a.target == "size" or (
            a.op == "call_function" and a.target in (operator.mul, operator.add, operator.floordiv, operator.sub)
        ) or (a.op == "call_function" and a.target is aten.sym_size.int)
    return False


def _exportable(gm: fx.GraphModule) -> None:
    """Rewrite shape computations so the TorchScript tracer records them (dynamic batch), and
    ATen internals without an ONNX symbolic into their public ops.

    ``aten.sym_size.int(t, d)`` -> ``t.size(d)``; reshapes/views/expands whose target shape
    depends on such sizes -> the tensor methods (the tracer keeps sizes symbolic there).
    """
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.sym_size.int:
            n.op, n.target = "call_method", "size"
    methods = {aten.reshape.default: "reshape", aten.view.default: "reshape", aten.expand.default: "expand",
               aten._unsafe_view.default: "reshape"}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in methods:
            shape = n.args[1] if len(n.args) > 1 else None
            if isinstance(shape, (list, tuple)) and any(_is_symbolic(s) for s in shape):
                n.op, n.target = "call_method", methods[n.target]
                n.args = (n.args[0], *shape)
    # ATen internals the TorchScript exporter has no symbolic for -> their public forms
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (aten._softmax.default, aten._log_softmax.default):
            x, dim = n.args[0], n.args[1]
            n.target = aten.softmax.int if n.target is aten._softmax.default else aten.log_softmax.int
            n.args, n.kwargs = (x, dim), {}
    gm.recompile()


class _Program(nn.Module):
    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return tuple(self.gm(*args))


def export_module(gm: fx.GraphModule, form: str) -> nn.Module:
    """The deploy graph as an exportable module in ``form`` (on a copy)."""
    if form not in FORMS:
        raise BqcError(f"unknown ONNX form {form!r}; valid: {', '.join(FORMS)}")
    g = ir.fresh_copy(gm)
    for n in g.graph.nodes:
        if n.op == "call_module":
            mod = g.get_submodule(n.target)
            if isinstance(mod, D.DEPLOY_LAYERS):
                owner, _, attr = n.target.rpartition(".")
                setattr(g.get_submodule(owner), attr, _Adapter(mod, n.name, form))
    _exportable(g)
    return _Program(g).eval()


# ---------------------------------------------------------------------------------------------
# ONNX post-processing (onnx-graphsurgeon)
# ---------------------------------------------------------------------------------------------
_OUT_DTYPES = {"SignPack": np.uint32, "UnsignedPack": np.uint32, "QuantizeCodes": None}


def _tensor_name(s: str) -> str:
    """``/gm/conv2d_1/kmap/Conv`` -> ``conv2d_1.kmap.Conv``; ``gm.deploy.conv2d_1.m.bias`` ->
    ``conv2d_1.bias`` (the exporter's wrapper and adapter levels removed)."""
    s = s.strip("/").replace("/", ".")
    s = s[3:] if s.startswith("gm.") else s
    if s.startswith("deploy."):
        s = s[len("deploy."):].replace(".m.", ".", 1).replace(".sc.", ".", 1)
    return s


def _postprocess(model, *, custom: bool):
    import onnx
    import onnx_graphsurgeon as gs

    severity = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    try:
        return _postprocess_graph(gs.import_onnx(model), model, custom)
    finally:
        gs.logger.G_LOGGER.severity = severity


def _postprocess_graph(graph, model, custom: bool):
    import onnx
    import onnx_graphsurgeon as gs

    graph.fold_constants()
    graph.cleanup()
    used: set[str] = set()
    if custom:
        for node in graph.nodes:
            if node.domain != ops.DOMAIN:
                continue
            layer = node.attrs.pop("bqc_layer")
            node.name = f"{layer}/{node.op}"
            names = {"SignPack": [None, "tau"], "UnsignedPack": [None, "step"], "QuantizeCodes": [None, "step"],
                     "IntMatMul": [None, None, "scale"]}.get(node.op, [None, "w_codes", "scale"])
            if node.op in ("BinaryConv2d", "BinaryGemm"):
                names = [None, "w_packed", "scale"]
            for i, suffix in enumerate(names):
                if suffix is None or i >= len(node.inputs):
                    continue
                inp = node.inputs[i]
                if not isinstance(inp, gs.Constant):
                    raise BqcError(f"{layer}: {node.op} input {i} is not a constant after folding")
                values = inp.values
                if suffix == "w_packed":
                    values = np.ascontiguousarray(values).view(np.uint32)
                const = gs.Constant(f"{layer}.{suffix}", values)
                if const.name in used:
                    const = gs.Constant(f"{layer}.{suffix}.{i}", values)
                used.add(const.name)
                node.inputs[i] = const
            out = node.outputs[0]
            kind = {'SignPack': 'bits', 'UnsignedPack': 'bits', 'QuantizeCodes': 'codes'}.get(node.op, 'core')
            out.name = f"{layer}.{kind}"
            if out.name in used:
                out.name = f"{out.name}.{len(used)}"
            used.add(out.name)
            out.shape = None
            if node.op in ("SignPack", "UnsignedPack"):
                out.dtype = np.uint32
            elif node.op == "QuantizeCodes":
                out.dtype = np.int8 if node.attrs["qmin"] >= -128 and node.attrs["qmax"] <= 127 else np.int16
            else:
                out.dtype = np.float32
    # strip the exporter's wrapper prefix; name anonymous initializers after their first consumer
    for t in list(graph.tensors().values()):
        if isinstance(t, gs.Constant) and (t.name.startswith("gm.") or t.name.startswith("deploy.")):
            t.name = _tensor_name(t.name)
    for node in graph.nodes:
        for i, inp in enumerate(node.inputs):
            if isinstance(inp, gs.Constant) and (inp.name.startswith("onnx::") or inp.name[:1].isdigit()
                                                 or inp.name.startswith("/")):
                base = f"{_tensor_name(node.name)}.in{i}"
                name, k = base, 1
                while name in used:
                    name, k = f"{base}.{k}", k + 1
                inp.name = name
                used.add(name)
            elif isinstance(inp, gs.Constant):
                used.add(inp.name)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    domains = {o.domain: o.version for o in out.opset_import}
    if custom:
        domains[ops.DOMAIN] = ops.domain_version(_domain_features(out))
    del out.opset_import[:]
    for d, v in domains.items():
        out.opset_import.append(onnx.helper.make_opsetid(d, v))
    out.producer_name = "bqc"
    return out


def _domain_features(model) -> set[str]:
    """The ``ai.bqc`` op types and binary input kinds a model uses (what its domain version
    depends on, :func:`ops.domain_version`)."""
    out = set()
    for n in model.graph.node:
        if n.domain == ops.DOMAIN:
            out.add(n.op_type)
            out.update(a.s.decode() for a in n.attribute if a.name == "input_kind")
    return out


def _export(gm: fx.GraphModule, form: str, args: list[torch.Tensor], opset: int):
    import onnx

    prog = export_module(gm, form)
    sig = Signature.of(gm)
    inputs, outputs = list(sig.inputs), list(sig.outputs)
    dyn = {n: {0: "batch"} for n in inputs if n != sig.state_flag}
    dyn.update({n: {0: "batch"} for n in outputs})
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(prog, tuple(args), f, dynamo=False, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_axes=dyn, do_constant_folding=True,
                          custom_opsets={ops.DOMAIN: ops.DOMAIN_VERSION} if form == "custom" else None)
    model = onnx.load_from_string(f.getvalue())
    return _postprocess(model, custom=(form == "custom"))


def initializer_bytes(model) -> dict[str, int]:
    """Initializer bytes by kind: ``packed`` (uint32 words), ``int8``, ``float``, ``other``."""
    from onnx import TensorProto, numpy_helper

    out = {"packed": 0, "int8": 0, "float": 0, "other": 0}
    for init in model.graph.initializer:
        n = numpy_helper.to_array(init).nbytes
        kind = {TensorProto.UINT32: "packed", TensorProto.INT8: "int8", TensorProto.FLOAT: "float"}.get(
            init.data_type, "other")
        out[kind] += int(n)
    return out


def custom_op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain == ops.DOMAIN:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def verify_fakequant(path, gm: fx.GraphModule, args: list[torch.Tensor]) -> dict:
    """Run the fake-quant model in onnxruntime and compare with the deploy graph (torch).

    ``rel_err``: max |ort - torch| / max |torch| per output. ``frac_close``: the fraction of
    output elements within 1e-4 (relative to the output's max). A binary net can disagree in
    a few places where a value lies within float rounding of a sign / rounding boundary (the
    two runtimes round GroupNorm, SiLU... differently): then ``max_rel_err`` is large while
    ``frac_close`` stays near 1.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # deterministic reductions
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    got = sess.run(None, feed)
    with torch.no_grad():
        want = [o.numpy() for o in gm(*args)]
    errs = {o.name: _rel_err(g, w) for o, g, w in zip(sess.get_outputs(), got, want)}
    close = {o.name: float((np.abs(g - w) <= 1e-4 * max(float(np.abs(w).max()), 1e-30)).mean())
             for o, g, w in zip(sess.get_outputs(), got, want)}
    return {"batch": int(args[0].shape[0]), "rel_err": errs, "max_rel_err": max(errs.values()),
            "frac_close": close, "min_frac_close": min(close.values())}


def _save(model, path: Path) -> None:
    import onnx

    if model.ByteSize() > 1_900_000_000:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))


def export_onnx(src, out_dir, *, opset: int = OPSET, batch: int = 2, verify: bool = True,
                forms=FORMS) -> OnnxExport:
    """Write ``model.onnx`` (ai.bqc domain) and ``model_fakequant.onnx`` into ``out_dir``.

    ``src``: a deploy artifact (:class:`bqc.deploy.DeployArtifact`, its folder or zoo name) or a
    deploy graph (:func:`bqc.deploy.as_deploy_artifact`); fold a trained artifact first
    (:func:`bqc.deploy.fold`: ``bqc lower --backend onnx`` does). ``verify`` runs the fake-quant model in onnxruntime at batch 2 (with TBS state) and
    records the relative error against the deploy graph in ``export.json``.
    """
    import onnx

    if opset < 17:
        raise BqcError(f"opset {opset} is too old; bqc exports opset 17 or newer")
    gm = D.as_deploy_artifact(src).gm
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = step_inputs(gm, batch=batch, seed=0)
    paths, files, features = {}, {}, set()
    for form in forms:
        model = _export(gm, form, args, opset)
        features |= _domain_features(model)
        onnx.checker.check_model(model)
        path = out / FILES[form]
        _save(model, path)
        paths[form] = path
        files[FILES[form]] = {"bytes": path.stat().st_size, "initializers": initializer_bytes(model),
                              "custom_ops": custom_op_counts(model), "nodes": len(model.graph.node)}
    summary = D.deploy_summary(gm)
    manifest = {
        "format": "bqc-onnx", "opset": opset, "custom_domain": ops.DOMAIN,
        "custom_domain_version": ops.domain_version(features), "layout_version": D.LAYOUT_VERSION,
        **Signature.of(gm).to_json(),
        "files": files,
        "deploy": {"total_bytes": summary["total_bytes"], "nominal_bytes": summary["nominal_bytes"]},
    }
    result = OnnxExport(out, paths, manifest)
    if verify and "fakequant" in paths:
        result.verify = verify_fakequant(paths["fakequant"], gm, step_inputs(gm, batch=2, seed=1))
        manifest["verify"] = result.verify
    (out / "export.json").write_text(json.dumps(manifest, indent=2))
    return result
