"""Helpers shared by the per-target schedules (``x86.py``, ``arm.py``, ``cuda.py``).

* :func:`new_schedule`, :func:`loop_extent`, :func:`pick_tile`: schedule plumbing;
* :func:`reduce_extents`: the reduction iteration domain of a block (which reduction loops a
  ``compute_at`` will create);
* :func:`cpu_register_tile`: the loop nest of the CPU W1A1 / int8 kernels (register tile of
  ``T`` outputs x ``L`` lanes, parallel rows, padded input built per row, fused epilogue),
  shared by the x86 and aarch64 schedules.
"""
from __future__ import annotations

import tvm
import tvm.s_tir as s_tir
from tvm import tirx

__all__ = [
    "new_schedule", "loop_extent", "pick_tile", "reduce_extents", "cpu_register_tile",
    "tile_then_reduce", "reduce_then_tile", "reduce_then_tile_then_group",
]

_REDUCE = 2  # tirx.IterVar.CommReduce


def new_schedule(func: tirx.PrimFunc) -> s_tir.Schedule:
    """A schedule of ``func`` alone, working on it (named by its ``global_symbol``, else ``main``)."""
    name = str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else "main"
    sch = s_tir.Schedule(tvm.IRModule({name: func}))
    sch.work_on(name)
    return sch


def loop_extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def pick_tile(n: int, max_tile: int) -> int:
    """Largest divisor of ``n`` that is <= ``max_tile``."""
    for t in range(min(n, max_tile), 0, -1):
        if n % t == 0:
            return t
    return 1


def reduce_extents(sch: s_tir.Schedule, block) -> list[int]:
    """Extents of the block's reduction iteration variables, in order (unit ones included)."""
    return [int(iv.dom.extent) for iv in sch.get(block).iter_vars if int(iv.iter_type) == _REDUCE]


def cpu_register_tile(sch: s_tir.Schedule, tile, *, conv: bool, arrange):
    """The common loop nest of the CPU conv / dense kernels (``acc``, ``out``, conv ``xpad`` blocks).

    The output axis (conv: ``ow`` of ``acc [N, OH, OW, OCB, L, *red]``; dense: ``m`` of
    ``acc [M, NB, L, *red]``) is split by ``T = pick_tile(extent, tile)`` into ``(outer, ti)``
    (``tile``: an int, or a function of the lane count ``L``);
    loops become ``(n*oh) [parallel], ob, outer, *arrange(ti, l, red)`` (dense:
    ``(outer*nb) [parallel], *arrange(ti, l, red)``), where ``arrange`` orders the register-tile
    loops ``ti``, ``l`` and the reduction loops ``red``. The accumulator is ``local``; the
    conv's padded input rows are computed per parallel row (``local``); ``out`` is computed at
    ``outer`` (dense: at the parallel loop) and vectorised over channels when ``OC % L == 0``.

    Returns ``(acc, T, ti, l, red)``; callers then vectorise / unroll and ``decompose_reduction``.
    """
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    if conv:
        n, oh, ax, ob, lane = loops[:5]
        red = list(loops[5:])
    else:
        ax, nb, lane = loops[:3]
        red = list(loops[3:])
    L = loop_extent(sch, lane)
    out = sch.get_sblock("out")
    OC = loop_extent(sch, sch.get_loops(out)[-1])
    T = pick_tile(loop_extent(sch, ax), tile(L) if callable(tile) else tile)
    axo, ti = sch.split(ax, [None, T])
    inner = arrange(ti, lane, red)
    if conv:
        sch.reorder(n, oh, ob, axo, *inner)
        par = sch.fuse(n, oh)
    else:
        sch.reorder(axo, nb, *inner)
        par = sch.fuse(axo, nb)
    sch.parallel(par)
    sch.set_scope(acc, 0, "local")
    if conv:
        xpad = sch.get_sblock("xpad")
        sch.compute_at(xpad, par)
        sch.set_scope(xpad, 0, "local")
    sch.reverse_compute_at(out, axo if conv else par)
    if OC % L == 0:
        sch.vectorize(sch.get_loops(out)[-1])
    return acc, T, ti, lane, red


# ``arrange`` orders for :func:`cpu_register_tile` (``ti``: tile loop, ``l``: lanes, ``red``: reduction loops)
def tile_then_reduce(ti, lane, red):
    """``ti, l, *red``: one register-tile row at a time, its whole reduction innermost."""
    return [ti, lane, *red]


def reduce_then_tile(ti, lane, red):
    """``*red, ti, l``: the reduction outside, the whole ``T x L`` register tile innermost."""
    return [*red, ti, lane]


def reduce_then_tile_then_group(ti, lane, red):
    """``*red[:-1], ti, l, group``: as :func:`reduce_then_tile` with the int8 4-channel group
    (the last reduction axis) innermost."""
    return [*red[:-1], ti, lane, red[-1]]
