"""The benchmark scripts run: a tiny configuration of each measuring script end to end, results well
formed (the numbers themselves are the scripts' business, never asserted here). ``benchmarks/kernels.py``
broke at its first printed row (a NameError left by a refactor) and nothing ran it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_runs_and_checks_exactness(tmp_path):
    pytest.importorskip("tvm")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--models", "ddim-cifar10", "--threads", "1",
           "--rounds", "1", "--round-ms", "1", "--max-channels", "128", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "kernels.json").read_text())
    rows = [row for run in doc["runs"] for row in run["rows"]]
    assert rows and all(row["exact"] for row in rows), rows  # every kernel equals the numpy reference
    assert all(row["ms"]["torch_fp32"] > 0 and row["speedup"] for row in rows)
    assert "--max-channels 128" in doc["command"]
    assert doc["command"] in (tmp_path / "kernels.md").read_text()  # the numbers carry their command
