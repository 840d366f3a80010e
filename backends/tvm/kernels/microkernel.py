"""Target-independent TIR micro-kernel helpers.

* :func:`replace_block_body` swaps the body of a (blockized) SBlock for hand-built TIR. It
  stands in for ``sch.tensorize``, which crashes in apache-tvm 0.27.0.post1 (tensorize deep
  copies the intrinsic through ``tvm.ir.save_json``, and ``save_json`` segfaults on any TIR
  node in that build). The schedule still does all the loop work (split, reorder, parallel,
  blockize, decompose_reduction); only the innermost block's statement is replaced, reading
  its base indices from the block's read/write regions.
* :func:`carry_save_popcount` emits ``sum(popcount(w) for w in words)`` as a Harley-Seal
  carry-save adder network: words are combined bitwise by full adders (``xor3`` and
  ``majority``, one ``vpternlogd`` each on AVX-512) into a binary counter of depth ``top``;
  only the words that overflow the counter and the counter itself at the end are popcounted.
  This is pure bitwise TIR, so it builds for any target; it pays off where popcount is
  expensive (x86 without VPOPCNTDQ: ~10 instructions per vector of 32-bit lanes).
"""
from __future__ import annotations

from collections.abc import Callable

import tvm_ffi
from tvm import tirx
import tvm.s_tir as s_tir

# Rough instruction cost of one vector popcount of 32-bit lanes relative to one bitwise
# op (vpshufb LUT + horizontal byte sum on AVX-512BW). Used to pick the counter depth.
POPCOUNT_COST = 12


def block_regions(block) -> list[tuple]:
    """``[(buffer, mins, extents), ...]`` for the block's reads then writes."""
    out = []
    for r in list(block.reads) + list(block.writes):
        out.append((r.source, [rg.min for rg in r.region], [rg.extent for rg in r.region]))
    return out


def find_region(block, buffer_name: str, write: bool = False):
    """``(buffer, mins, extents)`` of the first read (or write) region of ``buffer_name``
    (a buffer re-scoped by the schedule, e.g. ``acc_local``, matches ``acc`` too)."""
    regions = block.writes if write else block.reads
    for exact in (True, False):
        for r in regions:
            nm = str(r.source.name)
            if nm == buffer_name or (not exact and nm.startswith(buffer_name + "_")):
                return r.source, [rg.min for rg in r.region], [rg.extent for rg in r.region]
    names = [str(r.source.name) for r in regions]
    raise KeyError(f"block {block.name_hint} has no {'write' if write else 'read'} of {buffer_name} (has {names})")


def replace_block_body(func: tirx.PrimFunc, block_name: str,
                       make_body: Callable[[s_tir.SBlock], tirx.Stmt]) -> tirx.PrimFunc:
    """Return ``func`` with the body of every SBlock named ``block_name`` replaced by
    ``make_body(block)`` (iteration variables, regions and annotations are kept).

    ``make_body`` may return ``(stmt, [buffers])`` to allocate scratch buffers in the block.
    """
    found = []

    def visit(blk):
        if blk.name_hint != block_name:
            return blk
        found.append(blk)
        body = make_body(blk)
        allocs = list(blk.alloc_buffers)
        if isinstance(body, tuple):
            body, extra = body
            allocs += list(extra)
        return s_tir.SBlock(blk.iter_vars, blk.reads, blk.writes, blk.name_hint, body,
                            blk.init, allocs, blk.match_buffers, blk.annotations)

    body = tvm_ffi.structural_map(func.body, [(s_tir.SBlock, visit)], order="post")
    if not found:
        raise ValueError(f"no block named {block_name!r} in the function")
    return func.with_body(body)


def _simulate(n: int, top: int, popcount_cost: int) -> int:
    ops = n
    pend = [False] * top
    acc = [False] * top
    pcs = 0

    def add(k):
        nonlocal ops, pcs
        if k == top:
            pcs += 1
            return
        if not pend[k]:
            pend[k] = True
            return
        pend[k] = False
        acc[k] = True
        ops += 2
        add(k + 1)

    for _ in range(n):
        add(0)
    pcs += sum(acc) + sum(pend)
    return ops + pcs * (popcount_cost + 1)


def best_counter_depth(n: int, popcount_cost: int = POPCOUNT_COST, max_top: int = 6) -> int:
    """Counter depth (0 = plain popcount per word) minimising the estimated op count."""
    return min(range(max_top + 1), key=lambda t: (_simulate(n, t, popcount_cost), t))


class SlotPool:
    """Scratch vector registers for a micro-kernel: each slot is its own 1-element ``local``
    buffer (small, so TVM puts it on the stack and LLVM promotes it to a register; one big
    scratch buffer would exceed TVM's 1 KiB stack-alloca limit and go to a heap workspace)."""

    def __init__(self, dtype: str, prefix: str = "cs_r"):
        self.dtype = dtype
        self.prefix = prefix
        self.buffers = []
        self.free = []
        self.live = []

    def put(self, value):
        """``(store stmt, load expr)`` keeping ``value`` in a free slot."""
        if self.free:
            buf = self.free.pop()
        else:
            buf = tirx.decl_buffer((1,), self.dtype, name=f"{self.prefix}{len(self.buffers)}", scope="local")
            self.buffers.append(buf)
        load = tirx.BufferLoad(buf, [0])
        self.live.append((load, buf))
        return tirx.BufferStore(buf, value, [0]), load

    def release(self, expr):
        """Return the slot holding ``expr`` (a load made by :meth:`put`) to the pool; other
        expressions are ignored."""
        for i, (load, buf) in enumerate(self.live):
            if load.same_as(expr):
                del self.live[i]
                self.free.append(buf)
                return


def carry_save_popcount(words: list, top: int | None = None, popcount=None, pool: SlotPool | None = None,
                        accumulate=None, accumulate_word=None, out_dtype: str = "int32"):
    """Statements computing ``sum(popcount(w) for w in words)`` with a carry-save network.

    Returns ``(stmts, total)``. Intermediate words are kept in ``pool`` slots (released as soon
    as they are dead, so about ``2 * top + 3`` registers are live), or bound to variables
    with ``tirx.Bind`` if ``pool`` is None. (Bind is fine for small networks only: TVM 0.27's
    simplifier substitutes bound values into their uses, which blows the network up into an
    exponentially large expression.) If ``accumulate(term) -> stmt`` is given, every popcount
    term is added to the caller's accumulator as soon as it is known and ``total`` is None;
    otherwise ``total`` is an ``out_dtype`` expression to use after ``stmts``.
    ``popcount(word) -> expr`` overrides the popcount (default ``tirx.popcount`` cast);
    ``accumulate_word(word, k) -> stmt`` replaces both: it must add ``2**k * popcount(word)``
    to the caller's accumulator (e.g. byte popcounts summed by a dot-product instruction).
    ``words`` are expressions (e.g. ``x ^ w``); they are used twice each, not materialized.
    """
    if not words:
        return [], tirx.const(0, out_dtype)
    if top is None:
        top = best_counter_depth(len(words))
    if popcount is None:
        def popcount(w):
            return tirx.popcount(w).astype(out_dtype)
    dtype = str(words[0].ty)
    stmts = []
    terms = []
    names = [0]

    def bind(value):
        if pool is not None:
            st, e = pool.put(value)
        else:
            e = tirx.Var(f"cs{names[0]}", dtype)
            names[0] += 1
            st = tirx.Bind(e, value)
        stmts.append(st)
        return e

    def release(*exprs):
        if pool is not None:
            for e in exprs:
                pool.release(e)

    def count(word, k):
        if accumulate_word is not None:
            stmts.append(accumulate_word(word, k))
            release(word)
            return
        t = popcount(word)
        if k:
            t = t * (1 << k)
        if accumulate is not None:
            stmts.append(accumulate(t))
        else:
            terms.append(t)
        release(word)

    acc = [None] * top   # running counter word of weight 2**k
    pend = [None] * top  # a waiting word of weight 2**k

    def add(word, k):
        if k == top:
            count(word, k)
            return
        if pend[k] is None:
            pend[k] = word
            return
        a, p = acc[k], pend[k]
        pend[k] = None
        if a is None:  # half adder
            s_ = bind(p ^ word)
            carry = bind(p & word)
            release(p, word)
        else:  # full adder: sum = xor3, carry = majority (one vpternlogd each on AVX-512)
            s_ = bind(a ^ p ^ word)
            carry = bind((a & p) | (a & word) | (p & word))
            release(a, p, word)
        acc[k] = s_
        add(carry, k + 1)

    for w in words:
        add(w, 0)
    for k in range(top):
        for wd in (acc[k], pend[k]):
            if wd is not None:
                count(wd, k)
    total = None
    for t in terms:
        total = t if total is None else total + t
    return stmts, total
