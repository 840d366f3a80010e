"""CPU schedules for the floating-point part of a lowered UNet (TVM 0.27, ``tvm.s_tir``).

``tvm.compile`` leaves every legalized PrimFunc as plain single-threaded loops; this module
gives each fused float PrimFunc a rule-based schedule (no tuning run):

* **conv** (``bqc_fconv_*`` blocks, produced by :func:`conv_packed_compute` from the Relax
  rewrite in :mod:`.relax_import`): the weight is pre-packed to ``[OC/B, IC, KH, KW, B]``
  (``B`` = 16 output channels = one AVX-512 float vector); the accumulator is a register tile
  of ``OT x B`` output channels by ``HT x WT`` output pixels kept in a ``local`` buffer,
  reduced over ``(ic, kh, kw)`` with one broadcast input load per ``OT`` FMAs, then written back
  to NCHW together with the fused epilogue (bias, time-embedding add, residual add).
  The outer tiles (batch x channel blocks x rows x column blocks) run in parallel.
* **conv1x1** (``bqc_fconv1x1_*`` blocks, :func:`conv1x1_compute`: a 1x1 stride-1 unpadded
  conv, e.g. BiDM's full-precision residual projections): NCHW in and out, no channels-last
  copy; a register tile of ``OT`` output channels by about two vectors of pixels (whole short
  rows), one weight broadcast per output channel and pixel vectors loaded per input channel,
  written back with the epilogue (2-2.4x the packed conv on the zoo's 1x1 shapes).
* **gemm** (a reduction block whose body is ``sum(a * b)``: dense layers, attention
  ``bmm``, a topi conv left as is): output-stationary register tile with the innermost output
  axis vectorised, epilogue computed per tile.
* **groupnorm** (:func:`group_norm_compute`, or TOPI's ``group_norm``, + fused epilogue such as
  SiLU): statistics then ``x * a + b`` per ``(batch, group)`` in parallel, both vectorised
  along the contiguous spatial axis.
* **softmax** (``bqc_softmax_*`` blocks, :func:`softmax_compute`: the last axis): every stage
  per row under the output's row loop, the partial max / partial sum vectorised over their
  lane axis, ``exp`` (:func:`exp_poly`) and the normalisation over the row (2.3x TOPI's
  ``fast_softmax`` under dlight, whose max and sum were scalar dependency chains).
* **reduction** (anything else with a reduction): every block at root, outer spatial loops
  parallel, reduction loops inner; spatial blocks vectorised.
  ``tvm.s_tir.dlight.cpu.Reduction`` is tried first for the softmax-like pattern.
* **channel mean** (``bqc_cmean_*`` blocks from :func:`channel_mean_compute`, the K map's
  ``mean_c |x|``): channel loop outside, contiguous spatial axis vectorised inside.
* **injective** (SiLU, adds, concat, split, transpose, nearest upsample, the sin/cos time
  embedding): indices simplified under the block's bounds after inlining (a fused reshape
  chain leaves div/mod the vectoriser cannot see through); a block with reads (at least a
  quarter of its output's size) contiguous along another axis than its output's innermost
  one (NHWC <-> NCHW transposes, usually fused with a binary layer's epilogue or its input
  quantizer, also through a fused reshape) is tiled ``16 x 16`` (read axis
  unrolled, output axis vectorised: every read cache line used whole while in L1; 8 lanes
  where 16 would land in one L1 set); every other block fused flat, a 16-lane vectorised
  inner chunk where the trailing extent allows, the rest parallel.

Producers/consumers that are pure elementwise or reindexing (reshape, expand_dims, broadcast
adds) are inlined first. Small blocks (less than :data:`PARALLEL_MIN_WORK` scalar operations at
batch 1) are not parallelised: a fork/join costs more than they do.

Functions already scheduled are left untouched: :func:`is_scheduled` is true for a PrimFunc
with a ``tirx.is_scheduled``/``tir.is_scheduled``/``bqc.scheduled`` attribute, with any
non-serial loop (someone already parallelised/vectorised it), or with ``op_pattern == 8`` *and*
a ``global_symbol`` (a hand-written opaque kernel, e.g. from
:mod:`bqc.backends.tvm.kernels.build`; legalized TOPI functions such as ``group_norm`` are also
opaque but private, and those we do schedule).

Every schedule falls back to a simpler one if a primitive fails, down to "leave unchanged",
so a new op pattern costs speed, never correctness. The rule used is recorded in the
function attribute ``bqc.float_rule``.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import numpy as np
import tvm
from tvm import s_tir, te, tirx, topi
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.target import Target

log = logging.getLogger(__name__)

OP_PATTERN_OPAQUE = 8
OP_PATTERN_OUT_EWISE_FUSABLE = 4
#: output channels per packed weight block (16 float32 = one zmm register)
OC_BLOCK = 16
#: L1 data cache geometry assumed by the transpose tiling (line bytes, bytes one way spans,
#: ways): 32 KiB 8-way, common to x86 cores since Sandy Bridge and to Zen; a wrong guess only
#: costs speed
L1_LINE, L1_SET_SPAN, L1_WAYS = 64, 4096, 8
#: blocks doing less work than this (at batch 1) run single-threaded
PARALLEL_MIN_WORK = 1 << 14
#: maximum register accumulators (vectors) of a conv / gemm tile
MAX_ACC = 16
#: block-name prefix of the packed conv compute
CONV_PREFIX = "bqc_fconv"
#: name prefix of the pixel-regrouping reshapes next to a kernel (``Converter._view``), which
#: ``MarkViewsOpaque`` keeps out of fusion
VIEW_PREFIX = "bqc_view"
SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled", "bqc.scheduled")


def _nearbyint_vectorizable() -> None:
    """Mark ``tirx.nearbyint`` (round half to even: Relax's ``round``, torch's ``round``, the
    activation quantizers' rounding) vectorisable, as ``tirx.round`` and ``floor`` already are:
    TVM 0.27 does not, so every loop containing it fell back to scalar code (a [16, 64, 16, 16]
    quantizer 0.24 ms, 0.03 vectorised; LLVM lowers the vector form to one ``vrndscaleps`` /
    ``frintx``, same results)."""
    op = tvm.ir.Op.get("tirx.nearbyint")
    if op.get_attr("TVectorizable") is None:
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)


_nearbyint_vectorizable()


# ----------------------------------------------------------------------------- conv compute


def conv_block_size(out_channels: int) -> int:
    """Packed output-channel block: 16, or the next power of two for a narrower conv."""
    if out_channels >= OC_BLOCK:
        return OC_BLOCK
    b = 1
    while b < out_channels:
        b *= 2
    return b


def pack_conv_weight(w: np.ndarray, block: int | None = None) -> np.ndarray:
    """``[OC, IC, *K]`` -> ``[ceil(OC/B), *K, IC, B]`` (zero-padded output channels)."""
    w = np.asarray(w)
    oc = w.shape[0]
    nd = w.ndim - 2
    block = block or conv_block_size(oc)
    ocp = -(-oc // block) * block
    if ocp != oc:
        w = np.concatenate([w, np.zeros((ocp - oc,) + w.shape[1:], w.dtype)], axis=0)
    w = w.reshape((ocp // block, block) + w.shape[1:])  # [OCB, B, IC, *K]
    axes = (0,) + tuple(range(3, 3 + nd)) + (2, 1)
    return np.ascontiguousarray(w.transpose(axes))


def conv_packed_compute(x: te.Tensor, wp: te.Tensor, out_channels: int, strides: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int],
                        out_dtype: str | None = None) -> te.Tensor:
    """NC[H]W convolution with a packed weight ``wp[OC/B, *K, IC, B]`` (groups = 1).

    ``padding`` is Relax's ``[before..., after...]``. Stages: ``bqc_fconv_pad`` (the input
    zero-padded *and* transposed to channels-last ``[N, *IN_PADDED, IC]``, so that the reduction
    over input channels reads contiguous memory), ``bqc_fconv_acc[N, OC/B, *OUT, B]`` (the
    reduction, blocked layout, reduction order ``kh, kw, ic``), ``bqc_fconv_out[N, OC, *OUT]``
    (back to NCHW; the scheduler inlines it into the epilogue).
    """
    nd = len(x.shape) - 2
    out_dtype = out_dtype or x.dtype
    ic = x.shape[1]
    kernel = [int(k) for k in wp.shape[1:1 + nd]]
    block = int(wp.shape[-1])
    before = [int(p) for p in padding[:nd]]
    after = [int(p) for p in padding[nd:2 * nd]]
    strides = [int(s) for s in strides]
    dilation = [int(d) for d in dilation]
    in_sp = list(x.shape[2:])
    pad_shape = [in_sp[i] + before[i] + after[i] for i in range(nd)]

    def pad_f(*idx):
        n, sp, c = idx[0], idx[1:1 + nd], idx[-1]
        src = [sp[i] - before[i] for i in range(nd)]
        conds = []
        for i in range(nd):
            if before[i]:
                conds.append(sp[i] >= before[i])
            if after[i]:
                conds.append(sp[i] < before[i] + in_sp[i])
        val = x[(n, c, *src)]
        if not conds:
            return val
        return tirx.if_then_else(tirx.all(*conds), val, tirx.const(0, x.dtype))

    xp = te.compute((x.shape[0], *pad_shape, ic), pad_f, name=f"{CONV_PREFIX}_pad")
    out_sp = [
        (pad_shape[i] - dilation[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i in range(nd)
    ]
    rk = [te.reduce_axis((0, kernel[i]), name=f"rk{i}") for i in range(nd)]
    rc = te.reduce_axis((0, ic), name="rc")

    def acc_f(*idx):
        n, o = idx[0], idx[1]
        sp = idx[2:2 + nd]
        b = idx[-1]
        xi = [sp[i] * strides[i] + rk[i] * dilation[i] for i in range(nd)]
        return te.sum(xp[(n, *xi, rc)].astype(out_dtype) * wp[(o, *rk, rc, b)].astype(out_dtype),
                      axis=[*rk, rc])

    acc = te.compute((x.shape[0], wp.shape[0], *out_sp, block), acc_f, name=f"{CONV_PREFIX}_acc")
    return te.compute((x.shape[0], out_channels, *out_sp),
                      lambda *i: acc[(i[0], i[1] // block, *i[2:], i[1] % block)],
                      name=f"{CONV_PREFIX}_out")


CMEAN_PREFIX = "bqc_cmean"


#: block-name prefix of the 1x1 conv compute (:func:`conv1x1_compute`)
CONV1X1_PREFIX = f"{CONV_PREFIX}1x1"


def conv1x1_compute(x: te.Tensor, wt: te.Tensor, out_dtype: str | None = None) -> te.Tensor:
    """A 1x1 stride-1 unpadded NCHW conv with the pixels left where they are:
    ``out[n, o, h, w] = sum_c x[n, c, h, w] * wt[c, o]`` (``wt``: the ``[IC, OC]`` weight).

    In NCHW each input channel's pixels are contiguous, so the reduction over channels reads
    whole pixel vectors and broadcasts one weight per output channel, and the output is
    written NCHW as it is computed: no channels-last copy of the input (the ``_pad`` stage of
    :func:`conv_packed_compute`) and no transpose back. Stages: ``bqc_fconv1x1_acc`` (the
    reduction) and ``bqc_fconv1x1_out`` (identity; inlined into the epilogue)."""
    out_dtype = out_dtype or x.dtype
    rc = te.reduce_axis((0, x.shape[1]), name="rc")
    acc = te.compute((x.shape[0], wt.shape[1], x.shape[2], x.shape[3]),
                     lambda n, o, h, w: te.sum(x[n, rc, h, w].astype(out_dtype) * wt[rc, o].astype(out_dtype),
                                               axis=rc),
                     name=f"{CONV1X1_PREFIX}_acc")
    return te.compute(acc.shape, lambda *i: acc(*i), name=f"{CONV1X1_PREFIX}_out")


def channel_mean_compute(x: te.Tensor, absolute: bool = False) -> te.Tensor:
    """``mean(|x|, axis=1, keepdims=True)`` (or of ``x``) of an ``[N, C, *SP]`` tensor, as the
    sum over channels then a division by ``C`` (what Relax's ``mean`` legalizes to). Stages
    ``bqc_cmean_sum`` / ``bqc_cmean`` (see :func:`schedule_channel_mean`: the channel loop
    outside, the contiguous spatial axis vectorised, instead of a strided reduction per pixel).
    XNOR-Net's K map reads ``mean_c |x|`` before every binary conv with a K map."""
    shape = list(x.shape)  # the batch may be symbolic; C must be static
    c = int(shape[1])
    r = te.reduce_axis((0, c), name="rc")

    def f(n, _one, *sp):
        v = x[(n, r, *sp)]
        return te.sum(tirx.abs(v) if absolute else v, axis=r)

    s = te.compute([shape[0], 1, *shape[2:]], f, name=f"{CMEAN_PREFIX}_sum")
    return te.compute(s.shape, lambda *i: s(*i) / tirx.const(float(c), x.dtype), name=CMEAN_PREFIX)


#: exp(r) = 1 + r + r^2 q(r) on |r| <= ln2/2: q's coefficients, lowest first (a relative-error
#: minimax fit of degree 5: two multiply-adds fewer per element than Cephes' degree 7 in TOPI's
#: ``fast_exp``). Measured in float32 against float64: max relative error 1.6e-7 on |v| <= 1,
#: 4.1e-7 over the whole range (the one-constant ln 2 reduction adds n * 1e-9).
EXP_POLY = (0.499992311000824, 0.16667114198207855, 0.04189009591937065, 0.008312505669891834)
#: the input range of :func:`exp_poly` (e^88 < FLT_MAX; below -87.3 the result is the smallest
#: normal number's order instead of a denormal or 0)
EXP_LO, EXP_HI = -87.3, 88.0


def exp_poly(v):
    """``exp(v)`` of a float32 PrimExpr, vectorisable: ``2^n * p(r)`` with ``n = nearbyint(v /
    ln 2)``, ``r = v - n ln 2`` and :data:`EXP_POLY`; ``2^n`` built in the exponent bits."""
    f = lambda c: tirx.const(c, "float32")  # noqa: E731
    v = tirx.max(tirx.min(v, f(EXP_HI)), f(EXP_LO))
    n = tirx.nearbyint(v * f(1.4426950408889634))
    r = v - n * f(0.6931471805599453)
    q = f(EXP_POLY[-1])
    for c in EXP_POLY[-2::-1]:
        q = q * r + f(c)
    two_n = tirx.reinterpret("float32", (tirx.Cast("int32", n) + 127) << 23)
    return (q * (r * r) + r + f(1.0)) * two_n


GROUP_NORM_PREFIX = "group_norm"


#: lanes of GroupNorm's partial sums (:func:`group_norm_compute`)
GN_LANES = 16


def _pairwise_sum(terms: list):
    """``terms[0] + ... + terms[-1]`` as a balanced tree (depth log2 n instead of a chain)."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def group_norm_compute(x: te.Tensor, gamma: te.Tensor, beta: te.Tensor, groups: int,
                       eps: float) -> te.Tensor:
    """GroupNorm of an ``[N, C, H, W]`` tensor (the batch may be symbolic), as
    :func:`schedule_groupnorm` expects it: one reduction stage, the sum and sum of squares of
    each ``(n, group)`` as :data:`GN_LANES` partial sums over the flattened pixels (a plain
    data-parallel lane axis, vectorised); the per-channel ``a = gamma / std`` and
    ``b = beta - mean * a`` (partial sums added pairwise) as a small stage of their own; then
    ``x * a + b``: one multiply-add per element instead of TOPI's subtract, multiply and
    multiply-add (torch's CPU kernel computes it the same way), no serial 16-add chain per
    group (TOPI's rfactor), and no square root and division on the critical path in front of
    each channel's vector loop."""
    n_, c_, h_, w_ = x.shape
    c, h, w = int(c_), int(h_), int(w_)
    cpg = c // groups
    lanes = next((v for v in (GN_LANES, 8, 4, 2) if (h * w) % v == 0), 1)
    rc = te.reduce_axis((0, cpg), name="rc")
    rk = te.reduce_axis((0, h * w // lanes), name="rk")
    zero = tirx.const(0.0, x.dtype)
    sum_sumsq = te.comm_reducer(lambda a, b: (a[0] + b[0], a[1] + b[1]), lambda t0, t1: (zero, zero),
                                name="sum_sumsq")

    def stats(n, g, lane):
        p = rk * lanes + lane
        v = x[n, g * cpg + rc, p // w, p % w]
        return sum_sumsq((v, v * v), axis=[rc, rk])

    s, ss = te.compute((n_, groups, lanes), stats, name=f"{GROUP_NORM_PREFIX}_stats")
    inv = tirx.const(1.0 / (cpg * h * w), x.dtype)

    def scale_shift(n, ch):
        g = ch // cpg
        mean = _pairwise_sum([s[n, g, lane] for lane in range(lanes)]) * inv
        var = _pairwise_sum([ss[n, g, lane] for lane in range(lanes)]) * inv - mean * mean
        a = tirx.rsqrt(var + tirx.const(eps, x.dtype)) * gamma[ch]
        return a, beta[ch] - mean * a

    a, b = te.compute((n_, c), scale_shift, name=f"{GROUP_NORM_PREFIX}_scale")

    def norm(n, ch, i, j):
        return x[n, ch, i, j] * a[n, ch] + b[n, ch]

    return te.compute(x.shape, norm, name=GROUP_NORM_PREFIX)


SOFTMAX_PREFIX = "bqc_softmax"


#: vector widths :func:`softmax_compute` splits a row into, widest first
SOFTMAX_WIDTHS = (16, 8, 4)


def softmax_width(length) -> int:
    """The partial-result width :func:`softmax_compute` uses for rows of ``length`` elements (a
    static int or IntImm): the widest of :data:`SOFTMAX_WIDTHS` that divides it with at least two
    vectors per row; 0 (use TOPI's ``fast_softmax``) for a symbolic or too short row."""
    if isinstance(length, tirx.IntImm):
        length = int(length)
    if not isinstance(length, int):
        return 0
    return next((w for w in SOFTMAX_WIDTHS if length % w == 0 and length >= 2 * w), 0)


def one_plus_exp_neg(x, dtype: str):
    """``1 + e^-x`` on :func:`exp_poly` (``x`` a scalar expression of ``dtype``): the denominator
    of the sigmoid and of SiLU's ``x / (1 + e^-x)``."""
    return tirx.const(1.0, dtype) + exp_poly(-x)


def softmax_compute(x: te.Tensor, width: int) -> te.Tensor:
    """Softmax over the last axis (static length, a multiple of ``width``; the leading axes may
    be symbolic) in stages :func:`schedule_softmax` vectorises: the row maximum and the sum of
    exponentials each as ``width`` partial results (a plain data-parallel axis, no rfactor)
    reduced once more, ``exp(x - max)`` (:func:`exp_poly`) kept, and
    the normalisation as one multiply by the row's reciprocal sum."""
    *rows, length = x.shape
    k = int(length) // width
    r = te.reduce_axis((0, k), name="rk")
    rv = te.reduce_axis((0, width), name="rv")
    mx_p = te.compute((*rows, width), lambda *i: te.max(x[(*i[:-1], r * width + i[-1])], axis=r),
                      name=f"{SOFTMAX_PREFIX}_maxp")
    mx = te.compute(rows, lambda *i: te.max(mx_p[(*i, rv)], axis=rv), name=f"{SOFTMAX_PREFIX}_max")
    e = te.compute(x.shape, lambda *i: exp_poly(x(*i) - mx(*i[:-1])), name=f"{SOFTMAX_PREFIX}_exp")
    r2 = te.reduce_axis((0, k), name="rk")
    rv2 = te.reduce_axis((0, width), name="rv")
    s_p = te.compute((*rows, width), lambda *i: te.sum(e[(*i[:-1], r2 * width + i[-1])], axis=r2),
                     name=f"{SOFTMAX_PREFIX}_sump")
    s = te.compute(rows, lambda *i: te.sum(s_p[(*i, rv2)], axis=rv2), name=f"{SOFTMAX_PREFIX}_sum")
    one = tirx.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: e(*i) * (one / s(*i[:-1])), name=SOFTMAX_PREFIX)


# ----------------------------------------------------------------------------- helpers


def _int(e) -> int | None:
    if isinstance(e, int):
        return e
    if isinstance(e, tirx.IntImm):
        return int(e.value)
    return None


def _extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    return _int(sch.get(loop).extent)


def _extent1(sch, loop) -> int:
    """Extent with symbolic extents counted as 1 (work estimates at batch 1)."""
    e = _extent(sch, loop)
    return 1 if e is None else e


def _root(sch: s_tir.Schedule) -> SBlockRV:
    return sch.get_sblock(sch.mod["main"].body.block.name_hint)


def _blocks(sch: s_tir.Schedule) -> list[SBlockRV]:
    return list(sch.get_child_blocks(_root(sch)))


def _name(sch, block) -> str:
    return sch.get(block).name_hint


def _iter_kinds(sch, block) -> list[int]:
    """Iter types of a block: 0 data-parallel, 2 reduction (others: opaque etc.)."""
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _is_spatial(sch, block) -> bool:
    return all(k == 0 for k in _iter_kinds(sch, block))


def _is_reduction(sch, block) -> bool:
    kinds = _iter_kinds(sch, block)
    return any(k == 2 for k in kinds) and all(k in (0, 2) for k in kinds)


def _all_blocks_recursive(sch) -> list[SBlockRV]:
    out, todo = [], _blocks(sch)
    while todo:
        b = todo.pop()
        out.append(b)
        todo.extend(sch.get_child_blocks(b))
    return out


def is_scheduled(func: tirx.PrimFunc) -> bool:
    """True if ``func`` must not be touched (see the module docstring)."""
    attrs = func.attrs or {}
    for key in SCHEDULED_ATTRS:
        if key in attrs and bool(attrs[key]):
            return True
    if "op_pattern" in attrs and int(attrs["op_pattern"]) == OP_PATTERN_OPAQUE and "global_symbol" in attrs:
        return True
    try:
        sch = s_tir.Schedule(func)
        for b in _all_blocks_recursive(sch):
            for lp in sch.get_loops(b):
                if int(sch.get(lp).kind) != 0:
                    return True
    except Exception:  # not a schedulable (sblock) function: leave it alone
        return True
    return False


def _vec_lanes(target: Target | None, bits: int = 32) -> int:
    if target is None:
        return 16
    try:
        from tvm.target.codegen import llvm_get_vector_width

        w = int(llvm_get_vector_width(target))
    except Exception:
        w = 0
    if w <= 0:
        w = 512
    return max(4, w // bits)


def _largest_divisor(n: int | None, limit: int) -> int:
    if n is None:
        return 1
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def _inline_injective(sch: s_tir.Schedule, keep: Callable[[str], bool] = lambda n: False) -> None:
    """Inline every spatial non-output block (compute_inline, else reverse_compute_inline)."""
    changed = True
    while changed:
        changed = False
        outputs = {_name(sch, b) for b in sch.get_output_blocks(_root(sch))}
        for b in _blocks(sch):
            name = _name(sch, b)
            if keep(name) or not _is_spatial(sch, b):
                continue
            if name not in outputs:
                try:
                    sch.compute_inline(b)
                    changed = True
                    break
                except Exception:
                    pass
            try:
                sch.reverse_compute_inline(b)
                changed = True
                break
            except Exception:
                pass


def _work(sch, block) -> int:
    return int(np.prod([_extent1(sch, lp) for lp in sch.get_loops(block)] or [1]))


def _parallel(sch, loop, work: int) -> None:
    if work >= PARALLEL_MIN_WORK:
        sch.parallel(loop)


# ----------------------------------------------------------------------------- rules


def _block_bindings(sch, block) -> list | None:
    """The loop variables the block's iter vars are bound to (in iter-var order; a constant for
    an extent-1 axis whose loop ``StmtSimplify`` removed), or None if the block is not directly
    under its innermost loop or some binding is neither."""
    loops = sch.get_loops(block)
    if not loops:
        return None
    realize = sch.get(loops[-1]).body
    if type(realize).__name__ != "SBlockRealize":
        return None
    vals = list(realize.iter_values)
    if not all(isinstance(v, (tirx.Var, tirx.IntImm)) for v in vals):
        return None
    return vals


def _is_load(expr) -> bool:
    # 0.27: tirx.BufferLoad is a constructor function; the node class is ir.expr.TensorLoad
    return type(expr).__name__ in ("TensorLoad", "BufferLoad")


def _load_buffer(ld):
    src = getattr(ld, "source", None)
    return src if src is not None else getattr(ld, "buffer", None)


def _loads(expr, out: list) -> list:
    """Every buffer load in a PrimExpr tree (no TVM Python visitor in 0.27's tirx)."""
    if _is_load(expr):
        out.append(expr)
        for i in expr.indices:
            _loads(i, out)
        return out
    for field in ("a", "b", "value", "condition", "true_value", "false_value", "body"):
        sub = getattr(expr, field, None)
        if isinstance(sub, tvm.ir.expr.Expr):
            _loads(sub, out)
    args = getattr(expr, "args", None)
    if args is not None:
        for a in args:
            if isinstance(a, tvm.ir.expr.Expr):
                _loads(a, out)
    return out


def _read_iters(sch, block) -> dict[int, tuple[int, int | None]]:
    """``{i: (weight, period)}`` over the block iter vars ``i`` that walk the innermost axis of
    some of the block's loads: ``weight`` sums the elements of those loads' buffers (all 32-bit
    here), ``period`` is set when the reads are contiguous only within runs of ``period`` steps
    of ``i`` (an inner axis of a reshape fused before the transpose: index ``v % period``).
    Indices are simplified under the iter vars' bounds first, so the zero terms a fused reshape
    leaves (``v // 64`` for ``v < 64``) do not hide a plain variable. Only loads whose innermost
    index is a plain iter var, plus a constant, or that modulo a constant count."""
    st = sch.get(block)
    if not isinstance(st.body, tirx.BufferStore):
        return {}
    ana = tvm.sym.Analyzer()
    for iv in st.iter_vars:
        ana.bind(iv.var, iv.dom)
    found: dict[int, tuple[int, int | None]] = {}
    for ld in _loads(st.body.value, []):
        buf = _load_buffer(ld)
        if buf is None:
            continue
        shape = [_int(d) for d in buf.shape]
        if any(d is None for d in shape) or not ld.indices:
            continue
        last = ana.simplify(ld.indices[-1])
        mod = None
        if isinstance(last, tirx.FloorMod) and isinstance(last.b, tirx.IntImm):
            last, mod = last.a, int(last.b.value)
        if isinstance(last, tirx.Add) and isinstance(last.b, tirx.IntImm):
            last = last.a
        if not isinstance(last, tirx.Var):
            continue
        idx = next((i for i, iv in enumerate(st.iter_vars) if iv.var.same_as(last)), None)
        if idx is None:
            continue
        weight, period = found.get(idx, (0, None))
        if mod is not None:
            period = math.gcd(period, mod) if period else mod
        found[idx] = (weight + int(np.prod(shape)), period)
    return found


def _gather_lines_per_set(sch, block, it: int) -> float:
    """Per vector lane, how many of the cache lines a vectorised gather along block iter var
    ``it`` lands in one L1 set: lanes ``stride`` bytes apart share a set when ``stride`` is a
    multiple of the set span (:data:`L1_SET_SPAN`; a channel stride of 32x32 float pixels is
    4 KiB, so 16 lanes would fall in one 8-way set and evict each other on every load).
    The largest over the block's loads."""
    st = sch.get(block)
    if not isinstance(st.body, tirx.BufferStore):
        return 0.0
    var = st.iter_vars[it].var
    worst = 0.0
    for ld in _loads(st.body.value, []):
        buf = _load_buffer(ld)
        if buf is None:
            continue
        shape = [_int(d) for d in buf.shape]
        if any(d is None for d in shape):
            continue
        k = next((k for k, e in enumerate(ld.indices)
                  if any(v.same_as(var) for v in tirx.analysis.undefined_vars(e, []))), None)
        if k is None or k == len(shape) - 1:
            continue
        stride = int(np.prod(shape[k + 1:], dtype=np.int64)) * tvm.runtime.DataType(buf.dtype).bits // 8
        lines = max(1, stride // L1_LINE)
        sets = L1_SET_SPAN // L1_LINE
        worst = max(worst, 1.0 / (sets // math.gcd(lines, sets)))
    return worst


def _schedule_transpose_block(sch, block, lanes: int) -> bool:
    """A spatial block with reads contiguous along another axis than the output's innermost one
    (:func:`_read_iters`; NHWC <-> NCHW transposes, usually fused with a binary layer's
    epilogue): tile both
    axes, ``T x V`` (read axis unrolled, output axis vectorised), so that each read cache
    line is used whole while it is in L1. False if the block is not of that form."""
    kinds = _iter_kinds(sch, block)
    if any(k != 0 for k in kinds):
        return False
    loops = sch.get_loops(block)
    binds = _block_bindings(sch, block)
    if binds is None or len(loops) < 2:
        return False
    loop_vars = [sch.get(lp).loop_var for lp in loops]
    # iter var i bound to loop pos[i] (None: bound to a constant)
    pos = []
    for v in binds:
        j = None if isinstance(v, tirx.IntImm) else next(
            (k for k, lv in enumerate(loop_vars) if lv.same_as(v)), None)
        if j is None and not isinstance(v, tirx.IntImm):
            return False
        pos.append(j)
    ext = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in ext):
        return False
    bound = [j for j in pos if j is not None]
    if len(set(bound)) != len(bound) or any(ext[j] != 1 for j in range(len(loops)) if j not in bound):
        return False
    # innermost output axis with extent > 1 (the write-contiguous one)
    inner = next((j for j in range(len(loops) - 1, -1, -1) if ext[j] > 1), None)
    if inner is None:
        return False
    # the read axis: the heaviest one other than the output's (loads along the output's axis
    # stay vector loads in the tile), if its loads are at least a quarter of the output's size
    # (a residual or shortcut read in NCHW next to the transposed kernel output must not hide
    # it: flat, every lane of the transposed read is a separate cache line)
    others = {i: wp for i, wp in _read_iters(sch, block).items() if pos[i] != inner}
    if not others:
        return False
    rd = max(others, key=lambda i: others[i][0])
    weight, period = others[rd]
    rloop = pos[rd]
    if 4 * weight < int(np.prod(ext)) or ext[rloop] < 4 or ext[inner] < 4:
        return False
    ways = _gather_lines_per_set(sch, block, pos.index(inner))
    vec = next((v for v in (lanes, 8, 4) if ext[inner] % v == 0 and v * ways <= L1_WAYS), 0)
    tile = _largest_divisor(math.gcd(ext[rloop], period) if period else ext[rloop], lanes)
    if not vec or tile < 4:
        return False
    work = _work(sch, block)
    io, ii = sch.split(loops[inner], factors=[None, vec])
    ro, ri = sch.split(loops[rloop], factors=[None, tile])
    outer = []
    for j, lp in enumerate(loops):
        if j == inner:
            outer.append(io)
        elif j == rloop:
            outer.append(ro)
        else:
            outer.append(lp)
    sch.reorder(*outer, ri, ii)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    _parallel(sch, fused, work)
    sch.unroll(ri)
    sch.vectorize(ii)
    return True


def _schedule_injective_block(sch, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    try:
        if _schedule_transpose_block(sch, block, lanes):
            return
    except Exception as e:  # noqa: BLE001 - fall back to the flat schedule
        log.debug("transpose tiling failed: %s", e)
        loops = sch.get_loops(block)
    work = _work(sch, block)
    # trailing constant extent: how many inner elements we may vectorise across
    trailing = 1
    for lp in reversed(loops):
        e = _extent(sch, lp)
        if e is None:
            break
        trailing *= e
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    vec = 0
    for v in (lanes, 8, 4):
        if trailing % v == 0 and trailing >= v:
            vec = v
            break
    if vec:
        outer, inner = sch.split(fused, factors=[None, vec])
        _parallel(sch, outer, work)
        sch.vectorize(inner)
    else:
        _parallel(sch, fused, work)


def _schedule_reduction_block(sch, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block)
    # loops are in iter order for TOPI blocks: leading spatial loops then reductions
    nlead = 0
    for k in kinds:
        if k != 0:
            break
        nlead += 1
    if nlead == 0 or len(loops) != len(kinds):
        return
    work = _work(sch, block)
    lead = sch.fuse(*loops[:nlead]) if nlead > 1 else loops[0]
    _parallel(sch, lead, work)
    inner = sch.get_loops(block)[-1]
    e = _extent(sch, inner)
    if e is not None and e > 4 and kinds[-1] == 2:
        sch.annotate(inner, "pragma_auto_unroll_max_step", min(e, 16))
        sch.annotate(inner, "pragma_unroll_explicit", 0)


def _simplified(sch: s_tir.Schedule) -> s_tir.Schedule:
    """A fresh schedule of ``sch``'s function with every index simplified under its block's iter
    var bounds (``StmtSimplify``). Inlining a fused reshape chain leaves indices such as
    ``x[((h * 16 + c // 32 + w) // 256 + n) % 16, c % 32 * 2, ...]`` for ``x[n, c * 2, h, w]``,
    which the vectoriser cannot prove contiguous: every lane became a scalar load."""
    return s_tir.Schedule(s_tir.transform.StmtSimplify()(sch.mod))


def schedule_elementwise(sch, target) -> tuple[str, s_tir.Schedule]:
    lanes = _vec_lanes(target)
    _inline_injective(sch)
    sch = _simplified(sch)
    for b in _blocks(sch):
        _schedule_injective_block(sch, b, lanes)
    return "injective", sch


def schedule_generic_reduction(sch, target) -> str:
    lanes = _vec_lanes(target)
    _inline_injective(sch)
    for b in _blocks(sch):
        if _is_spatial(sch, b):
            _schedule_injective_block(sch, b, lanes)
        elif _is_reduction(sch, b):
            _schedule_reduction_block(sch, b, lanes)
    return "reduction"


def _gemm_like(sch, block) -> bool:
    """A reduction block whose value is ``acc + a * b`` (two loads multiplied)."""
    if not _is_reduction(sch, block):
        return False
    st = sch.get(block)
    body = st.body
    if not isinstance(body, tirx.BufferStore) or len(st.writes) != 1:
        return False
    v = body.value
    if not isinstance(v, tirx.Add):
        return False
    terms = [v.a, v.b]
    prod = [t for t in terms if isinstance(t, tirx.Mul)]
    return len(prod) == 1 and len(st.reads) >= 2


def _tile_reduction_under(sch, acc: SBlockRV, out: SBlockRV, lanes: int, *,
                          vec_acc_axis: int, out_tiles: list[tuple[int, int]],
                          n_parallel: int, work: int, vec_fuse: bool = False) -> None:
    """Shared core of the conv and gemm rules.

    ``out_tiles``: for each loop of the consumer block ``out`` (in order), the inner tile
    size (1 = no split). The outer parts of the first ``n_parallel`` loops and of the others
    form the tile loop nest (first ``n_parallel`` fused and parallel); ``acc`` is computed at
    the innermost outer loop, its reduction loops hoisted above its spatial loops, the
    ``vec_acc_axis``-th spatial loop of ``acc`` vectorised and the rest unrolled.
    ``vec_fuse``: the last two spatial loops of ``acc`` are fused first and vectorised in
    chunks of ``lanes`` (pixels of several short rows in one vector).
    """
    loops = sch.get_loops(out)
    assert len(loops) == len(out_tiles)
    outers, inners = [], []
    for lp, (tile, _) in zip(loops, out_tiles):
        if tile > 1:
            o, i = sch.split(lp, factors=[None, tile])
        else:
            o, i = lp, None
        outers.append(o)
        if i is not None:
            inners.append(i)
    sch.reorder(*outers, *inners)
    par = sch.fuse(*outers[:n_parallel]) if n_parallel > 1 else outers[0]
    rest = outers[n_parallel:]
    if rest:
        at = sch.fuse(*rest) if len(rest) > 1 else rest[0]
        par = sch.fuse(par, at)
    _parallel(sch, par, work)
    sch.compute_at(acc, par, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    aloops = sch.get_loops(acc)[1:]  # under `par`
    kinds = _iter_kinds(sch, acc)
    sp = [lp for lp, k in zip(aloops, kinds) if k == 0]
    rd = [lp for lp, k in zip(aloops, kinds) if k == 2]
    if vec_fuse and len(sp) >= 2:
        fused = sch.fuse(sp[-2], sp[-1])
        ext = _extent(sch, fused)
        if ext is not None and ext > lanes and ext % lanes == 0:
            po, fused = sch.split(fused, factors=[None, lanes])
            sp = sp[:-2] + [po, fused]
        else:
            sp = sp[:-2] + [fused]
        vec_acc_axis = -1
    vec = sp[vec_acc_axis]
    others = [lp for lp in sp if not sch.get(lp).same_as(sch.get(vec)) and _extent(sch, lp) != 1]
    sch.reorder(*rd, *others, vec)
    sch.vectorize(vec)
    for lp in others:
        sch.unroll(lp)
    sch.decompose_reduction(acc, rd[0])
    # write-back + epilogue: vectorise its innermost tile loop if it is wide enough
    oloops = sch.get_loops(out)
    last = oloops[-1]
    e = _extent(sch, last)
    if e is not None and e >= 4 and len(inners) > 0:
        sch.vectorize(last)


def schedule_conv(sch, target) -> str:
    lanes = _vec_lanes(target)
    pad_name, acc_name = f"{CONV_PREFIX}_pad", f"{CONV_PREFIX}_acc"
    _inline_injective(sch, keep=lambda n: n in (pad_name, acc_name))
    acc = sch.get_sblock(acc_name)
    consumers = sch.get_consumers(acc)
    if len(consumers) != 1 or not _is_spatial(sch, consumers[0]):
        raise RuntimeError("conv epilogue is not a single spatial block")
    out = consumers[0]
    acc_st = sch.get(acc)
    a_ext = [_int(iv.dom.extent) for iv, k in zip(acc_st.iter_vars, _iter_kinds(sch, acc)) if k == 0]
    # acc: [N, OCB, *OUT, B]
    block, ocb, out_sp = a_ext[-1], a_ext[1], a_ext[2:-1]
    oloops = sch.get_loops(out)
    o_ext = [_extent(sch, lp) for lp in oloops]
    if len(oloops) != 2 + len(out_sp) or o_ext[2:] != out_sp:
        raise RuntimeError("conv epilogue does not have the conv output shape")
    oc = o_ext[1]
    nvec = max(1, block // lanes)
    ot = 2 if (ocb % 2 == 0 and oc == ocb * block) else 1
    budget = max(1, MAX_ACC // (ot * nvec))
    wt = _largest_divisor(out_sp[-1], min(8, budget))
    ht = _largest_divisor(out_sp[0], max(1, budget // wt)) if len(out_sp) == 2 else 1
    tiles = [(1, 0), (ot * block if oc == ocb * block else oc, 0)]
    if len(out_sp) == 2:
        tiles.append((ht, 0))
    tiles.append((wt, 0))
    work = _work(sch, out) * int(np.prod([_extent1(sch, lp) for lp in sch.get_loops(acc)
                                          ][-(len(out_sp) + 1):]))
    _tile_reduction_under(sch, acc, out, lanes, vec_acc_axis=-1, out_tiles=tiles,
                          n_parallel=2, work=work)
    try:
        pad = sch.get_sblock(pad_name)
        _schedule_pad(sch, pad)
    except Exception:  # no pad stage (1x1 conv)
        pass
    return "conv"


def schedule_conv1x1(sch, target) -> str:
    """:func:`conv1x1_compute` (+ fused epilogue): tiles of ``OT`` output channels by about
    two vectors of pixels (``HT`` whole rows when a row is shorter than that), accumulated in
    registers over the input channels (pixel vectors loaded, weights broadcast), written back
    NCHW with the epilogue; the tiles run in parallel."""
    lanes = _vec_lanes(target)
    acc_name = f"{CONV1X1_PREFIX}_acc"
    _inline_injective(sch, keep=lambda n: n == acc_name)
    acc = sch.get_sblock(acc_name)
    consumers = sch.get_consumers(acc)
    if len(consumers) != 1 or not _is_spatial(sch, consumers[0]):
        raise RuntimeError("1x1 conv epilogue is not a single spatial block")
    out = consumers[0]
    o_ext = [_extent(sch, lp) for lp in sch.get_loops(out)]
    if len(o_ext) != 4 or any(e is None for e in o_ext[1:]):
        raise RuntimeError("1x1 conv epilogue is not [N, OC, H, W] with static OC, H, W")
    _, oc, h, w = o_ext
    if w >= 2 * lanes:
        ht, wt = 1, _largest_divisor(w, 2 * lanes)
    else:  # whole rows, preferring a pixel count that fills whole vectors
        rows = [d for d in range(1, h + 1) if h % d == 0 and d * w <= 2 * lanes] or [1]
        ht, wt = max(rows, key=lambda d: ((d * w) % lanes == 0, (d * w) % 8 == 0, d)), w
    nvec = -(-ht * wt // lanes)
    ot = _largest_divisor(oc, max(1, MAX_ACC // nvec))
    red_work = _extent1(sch, sch.get_loops(acc)[-1])
    _tile_reduction_under(sch, acc, out, lanes, vec_acc_axis=-1,
                          out_tiles=[(1, 0), (ot, 0), (ht, 0), (wt, 0)], n_parallel=2,
                          work=_work(sch, out) * red_work, vec_fuse=True)
    return "conv1x1"


def _schedule_pad(sch, pad) -> None:
    """Channels-last padded copy ``[N, *SP, C]``: rows in parallel, channels inner."""
    loops = sch.get_loops(pad)
    work = _work(sch, pad)
    nh = sch.fuse(loops[0], loops[1])
    _parallel(sch, nh, work)


def schedule_gemm(sch, target) -> str:
    lanes = _vec_lanes(target)
    _inline_injective(sch)
    red = [b for b in _blocks(sch) if not _is_spatial(sch, b)]
    if len(red) != 1 or not _gemm_like(sch, red[0]):
        raise RuntimeError("not a single gemm-like block")
    acc = red[0]
    outputs = {_name(sch, b) for b in sch.get_output_blocks(_root(sch))}
    if _name(sch, acc) in outputs:
        sch.cache_write(acc, 0, "local")
        acc = red[0]
    consumers = sch.get_consumers(acc)
    if len(consumers) != 1 or not _is_spatial(sch, consumers[0]):
        raise RuntimeError("gemm epilogue is not a single spatial block")
    out = consumers[0]
    a_kinds = _iter_kinds(sch, acc)
    a_sp = [_int(iv.dom.extent) for iv, k in zip(sch.get(acc).iter_vars, a_kinds) if k == 0]
    oloops = sch.get_loops(out)
    o_ext = [_extent(sch, lp) for lp in oloops]
    if len(o_ext) != len(a_sp) or o_ext[-1] != a_sp[-1] or o_ext[-1] is None:
        raise RuntimeError("gemm epilogue shape differs")
    j = o_ext[-1]
    vj = next((v for v in (2 * lanes, lanes, 8, 4) if j % v == 0), 0)
    if not vj:
        raise RuntimeError("gemm inner axis not vectorisable")
    nvec = max(1, vj // lanes)
    ti = _largest_divisor(o_ext[-2], max(1, MAX_ACC // nvec)) if len(o_ext) >= 2 else 1
    tiles = [(1, 0)] * (len(o_ext) - 2) + ([(ti, 0)] if len(o_ext) >= 2 else []) + [(vj, 0)]
    red_work = int(np.prod([_extent1(sch, lp) for lp, k in zip(sch.get_loops(acc), a_kinds) if k == 2]))
    work = _work(sch, out) * red_work
    n_par = max(1, len(o_ext) - 1)
    _tile_reduction_under(sch, acc, out, lanes, vec_acc_axis=-1, out_tiles=tiles,
                          n_parallel=n_par, work=work)
    return "gemm"


def _rfactor_vectorised(sch, red, lanes: int) -> None:
    """Fuse a reduction block's loops after the first, split off ``lanes`` partial results
    (rfactor) and vectorise them; scalar if that fails (still correct)."""
    rl = sch.get_loops(red)[1:]
    try:
        inner = sch.fuse(*rl) if len(rl) > 1 else rl[0]
        r_ext = _extent(sch, inner)
        rvec = next((v for v in (lanes, 8, 4) if r_ext and r_ext % v == 0), 0)
        if rvec:
            _, ri = sch.split(inner, factors=[None, rvec])
            rf = sch.rfactor(ri, factor_axis=2)
            rf_loops = sch.get_loops(rf)
            sch.vectorize(rf_loops[-1])
            sch.decompose_reduction(rf, rf_loops[-2])
    except Exception as e:  # noqa: BLE001 - scalar statistics are still correct
        log.debug("groupnorm rfactor failed: %s", e)


def schedule_groupnorm(sch, target) -> str:
    """GroupNorm (+ fused elementwise epilogue, e.g. SiLU): per (batch, group) in parallel,
    statistics then normalisation, both over vectors of the contiguous spatial axis (ours: the
    per-channel scale and shift in between, vectorised over channels)."""
    lanes = _vec_lanes(target)
    scale_name = f"{GROUP_NORM_PREFIX}_scale"
    _inline_injective(sch, keep=lambda n: n == scale_name)
    blocks = _blocks(sch)
    scale = [b for b in blocks if _name(sch, b) == scale_name]
    blocks = [b for b in blocks if _name(sch, b) != scale_name]
    red = [b for b in blocks if _is_reduction(sch, b)]
    sp = [b for b in blocks if _is_spatial(sch, b)]
    if len(red) != 1 or len(sp) != 1 or len(blocks) != 2:
        raise RuntimeError("not a statistics + normalisation pair")
    red, out = red[0], sp[0]
    if scale:
        _schedule_injective_block(sch, scale[0], lanes)
    kinds = _iter_kinds(sch, red)
    ivs = sch.get(red).iter_vars
    # TOPI's: [N, G] x reductions; ours (group_norm_compute): [N, G, lanes] x [C/G, pixels/lanes]
    partial = kinds == [0, 0, 0, 2, 2]
    if not partial and (kinds[:2] != [0, 0] or any(k != 2 for k in kinds[2:]) or len(kinds) < 3):
        raise RuntimeError("statistics block is not [N, G] x reductions")
    groups = _int(ivs[1].dom.extent)
    cpg = _int(ivs[3 if partial else 2].dom.extent)
    oloops = sch.get_loops(out)
    o_ext = [_extent(sch, lp) for lp in oloops]
    if len(oloops) < 3 or groups is None or cpg is None or o_ext[1] != groups * cpg:
        raise RuntimeError("normalisation block does not match the groups")
    work = _work(sch, out)
    # statistics at root, (batch, group) in parallel. Ours: the lane axis innermost and
    # vectorised. TOPI's: the contiguous reduction is split into vec-wide partial sums (rfactor)
    # so that it vectorises. (rfactor/compute_at under a fused symbolic-batch loop derives
    # out-of-bounds regions in TVM 0.27, so everything stays at root.)
    rl = sch.get_loops(red)
    red_par = sch.fuse(rl[0], rl[1])
    _parallel(sch, red_par, work)
    if partial:
        _, lane, rc, rk = sch.get_loops(red)
        sch.reorder(rc, rk, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(red, rc)
    else:
        _rfactor_vectorised(sch, red, lanes)
    # normalisation (+ epilogue): (batch, group) in parallel, spatial axis vectorised
    g, _ci = sch.split(oloops[1], factors=[groups, cpg])
    spatial = oloops[2:]
    hw = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    hw_ext = _extent(sch, hw)
    vec = next((v for v in (lanes, 8, 4) if hw_ext and hw_ext % v == 0), 0)
    if vec:
        _, hw_i = sch.split(hw, factors=[None, vec])
        sch.vectorize(hw_i)
    par = sch.fuse(oloops[0], g)
    _parallel(sch, par, work * 8)
    return "groupnorm"


def schedule_channel_mean(sch, target) -> str:
    """:func:`channel_mean_compute`: per batch row (parallel), the channel loop outside, the
    flattened spatial axis inside and vectorised (accumulating in the output row, which stays
    in L1), then the division fused as a vectorised pass."""
    lanes = _vec_lanes(target)
    red = sch.get_sblock(f"{CMEAN_PREFIX}_sum")
    out = sch.get_sblock(CMEAN_PREFIX)
    loops = sch.get_loops(red)  # n, 1, *sp, rc
    if len(loops) < 4:
        raise RuntimeError("channel mean: unexpected loop nest")
    n, one, sp, rc = loops[0], loops[1], loops[2:-1], loops[-1]
    spf = sch.fuse(*sp) if len(sp) > 1 else sp[0]
    sch.reorder(n, one, rc, spf)
    e = _extent(sch, spf)
    vec = next((v for v in (lanes, 8, 4) if e and e % v == 0), 0)
    work = _work(sch, red)
    _parallel(sch, n, work)
    if vec:
        _so, si = sch.split(spf, factors=[None, vec])
        sch.vectorize(si)  # before decompose_reduction (the other order fails)
    sch.decompose_reduction(red, rc)
    _schedule_injective_block(sch, out, lanes)
    return "channel-mean"


def schedule_softmax(sch, target) -> str:
    """:func:`softmax_compute`: every stage computed per row under the output's row loop (so the
    exponentials stay in L1), rows in parallel; the partial-max / partial-sum stages vectorised
    over their ``width`` axis (the reduction loop outside), the exponential and the
    normalisation over the row."""
    lanes = _vec_lanes(target)
    pre = SOFTMAX_PREFIX
    _inline_injective(sch, keep=lambda n: n == f"{pre}_exp")
    out = sch.get_sblock(pre)
    stages = [sch.get_sblock(f"{pre}_{n}") for n in ("maxp", "max", "exp", "sump", "sum")]
    loops = sch.get_loops(out)
    if len(loops) < 2:
        raise RuntimeError("softmax: no row axis")
    rows = loops[:-1]
    static = all(_extent(sch, lp) is not None for lp in rows)
    row = sch.fuse(*rows) if static and len(rows) > 1 else rows[-1]
    for b in reversed(stages):
        sch.compute_at(b, row)
    _parallel(sch, row if static else rows[0], _work(sch, out))  # before decompose_reduction
    for b in (stages[0], stages[3]):
        v, k = sch.get_loops(b)[-2:]
        sch.reorder(k, v)
        if (_extent(sch, v) or 0) % min(lanes, _extent(sch, v) or 1) == 0:
            sch.vectorize(v)
        sch.decompose_reduction(b, k)
    for b in (stages[2], out):
        j = sch.get_loops(b)[-1]
        ext = _extent(sch, j)
        vec = next((v for v in (lanes, 8, 4) if ext and ext % v == 0), 0)
        if vec:
            _, ji = sch.split(j, factors=[None, vec])
            sch.vectorize(ji)
    return "softmax"


def schedule_dlight_reduction(sch_unused, target, func) -> s_tir.Schedule | None:
    from tvm.s_tir.dlight.cpu import Reduction

    return Reduction().apply(func, target, False)


# ----------------------------------------------------------------------------- driver


def _try(rule, func, target) -> tuple[s_tir.Schedule, str] | None:
    """Apply one rule to a fresh schedule of ``func``: ``(schedule, rule name)``, or None if the
    rule raised. A rule returns its name, or its name and the schedule it continued on."""
    sch = s_tir.Schedule(func)
    try:
        name = rule(sch, target)
        if isinstance(name, tuple):
            name, sch = name
        return sch, name
    except Exception as e:  # noqa: BLE001 - any schedule error: fall back to the next rule
        log.debug("rule %s failed: %s", getattr(rule, "__name__", rule), e)
        return None


def schedule_primfunc(func: tirx.PrimFunc, target: Target | None = None) -> tirx.PrimFunc:
    """A CPU schedule for one float PrimFunc (unchanged if :func:`is_scheduled`)."""
    if is_scheduled(func):
        return func
    target = target or Target.current(allow_none=True)
    sch0 = s_tir.Schedule(func)
    try:
        names = [_name(sch0, b) for b in _all_blocks_recursive(sch0)]
        has_red = any(_is_reduction(sch0, b) for b in _all_blocks_recursive(sch0))
    except Exception:
        return func
    rules: list = []
    if any(n.startswith(f"{CONV_PREFIX}_acc") for n in names):
        rules.append(schedule_conv)
    if any(n.startswith(f"{CONV1X1_PREFIX}_acc") for n in names):
        rules.append(schedule_conv1x1)
    if f"{CMEAN_PREFIX}_sum" in names:
        rules.append(schedule_channel_mean)
    if f"{SOFTMAX_PREFIX}_maxp" in names:
        rules.append(schedule_softmax)
    if has_red:
        rules.append(schedule_gemm)
        rules.append(schedule_groupnorm)
        rules.append("dlight")
        rules.append(schedule_generic_reduction)
    else:
        rules.append(schedule_elementwise)
    for rule in rules:
        if rule == "dlight":
            try:
                got = schedule_dlight_reduction(None, target, func)
            except Exception:
                got = None
            if got is not None:
                return _finish(got.mod["main"], func, "dlight-reduction")
            continue
        res = _try(rule, func, target)
        if res is not None:
            sch, name = res
            try:
                new = sch.mod["main"]
                return _finish(new, func, name)
            except Exception:
                continue
    return func.with_attr("bqc.float_rule", "none")


def _finish(new: tirx.PrimFunc, old: tirx.PrimFunc, rule: str) -> tirx.PrimFunc:
    return new.with_attr("tirx.is_scheduled", True).with_attr("bqc.float_rule", rule)


@tvm.transform.module_pass(opt_level=0, name="BqcScheduleFloatCPU")
class ScheduleFloatCPU:
    """Apply :func:`schedule_primfunc` to every PrimFunc of an IRModule."""

    def __init__(self, target: Target | None = None):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or Target.current(allow_none=True)
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                new = schedule_primfunc(func, target)
                if not new.same_as(func):
                    updates[gv] = new
        for gv, func in updates.items():
            mod[gv] = func
        return mod


def rules_used(mod: tvm.IRModule) -> dict[str, str]:
    """``{function name: rule}`` for the PrimFuncs of a scheduled module."""
    out = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            attrs = func.attrs or {}
            out[gv.name_hint] = str(attrs["bqc.float_rule"]) if "bqc.float_rule" in attrs else "skipped"
    return out
