"""CI smoke of the replication study: two recipes, a few steps, well-formed results."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_replicate_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("replicate", ROOT / "benchmarks" / "replicate.py")
    rep = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["replicate"] = rep  # dataclasses look their module up there
    spec.loader.exec_module(rep)
    rep.main(["--smoke", "--out", str(tmp_path), "--threads", "1"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["rows"]
    assert set(rows) == set(rep.SMOKE)
    for row in rows.values():
        for k in ("fid", "fid_floor", "precision", "recall", "is"):
            assert math.isfinite(row[k]), (row["run"], k)
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["size_saving"] > 1
    assert rows["bidm"]["bits"] == "W1A1" and rows["baseline-w1a4"]["bits"] == "W1A4"
    # resumable: a rerun skips finished runs and gives the same summary
    rep.main(["--smoke", "--out", str(tmp_path), "--threads", "1"])
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == rows
    for run in rep.SMOKE:
        assert (tmp_path / run / "seed0" / "samples.png").exists()
