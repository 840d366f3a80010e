"""Hand-written ``tvm.s_tir.Schedule`` schedules of the bqc kernels for aarch64 (NEON).

Same interface as ``schedules/x86.py``: each function takes the PrimFunc made by
``te.create_prim_func`` from the TE computes in ``backends/tvm/kernels`` (stage names
``xpad``, ``acc``, ``out``, ``bitpack``, ``quantize``) and returns the scheduled PrimFunc.
Build with :func:`bqc.backends.tvm.arm.arm_target`.

W1A1 conv / dense (``schedule_binary_conv2d``, ``schedule_binary_dense``): a register tile of
``T`` output pixels (conv: along ``ow``; dense: rows ``m``) x ``L`` output-channel lanes
(the weight layout's lane block, ``bqc.packing.block_oc``; ``L = 16`` is 4 NEON q
registers), ``T = 64 / L`` by default (16 q-register accumulators for ``L = 16``). For every
reduction word the activation word is broadcast (``ld1r``/``dup``), XOR-ed with the ``L``
weight words (``ldp q``) and popcounted per lane: aarch64 LLVM lowers ``popcount`` of
``<4 x i32>`` into ``cnt v.16b`` + ``uaddlp v.8h`` and folds the int32 accumulation into
``uadalp v.4s``, so each 128 bit-MACs cost ``eor, cnt, uaddlp, uadalp``. (NEON has a native
byte popcount, so the Harley-Seal carry-save network of the x86 schedule would only add
work here.) Loops: ``(n*oh)`` [parallel] (dense: ``(m/T)*nb``), ``ob``, ``ow/T``; the padded
input rows a row of outputs needs are built per parallel iteration; the accumulator is a
``local`` register tile; the epilogue (``base - 2 * acc``) is fused per tile and vectorised.

int8 / W1Ak (``schedule_int8_conv2d``/``schedule_int8_dense``) and the activation packers
(``schedule_bitpack``/``schedule_quantize``) use the target-generic paths of the x86
schedules (vectorised over the 16 lanes; NEON has no ``vpdpbusd``).
"""
from __future__ import annotations

from tvm import tirx

from . import x86 as _x86
from .common import cpu_register_tile, new_schedule, pick_tile, reduce_then_tile

__all__ = [
    "schedule_binary_conv2d", "schedule_binary_dense", "schedule_bitpack", "schedule_quantize",
    "schedule_int8_conv2d", "schedule_int8_dense", "schedule_int_matmul", "default_tile", "pick_tile",
]


def default_tile(lanes: int) -> int:
    """Register-tile rows for ``lanes`` int32 lanes: 16 NEON q registers of accumulators."""
    return max(1, min(8, 64 // max(lanes, 1)))


def _binary(func: tirx.PrimFunc, tile: int | None, conv: bool) -> tirx.PrimFunc:
    """The ``T x L`` register tile of :func:`~.common.cpu_register_tile`, reduction outside
    the tile; tile rows unrolled, lanes vectorised (``eor, cnt, uaddlp, uadalp``)."""
    sch = new_schedule(func)
    acc, _, ti, lane, red = cpu_register_tile(sch, tile or default_tile, conv=conv, arrange=reduce_then_tile)
    sch.unroll(ti)
    sch.vectorize(lane)
    init = sch.decompose_reduction(acc, red[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod[sch.func_working_on]


def schedule_binary_conv2d(func: tirx.PrimFunc, target=None, tile: int | None = None) -> tirx.PrimFunc:
    """Schedule ``binary_conv2d_nhwc`` (blocks ``xpad``, ``acc`` ``[N, OH, OW, OCB, L]``, ``out``)."""
    return _binary(func, tile, conv=True)


def schedule_binary_dense(func: tirx.PrimFunc, target=None, tile: int | None = None) -> tirx.PrimFunc:
    """Schedule ``binary_dense`` (blocks ``acc`` ``[M, NB, L]``, ``out``)."""
    return _binary(func, tile, conv=False)


def schedule_bitpack(func: tirx.PrimFunc, target=None) -> tirx.PrimFunc:
    """Block ``bitpack``: the x86 schedule (parallel rows, vectorised ``w``, unrolled bits)."""
    return _x86.schedule_bitpack(func, target)


def schedule_quantize(func: tirx.PrimFunc, target=None) -> tirx.PrimFunc:
    return _x86.schedule_quantize(func, target)


def schedule_int_matmul(func: tirx.PrimFunc, target=None) -> tirx.PrimFunc:
    """Exact int32 matmul of codes: the x86 schedule (target-generic; NEON ``smlal``-style code)."""
    return _x86.schedule_int_matmul(func, target)


def schedule_int8_conv2d(func: tirx.PrimFunc, target=None, tile: int | None = None) -> tirx.PrimFunc:
    """int8 / W1Ak conv: the x86 schedule's generic path (no VNNI on an aarch64 target)."""
    from ..arm import arm_target

    return _x86.schedule_int8_conv2d(func, target if target is not None else arm_target(), tile=tile)


def schedule_int8_dense(func: tirx.PrimFunc, target=None, tile: int | None = None) -> tirx.PrimFunc:
    from ..arm import arm_target

    return _x86.schedule_int8_dense(func, target if target is not None else arm_target(), tile=tile)
