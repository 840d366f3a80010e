"""Process-wide settings a bqc command applies once, before any work.

``tune_allocator``: glibc's malloc returns every freed block above its mmap threshold (128 KiB
at start, adjusted upward as blocks are freed) to the kernel and trims the heap top above twice
that, so each eager op's new 1-30 MiB output tensor is fresh memory: page faults plus the
kernel zeroing the pages, which costs more than the op itself (a clamp of a 2 MiB tensor:
0.8 ms against 0.05 ms on recycled memory; measured in benchmarks/results/train_speed.md).
Raising both thresholds keeps freed tensors' memory in the process for the next step.
``BQC_MALLOC=default`` leaves malloc alone; it is a no-op off glibc (macOS, musl, Windows).
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks up to 32 MiB come from the heap (glibc's own cap for the dynamic threshold)
TRIM_THRESHOLD = 1 << 30  # the heap keeps up to 1 GiB of free memory at its top before giving it back

_state = {"tuned": None}


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # only glibc has it (musl's mallopt does nothing)
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() else None


def tune_allocator() -> bool:
    """Raise glibc malloc's mmap and trim thresholds (once per process); True when applied."""
    if _state["tuned"] is not None:
        return _state["tuned"]
    libc = None if os.environ.get("BQC_MALLOC", "").lower() == "default" else _glibc()
    ok = bool(libc) and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _state["tuned"] = ok
    return ok


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (idle + iowait jiffies, total jiffies)}`` from /proc/stat for ``cpus``; None off Linux."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(f) for f in fields[:8]]
            out[int(name[3:])] = (v[3] + v[4], sum(v))
    return out or None


def idle_cores(window: float = 0.5) -> float | None:
    """How many of this process's cores were idle over the next ``window`` seconds (from
    /proc/stat), or None where that cannot be read. A benchmark that runs one thread per core
    on a machine another job keeps busy measures the wait for a core, not the kernels: TVM's
    thread pool spin-waits on its busy workers (``bqc demo`` read 0.05x beside a CI run)."""
    import time

    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    before = _cpu_times(cpus)
    if before is None:
        return None
    time.sleep(window)
    after = _cpu_times(cpus) or {}
    idle = 0.0
    for c, (i0, t0) in before.items():
        i1, t1 = after.get(c, (i0, t0))
        idle += (i1 - i0) / (t1 - t0) if t1 > t0 else 0.0
    return idle


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (``MemAvailable``), or None: the rule lives in
    :func:`bqc.run.available_memory`, which the standalone bundle runner uses too."""
    from bqc.run import available_memory as mem

    return mem()


def _size(b: float) -> str:
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def require_memory(need: int, what: str, hint: str) -> None:
    """Refuse (BqcError, before any work) a request of ``need`` bytes that this machine's available
    memory cannot hold: ``what`` says what needs it ("1000 samples of shape ... need")."""
    from bqc.errors import BqcError

    have = available_memory()
    if have is not None and need > have:
        raise BqcError(f"{what} about {_size(need)}; this machine has {_size(have)} available", hint=hint)
