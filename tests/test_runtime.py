"""bqc.runtime: the allocator setting bqc's commands apply (its speed: benchmarks/train_speed.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = ("import ctypes, bqc.runtime as r; ok = r.tune_allocator(); "
         "print(ok, r.tune_allocator(), r._glibc() is not None)")


def _run(env_extra: dict) -> list[str]:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_tune_allocator_applies_once_on_glibc_and_can_be_turned_off():
    tuned, again, glibc = _run({"BQC_MALLOC": ""})
    if glibc == "False":
        pytest.skip("this Linux's C library is not glibc (musl's mallopt does nothing)")
    assert tuned == "True" and again == "True"  # applied, and the second call reports the same
    assert _run({"BQC_MALLOC": "default"})[:2] == ["False", "False"]


def test_the_console_entry_point_tunes_the_allocator(capsys):
    from bqc import runtime
    from clirun import run_cli

    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "bqc" in out
    assert runtime._state["tuned"] is not None  # main() asked (True on glibc, False elsewhere)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="idle cores are read from Linux's /proc/stat")
def test_idle_cores_sees_a_busy_core():
    """A thread spinning through the whole window keeps one core busy: fewer idle cores than the
    process may use (and never negative)."""
    import threading
    import time

    from bqc.runtime import idle_cores

    cores = len(os.sched_getaffinity(0))
    stop = time.monotonic() + 1.5
    t = threading.Thread(target=lambda: [None for _ in iter(lambda: time.monotonic() < stop, False)])
    t.start()
    try:
        idle = idle_cores(0.5)
    finally:
        t.join()
    assert idle is not None and 0.0 <= idle <= cores - 0.5


def test_demo_benches_one_thread_per_idle_core(monkeypatch):
    from bqc import demo

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert demo.bench_threads(3) == 3  # --threads wins
    monkeypatch.setattr(demo, "idle_cores", lambda: 0.2)
    assert demo.bench_threads(None) == 1  # everything busy: still one thread
    monkeypatch.setattr(demo, "idle_cores", lambda: cores + 5.0)
    assert demo.bench_threads(None) == cores
    monkeypatch.setattr(demo, "idle_cores", lambda: None)  # unreadable: all cores, as before
    assert demo.bench_threads(None) == cores
