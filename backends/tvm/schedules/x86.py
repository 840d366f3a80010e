"""Hand-written ``tvm.s_tir.Schedule`` schedules of the bqc kernels for x86 CPUs.

Every schedule takes the PrimFunc made by ``te.create_prim_func`` from the TE computes in
``backends/tvm/kernels`` and returns the scheduled PrimFunc. They build for any x86 LLVM CPU
target; which micro-kernel a kernel uses is the target's kernel route
(:data:`bqc.backends.tvm.target.KERNEL_ROUTES`, read through ``kernel_route``), a function of
the target's ISA features only.

W1A1 conv / dense (``schedule_binary_conv2d``, ``schedule_binary_dense``): output channels
are vectorised as ``L = 16`` uint32 lanes (one zmm); loops ``(n*oh) [parallel], ob, ow``;
the padded input rows a row of outputs needs are built per parallel iteration
(``compute_at``); the accumulator is a register tile (``local``); the epilogue
(``base - 2 * acc``) is fused under the ``ow`` loop. The reduction over ``(kh, kw, cw)`` for one
output position and 16 output channels is blockized and its body replaced by a Harley-Seal
carry-save popcount micro-kernel (``microkernel="harley-seal"``; on VNNI targets the few
remaining popcounts are a byte LUT + one ``vpdpbusd``), or kept as the plain vectorised
``popcount`` loop (``microkernel="popcount"``, the first simple schedule; the better choice
where the target has VPOPCNTDQ). ``microkernel="auto"`` (default) picks between them.
(``sch.tensorize`` would be the natural primitive, but it segfaults in apache-tvm
0.27.0.post1; see ``kernels/microkernel.py``.)

int8 / W1Ak conv and dense (``schedule_int8_conv2d``, ``schedule_int8_dense``): a register
tile of ``T`` output pixels x 16 output channels (int32 accumulators); for every group of
4 input channels and pixel, the route's 4-channel dot product (:data:`DOT4`; u8 activations
broadcast, int8 weights ``[16, 4]``): one ``vpdpbusd`` (``vnni``), or ``vpmaddubsw`` +
``vpmaddwd`` + add on one zmm (``avx512bw``) or two ymm (``avx2``), the last two for +-1
weights only (``binary_weights=True``, W1Ak). ``generic``: the same loop nest vectorised over
the 16 channels (int32 multiply-add).

``schedule_int_matmul`` (attention on integer codes, exact int32 accumulation for any K):
parallel rows, a vectorised ``local`` accumulator of up to 16 columns.

The loop nest shared by the conv / dense schedules here and in ``arm.py`` is
:func:`.common.cpu_register_tile`.

Order that works in TVM 0.27: loop transforms, vectorize/unroll, then decompose_reduction,
then blockize + micro-kernel replacement.
"""
from __future__ import annotations

from tvm import tirx

from ..kernels.microkernel import (SlotPool, best_counter_depth, carry_save_popcount, find_region,
                                   replace_block_body)
from ..target import as_target, kernel_route
from .common import (cpu_register_tile, loop_extent, new_schedule, pick_tile, reduce_then_tile_then_group,
                     tile_then_reduce)

__all__ = [
    "schedule_bitpack", "schedule_quantize", "schedule_binary_conv2d", "schedule_binary_dense",
    "schedule_int8_conv2d", "schedule_int8_dense", "schedule_int_matmul", "pick_tile", "pick_microkernel",
]


_extent = loop_extent


# --------------------------------------------------------------------------------------
# activation packing / quantisation
# --------------------------------------------------------------------------------------

def schedule_bitpack(func: tirx.PrimFunc, target=None) -> tirx.PrimFunc:
    """Block ``bitpack`` (loops n, h, w, cw, b): parallel over rows, vectorise w, unroll bits."""
    sch = new_schedule(func)
    blk = sch.get_sblock("bitpack")
    n, h, w, cw, b = sch.get_loops(blk)
    vw = pick_tile(_extent(sch, w), 16)
    wo, wi = sch.split(w, [None, vw])
    sch.reorder(n, h, cw, wo, b, wi)
    row = sch.fuse(n, h)
    sch.parallel(row)
    if vw > 1:
        sch.vectorize(wi)
    sch.unroll(b)
    sch.decompose_reduction(blk, b)
    return sch.mod[sch.func_working_on]


def schedule_quantize(func: tirx.PrimFunc, target=None) -> tirx.PrimFunc:
    """Block ``quantize``: parallel over rows (conv) or over all (dense), vectorised inner axis."""
    sch = new_schedule(func)
    blk = sch.get_sblock("quantize")
    loops = sch.get_loops(blk)
    if len(loops) == 4:
        n, h, w, c = loops
        row = sch.fuse(n, h)
        sch.parallel(row)
        vc = pick_tile(_extent(sch, c), 16)
        co, ci = sch.split(c, [None, vc])
        if vc > 1:
            sch.vectorize(ci)
    else:
        m, k = loops
        sch.parallel(m)
        vk = pick_tile(_extent(sch, k), 16)
        ko, ki = sch.split(k, [None, vk])
        if vk > 1:
            sch.vectorize(ki)
    return sch.mod[sch.func_working_on]


# --------------------------------------------------------------------------------------
# W1A1
# --------------------------------------------------------------------------------------

def _hs_body(acc_name: str, x_name: str, w_name: str, x_taps, w_taps, lanes: int, top=None,
             vnni_popcount: bool = False, tile: int = 1, tile_axis: int | None = None):
    """Micro-kernel for a blockized ``acc[..., 0:L] += sum_taps popcount(x[tap] ^ w[tap, 0:L])``.

    Written directly as ``L``-lane vector TIR: each tap is ``broadcast(x word) ^ w[16 lanes]``,
    combined by :func:`carry_save_popcount`; the intermediate vectors live in small ``local``
    buffers of ``uint32xL`` (promoted to registers by LLVM), popcounts are added to the
    accumulator tile as soon as they are known. ``x_taps(mins, extents, t)`` and
    ``w_taps(mins)`` give, per tap, the element index of the x word (of tile element ``t``) and
    of lane 0 of the weight vector, from the block's region mins/extents. ``tile`` independent networks (accumulator axis ``tile_axis``) are interleaved.
    """

    def make(blk):
        cbuf, cmin, _ = find_region(blk, acc_name)
        xbuf, xmin, xext = find_region(blk, x_name)
        wbuf, wmin, _ = find_region(blk, w_name)
        wdt = str(wbuf.dtype)
        streams, buffers = [], []
        for t in range(tile):
            stmts, pool = make_one(cbuf, cmin, xbuf, xmin, xext, wbuf, wmin, wdt, t)
            streams.append(stmts)
            buffers += pool.buffers
        # interleave the independent networks of the tile (more independent work in flight)
        out = []
        for i in range(max(len(s_) for s_ in streams)):
            out += [s_[i] for s_ in streams if i < len(s_)]
        return (tirx.SeqStmt(out) if len(out) > 1 else out[0]), buffers

    def make_one(cbuf, cmin, xbuf, xmin, xext, wbuf, wmin, wdt, t):
        words = []
        for xi, wi in zip(x_taps(xmin, xext, t), w_taps(wmin)):
            xv = tirx.Broadcast(tirx.BufferLoad(xbuf, list(xi)), lanes)
            wv = tirx.BufferLoad(wbuf, list(wi[:-1]) + [tirx.Ramp(wi[-1], 1, lanes)])
            words.append(xv ^ wv)
        pool = SlotPool(f"{wdt}x{lanes}", prefix=f"cs{t}_r")
        cidx = list(cmin[:-1]) + [tirx.Ramp(cmin[-1], 1, lanes)]
        if tile_axis is not None:
            cidx[tile_axis] = cmin[tile_axis] + t

        def popcount(v):
            return tirx.popcount(v).astype(f"int32x{lanes}")

        def accumulate(term):
            return tirx.BufferStore(cbuf, tirx.BufferLoad(cbuf, cidx) + term, cidx)

        if vnni_popcount and lanes == 16:
            # popcount per byte (vpshufb nibble LUT), then one vpdpbusd sums the 4 byte counts
            # of each 32-bit lane, times the word's weight 2**k, into the int32 accumulator
            # (instead of the ~6-instruction unpack/vpsadbw/pack horizontal sum).
            def vnni_acc(word, k):
                bytes_ = tirx.popcount(tirx.reinterpret("uint8x64", word))
                mult = tirx.Broadcast(tirx.const(1 << k, "int8"), 64)
                val = tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512",
                                                 tirx.BufferLoad(cbuf, cidx), bytes_, mult)
                return tirx.BufferStore(cbuf, val, cidx)

            stmts, _ = carry_save_popcount(words, top=top, pool=pool, accumulate_word=vnni_acc)
        else:
            stmts, _ = carry_save_popcount(words, top=top, popcount=popcount, pool=pool,
                                           accumulate=accumulate)
        return stmts, pool

    return make


def _vnni_lut(target) -> bool:
    """Harley-Seal's leftover popcounts as byte LUT + ``vpdpbusd`` (route ``hs-popcount``)."""
    return kernel_route(target, "hs-popcount") == "vnni-lut"


def _popcount_cost(target) -> int:
    """Instructions per popcount-and-accumulate of one vector (VNNI: LUT + vpdpbusd)."""
    return 7 if _vnni_lut(target) else 12


def pick_microkernel(target, microkernel: str = "auto") -> str:
    """``"auto"``: the target's ``w1a1`` route (:data:`bqc.backends.tvm.target.KERNEL_ROUTES`):
    the plain vector popcount where the target has AVX-512 VPOPCNTDQ (one instruction per
    vector: ``znver4``, ``icelake-server``), else the Harley-Seal network (Cascade Lake,
    x86-64-v4 / v3 / v2, generic x86-64)."""
    if microkernel == "auto":
        return "popcount" if kernel_route(target, "w1a1") == "vpopcnt" else "harley-seal"
    if microkernel not in ("harley-seal", "popcount"):
        raise ValueError(f"unknown microkernel {microkernel!r}")
    return microkernel


def _w1a1_reduction(sch, acc, red, lane, tile_loop, microkernel: str, unroll_last: bool):
    """The reduction of a W1A1 kernel. ``"popcount"``: reduction loops outside the vectorised
    lanes (the last one unrolled if ``unroll_last``), init split off: the schedule is done.
    ``"harley-seal"``: init split off at ``tile_loop`` and the body from there blockized into
    the block ``acc_update_o`` that :func:`_hs_body` fills. Returns the PrimFunc."""
    if microkernel == "popcount":
        sch.reorder(*red, lane)
        sch.vectorize(lane)
        if unroll_last:
            sch.unroll(red[-1])
        init = sch.decompose_reduction(acc, red[0])
    else:
        init = sch.decompose_reduction(acc, tile_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    if microkernel != "popcount":
        sch.blockize(tile_loop)
    return sch.mod[sch.func_working_on]


def schedule_binary_conv2d(func: tirx.PrimFunc, target=None, microkernel: str = "auto",
                           counter_depth: int | None = None, tile: int | None = None) -> tirx.PrimFunc:
    """Schedule the ``binary_conv2d_nhwc`` PrimFunc (blocks ``xpad``, ``acc``, ``out``).

    ``tile``: output pixels per micro-kernel call (Harley-Seal: that many independent adder
    networks interleaved; default 1: measured no faster at 2 and slower at 4, the kernel is
    bound by vector ALU throughput, not latency), ``counter_depth``: the carry-save counter
    depth (default: chosen by op count).
    """
    target = as_target(target)
    microkernel = pick_microkernel(target, microkernel)
    sch = new_schedule(func)
    max_tile = (tile if tile is not None else 1) if microkernel == "harley-seal" else 1
    acc, T, owi, l, (kh, kw, cw) = cpu_register_tile(sch, max_tile, conv=True, arrange=tile_then_reduce)
    KH, KW, CW, L = (_extent(sch, v) for v in (kh, kw, cw, l))
    func = _w1a1_reduction(sch, acc, [kh, kw, cw], l, owi, microkernel, unroll_last=True)
    if microkernel == "popcount":
        return func
    wname = str(func.params[1].name)
    taps = [(a, b, c) for a in range(KH) for b in range(KW) for c in range(CW)]
    top = counter_depth if counter_depth is not None else best_counter_depth(len(taps), _popcount_cost(target))

    def x_taps(m, ext, t):
        s = (int(ext[2]) - KW) // (T - 1) if T > 1 else 0  # region columns: (T-1)*stride + KW
        return [[m[0], m[1] + a, m[2] + t * s + b, m[3] + c] for a, b, c in taps]

    make = _hs_body(
        "acc", "xpad", wname, x_taps,
        lambda m: [[m[0], m[1] + a, m[2] + b, m[3] + c, m[4]] for a, b, c in taps],
        L, top, vnni_popcount=_vnni_lut(target), tile=T, tile_axis=2)
    return replace_block_body(func, "acc_update_o", make)


def schedule_binary_dense(func: tirx.PrimFunc, target=None, microkernel: str = "auto",
                          counter_depth: int | None = None) -> tirx.PrimFunc:
    """Schedule the ``binary_dense`` PrimFunc (blocks ``acc`` ``[M, NB, L]``, ``out``)."""
    target = as_target(target)
    microkernel = pick_microkernel(target, microkernel)
    sch = new_schedule(func)
    acc = sch.get_sblock("acc")
    m, nb, l, k = sch.get_loops(acc)
    K, L = _extent(sch, k), _extent(sch, l)
    N = int(func.params[-1].shape[-1])
    outer = sch.fuse(m, nb)
    sch.parallel(outer)
    sch.set_scope(acc, 0, "local")
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, outer)
    if N % L == 0:
        sch.vectorize(sch.get_loops(out)[-1])
    func = _w1a1_reduction(sch, acc, [k], l, l, microkernel, unroll_last=False)
    if microkernel == "popcount":
        return func
    xname = str(func.params[0].name)
    wname = str(func.params[1].name)
    top = counter_depth if counter_depth is not None else best_counter_depth(K, _popcount_cost(target))
    make = _hs_body(
        "acc", xname, wname,
        lambda mm, ext, t: [[mm[0], mm[1] + c] for c in range(K)],
        lambda mm: [[mm[0], mm[1] + c, mm[2]] for c in range(K)],
        L, top, vnni_popcount=_vnni_lut(target))
    return replace_block_body(func, "acc_update_o", make)


# --------------------------------------------------------------------------------------
# int8 / W1Ak
# --------------------------------------------------------------------------------------

#: The 4-channel dot-product micro-kernels of the int8 route (``KERNEL_ROUTES`` ``w1ak`` /
#: ``int8``): route -> (int32 lanes per instruction chunk, intrinsics). ``vnni``: ``acc =
#: vpdpbusd(acc, x, w)``; the others: ``acc += pmaddwd(pmaddubsw(x, w), 1)`` (u8 x s8 byte pairs
#: summed to int16 with saturation, then int16 pairs to int32): exact only while a pair sum fits
#: int16, i.e. |w| <= 64 (the +-1 weights of W1Ak).
DOT4 = {
    "vnni": (16, ("llvm.x86.avx512.vpdpbusd.512",)),
    "avx512bw": (16, ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512")),
    "avx2": (8, ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd")),
}
#: default register tile (output pixels) per route, conv / dense: ``T`` accumulators of 16 int32
#: lanes live in registers (32 zmm on AVX-512; 16 ymm on AVX2, two per pixel)
DOT4_TILE = {"vnni": (16, 8), "avx512bw": (16, 8), "avx2": (4, 4), "generic": (16, 8)}


def _dot4(route: str, acc, xb, w, chunk: int):
    """``acc[0:chunk] + sum_j x[j] * w[0:chunk, j]`` for one chunk of int32 lanes (``xb``: the 4
    activation bytes broadcast, ``w``: ``chunk x 4`` weight bytes) with the route's instructions."""
    names = DOT4[route][1]
    if len(names) == 1:
        return tirx.call_llvm_pure_intrin(f"int32x{chunk}", names[0], acc, xb, w)
    pairs = tirx.call_llvm_pure_intrin(f"int16x{2 * chunk}", names[0], xb, w)
    quads = tirx.call_llvm_pure_intrin(f"int32x{chunk}", names[1], pairs,
                                       tirx.Broadcast(tirx.const(1, "int16"), 2 * chunk))
    return acc + quads


def _dot4_body(acc_name: str, x_name: str, w_name: str, tile: int, x_step, lanes: int, route: str):
    """``acc[t, 0:L] += sum_j x[t, j] * w[0:L, j]`` (4 channels ``j``) for ``t < tile``, by the
    route's instructions (:data:`DOT4`), ``L / chunk`` instruction chunks per pixel.

    ``x_step(mins, extents, t) -> index list`` of the 4 activation bytes of tile element ``t``;
    the accumulator's tile axis is the last region axis of extent ``tile`` before the lane axis.
    """
    chunk = DOT4[route][0]

    def make(blk):
        cbuf, cmin, cext = find_region(blk, acc_name)
        xbuf, xmin, xext = find_region(blk, x_name)
        wbuf, wmin, _ = find_region(blk, w_name)
        tile_axis = [i for i, e in enumerate(cext) if int(e) == tile and i != len(cext) - 1]
        tile_axis = tile_axis[-1] if tile_axis else None
        # weight index [..., lane, j]: chunk h starts at lane h * chunk
        wvecs = [wbuf.vload(list(wmin[:-2]) + [wmin[-2] + h, wmin[-1]], f"int8x{4 * chunk}")
                 for h in range(0, lanes, chunk)]
        stmts = []
        for t in range(tile):
            a = tirx.reinterpret("int32", xbuf.vload(x_step(xmin, xext, t), "uint8x4"))
            a = tirx.reinterpret(f"uint8x{4 * chunk}", tirx.Broadcast(a, chunk))
            for h, wvec in zip(range(0, lanes, chunk), wvecs):
                cidx = list(cmin[:-1]) + [tirx.Ramp(cmin[-1] + h, 1, chunk)]
                if tile_axis is not None:
                    cidx[tile_axis] = cmin[tile_axis] + t
                val = _dot4(route, tirx.BufferLoad(cbuf, cidx), a, wvec, chunk)
                stmts.append(tirx.BufferStore(cbuf, val, cidx))
        return tirx.SeqStmt(stmts) if len(stmts) > 1 else stmts[0]

    return make


def _int8_route(target, binary_weights: bool) -> str:
    """``KERNEL_ROUTES`` ``w1ak`` (+-1 weights) or ``int8`` of the target."""
    return kernel_route(target, "w1ak" if binary_weights else "int8")


def _int8_register_tile(sch, max_tile: int, route: str, *, conv: bool):
    """Loop nest of the int8 conv / dense: :func:`cpu_register_tile` with the 4-channel group
    innermost, accumulator init split off. With a :data:`DOT4` route (and 16 lanes) the tile is
    left for the micro-kernel (returns ``(acc, T, ti, L)``); otherwise (``generic``) it is
    vectorised over the lanes, group and tile unrolled, and the schedule is complete (returns
    ``acc = None``)."""
    acc, T, ti, lane, red = cpu_register_tile(sch, max_tile, conv=conv, arrange=reduce_then_tile_then_group)
    L, group = _extent(sch, lane), red[-1]
    micro = route in DOT4 and L == 16
    if not micro:
        sch.reorder(ti, group, lane)
        sch.vectorize(lane)
        sch.unroll(group)
        sch.unroll(ti)
    init = sch.decompose_reduction(acc, red[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return (acc if micro else None), T, ti, L


def _blockized_register_tile(func: tirx.PrimFunc, target, tile: int | None, binary_weights: bool, *, conv: bool):
    """The int8 conv / dense schedules' common start: pick the route, tile the ``acc`` block into
    register tiles and blockize the tile. ``(func, (T, L, route))``, or ``(func, None)`` when the
    shape does not tile (the func then keeps the default schedule)."""
    route = _int8_route(as_target(target), binary_weights)
    sch = new_schedule(func)
    acc, T, inner, L = _int8_register_tile(sch, tile or DOT4_TILE.get(route, (16, 8))[0 if conv else 1], route, conv=conv)
    if acc is None:
        return sch.mod[sch.func_working_on], None
    sch.blockize(inner)
    return sch.mod[sch.func_working_on], (T, L, route)


def schedule_int8_conv2d(func: tirx.PrimFunc, target=None, stride: int | None = None,
                         tile: int | None = None, binary_weights: bool = False) -> tirx.PrimFunc:
    """Schedule ``int8_conv2d_nhwc`` (blocks ``xpad``, ``acc`` ``[N, OH, OW, OCB, L]``, ``out``).

    ``binary_weights``: the weights are +-1 (W1Ak), which allows the ``avx512bw`` / ``avx2``
    routes. ``tile``: at most this many output pixels per register tile (the largest divisor of
    OW not above it; default :data:`DOT4_TILE`). ``stride`` is read off the blockized input
    region (``(tile - 1) * stride + 1`` columns) when not given."""
    func, tiled = _blockized_register_tile(func, target, tile, binary_weights, conv=True)
    if tiled is None:
        return func
    T, L, route = tiled
    wname = str(func.params[1].name)

    def x_step(m, ext, t):
        s = stride
        if T > 1:
            s_region = (int(ext[2]) - 1) // (T - 1)
            if s is not None and s != s_region:
                raise ValueError(f"stride {s} disagrees with the input region (stride {s_region})")
            s = s_region
        return [m[0], m[1], m[2] + t * (s or 1), m[3]]

    make = _dot4_body("acc", "xpad", wname, T, x_step, L, route)
    return replace_block_body(func, "acc_update_o", make)


def schedule_int8_dense(func: tirx.PrimFunc, target=None, tile: int | None = None,
                        binary_weights: bool = False) -> tirx.PrimFunc:
    """Schedule ``int8_dense`` (blocks ``acc`` ``[M, NB, L]``, ``out``); options as
    :func:`schedule_int8_conv2d`."""
    func, tiled = _blockized_register_tile(func, target, tile, binary_weights, conv=False)
    if tiled is None:
        return func
    T, L, route = tiled
    xname = str(func.params[0].name)
    wname = str(func.params[1].name)
    make = _dot4_body("acc", xname, wname, T, lambda mm, ext, t: [mm[0] + t, mm[1]], L, route)
    return replace_block_body(func, "acc_update_o", make)


def schedule_int_matmul(func: tirx.PrimFunc, target=None, vector: int = 16) -> tirx.PrimFunc:
    """Schedule ``int_matmul`` (blocks ``acc`` int32 ``[BT, M, N]``, ``out``): rows ``(bt*m)``
    parallel, a ``local`` accumulator of ``V`` columns vectorised (int8 -> int32 multiply-add),
    the reduction over ``k`` outside it, the epilogue fused per vector. Any CPU target."""
    sch = new_schedule(func)
    acc = sch.get_sblock("acc")
    b, m, n, k = sch.get_loops(acc)
    V = pick_tile(_extent(sch, n), vector)
    no, ni = sch.split(n, [None, V])
    sch.reorder(b, m, no, k, ni)
    row = sch.fuse(b, m)
    sch.parallel(row)
    sch.set_scope(acc, 0, "local")
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, no)
    if V > 1:
        sch.vectorize(sch.get_loops(out)[-1])
        sch.vectorize(ni)
    init = sch.decompose_reduction(acc, k)
    if V > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod[sch.func_working_on]
