"""The command line: JSON contracts, exit codes and one-paragraph errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bqc import cli
from clirun import run_cli


run = run_cli


def test_inspect_json_mnist16(capsys):
    code, out, _ = run(["inspect", "mnist16", "--json"], capsys)
    assert code == 0
    d = json.loads(out)
    assert sum(layer["params"] for layer in d["layers"]) < d["params"]  # norms are not layers
    assert 500_000 <= d["params"] <= 1_500_000
    assert {"name", "kind", "role", "level", "block", "params", "macs"} <= set(d["layers"][0])
    roles = {layer["role"] for layer in d["layers"]}
    assert {"input", "output", "time-embed", "head", "tail"} <= roles
    assert d["blocks"] and d["blocks"][0]["section"] == "input"


def test_inspect_ldm4_bedrooms_param_count():
    """The published LDM-4 LSUN-Bedrooms UNet has 274,056,163 parameters."""
    out = subprocess.run([sys.executable, "-m", "bqc", "inspect", "--model", "ldm4-bedrooms", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["params"] == 274_056_163


def test_inspect_table(capsys):
    code, out, _ = run(["inspect", "mnist16"], capsys)
    assert code == 0 and "timestep-embedded blocks" in out and "input_blocks.0" in out


def test_missing_model_exit_2_no_traceback(capsys):
    code, out, err = run(["inspect", "/no/such/model.pt2"], capsys)
    assert code == 2
    assert "not found" in err and "Traceback" not in err


def test_debug_shows_traceback(capsys):
    from bqc.errors import BqcError

    with pytest.raises(BqcError):
        run(["--debug", "inspect", "/no/such/model.pt2"], capsys)


def test_unknown_recipe_exit_2(capsys, tmp_path):
    code, _, err = run(["transform", "mnist16", "--recipe", "bidn", "-o", str(tmp_path / "a")], capsys)
    assert code == 2 and "valid recipes" in err and not (tmp_path / "a").exists()


def test_transform_explain_and_report(capsys, tmp_path):
    art = tmp_path / "art"
    code, out, _ = run(["transform", "mnist16", "--recipe", "binarydm", "-o", str(art), "--explain"], capsys)
    assert code == 0 and (art / "bqc.json").exists() and (art / "model.safetensors").exists()
    assert "--explain" in out and "ebb" in out and "role input" in out
    code, out, _ = run(["report", str(art), "--json"], capsys)
    rep = json.loads(out)
    for key in ("params", "size_mb", "fp32_size_mb", "ops", "fp32_ops", "size_saving", "ops_saving", "layers"):
        assert key in rep
    assert {"name", "role", "w_bits", "a_bits", "params", "macs"} <= set(rep["layers"][0])
    assert rep["size_saving"] > 5 and rep["ops_saving"] > 3
    plot = tmp_path / "r.png"
    code, _, _ = run(["report", str(art), "--plot", str(plot)], capsys)
    assert code == 0 and plot.stat().st_size > 1000


def test_recipes_and_passes_list(capsys):
    code, out, _ = run(["recipes", "--json"], capsys)
    names = {r["name"] for r in json.loads(out)}
    assert {"fp", "baseline", "xnor", "xnor++", "dorefa", "reactnet", "reste", "lsq", "binarydm", "binarydm-lmb", "bidm"} <= names
    code, out, _ = run(["passes"], capsys)
    assert code == 0 and "plan_quant" in out and "tbs_edges" in out


def test_eval_json_is_one_object_on_stdout():
    """`bqc eval ... --json`: stdout is exactly one JSON object with the contract's keys
    (progress bars go to stderr)."""
    out = subprocess.run([sys.executable, "-m", "bqc", "eval", "mnist16", "-n", "16", "--steps", "2", "--json"],
                         capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("{") and out.stdout.count("\n") == 1
    m = json.loads(out.stdout)
    assert {"fid", "kid", "precision", "recall", "is", "n", "fid_floor"} <= set(m) and m["n"] == 16


def test_demo_summary_names_what_the_speedup_compares(tmp_path, monkeypatch):
    """The demo's closing table and notes (the whole demo is the README's main job, minutes)."""
    from rich.console import Console

    from bqc.demo import DemoRow, print_summary

    m = {"fid": 30.0, "fid_floor": 2.0, "precision": 0.8, "recall": 0.9, "confident": 0.7}
    rep = {"size_mb": 0.29, "size_saving": 14.4, "ops_saving": 24.8}
    bench = {"bqc_ms": 11.0, "torch_fp32_ms": 33.0, "speedup": 3.0, "threads": 1, "batch": 16}
    con = Console(record=True, width=200)
    monkeypatch.chdir(tmp_path)
    paths = {"model": tmp_path / "models" / "checkpoints" / "x", "samples": "/elsewhere/s.png"}
    print_summary([DemoRow("bidm", "W1A1", m, rep, bench=bench), DemoRow("binarydm", "W1A4", m, rep, paths=paths)],
                  con, 90.0, tmp_path)
    text = con.export_text()
    assert "3.00x" in text and "11.0 ms vs torch FP32 eager 33.0 ms, 1 threads (one per idle core unless --threads), batch 16" in text
    assert "--threads 1" in text
    # paths inside the current directory are shown relative to it, others as given
    assert "model     models/checkpoints/x" in text and "samples   /elsewhere/s.png" in text


def test_lower_notes_ebb_layers_folded_in_stage1():
    """`bqc lower`'s note comes from the stage buffers, counted when folding: a binarydm graph in stage 1
    is noted, the same graph after the switch and a bidm graph (no EBB) are not."""
    from bqc import deploy
    from bqc.cli import ebb_stage_note
    from test_deploy import case

    counts = {name: deploy.fold(case("tiny", name)).manifest["ebb_stage1_layers"]
              for name in ("binarydm-s1", "binarydm-s2", "bidm")}
    assert counts["binarydm-s1"] > 0 and counts["binarydm-s2"] == counts["bidm"] == 0, counts
    assert f"{counts['binarydm-s1']} EBB layers" in ebb_stage_note({"ebb_stage1_layers": counts["binarydm-s1"]})
    assert ebb_stage_note({"ebb_stage1_layers": 0}) is None and ebb_stage_note({}) is None  # older deploy artifacts


def test_eval_defaults_to_the_training_data(tmp_path, capsys):
    """A model trained on an image folder is scored against that folder, not mnist16, and the
    output says which data and which features a score used."""
    import numpy as np
    from PIL import Image

    from bqc import transform as tf
    from bqc.frontend import load_source
    from bqc.train.qat import QATOptions, train_artifact

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray((rng.random((16, 16)) * 255).astype("uint8"), "L").save(imgs / f"{i}.png")
    art = tf.save(tf.transform(load_source("mnist16"), "baseline"), tmp_path / "art")
    run_dir = train_artifact(art, str(imgs), tmp_path / "run",
                             QATOptions(steps=1, batch=4, warmup=1, checkpoint_every=0, progress=False))
    code, out, err = run(["eval", str(run_dir), "-n", "5", "--steps", "2", "--json"], capsys)
    assert code == 0, err
    m = json.loads(out)
    assert m["data"] == str(imgs) and m["data_from"] == "the data it was trained on"
    assert "MNIST classifier" in m["features"]
    code, out, err = run(["eval", str(run_dir), "-n", "5", "--steps", "2", "--json", "--data", "mnist16"], capsys)
    assert code == 0 and json.loads(out)["data"] == "mnist16"
