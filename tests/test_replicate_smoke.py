"""CI smoke of the replication study: two recipes, a few steps, well-formed results."""
from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_replicate():
    """``benchmarks/replicate.py`` as a module (the directory is not a package)."""
    import sys

    spec = importlib.util.spec_from_file_location("replicate", ROOT / "benchmarks" / "replicate.py")
    rep = importlib.util.module_from_spec(spec)
    sys.modules["replicate"] = rep  # dataclasses look their module up there
    spec.loader.exec_module(rep)
    return rep


def test_replicate_smoke(tmp_path):
    rep = _load_replicate()
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
    # the training command is recorded for the report
    cmd = "python benchmarks/replicate.py --smoke --out " + str(tmp_path) + " --threads 1"
    assert (tmp_path / "commands.txt").read_text().splitlines() == [cmd]
    assert json.loads((tmp_path / "bidm" / "seed0" / "done.json").read_text())["command"] == cmd

    # --report writes the results page from the finished runs
    doc = tmp_path / "doc" / "RESULTS.md"
    rep.main(["--report", "--out", str(tmp_path), "--doc", str(doc), "--threads", "1"])
    assert json.loads((tmp_path / "summary.json").read_text())["train_commands"] == [cmd]
    text = doc.read_text()
    assert text.startswith("<!-- generated")
    for heading in ("## Settings", "## Table A", "## Table B", "## Ablations", "## Verdicts",
                    "## Speed of the lowered artifact", "## Sample grids",
                    "## Training curves", "## Wall times"):
        assert heading in text, heading
    assert cmd in text and "Real-vs-real floor" in text
    cells = {}
    for line in text.splitlines():
        parts = [c.strip() for c in line.split("|")]
        if line.startswith("| `") and len(parts) > 6:
            cells.setdefault(parts[1], parts)
    assert cells["`baseline-w1a4`"][3] == "W1A4" and cells["`bidm`"][3] == "W1A1"
    for run in rep.SMOKE:
        row = cells[f"`{run}`"]
        assert row[4] == "1" and math.isfinite(float(row[5])), row  # seeds, FID of the one seed
    for run in ("fp", "binarydm-w1a4", "xnor", "binarydm-no-ebb", "bidm-tbs-1"):
        assert cells[f"`{run}`"][5] == "not run yet", run
    assert re.search(r"^\| Table B \| BiDM beats XNOR-Net at W1A1 \| \*\*not run yet\*\* \|", text, re.M)
    assert re.search(r"^\| Table A \| BinaryDM beats the baseline binarizer at W1A4 \| \*\*not run yet\*\* \|", text, re.M)
    images = re.findall(r"img/(rep_[\w.-]+\.png)", text)
    assert "rep_bidm.png" in images and "rep_curves_table-b.png" in images
    from PIL import Image

    for name in images:
        p = doc.parent / "img" / name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(p) as im:
            im.verify()
    # deterministic: the same runs give the same page and images
    before = {p.name: p.read_bytes() for p in [doc, *(doc.parent / "img").iterdir()]}
    rep.main(["--report", "--out", str(tmp_path), "--doc", str(doc), "--threads", "1"])
    assert before == {p.name: p.read_bytes() for p in [doc, *(doc.parent / "img").iterdir()]}

    # a longer-budget study reported in its own section, with x0-clipped sampling as second metrics
    long = tmp_path / "long"
    rep.main(["--smoke", "--out", str(long), "--threads", "1", "--clip-x0", "1"])
    done = json.loads((long / "bidm" / "seed0" / "done.json").read_text())
    assert done["clip_x0"] == 1.0 and math.isfinite(done["metrics_clip"]["fid"])
    assert (long / "bidm" / "seed0" / "samples-clip.png").exists()
    rep.main(["--report", "--out", str(tmp_path), "--doc", str(doc), "--long", str(long), "--threads", "1"])
    text = doc.read_text()
    assert "## Longer budget" in text and "FID, x0-clip" in text
    assert re.search(r"^\| Table B \| BiDM beats XNOR-Net at W1A1 \| \*\*not run yet\*\* \|", text, re.M)
    line = next(ln for ln in text.splitlines() if ln.startswith("| `bidm` | W1A1 | 0 |"))
    assert all(math.isfinite(float(line.split("|")[i])) for i in (4, 7, 10)), line  # FID, clipped FID, main FID

    # --rescore adds another evaluation (stochastic DDIM) to finished runs without training them
    before = json.loads((tmp_path / "bidm" / "seed0" / "done.json").read_text())
    rep.main(["--smoke", "--out", str(tmp_path), "--threads", "1", "--eta", "1", "--rescore"])
    after = json.loads((tmp_path / "bidm" / "seed0" / "done.json").read_text())
    assert after["evals"] == {"eta1": {"eta": 1.0, "clip_x0": None}} and math.isfinite(after["metrics_eta1"]["fid"])
    assert {k: after[k] for k in before} == before  # nothing it had changed
    assert (tmp_path / "commands.txt").read_text().splitlines() == [cmd]  # rescoring is not a training command
    rep.main(["--report", "--out", str(tmp_path), "--doc", str(doc), "--long", str(long), "--threads", "1"])
    text = doc.read_text()
    assert "| FID ↓ | FID, DDIM η=1 ↓ | KID ↓ |" in text and "verdict, DDIM η=1 |" in text
    assert "python benchmarks/replicate.py --smoke --out " + str(tmp_path) + " --threads 1 --eta 1 --rescore" in text
    assert "img/rep_bidm-eta1.png" in text and (doc.parent / "img" / "rep_bidm-eta1.png").is_file()
    for name in ("rep_long_bidm.png", "rep_long_bidm-clip.png", "rep_long_curves.png"):
        assert f"img/{name}" in text and (doc.parent / "img" / name).is_file(), name
    # a report without --long drops the section and its images
    rep.main(["--report", "--out", str(tmp_path), "--doc", str(doc), "--threads", "1"])
    assert "## Longer budget" not in doc.read_text()
    assert not list((doc.parent / "img").glob("rep_long_*"))


def test_ebb_switch_override_only_touches_recipes_that_switch(tmp_path):
    rep = _load_replicate()
    from bqc.pipeline import load_recipe

    runs = {r.name: r for r in rep.RUNS}
    s = rep.Settings(ebb_switch=0.5)
    for name, want in (("binarydm-w1a4", 0.5), ("binarydm-ebb-3", 0.5), ("binarydm-lmb-w1a4", -1), ("baseline-w1a4", None)):
        d = tmp_path / name
        d.mkdir()
        recipe = load_recipe(rep._recipe_file(runs[name], d, s))
        assert recipe.train.get("ebb_switch") == want, name
    assert load_recipe(rep._recipe_file(runs["binarydm-ebb-3"], tmp_path / "binarydm-ebb-3", s)).passes[0][1]["head_tail_blocks"] == 3
    assert rep._recipe_file(runs["binarydm-w1a4"], tmp_path, rep.Settings()) == "binarydm"


def test_speed_section_matches_measured_recipes_only(tmp_path):
    rep = _load_replicate()
    rr = rep._report_module()
    res = {"batch": 16, "bqc_wall_median_ms": 10.0, "torch_wall_median_ms": 30.0, "speedup_wall_median": 3.0,
           "speedup_cpu_median": 2.9, "bqc_size_mb": 0.28, "fp32_size_mb": 4.22}
    f = tmp_path / "unet_step.json"
    f.write_text(json.dumps({"entries": {"mnist16/bidm/t1": {"command": "python benchmarks/unet_step.py", "result": res},
                                         "mnist16/baseline/t2": {"result": res}}}))
    rows = {n: {} for n in ("bidm", "baseline-w1a4", "bidm-no-spd")}
    text = "\n".join(rr._speed_section(rep.RUNS, rows, f))
    assert "| `bidm` | bidm | 16 | 10.00 | 30.00 | **3.00x** / 2.90x |" in text
    assert "`baseline-w1a4`" not in text  # measured at 2 threads only
    assert "`bidm-no-spd`" not in text  # ablation rows are not matched to a recipe's measurement
    assert "No measured row" in "\n".join(rr._speed_section(rep.RUNS, rows, tmp_path / "missing.json"))


def test_keep_and_restore_results(tmp_path):
    """--keep copies a finished run's results (never weights) and restores them into a lost OUT,
    where the run then counts as finished instead of training again."""
    rep = _load_replicate()
    out, keep = tmp_path / "out", tmp_path / "keep"
    d = out / "baseline-w1a4" / "seed0"
    (d / "trained" / "train").mkdir(parents=True)
    (d / "artifact").mkdir()
    result = {"run": "baseline-w1a4", "seed": 0, "n": 1000, "sample_steps": 100, "metrics": {"fid": 10.0}}
    (d / "done.json").write_text(json.dumps(result))
    (d / "eval-eta0.json").write_text("{}")
    (d / "samples.png").write_bytes(b"png")
    (d / "trained" / "train" / "metrics.csv").write_text("step,loss\n1,0.5\n")
    (d / "trained" / "model.safetensors").write_bytes(b"weights")  # never kept
    (d / "artifact" / "bqc.json").write_text("{}")
    partial = out / "bidm" / "seed0" / "trained"  # unfinished: no done.json, not kept
    partial.mkdir(parents=True)
    (out / "commands.txt").write_text("python benchmarks/replicate.py --only table-a\n")

    assert rep.keep_results(out, keep) == ["baseline-w1a4/seed0"]
    kept = sorted(str(p.relative_to(keep)) for p in keep.rglob("*") if p.is_file())
    assert kept == ["baseline-w1a4/seed0/done.json", "baseline-w1a4/seed0/eval-eta0.json",
                    "baseline-w1a4/seed0/samples.png", "baseline-w1a4/seed0/trained/train/metrics.csv",
                    "commands.txt"]

    lost = tmp_path / "new-machine"
    assert rep.restore_results(keep, lost) == ["baseline-w1a4/seed0"]
    assert rep.restore_results(keep, lost) == []  # already there
    assert rep.do_run(next(r for r in rep.RUNS if r.name == "baseline-w1a4"), 0,
                      rep.Settings(out=lost), None) == result  # finished: not trained again
    assert (lost / "commands.txt").read_text() == "python benchmarks/replicate.py --only table-a\n"
    # rescoring a restored run (no weights here) says why instead of failing inside the loader
    import pytest

    with pytest.raises(SystemExit, match="not on this machine"):
        rep.rescore(next(r for r in rep.RUNS if r.name == "baseline-w1a4"), 0,
                    rep.Settings(out=lost, variants=rep.variants_from_args(None, 0.0)))
    # a partial run in OUT is not overwritten by restore unless the kept one is finished
    (lost / "bidm" / "seed0").mkdir(parents=True)
    (lost / "bidm" / "seed0" / "ckpt").write_text("x")
    rep.restore_results(keep, lost)
    assert not (lost / "bidm" / "seed0" / "done.json").exists()


def test_every_run_recipe_loads_and_no_tbs_rows_drop_only_tbs(tmp_path):
    """Every study row's recipe (with its overrides) loads; the no-TBS ablations run their
    reference recipe's pass list, options included, minus ``tbs_edges`` (a hand-written list once
    left BiDM's residual projections binary in ``bidm-no-tbs``, two changes in one row)."""
    rep = _load_replicate()
    from bqc.pipeline import load_recipe

    for run in rep.RUNS:
        d = tmp_path / run.name
        d.mkdir()
        recipe = load_recipe(rep._recipe_file(run, d, rep.Settings()))
        if run.name.endswith("-no-tbs"):
            ref = load_recipe(run.recipe)
            assert recipe.passes == [(n, o) for n, o in ref.passes if n != "tbs_edges"], run.name
            assert recipe.train == ref.train, run.name
    with pytest.raises(ValueError, match="no pass"):
        rep.without_pass("baseline", "tbs_edges")
    undescribed = [r.name for r in rep.RUNS if not rep._report_module().DESCRIBE.get(r.name)]
    assert not undescribed, f"rows with an empty 'what' column in docs/RESULTS.md: {undescribed}"
    runs = {r.name: r for r in rep.RUNS}
    plan = dict(load_recipe(rep._recipe_file(runs["bidm01-no-kmap"], tmp_path / "bidm01-no-kmap", rep.Settings())).passes)["plan_quant"]
    assert plan["body"] == {"weight": "bidm", "act": "dorefa", "shortcut": "scaled"} and plan["res_proj"] == "fp"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_background_study_stops_on_signal(tmp_path, sig):
    """A study started with `nohup ... &` inherits SIGINT ignored; `kill -INT` (or -TERM) must still
    stop it, in any phase, with exit 130 and the resume hint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "replicate.py"), "--smoke", "--threads", "1",
                          "--out", str(tmp_path / "out")], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as under nohup ... &
    for line in p.stdout:  # the first run has started
        if line.startswith("=="):
            break
    time.sleep(1.0)
    p.send_signal(getattr(signal, sig))
    try:
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, err[-2000:]
    assert "rerun the same command to resume" in err and "Traceback" not in err
