"""Per-function profile of a compiled Relax executable (TVM 0.27 has no ``profile=True`` VM).

``profile_vm(ex, inputs) -> list[(name, ms)]``: time per forward spent in each callee of
``main`` (each ``call_tir`` PrimFunc), summed over its calls, slowest first, plus one row
``"(vm overhead)"`` = the (minimum) end-to-end time minus the kernels (runtime builtins, allocation,
argument checks, Python).

How: ``main`` runs once under a VM *instrument* (a callback the VM invokes before every
``Call`` instruction) that records each callee and its argument tensors; every distinct
``(callee, shapes)`` is then timed alone with ``time_evaluator`` on the executable's compiled
library (minimum over repeats: robust to the other processes sharing this machine, whereas a
wall-clock instrument gets preemptions of several ms billed to whichever kernel was running).
``method="wall"`` gives the wall-clock-instrument numbers instead.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import tvm
from tvm import relax

__all__ = ["profile_vm", "profile_vm_detailed", "time_vm", "format_profile", "group_profile", "op_kind"]

OVERHEAD = "(vm overhead)"


def _lib(ex):
    """The compiled kernel library inside a Relax executable (``ex.mod.imports[0]``)."""
    ex = getattr(ex, "ex", ex)  # CompiledRelax
    mod = ex if isinstance(ex, tvm.runtime.Module) else ex.mod
    imports = getattr(mod, "imports", None) or getattr(mod, "imported_modules", None) or ()
    return list(imports)


def _vm(ex, dev=None):
    if isinstance(ex, relax.VirtualMachine):
        return ex
    if hasattr(ex, "vm") and isinstance(getattr(ex, "vm"), relax.VirtualMachine):  # CompiledRelax
        return ex.vm
    return relax.VirtualMachine(ex, dev or tvm.cpu(0))


def _to_tvm(inputs: Sequence[Any], dev) -> list:
    out = []
    for a in inputs:
        if isinstance(a, tvm.runtime.Tensor):
            out.append(a)
            continue
        if hasattr(a, "detach"):
            a = a.detach().cpu().contiguous().numpy()
        out.append(tvm.runtime.tensor(np.ascontiguousarray(a), dev))
    return out


def time_vm(ex, inputs: Sequence[Any], *, func: str = "main", repeat: int = 10, warmup: int = 2,
            dev=None) -> list[float]:
    """Wall-clock milliseconds of ``repeat`` calls of ``func`` (after ``warmup`` calls)."""
    dev = dev or tvm.cpu(0)
    vm = _vm(ex, dev)
    args = _to_tvm(inputs, dev)
    f = vm[func]
    for _ in range(warmup):
        f(*args)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(*args)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _record_calls(vm, f, args) -> list[tuple[str, tuple]]:
    calls: list[tuple[str, tuple]] = []

    def instrument(_func, symbol, before_run, _ret, *cargs):
        if before_run:
            calls.append((str(symbol), cargs))
        return 0

    vm.set_instrument(instrument)
    try:
        f(*args)
    finally:
        _clear_instrument(vm)
    return calls


def _sig(cargs) -> tuple:
    out = []
    for a in cargs:
        if isinstance(a, tvm.runtime.Tensor):
            out.append((tuple(a.shape), str(a.dtype)))
        else:
            out.append(repr(a))
    return tuple(out)


def profile_vm_detailed(ex, inputs: Sequence[Any], *, func: str = "main", repeat: int = 5,
                        min_repeat_ms: int = 2, method: str = "kernel", dev=None) -> dict:
    """``{"functions": [(name, ms_per_forward, calls_per_forward)], "plain_ms": end-to-end
    minimum, "plain_median_ms", "kernel_ms": sum of the kernels (each timed alone, hot caches),
    "replay_ms": the recorded kernel sequence called back to back without the VM (minimum),
    "method": method}`` (see the module docstring). The overhead row is
    ``plain_ms - kernel_ms`` (floored at 0): VM bookkeeping (``plain - replay``) plus the cost of
    caches not being hot when a kernel runs inside a forward (``replay - kernel``) plus whatever
    load noise the minimum did not remove."""
    dev = dev or tvm.cpu(0)
    vm = _vm(ex, dev)
    args = _to_tvm(inputs, dev)
    f = vm[func]
    f(*args)
    plain = []
    for _ in range(max(5, 2 * repeat)):
        t0 = time.perf_counter()
        f(*args)
        plain.append((time.perf_counter() - t0) * 1e3)
    plain_ms = min(plain)  # least disturbed by other processes; the median is returned too
    if method == "wall":
        rows = _profile_wall(vm, f, args, repeat)
    else:
        libs = _lib(ex)
        calls = _record_calls(vm, f, args)
        groups: dict[tuple, list] = {}
        for sym, cargs in calls:
            lib = next((m for m in libs if m.implements_function(sym)), None)
            if lib is None:
                continue  # runtime builtin: part of the overhead row
            key = (sym, _sig(cargs))
            if key in groups:
                groups[key][2] += 1
            else:
                groups[key] = [lib, cargs, 1]
        # the same kernel sequence replayed without the VM (min over runs): kernel time with
        # the caches as a real forward leaves them, without VM bookkeeping
        seq = [(lib.get_function(sym), cargs) for sym, cargs in calls
               for lib in [next((m for m in libs if m.implements_function(sym)), None)] if lib is not None]
        replay = []
        for _ in range(max(3, repeat)):
            t0 = time.perf_counter()
            for kf, cargs in seq:
                kf(*cargs)
            replay.append((time.perf_counter() - t0) * 1e3)
        acc: dict[str, float] = defaultdict(float)
        cnt: dict[str, int] = defaultdict(int)
        for (sym, _), (lib, cargs, n) in groups.items():
            ev = lib.time_evaluator(sym, dev, number=1, repeat=repeat, min_repeat_ms=int(min_repeat_ms))
            ms = min(ev(*cargs).results) * 1e3
            acc[sym] += ms * n
            cnt[sym] += n
        rows = sorted(((n, ms, cnt[n]) for n, ms in acc.items()), key=lambda r: -r[1])
    kernel_ms = sum(ms for _, ms, _ in rows)
    replay_ms = min(replay) if method != "wall" else None
    rows.append((OVERHEAD, max(0.0, plain_ms - kernel_ms), 0))
    return {"functions": rows, "plain_ms": plain_ms, "plain_median_ms": statistics.median(plain),
            "kernel_ms": kernel_ms, "replay_ms": replay_ms, "method": method}


def _profile_wall(vm, f, args, repeat) -> list[tuple[str, float, int]]:
    state = {"t": 0.0}
    acc: dict[str, float] = defaultdict(float)
    cnt: dict[str, int] = defaultdict(int)

    def instrument(_func, symbol, before_run, _ret, *_args):
        if before_run:
            state["t"] = time.perf_counter()
        else:
            acc[str(symbol)] += time.perf_counter() - state["t"]
            cnt[str(symbol)] += 1
        return 0

    vm.set_instrument(instrument)
    runs: list[dict[str, float]] = []
    try:
        for _ in range(repeat):
            acc.clear()
            cnt.clear()
            f(*args)
            runs.append(dict(acc))
        counts = dict(cnt)
    finally:
        _clear_instrument(vm)
    names = sorted({n for r in runs for n in r if not n.startswith("vm.builtin")})
    rows = [(n, statistics.median([r.get(n, 0.0) for r in runs]) * 1e3, counts.get(n, 0)) for n in names]
    rows.sort(key=lambda r: -r[1])
    return rows


def _clear_instrument(vm) -> None:
    try:
        vm.set_instrument(None)
    except Exception:  # pragma: no cover - older runtimes: a no-op callback
        vm.set_instrument(lambda *_a: 0)


def profile_vm(ex, inputs: Sequence[Any], *, func: str = "main", repeat: int = 5,
               method: str = "kernel", dev=None) -> list[tuple[str, float]]:
    """``[(callee name, ms per forward)]``, slowest first, last row ``"(vm overhead)"``."""
    res = profile_vm_detailed(ex, inputs, func=func, repeat=repeat, method=method, dev=dev)
    return [(n, ms) for n, ms, _ in res["functions"]]


def op_kind(name: str) -> str:
    """Coarse category of a fused function name (for grouping a profile): bqc's binary / int8
    kernels and activation packers by their ``bqc_*`` names, then the float functions by the
    ops fused into them (``conv`` = float convs incl. their fused epilogue; ``layout`` =
    anything with a transpose/concat/split/reshape, e.g. the NHWC -> NCHW epilogue of a binary
    layer)."""
    n = name.lower()
    if n.startswith("vm.builtin") or n.startswith("vm.") or n == OVERHEAD:
        return "runtime"
    # bqc's own kernels (backends/tvm/kernels): named bqc_<kind>_<shape>[_epilogue]
    if n.startswith(("bqc_bconv", "bqc_bdense")):
        return "binary kernels"
    if n.startswith(("bqc_w1akconv", "bqc_w1akdense")):  # binary weights x k-bit codes (the int8 layout)
        return "W1Ak kernels"
    if n.startswith(("bqc_qconv", "bqc_qdense", "bqc_imatmul")):
        return "int8 kernels"
    if n.startswith(("bqc_bitpack", "bqc_quantize")):
        return "act. packing"
    if "cmean" in n:
        return "K-map mean"
    if "fconv" in n or "conv" in n:
        return "conv"
    if "group_norm" in n:
        return "groupnorm(+silu)"
    if "softmax" in n:
        return "softmax"
    if "matmul" in n:
        return "matmul"
    if "resize" in n:
        return "upsample"
    if "concat" in n or "split" in n or "transpose" in n or "reshape" in n:
        return "layout"
    if "sin" in n or "cos" in n:
        return "time-embedding"
    return "elementwise"


def group_profile(rows: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Sum a :func:`profile_vm` result by :func:`op_kind`."""
    acc: dict[str, float] = defaultdict(float)
    for n, ms in rows:
        acc[op_kind(n)] += ms
    return sorted(acc.items(), key=lambda kv: -kv[1])


def format_profile(rows: Sequence[tuple[str, float]], top: int = 20) -> str:
    total = sum(ms for _, ms in rows) or 1.0
    lines = [f"{'function':<56} {'ms':>8} {'%':>6}"]
    for n, ms in list(rows)[:top]:
        lines.append(f"{n:<56} {ms:8.3f} {100 * ms / total:6.1f}")
    return "\n".join(lines)
