"""torch -> Relax import and the CPU compile pipeline for the floating-point path (TVM 0.27).

Public API
----------
``import_exported(ep_or_module, example_inputs=None, *, dynamic_batch=True, max_batch=1024) -> (IRModule, params)``
    ``torch.export.export`` (unless given an ``ExportedProgram``) with a dynamic batch
    dimension (dim 0 of every tensor input; the example batch must be >= 2) when
    ``dynamic_batch`` (falls back to a static export if torch refuses), then
    ``tvm.relax.frontend.torch.from_exported_program(ep, keep_params_as_input=True)`` and
    ``relax.frontend.detach_params``. ``params`` is ``{"main": [tvm tensors]}`` in the order of
    ``main``'s parameters after its ``num_input`` inputs.

``compile_relax(mod, params=None, target=None, *, schedule=True, prepack_conv=True, fast_math=True) -> CompiledRelax``
    Binds ``params`` as constants, runs :func:`float_pipeline`, lowers for the Relax VM
    (``tvm.compile`` with only the dataflow-lowering + finalize passes, since everything before
    is done) and wraps the result: ``obj(x, t) -> numpy``, accepting numpy arrays, torch
    tensors or ``tvm.runtime.Tensor``; ``obj.vm``, ``obj.ex`` (``export_library``),
    ``obj.mod`` (the scheduled module), ``obj.rules`` (schedule rule per PrimFunc).

``float_pipeline(target, *, schedule=True, prepack_conv=True, fast_math=True) -> tvm.transform.Pass``
    Relax with bound constants -> fused, scheduled TIR + ``call_tir``. For callers that
    assemble their own module (e.g. a deploy graph with ``call_tir`` to hand-written binary
    kernels): those kernels are left alone (see below). Passes, in order:

    1. ``DecomposeOpsForInference``, ``CanonicalizeBindings``, ``FoldConstant`` (weight
       transposes and bias reshapes become constants), ``EliminateCommonSubexpr`` (SiLU of the
       time embedding, recomputed by every ResBlock in the torch graph, is computed once);
    2. :class:`FloatRewrite`: float ``conv2d``/``conv1d`` with constant weights -> the packed
       ``bqc_fconv`` TE compute (weight packed to ``[OC/16, KH, KW, IC, 16]`` at compile time,
       input transposed to channels-last inside the kernel); ``sigmoid``/``silu``/``exp``/
       ``softmax`` -> versions on :func:`schedules.float_cpu.exp_poly` (a vectorisable
       polynomial; otherwise each element is a scalar libm ``expf`` call, which made
       GroupNorm+SiLU 10x slower), ``x * sigmoid(x)`` -> one SiLU, ``group_norm`` ->
       :func:`schedules.float_cpu.group_norm_compute` (affine folded); ``mean(x, axis=1,
       keepdims=True)`` (and an ``abs`` feeding it: XNOR-Net's K map) -> the channel-mean
       compute :func:`schedules.float_cpu.channel_mean_compute` (with ``prepack_conv``);
    3. ``LegalizeOps``, ``AnnotateTIROpPattern``, :class:`MarkFusable` (packed convs and TOPI
       ``group_norm`` get pattern ``kOutEWiseFusable`` so bias/residual adds fuse into the conv
       and SiLU into GroupNorm; 1-channel packed convs, the K maps, are made opaque so that a
       binary layer's epilogue fuses with its NHWC -> NCHW transpose instead), ``FoldConstant``,
       ``FuseOps``, ``FuseTIR``,
       ``DeadCodeElimination``;
    4. :class:`schedules.float_cpu.ScheduleFloatCPU`: a rule-based schedule for every PrimFunc,
       skipping the already-scheduled ones (``tirx.is_scheduled``/``bqc.scheduled`` attribute,
       opaque ``op_pattern = 8`` *with* a ``global_symbol``, or any non-serial loop).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.target import Target

from .schedules import float_cpu as fs

log = logging.getLogger(__name__)

__all__ = [
    "CompiledRelax",
    "FloatRewrite",
    "PrepackConv",
    "bind_params",
    "compile_relax",
    "float_pipeline",
    "import_exported",
]


# ----------------------------------------------------------------------------- import


def import_exported(ep_or_module, example_inputs: Sequence[Any] | None = None, *,
                    dynamic_batch: bool = True, max_batch: int = 1024):
    """torch model or ``ExportedProgram`` -> ``(IRModule, params)`` (see the module doc)."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    if isinstance(ep_or_module, torch.export.ExportedProgram):
        ep = ep_or_module
    else:
        if example_inputs is None:
            raise ValueError("import_exported: example_inputs are required to export a module")
        model = ep_or_module.eval()
        args = tuple(example_inputs)
        ep = None
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1, max=max_batch)
            dyn = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
            try:
                with torch.no_grad():
                    ep = torch.export.export(model, args, dynamic_shapes=dyn)
            except Exception as e:  # noqa: BLE001 - any export constraint failure: go static
                log.warning("dynamic-batch export failed (%s); exporting with a static batch", e)
        if ep is None:
            with torch.no_grad():
                ep = torch.export.export(model, args)
    mod = from_exported_program(ep, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    return mod, params


def _param_names(func: relax.Function) -> list[str]:
    n_in = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else 0
    return [p.name for p in func.params[n_in:]]


def bind_params(mod: tvm.IRModule, params, func_name: str = "main") -> tvm.IRModule:
    """Bind ``params`` (``{"main": [...]}`` from ``detach_params``, or ``{name: array}``) as
    constants of ``func_name`` and drop them from its signature."""
    if not params:
        return mod
    if func_name in params and isinstance(params[func_name], (list, tuple)):
        names = _param_names(mod[func_name])
        values = list(params[func_name])
        if len(names) != len(values):
            raise ValueError(f"bind_params: {len(values)} params for {len(names)} parameters of {func_name}")
        named = dict(zip(names, values))
    else:
        named = dict(params)
    named = {k: (v if isinstance(v, tvm.runtime.Tensor) else tvm.runtime.tensor(np.asarray(v)))
             for k, v in named.items()}
    mod = relax.transform.BindParams(func_name, named)(mod)
    func = mod[func_name]
    if func.attrs is not None and "num_input" in func.attrs:
        # every non-input parameter is bound now
        mod[func_name] = func.without_attr("num_input") if hasattr(func, "without_attr") else func
    return mod


# ----------------------------------------------------------------------------- conv prepack


def _const_array(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.expr.Constant):
        v = expr.value
        return v.numpy() if hasattr(v, "numpy") else None
    return None


def _fast_exp(x):
    from tvm import te

    return te.compute(x.shape, lambda *i: fs.exp_poly(x(*i)), name="fast_exp", tag="elemwise")


def _fast_sigmoid(x):
    from tvm import te

    one = tvm.tirx.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: one / fs.one_plus_exp_neg(x(*i), x.dtype), name="fast_sigmoid", tag="elemwise")


def _fast_silu(x):
    from tvm import te

    return te.compute(x.shape, lambda *i: x(*i) / fs.one_plus_exp_neg(x(*i), x.dtype), name="fast_silu", tag="elemwise")


def _is_f32(expr) -> bool:
    ty = getattr(expr, "ty", None)
    return isinstance(ty, relax.TensorType) and ty.dtype == "float32"


@relax.expr_functor.mutator
class _FloatRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, prepack_conv: bool = True, fast_math: bool = True):
        super().__init__(mod)
        self.mod_ = mod
        self.prepack = prepack_conv
        self.fast_math = fast_math
        self.conv2d = tvm.ir.Op.get("relax.nn.conv2d")
        self.conv1d = tvm.ir.Op.get("relax.nn.conv1d")
        self.math = {tvm.ir.Op.get(n): n for n in ("relax.sigmoid", "relax.nn.silu", "relax.nn.softmax", "relax.exp")}
        self.mean = tvm.ir.Op.get("relax.mean")
        self.group_norm = tvm.ir.Op.get("relax.nn.group_norm")
        self.multiply = tvm.ir.Op.get("relax.multiply")
        self.call_tir = tvm.ir.Op.get("relax.call_tir")
        self.sigmoids: set = set()  # GlobalVars of the emitted fast_sigmoid PrimFuncs
        self.abs = tvm.ir.Op.get("relax.abs")
        self.count = 0

    def _channel_mean(self, call):
        """``mean(x, axis=[1], keepdims=True)`` of a float32 ``[N, C, ...]`` tensor (and the
        ``abs`` feeding it, XNOR-Net's K map ``mean_c |x|``) -> :func:`fs.channel_mean_compute`;
        None if the call is not of that form."""
        a = call.attrs
        x = call.args[0]
        ty = getattr(x, "ty", None)
        if not _is_f32(x) or ty.ndim < 3 or a.axis is None or len(a.axis) != 1 or not bool(a.keepdims):
            return None
        if int(a.axis[0]) % ty.ndim != 1 or ty.shape is None or not isinstance(ty.shape[1], tvm.tirx.IntImm):
            return None
        absolute = False
        if isinstance(x, relax.Var):
            bound = self.lookup_binding(x)
            if isinstance(bound, relax.Call) and bound.op == self.abs and _is_f32(bound.args[0]):
                x, absolute = bound.args[0], True
        return self.builder_.call_te(fs.channel_mean_compute, x, absolute,
                                     primfunc_name_hint=fs.CMEAN_PREFIX)

    def _group_norm(self, call):
        """NCHW float32 ``group_norm`` over ``[H, W]`` with static C, H, W and both affine
        parameters -> :func:`fs.group_norm_compute`; None otherwise (TOPI's legalization)."""
        a = call.attrs
        x, gamma, beta = call.args
        ty = getattr(x, "ty", None)
        if not _is_f32(x) or ty.ndim != 4 or ty.shape is None or int(a.channel_axis) % 4 != 1 \
                or sorted(int(i) % 4 for i in a.axes) != [2, 3] or not (bool(a.center) and bool(a.scale)) \
                or not all(isinstance(ty.shape[i], tvm.tirx.IntImm) for i in (1, 2, 3)) \
                or not (_is_f32(gamma) and _is_f32(beta)):
            return None
        return self.builder_.call_te(fs.group_norm_compute, x, gamma, beta, int(a.num_groups),
                                     float(a.epsilon), primfunc_name_hint=fs.GROUP_NORM_PREFIX)

    def _math(self, call):
        from tvm import topi

        name = self.math[call.op]
        x = call.args[0]
        if not _is_f32(x):
            return call
        if name == "relax.sigmoid":
            new = self.builder_.call_te(_fast_sigmoid, x, primfunc_name_hint="fast_sigmoid")
            self.sigmoids.add(new.args[0])
            return new
        if name == "relax.nn.silu":
            return self.builder_.call_te(_fast_silu, x, primfunc_name_hint="fast_silu")
        if name == "relax.exp":
            return self.builder_.call_te(_fast_exp, x, primfunc_name_hint="fast_exp")
        if name == "relax.nn.softmax":
            ty = x.ty
            axis = int(call.attrs.axis) % ty.ndim
            width = fs.softmax_width(ty.shape[-1] if ty.shape is not None else None)
            if axis == ty.ndim - 1 and width:
                return self.builder_.call_te(fs.softmax_compute, x, width,
                                             primfunc_name_hint=fs.SOFTMAX_PREFIX)
            return self.builder_.call_te(topi.nn.fast_softmax, x, axis, primfunc_name_hint="fast_softmax")
        return call

    def _silu(self, call):
        """``x * sigmoid(x)`` (how torch.export spells SiLU) -> one ``x / (1 + exp(-x))``; the
        sigmoid, if nothing else reads it, is dropped by dead-code elimination."""
        args = list(call.args)
        for x, s in (args, args[::-1]):
            if not (isinstance(s, relax.Var) and _is_f32(x)):
                continue
            bound = self.lookup_binding(s)  # s = sigmoid(x): same shape as x, no broadcast
            if isinstance(bound, relax.Call) and bound.op == self.call_tir and bound.args[0] in self.sigmoids \
                    and bound.args[1][0].same_as(x):
                return self.builder_.call_te(_fast_silu, x, primfunc_name_hint="fast_silu")
        return None

    def visit_call_(self, call):  # noqa: N802 - TVM visitor name
        call = self.visit_expr_post_order(call)
        if not isinstance(call, tvm.ir.expr.Call):
            return call
        if self.fast_math and call.op == self.multiply:
            new = self._silu(call)
            return call if new is None else new
        if self.fast_math and call.op in self.math:
            return self._math(call)
        if self.fast_math and call.op == self.group_norm:
            new = self._group_norm(call)
            return call if new is None else new
        if self.prepack and call.op == self.mean:
            new = self._channel_mean(call)
            return call if new is None else new
        if not self.prepack or call.op not in (self.conv2d, self.conv1d):
            return call
        a = call.attrs
        nd = 2 if call.op == self.conv2d else 1
        layouts = ("NCHW", "OIHW") if nd == 2 else ("NCW", "OIW")
        if (int(a.groups) != 1 or str(a.data_layout) != layouts[0] or str(a.kernel_layout) != layouts[1]
                or str(a.out_layout) != layouts[0]):
            return call
        w = _const_array(call.args[1])
        x = call.args[0]
        x_ty = x.ty
        if w is None or not isinstance(x_ty, relax.TensorType) or x_ty.dtype != "float32" \
                or w.dtype != np.float32:
            return call
        out_dtype = str(a.out_dtype) or "float32"
        if out_dtype not in ("", "float32"):
            return call
        oc = int(w.shape[0])
        strides = [int(s) for s in a.strides]
        padding = [int(p) for p in a.padding]
        dilation = [int(d) for d in a.dilation]
        self.count += 1
        if nd == 2 and w.shape[2:] == (1, 1) and strides == [1, 1] and not any(padding) and dilation == [1, 1] \
                and all(isinstance(x_ty.shape[i], tvm.tirx.IntImm) for i in (1, 2, 3)):
            return self.builder_.call_te(
                fs.conv1x1_compute, x, relax.const(np.ascontiguousarray(w[:, :, 0, 0].T)), "float32",
                primfunc_name_hint=fs.CONV1X1_PREFIX,
            )
        wp = fs.pack_conv_weight(w)
        return self.builder_.call_te(
            fs.conv_packed_compute, x, relax.const(wp), oc, strides, padding, dilation, "float32",
            primfunc_name_hint=f"{fs.CONV_PREFIX}{nd}d",
        )

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="BqcFloatRewrite")
class FloatRewrite:
    """Relax-level rewrites for the CPU float path.

    * ``prepack_conv``: float NCHW/NCW ``relax.nn.conv2d``/``conv1d`` (groups 1) with a constant
      weight -> the packed compute :func:`schedules.float_cpu.conv_packed_compute` (weight packed at
      compile time); a 1x1 stride-1 unpadded conv2d with static channels and pixels ->
      :func:`schedules.float_cpu.conv1x1_compute` (NCHW in and out, weight ``[IC, OC]``).
    * ``fast_math``: ``sigmoid``/``silu``/``exp`` -> computes on :func:`fs.exp_poly`
      (vectorisable polynomial exp, max relative error 4.1e-7, versus a scalar libm call per
      element otherwise); ``x * sigmoid(x)`` (torch.export's SiLU) -> one ``x / (1 + e^-x)``;
      last-axis ``softmax`` -> :func:`fs.softmax_compute` (TOPI's ``fast_softmax`` where the
      row is not a multiple of 4 lanes twice over); NCHW ``group_norm`` ->
      :func:`fs.group_norm_compute` (``x * a + b`` with per-channel ``a``, ``b``).
    """

    def __init__(self, prepack_conv: bool = True, fast_math: bool = True):
        self.prepack_conv = prepack_conv
        self.fast_math = fast_math

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _FloatRewriter(mod, self.prepack_conv, self.fast_math).transform()


PrepackConv = FloatRewrite


def _out_channels(func) -> int | None:
    """Dim 1 of a PrimFunc's output (its last parameter), if static."""
    try:
        return int(func.params[-1].shape[1])
    except Exception:  # noqa: BLE001
        return None


@tvm.transform.module_pass(opt_level=0, name="BqcMarkViewsOpaque")
class MarkViewsOpaque:
    """Keep a kernel's input/output regroupings (``Converter._view``, :data:`fs.VIEW_PREFIX`)
    out of fusion, in every pipeline: fused, the transpose next to one would lose its plain
    indices (and FuseTIR rejects fusing it into a legalized op); alone,
    ``RewriteDataflowReshape`` makes it a zero-copy reshape."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith(fs.VIEW_PREFIX):
                mod[gv] = func.with_attr("op_pattern", fs.OP_PATTERN_OPAQUE)
        return mod


@tvm.transform.module_pass(opt_level=0, name="BqcMarkFusable")
class MarkFusable:
    """Give the packed convs and ``group_norm`` (ours or TOPI's) the ``kOutEWiseFusable``
    pattern so that FuseOps fuses their elementwise consumers (bias/residual adds; GroupNorm +
    SiLU); 1-channel packed convs (K maps) are made opaque instead (see ``transform_module``).

    Opaque functions that carry a ``global_symbol`` (hand-written kernels) are left alone."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            attrs = func.attrs or {}
            if "global_symbol" in attrs:
                continue
            name = gv.name_hint
            if name.startswith(fs.CONV_PREFIX) and _out_channels(func) == 1:
                # a 1-channel conv (XNOR-Net's K map, ``k * mean_c |x|``): fusing the layer's
                # elementwise epilogue into it would make the binary conv's NHWC -> NCHW
                # transpose a pass of its own; left alone, the epilogue fuses with the
                # transpose instead (one pass over the conv output) and the K conv writes
                # only [N, 1, H, W]
                updates[gv] = func.with_attr("op_pattern", fs.OP_PATTERN_OPAQUE)
            elif name.startswith(fs.CONV_PREFIX) or name.startswith(fs.GROUP_NORM_PREFIX):
                updates[gv] = func.with_attr("op_pattern", fs.OP_PATTERN_OUT_EWISE_FUSABLE)
        for gv, func in updates.items():
            mod[gv] = func
        return mod


# ----------------------------------------------------------------------------- pipeline


def float_pipeline(target, *, schedule: bool = True, prepack_conv: bool = True,
                   fast_math: bool = True) -> tvm.transform.Pass:
    """Relax (high-level ops, constants bound) -> fused, scheduled TIR + Relax ``call_tir``."""
    target = _as_target(target)
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        # e.g. SiLU(time embedding) is recomputed by every ResBlock in the torch graph
        relax.transform.EliminateCommonSubexpr(),
        relax.transform.CanonicalizeBindings(),
    ]
    if prepack_conv or fast_math:
        passes.append(FloatRewrite(prepack_conv, fast_math))
    passes += [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        MarkViewsOpaque(),
        MarkFusable(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    if schedule:
        passes.append(fs.ScheduleFloatCPU(target))
    seq = tvm.transform.Sequential(passes, name="bqc_float_pipeline")

    @tvm.transform.module_pass(opt_level=0, name="BqcFloatPipeline")
    def _pipeline(mod, _ctx):
        with target:
            return seq(mod)

    return _pipeline


def _vm_lowering(target) -> tvm.transform.Pass:
    from tvm.relax.backend.cpu_generic import pipeline as rp

    return tvm.transform.Sequential(rp.dataflow_lower_passes(target) + rp.finalize_passes(target))


def _as_target(target) -> Target:
    try:
        from .target import as_target

        if target is None:
            from .target import x86_target

            return x86_target(num_cores=os.cpu_count() or 1)
        return as_target(target)
    except ImportError:  # pragma: no cover
        return Target(target) if target is not None else Target({"kind": "llvm"})


@dataclass
class CompiledRelax:
    """A compiled Relax module: ``obj(*inputs) -> numpy array`` (or a tuple of them)."""

    ex: Any
    target: Target
    mod: tvm.IRModule  # the scheduled module that was built (before VM lowering)
    dev: Any = field(default=None)
    func_name: str = "main"

    def __post_init__(self):
        self.dev = self.dev or tvm.cpu(0)
        self.vm = relax.VirtualMachine(self.ex, self.dev)

    def to_tvm(self, inputs) -> list:
        out = []
        for a in inputs:
            if isinstance(a, tvm.runtime.Tensor):
                out.append(a)
                continue
            if hasattr(a, "detach"):  # torch tensor
                a = a.detach().cpu().contiguous().numpy()
            out.append(tvm.runtime.tensor(np.ascontiguousarray(a), self.dev))
        return out

    def run_tvm(self, *inputs):
        return self.vm[self.func_name](*self.to_tvm(inputs))

    def __call__(self, *inputs):
        return _to_numpy(self.run_tvm(*inputs))

    @property
    def rules(self) -> dict[str, str]:
        """Which schedule rule each PrimFunc got (see :func:`schedules.float_cpu.rules_used`)."""
        return fs.rules_used(self.mod)

    def export_library(self, path: str) -> None:
        self.ex.export_library(path)


def _to_numpy(out):
    if isinstance(out, tvm.runtime.Tensor):
        return out.numpy()
    if isinstance(out, (list, tuple)) or type(out).__name__ in ("Array", "Tuple"):
        items = [_to_numpy(o) for o in out]
        return items[0] if len(items) == 1 else tuple(items)
    return out


def compile_relax(mod: tvm.IRModule, params=None, target=None, *, schedule: bool = True,
                  prepack_conv: bool = True, fast_math: bool = True,
                  func_name: str = "main") -> CompiledRelax:
    """Bind ``params``, run :func:`float_pipeline`, build for ``target`` (default: this
    machine's x86 target with ``num-cores`` = the CPU count) and wrap it in a VM."""
    target = _as_target(target)
    mod = bind_params(mod, params, func_name)
    mod = float_pipeline(target, schedule=schedule, prepack_conv=prepack_conv, fast_math=fast_math)(mod)
    with target:
        ex = tvm.compile(mod, target, relax_pipeline=_vm_lowering(target))
    return CompiledRelax(ex=ex, target=target, mod=mod, func_name=func_name)
