"""Hand-written ``tvm.s_tir.Schedule`` schedules of the bqc kernels for CUDA GPUs.

Same interface as ``schedules/x86.py`` (PrimFunc from ``te.create_prim_func`` of the computes
in ``backends/tvm/kernels`` in, scheduled PrimFunc out); build with
:func:`bqc.backends.tvm.cuda.cuda_target`.

W1A1 and int8 conv / dense (``popc`` path, any arch) share one thread mapping of the output
``out`` (``[N, OH, OW, OC]`` / ``[M, N]``):

* ``threadIdx.x``: ``G`` lane blocks x ``L`` lanes = 32 consecutive output channels. Their
  weight words are consecutive in the lane-blocked layout, so a warp's weight loads coalesce
  into one 128-byte transaction, and all lanes of a warp read the same activation word (a
  broadcast);
* ``threadIdx.y``: ``row_tile`` output positions (conv: along ``ow``; dense: rows ``m``);
  each thread keeps ``row_inner`` int32 accumulators in registers (``acc`` computed at the
  thread, ``local`` scope; TVM_NOTES: intermediate buffers must be local);
* ``blockIdx.x``: everything else, fused;
* the zero-word padding (``xpad``) is inlined into the activation load; the epilogue
  (``base - 2 * acc``, ``acc + bias``) runs per thread after the reduction.

``popcount`` of a uint32 becomes ``__popc`` in CUDA C and ``popc.b32`` in PTX.

Tensor cores (:func:`binary_dense_mma`, sm_80..sm_90): a hand-written TIR kernel for the
dense, with ``mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.xor.popc`` (sm_80) or two
``.and.popc`` MMAs (sm_90) through TVM's ``T.ptx`` dialect. Without a GPU, every kernel here
is checked numerically by ``emulate_kernel`` of the test harness ``tests/cuda_emulator.py``.
"""
from __future__ import annotations

from tvm import tirx

from .common import loop_extent as _extent
from .common import new_schedule as _sched
from .common import pick_tile, reduce_extents

__all__ = [
    "schedule_binary_conv2d", "schedule_binary_dense", "schedule_int8_conv2d", "schedule_int8_dense",
    "schedule_bitpack", "schedule_quantize", "schedule_int_matmul",
]


def _lane_groups(n_blocks: int, lanes: int) -> int:
    """Lane blocks per warp row: ``G * L`` up to 32 threads, ``G`` dividing the block count."""
    return pick_tile(n_blocks, max(1, 32 // lanes))


def _acc_under_thread(sch, acc, tx, unroll_group: bool):
    """``acc`` computed per thread under ``tx``, in local registers, reduction outermost.

    ``compute_at`` creates a loop only for the axes of extent > 1: every reduction axis of
    extent > 1 (in order, after the spatial ones) and the per-thread spatial axes left (the
    ``row_inner`` outputs). A reduction of one step (e.g. a 1x1 conv or a dense whose input
    fits one packed word) gets a unit loop (``add_unit_loop``), so that the init can still be
    split off. ``unroll_group``: unroll the last reduction axis (the int8 4-channel group) when
    it has a loop.
    """
    red_ext = reduce_extents(sch, acc)
    sch.compute_at(acc, tx)
    sch.set_scope(acc, 0, "local")
    loops = sch.get_loops(acc)
    pos = [i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(tx))][0]
    inner = loops[pos + 1:]
    n_red = sum(1 for e in red_ext if e > 1)
    sp, red = inner[:len(inner) - n_red], inner[len(inner) - n_red:]
    got = [_extent(sch, lp) for lp in red]
    if got != [e for e in red_ext if e > 1]:
        raise RuntimeError(f"unexpected loops under the thread: reduction extents {got}, wanted {red_ext}")
    if red:
        sch.reorder(*red, *sp)
    else:
        red = [sch.add_unit_loop(acc)]
    for lp in sp:
        sch.unroll(lp)
    if unroll_group and red_ext[-1] > 1:
        sch.unroll(red[-1])
    sch.decompose_reduction(acc, red[0])
    return sch.mod[sch.func_working_on]


def schedule_binary_conv2d(func: tirx.PrimFunc, target=None, row_tile: int = 8, row_inner: int = 2) -> tirx.PrimFunc:
    """Schedule ``binary_conv2d_nhwc`` (blocks ``xpad``, ``acc`` ``[N, OH, OW, OCB, L]``, ``out``)."""
    return _conv(func, row_tile, row_inner)


def schedule_int8_conv2d(func: tirx.PrimFunc, target=None, row_tile: int = 8, row_inner: int = 2) -> tirx.PrimFunc:
    """Schedule ``int8_conv2d_nhwc`` (blocks ``xpad``, ``acc``, ``out``); the 4-channel group is unrolled."""
    return _conv(func, row_tile, row_inner)


def _conv(func, row_tile, row_inner):
    """Tile ``out`` ``[N, OH, OW, OC]`` into threads, then compute ``acc`` per thread.

    (Tiling ``out`` and computing ``acc`` at the thread, rather than the other way round,
    keeps each thread's epilogue on its own accumulators also when ``OC % L != 0``.)
    """
    return _thread_tiles(func, row_tile, row_inner, conv=True)


def schedule_binary_dense(func: tirx.PrimFunc, target=None, row_tile: int = 8, row_inner: int = 2) -> tirx.PrimFunc:
    """Schedule ``binary_dense`` (blocks ``acc`` ``[M, NB, L]``, ``out``)."""
    return _dense(func, row_tile, row_inner)


def schedule_int8_dense(func: tirx.PrimFunc, target=None, row_tile: int = 8, row_inner: int = 2) -> tirx.PrimFunc:
    """Schedule ``int8_dense`` (blocks ``acc`` ``[M, NB, L]``, ``out``)."""
    return _dense(func, row_tile, row_inner)


def _dense(func, row_tile, row_inner):
    """Tile ``out`` ``[M, N]`` into threads (rows ``m`` along ``threadIdx.y``), ``acc`` per thread."""
    return _thread_tiles(func, row_tile, row_inner, conv=False)


def _thread_tiles(func, row_tile, row_inner, conv: bool):
    """The thread mapping of the module docstring. The row axis (conv: ``ow``; dense: ``m``)
    is split ``[blocks, row_tile (threadIdx.y), row_inner (per thread)]``, the channel axis
    ``[blocks, G lane blocks, L lanes]`` (``threadIdx.x`` = ``G * L``); the conv's leading
    ``n, oh`` join the block index."""
    sch = _sched(func)
    if conv:
        sch.compute_inline(sch.get_sblock("xpad"))
    acc = sch.get_sblock("acc")
    int8 = len(reduce_extents(sch, acc)) == (4 if conv else 2)  # int8: (kh, kw,) c4/4, group
    ob_l, l_l = sch.get_loops(acc)[3:5] if conv else sch.get_loops(acc)[1:3]
    OB, L = _extent(sch, ob_l), _extent(sch, l_l)
    *lead, row, ch = sch.get_loops(sch.get_sblock("out"))
    R = _extent(sch, row)
    ri = pick_tile(R, row_inner)
    rt = pick_tile(R // ri, row_tile)
    g = _lane_groups(OB, L)
    ro, rtl, ril = sch.split(row, [None, rt, ri])
    co, cg, cl = sch.split(ch, [None, g, L])
    sch.reorder(*lead, ro, co, rtl, cg, cl, ril)
    sch.bind(sch.fuse(*lead, ro, co), "blockIdx.x")
    sch.bind(rtl, "threadIdx.y")
    tx = sch.fuse(cg, cl)
    sch.bind(tx, "threadIdx.x")
    return _acc_under_thread(sch, acc, tx, unroll_group=int8)


def schedule_int_matmul(func: tirx.PrimFunc, target=None, row_tile: int = 8) -> tirx.PrimFunc:
    """Schedule ``int_matmul`` (``acc``/``out`` ``[BT, M, N]``): ``threadIdx.x`` up to 32
    consecutive columns, ``threadIdx.y`` ``row_tile`` rows, one exact int32 accumulator per
    thread (``local``), the reduction over ``k`` in the thread."""
    sch = _sched(func)
    acc = sch.get_sblock("acc")
    b, m, n = sch.get_loops(sch.get_sblock("out"))
    mo, mt = sch.split(m, [None, pick_tile(_extent(sch, m), row_tile)])
    no, nt = sch.split(n, [None, pick_tile(_extent(sch, n), 32)])
    sch.reorder(b, mo, no, mt, nt)
    sch.bind(sch.fuse(b, mo, no), "blockIdx.x")
    sch.bind(mt, "threadIdx.y")
    sch.bind(nt, "threadIdx.x")
    return _acc_under_thread(sch, acc, nt, unroll_group=False)


def _flat_threads(sch, block, threads: int = 128):
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops)
    bx, tx = sch.split(fused, [None, pick_tile(_extent(sch, fused), threads)])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return tx


def schedule_bitpack(func: tirx.PrimFunc, target=None) -> tirx.PrimFunc:
    """Block ``bitpack`` (n, h, w, cw | 32 bits): one thread per output word, bits unrolled."""
    sch = _sched(func)
    blk = sch.get_sblock("bitpack")
    n, h, w, cw, b = sch.get_loops(blk)
    sch.reorder(n, h, cw, w, b)  # consecutive threads: consecutive w (coalesced NCHW loads)
    fused = sch.fuse(n, h, cw, w)
    bx, tx = sch.split(fused, [None, pick_tile(_extent(sch, fused), 128)])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    loc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(loc, tx)
    sch.unroll(b)
    sch.decompose_reduction(blk, b)
    return sch.mod[sch.func_working_on]


def schedule_quantize(func: tirx.PrimFunc, target=None) -> tirx.PrimFunc:
    """Block ``quantize``: one thread per output byte."""
    sch = _sched(func)
    _flat_threads(sch, sch.get_sblock("quantize"))
    return sch.mod[sch.func_working_on]


# --------------------------------------------------------------------------------------
# W1A1 dense on binary tensor cores (mma.sync ... .b1, sm_80+)
# --------------------------------------------------------------------------------------

def mma_form(arch: str) -> str:
    """The b1 MMA form for a CUDA arch: ``"xor"`` on sm_80..sm_89 (native XOR-popc),
    ``"and"`` on sm_90 (which has only AND-popc at full rate); none on other archs."""
    cc = int("".join(ch for ch in arch if ch.isdigit()))
    if 80 <= cc < 90:
        return "xor"
    if 90 <= cc < 100:
        return "and"
    raise ValueError(f"no binary tensor-core MMA path for {arch} (sm_80/sm_86/sm_89/sm_90 only); "
                     "use schedule_binary_dense (popc) instead")


def binary_dense_mma(m: int, k: int, n: int, lanes: int = 16, form: str = "xor", warps: int = 4) -> tirx.PrimFunc:
    """W1A1 dense on tensor cores: ``mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.{xor,and}.popc``.

    Same buffers as ``te.create_prim_func`` of ``kernels.binary.binary_dense``:
    ``x uint32[M, KW]``, ``w uint32[NB, KW, L]`` (``bqc.packing.block_oc``), ``out int32[M, N]``,
    so it replaces that kernel's CUDA schedule one for one. A warp computes a 16 x 8 output
    tile; a block is ``warps`` warps along ``N`` (16 x 8*warps). Fragments (PTX ISA, mma
    m16n8k128 .b1; ``g = lane >> 2``, ``t = lane & 3``): ``a0 = x[m0+g, k0+t]``,
    ``a1 = x[m0+g+8, k0+t]``, ``b0 = w[n0+g, k0+t]`` (one 32-bit word = 32 k-elements, k0 in
    words, 4 words a step); accumulators ``c_i`` = out[m0+g+8*(i>>1), n0+2t+(i&1)].

    * ``form="xor"`` (sm_80): ``acc = sum popc(a ^ w)``, ``out = K - 2 * acc`` (zero pad bits
      and out-of-range words are 0 in both operands and count nothing).
    * ``form="and"`` (sm_90, which has no full-rate XOR): agreements are
      ``popc(a & w) + popc(~a & ~w)``, two MMAs; pad bits/words agree (both 0), so
      ``out = 2 * (acc - pad) - K`` with ``pad = 128 * steps - K``.
    """
    if form not in ("xor", "and"):
        raise ValueError(f"form must be 'xor' or 'and', got {form!r}")
    from tvm.script import tirx as T

    import tvm.backend.cuda  # noqa: F401  (registers the T.ptx dialect)

    kw_words = (k + 31) // 32
    nb = (n + lanes - 1) // lanes
    steps = (kw_words + 3) // 4
    pad = 128 * steps - k
    gm, gn = (m + 15) // 16, (n + 8 * warps - 1) // (8 * warps)
    M, N, K, KW, L, W = m, n, k, kw_words, lanes, warps  # noqa: N806 (TVMScript closure names)
    zero = tirx.const(0, "uint32")

    XOR = form == "xor"  # noqa: N806 (a Python bool: TVMScript keeps only the taken branch)

    @T.prim_func(check_well_formed=False)
    def func(x: T.Buffer((M, KW), "uint32"), w: T.Buffer((nb, KW, L), "uint32"), out: T.Buffer((M, N), "int32")):
        T.func_attr({"tirx.noalias": True})
        for bx in T.thread_binding(gm, thread="blockIdx.x"):
            for by in T.thread_binding(gn, thread="blockIdx.y"):
                for ty in T.thread_binding(W, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        acc = T.alloc_buffer((4,), "uint32", scope="local")
                        a = T.alloc_buffer((2,), "uint32", scope="local")
                        b = T.alloc_buffer((1,), "uint32", scope="local")
                        for i in range(4):
                            acc[i] = zero
                        for s in range(steps):
                            for r in range(2):
                                a[r] = T.if_then_else(
                                    bx * 16 + tx // 4 + r * 8 < M and s * 4 + tx % 4 < KW,
                                    x[T.min(bx * 16 + tx // 4 + r * 8, M - 1), T.min(s * 4 + tx % 4, KW - 1)], zero)
                            b[0] = T.if_then_else(
                                (by * W + ty) * 8 + tx // 4 < N and s * 4 + tx % 4 < KW,
                                w[T.min((by * W + ty) * 8 + tx // 4, N - 1) // L, T.min(s * 4 + tx % 4, KW - 1),
                                  T.min((by * W + ty) * 8 + tx // 4, N - 1) % L], zero)
                            if XOR:
                                T.ptx.mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.xor.popc(
                                    acc[0], acc[1], acc[2], acc[3], a[0], a[1], b[0], acc[0], acc[1], acc[2], acc[3])
                            else:  # agreements = popc(a & w) + popc(~a & ~w)
                                T.ptx.mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and_.popc(
                                    acc[0], acc[1], acc[2], acc[3], a[0], a[1], b[0], acc[0], acc[1], acc[2], acc[3])
                                a[0] = ~a[0]
                                a[1] = ~a[1]
                                b[0] = ~b[0]
                                T.ptx.mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and_.popc(
                                    acc[0], acc[1], acc[2], acc[3], a[0], a[1], b[0], acc[0], acc[1], acc[2], acc[3])
                        for i in range(4):
                            if bx * 16 + tx // 4 + (i // 2) * 8 < M and (by * W + ty) * 8 + (tx % 4) * 2 + i % 2 < N:
                                if XOR:
                                    out[bx * 16 + tx // 4 + (i // 2) * 8, (by * W + ty) * 8 + (tx % 4) * 2 + i % 2] = (
                                        K - 2 * T.Cast("int32", acc[i]))
                                else:
                                    out[bx * 16 + tx // 4 + (i // 2) * 8, (by * W + ty) * 8 + (tx % 4) * 2 + i % 2] = (
                                        2 * (T.Cast("int32", acc[i]) - pad) - K)
    return func
