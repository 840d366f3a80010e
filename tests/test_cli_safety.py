"""The command line never destroys what the user owns, and never shows a traceback.

* an existing output that bqc did not write is refused (exit 2, before any work) unless
  ``--force``, and even then only bqc's own files are replaced;
* outputs that cannot be written are reported before the work;
* usage errors and bad input of every subcommand: exit 2, no traceback;
* Ctrl-C: exit 130 with one line saying what was saved.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bqc import cli
from clirun import run_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


run = run_cli


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    return path


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A bidm artifact written with --force into a folder that already held a user's file."""
    d = _user_dir(tmp_path_factory.mktemp("art") / "a")
    r = subprocess.run([sys.executable, "-m", "bqc", "transform", "mnist16", "--recipe", "bidm", "-o", str(d), "--force"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    return d


# 1. never destroy what the user owns ---------------------------------------------------------
def test_user_files_in_out_dir_survive(tmp_path, capsys):
    d = _user_dir(tmp_path / "mine")
    code, _, err = run(["transform", "mnist16", "--recipe", "bidm", "-o", d], capsys)
    assert code == 2 and "--force" in err and "notes.txt" in err and "Traceback" not in err
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"] and (d / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("cmd", [
    ["transform", "mnist16", "-o", "{f}"],
    ["transform", "mnist16", "-o", "{f}", "--force"],  # a file is never replaced by a folder
    ["train", "{f}", "--steps", "1", "-o", "{f}"],
    ["lower", "mnist16", "-o", "{f}"],
    ["pretrain", "--steps", "1", "-o", "{f}"],
    ["demo", "-o", "{f}"],
    ["sample", "mnist16", "-o", "{f}"],
    ["report", "mnist16", "--plot", "{f}"],  # matplotlib wrote over the user's notes.png
])
def test_existing_file_output_refused(tmp_path, capsys, cmd):
    f = tmp_path / ("notes.png" if cmd[0] in ("sample", "report") else "notes.txt")
    f.write_text("my notes")
    code, _, err = run([c.format(f=f) for c in cmd], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f.read_text() == "my notes" and sorted(tmp_path.iterdir()) == [f]


@pytest.mark.parametrize("cmd", [["train", "{art}", "--steps", "1"], ["lower", "{art}"], ["pretrain", "--steps", "1"],
                                 ["demo"]])
def test_every_writing_command_refuses_foreign_dir(tmp_path, capsys, cmd):
    d = _user_dir(tmp_path / "mine")
    code, _, err = run([c.format(art=tmp_path / "no-art") for c in cmd] + ["-o", d], capsys)
    assert code == 2 and "--force" in err and "Traceback" not in err, err
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


#: every path option of every command: what bqc writes (each goes through bqc.outputs.check_output,
#: tested above and below) and what it only reads. A new path option fails this test until it is
#: classified here: `report --plot` and `transform --dump-dir` wrote over a user's files unchecked.
PATH_OPTIONS = {
    "written": {("transform", "--out"), ("transform", "--dump-dir"), ("report", "--plot"), ("pretrain", "--out"),
                ("train", "--out"), ("sample", "--out"), ("sample", "--npz"), ("encode", "--out"), ("fold", "--out"),
                ("unfold", "--out"), ("lower", "--out"), ("demo", "--out")},
    "read": {("train", "--resume"), ("pretrain", "--init"), ("sample", "--vae-weights"), ("encode", "--vae-weights"), ("encode", "--captions"),
             ("encode", "--context")},
}


def test_every_path_option_is_classified():
    import inspect

    found = set()
    for c in cli.app.registered_commands:
        for p in inspect.signature(c.callback).parameters.values():
            decls = getattr(p.default, "param_decls", None) or ()
            if "Path" in str(p.annotation) and decls:
                found.add((c.name or c.callback.__name__, decls[0]))
    assert found == PATH_OPTIONS["written"] | PATH_OPTIONS["read"]


def test_report_plot_is_marked_and_replaced_by_a_rerun(tmp_path, capsys):
    plot = tmp_path / "cost.png"
    for _ in range(2):  # the second run replaces the first run's (marked) PNG without --force
        code, _, err = run(["report", "mnist16", "--plot", plot], capsys)
        assert code == 0, err
    from bqc.outputs import is_bqc_file

    assert is_bqc_file(plot)
    code, _, err = run(["report", "mnist16", "--plot", tmp_path / "cost.txt"], capsys)  # was matplotlib's traceback
    assert code == 2 and "name it cost.png" in err


def test_dump_dir_keeps_user_files(tmp_path, capsys):
    """`transform --dump-dir DIR` wrote 00_input.txt, 01_<pass>.txt ... into any folder, over a user's files."""
    d = _user_dir(tmp_path / "mine")
    (d / "00_input.txt").write_text("mine too")
    code, _, err = run(["transform", "mnist16", "--recipe", "bidm", "-o", tmp_path / "a", "--dump-dir", d], capsys)
    assert code == 2 and "--dump-dir" in err and "notes.txt" in err, err
    assert (d / "00_input.txt").read_text() == "mine too" and not (tmp_path / "a").exists()
    dump = tmp_path / "dump"
    for _ in range(2):  # bqc's own dump is rewritten by a rerun
        code, _, err = run(["transform", "mnist16", "--recipe", "bidm", "-o", tmp_path / "a", "--force", "--dump-dir", dump],
                           capsys)
        assert code == 0, err
    from bqc.outputs import output_kind

    assert output_kind(dump) == "dump" and "get_attr" in (dump / "00_input.txt").read_text() and len(list(dump.iterdir())) > 5


def test_force_replaces_only_bqc_files(art, tmp_path, capsys):
    # the fixture wrote the artifact with --force next to the user's file
    assert (art / "notes.txt").read_text() == "my notes"
    assert {"bqc.json", "base.pt2", "model.safetensors", "graph.txt"} <= {p.name for p in art.iterdir()}
    assert not [p for p in art.parent.iterdir() if p.name.startswith(".")]  # no temp/old folders left
    # bqc's own artifact of the same kind is not refused (a re-run replaces it)
    from bqc.outputs import check_output, output_kind

    assert output_kind(art) == "artifact"
    check_output(art, "artifact")
    # ... but a training run is another kind: writing a transform there needs --force
    run_dir = tmp_path / "run"
    (run_dir / "train").mkdir(parents=True)
    (run_dir / "bqc.json").write_text('{"format": 1, "bqc_version": "0"}')  # (a bqc.json without them is a user's)
    (run_dir / "train.json").write_text("{}")
    code, _, err = run(["transform", "mnist16", "-o", run_dir], capsys)
    assert code == 2 and "training run" in err and "--force" in err


@pytest.mark.parametrize("clash", ["model.safetensors", "bqc.json", "train/"])
def test_force_never_replaces_a_user_file_of_a_name_bqc_writes(tmp_path, capsys, clash):
    """`transform -o DIR --force` replaced the user's own model.safetensors (and bqc.json) in a folder
    that was no bqc output: --force replaces only bqc's own files, so that folder is refused."""
    d = _user_dir(tmp_path / "mine")
    target = d / clash.rstrip("/")
    if clash.endswith("/"):
        target.mkdir()
        (target / "metrics.csv").write_text("my metrics")
    else:
        target.write_text("my weights")
    kind = "train" if clash == "train/" else "transform"
    cmd = (["train", tmp_path / "no-art", "--steps", "1"] if kind == "train" else ["transform", "mnist16"]) + ["-o", d, "--force"]
    code, _, err = run(cmd, capsys)
    assert code == 2 and clash in err and "did not write" in err and "Traceback" not in err, err
    assert sorted(p.name for p in d.iterdir()) == sorted(["notes.txt", clash.rstrip("/")])
    assert (target / "metrics.csv" if clash.endswith("/") else target).read_text().startswith("my ")


def test_save_artifact_into_existing_dir_keeps_other_files(art, tmp_path):
    from bqc import artifact

    a = artifact.load_artifact(art)
    d = _user_dir(tmp_path / "d")
    (d / "sub").mkdir()
    artifact.save_artifact(d, base_ep=a.base_ep, gm=a.gm, recipe=a.recipe, wbits=1, abits=1, source={})
    assert (d / "notes.txt").read_text() == "my notes" and (d / "sub").is_dir() and artifact.is_artifact(d)
    assert sorted(p.name for p in d.iterdir()) == ["base.pt2", "bqc.json", "graph.txt", "model.safetensors", "notes.txt", "sub"]


def test_sample_file_outputs(tmp_path, capsys):
    png, npz = tmp_path / "grid.png", tmp_path / "x.npz"
    from PIL import Image

    Image.new("L", (4, 4)).save(png)  # the user's own PNG
    code, _, err = run(["sample", "mnist16", "-n", "1", "--steps", "1", "-o", png], capsys)
    assert code == 2 and "--force" in err and png.stat().st_size < 200
    code, _, err = run(["sample", "mnist16", "-n", "1", "--steps", "1", "-o", png, "--npz", npz, "--force"], capsys)
    assert code == 0, err
    # what bqc wrote, bqc may replace
    code, _, err = run(["sample", "mnist16", "-n", "1", "--steps", "1", "-o", png, "--npz", npz], capsys)
    assert code == 0, err
    import numpy as np

    assert list(np.load(npz).keys()) == ["samples"]


@pytest.mark.parametrize("force", [False, True])
def test_file_output_never_writes_through_a_link(tmp_path, capsys, force):
    """`sample -o link.png --force`, the link pointing at the user's file, overwrote that file; a
    dangling link made bqc create the file it points to. Both are refused, --force or not; a link to
    bqc's own PNG is written as before."""
    mine = tmp_path / "notes.txt"
    mine.write_text("user data")
    (tmp_path / "link.png").symlink_to(mine)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "elsewhere.png")
    for out in ("link.png", "dangling.png"):
        code, _, err = run(["sample", "mnist16", "-n", "1", "--steps", "1", "-o", tmp_path / out]
                           + (["--force"] if force else []), capsys)
        assert code == 2 and "symbolic link" in err, err
    assert mine.read_text() == "user data" and not (tmp_path / "elsewhere.png").exists()
    code, _, err = run(["sample", "mnist16", "-n", "1", "--steps", "1", "-o", tmp_path / "real.png"], capsys)
    assert code == 0, err
    (tmp_path / "ours.png").symlink_to(tmp_path / "real.png")
    code, _, err = run(["sample", "mnist16", "-n", "1", "--steps", "1", "-o", tmp_path / "ours.png"], capsys)
    assert code == 0, err


def test_output_folder_with_a_linked_own_file_is_refused(art, tmp_path, capsys):
    """An artifact folder whose model.safetensors is a link to the user's file: writing the
    artifact there would overwrite that file through the link."""
    import shutil

    mine = tmp_path / "weights.bin"
    mine.write_bytes(b"user data")
    out = tmp_path / "art"
    shutil.copytree(art, out)
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").symlink_to(mine)
    code, _, err = run(["transform", "mnist16", "--recipe", "baseline", "-o", out, "--force"], capsys)
    assert code == 2 and "model.safetensors is a symbolic link" in err, err
    assert mine.read_bytes() == b"user data"


@pytest.mark.parametrize("where", ["under-file", "proc", "read-only"])
def test_unwritable_output_exit_2_before_work(tmp_path, capsys, where):
    if where == "under-file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "art"
    elif where == "proc":
        if not Path("/proc/self").exists():
            pytest.skip("no /proc")
        out = Path("/proc/bqc-test-out")
    else:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "art"
    for cmd in (["transform", "mnist16", "-o", out], ["lower", "no-such-art", "-o", out],
                ["sample", "mnist16", "-o", Path(str(out) + ".png")]):
        t0 = time.time()
        code, _, err = run(cmd, capsys)
        assert code == 2 and "cannot write" in err and "Traceback" not in err, (cmd, err)
        assert time.time() - t0 < 20  # before any work


# 3. no tracebacks -----------------------------------------------------------------------------
def _fixtures(d: Path) -> dict:
    """Inputs for the bad command lines: an ONNX export folder, an aarch64 library, a broken
    diffusers folder, a non-Module --config, a user file."""
    onnx = d / "onnx"
    onnx.mkdir()
    (onnx / "export.json").write_text(json.dumps({"format": "bqc-onnx"}))
    arm = d / "arm"
    arm.mkdir()
    elf = b"\x7fELF\x02\x01\x01" + bytes(9) + (3).to_bytes(2, "little") + (183).to_bytes(2, "little") + bytes(44)
    (arm / "model.so").write_bytes(elf)
    (arm / "manifest.json").write_text(json.dumps({"format": "bqc-tvm", "backend": "tvm-arm", "batch": 2,
                                                   "input_shape": [1, 16, 16], "conditional": False,
                                                   "files": {"library": "model.so"}}))
    dif = d / "dif"
    dif.mkdir()
    (dif / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 16, "in_channels": "one"}))
    (dif / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (d / "cfg.yaml").write_text("target: builtins.dict\nparams: {}\n")
    (d / "notes.txt").write_text("mine")
    return {"onnx": onnx, "arm": arm, "dif": dif, "cfg": d / "cfg.yaml", "file": d / "notes.txt", "new": d / "new"}


BAD = {
    "unknown-option": ["transform", "mnist16", "--recpie", "bidm", "-o", "{new}"],
    "missing-out": ["transform", "mnist16"],
    "not-an-int": ["sample", "mnist16", "--steps", "abc"],
    "unknown-command": ["frobnicate"],
    "inspect-bad-option": ["inspect", "mnist16", "--input-shape", "1,16,16"],  # a hint suggests it
    "recipes-extra-arg": ["recipes", "extra"],
    "passes-bad-option": ["passes", "--json"],
    "report-bad-int": ["report", "mnist16", "--wbits", "x"],
    "train-missing-steps": ["train", "{new}", "-o", "{new}"],
    "train-bad-option": ["train", "{new}", "--steps", "3", "--grad-clip", "1", "-o", "{new}"],  # a hint suggested it
    "train-no-artifact": ["train", "{new}", "--steps", "3", "-o", "{new}/run"],
    "train-zoo-name": ["train", "mnist16", "--steps", "3", "-o", "{new}/run"],  # a new user's first try
    "train-deploy-name": ["train", "mnist16-bidm", "--steps", "3", "-o", "{new}/run"],
    "train-batch-0": ["train", "{new}", "--steps", "3", "--batch", "0", "-o", "{new}/run"],
    "sample-n-0": ["sample", "mnist16", "-n", "0", "-o", "{new}/s.png"],
    "sample-onnx": ["sample", "{onnx}", "-o", "{new}/s.png"],
    "sample-aarch64": ["sample", "{arm}", "-n", "2", "--steps", "1", "-o", "{new}/s.png"],
    "eval-n-0": ["eval", "mnist16", "-n", "0"],
    "eval-n-2": ["eval", "mnist16", "-n", "2", "--steps", "1"],  # refused after sampling (metrics need 5)
    "sample-seed-huge": ["sample", "mnist16", "-n", "1", "--seed", str(10**23), "-o", "{new}/s.png"],  # torch's overflow
    "train-seed-negative": ["train", "{new}", "--steps", "3", "--seed", "-1", "-o", "{new}/run"],
    "sample-name-too-long": ["sample", "mnist16", "-n", "1", "-o", "{new}/" + "a" * 300 + ".png"],  # OSError traceback
    "inspect-name-too-long": ["inspect", "b" * 300],
    "sample-out-folder": ["sample", "mnist16", "-n", "1", "-o", "."],  # a traceback: '.' has an empty name
    "sample-npz-folder": ["sample", "mnist16", "-n", "1", "-o", "{new}/s.png", "--npz", "."],
    "pretrain-negative-steps": ["pretrain", "--steps", "-1", "-o", "{new}"],
    "lower-batch-huge": ["lower", "mnist16-bidm", "--batch", "100000000", "-o", "{new}"],  # the allocator's refusal
    "lower-backend": ["lower", "mnist16", "--backend", "foo", "-o", "{new}"],
    "lower-no-artifact": ["lower", "{new}", "-o", "{new}/lib"],
    "bench-onnx": ["bench", "{onnx}"],
    "bench-nothing": ["bench", "{new}"],
    "demo-recipe": ["demo", "--qat", "nosuch", "-o", "{new}"],
    "demo-model": ["demo", "--models", "nosuch-model", "-o", "{new}"],
    "demo-model-not-deploy": ["demo", "--models", "{file}", "-o", "{new}"],
    "demo-file-out": ["demo", "-o", "{file}"],
    "diffusers-config": ["inspect", "{dif}"],
    "config-not-module": ["inspect", "--config", "{cfg}"],
    "transform-into-file": ["transform", "mnist16", "-o", "{file}"],
}


#: runs each command line of a JSON file through bqc's console entry point in this one process (one
#: import of torch instead of one per command line); an exception that escapes main() is printed as
#: Python would print it, so the test sees the traceback
_DRIVER = """
import contextlib, io, json, sys, traceback
from bqc import cli
src, dst = sys.argv[1:3]
results = {}
for name, argv in json.load(open(src)).items():
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["bqc", *argv]
    cli._STATE.pop("interrupted", None)
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
json.dump(results, open(dst, "w"))
"""


@pytest.fixture(scope="module")
def bad_results(tmp_path_factory):
    """Every bad command line through `bqc`'s entry point, in two fresh processes (half each, in parallel);
    three of them also as `python -m bqc ...` of their own, the way a user runs it."""
    from types import SimpleNamespace

    d = tmp_path_factory.mktemp("bad")
    fx = _fixtures(d)
    argvs = {name: [a.format(**fx) for a in args] for name, args in BAD.items()}
    names = sorted(argvs)
    halves = [names[0::2], names[1::2]]

    def batch(i):
        (d / f"argv{i}.json").write_text(json.dumps({n: argvs[n] for n in halves[i]}))
        r = subprocess.run([sys.executable, "-c", _DRIVER, str(d / f"argv{i}.json"), str(d / f"res{i}.json")],
                           capture_output=True, text=True, env=ENV, timeout=600, cwd=d)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((d / f"res{i}.json").read_text())

    def own(name):
        return name, subprocess.run([sys.executable, "-m", "bqc", *argvs[name]], capture_output=True, text=True,
                                    env=ENV, timeout=300, cwd=d)

    with ThreadPoolExecutor(2) as ex:
        results = {n: SimpleNamespace(**r) for part in ex.map(batch, (0, 1)) for n, r in part.items()}
    with ThreadPoolExecutor(3) as ex:
        for name, r in ex.map(own, ("unknown-option", "train-no-artifact", "sample-aarch64")):
            own_err = r.stderr.replace("python -m bqc", "bqc")  # the usage line names the program as it was run
            assert (r.returncode, own_err) == (results[name].returncode, results[name].stderr), name
    return results


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_command_line_exit_2_no_traceback(bad_results, name):
    r = bad_results[name]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    assert "error:" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 8, r.stderr  # one paragraph


def test_usage_error_names_the_fix(bad_results):
    err = bad_results["unknown-option"].stderr
    assert "--recipe" in err and "Usage:" in err
    assert "aarch64" in bad_results["sample-aarch64"].stderr and "tvm-x86" in bad_results["sample-aarch64"].stderr
    assert "ONNX" in bad_results["bench-onnx"].stderr
    assert "bqc transform mnist16 --recipe bidm -o art" in bad_results["train-zoo-name"].stderr
    assert "artifact folder not found" in bad_results["train-no-artifact"].stderr
    assert "bqc unfold mnist16-bidm -o art" in bad_results["train-deploy-name"].stderr
    assert "-n must be at least 5 to score" in bad_results["eval-n-2"].stderr and "sampling" not in bad_results["eval-n-2"].stderr


def test_os_errors_are_one_paragraph(bad_results, tmp_path, capsys, monkeypatch):
    """An OSError that escapes a command (the system refused a path, the disk filled) prints the reason
    and the path in one paragraph: exit 2 for a path the user gave, 1 for the machine's trouble."""
    err = bad_results["inspect-name-too-long"].stderr
    assert "File name too long" in err and "(300 characters)" in err and "shorten it" in err
    # an output name too long is found before any work (it was found when the grid was written)
    err = bad_results["sample-name-too-long"].stderr
    assert "a name of 304 bytes; this file system takes at most" in err and "sampling" not in err
    import errno

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "g.png"))

    monkeypatch.setattr(cli, "_samples", disk_full)
    code, _, err = run_cli(["sample", "mnist16", "-n", "2", "--steps", "1", "-o", tmp_path / "g.png"], capsys)
    assert code == 1 and "No space left on device" in err and "free disk space" in err and "Traceback" not in err

    def library_oserror(*a, **k):  # PIL's "image file is truncated": an OSError without errno
        raise OSError("image file is truncated (3 bytes not processed)")

    monkeypatch.setattr(cli, "_samples", library_oserror)
    code, _, err = run_cli(["sample", "mnist16", "-n", "2", "--steps", "1", "-o", tmp_path / "g.png"], capsys)
    assert code == 1 and "OSError: image file is truncated" in err and "Traceback" not in err


# Ctrl-C ------------------------------------------------------------------------------------------
def test_ctrl_c_in_sample_exits_130(monkeypatch, tmp_path, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_samples", interrupted)
    code, _, err = run(["sample", "mnist16", "-o", tmp_path / "s.png"], capsys)
    assert code == 130 and "interrupted" in err and "nothing was written" in err and not (tmp_path / "s.png").exists()


def test_ctrl_c_inside_tvm_exits_130(monkeypatch, tmp_path, capsys):
    """TVM's FFI hands a KeyboardInterrupt raised inside its C++ calls back as a bare RuntimeError:
    Ctrl-C during `bqc lower`'s compile was a traceback and exit 1."""
    pytest.importorskip("tvm")
    from bqc.backends.tvm import lower as tvm_lower

    def compile_interrupted(*a, **k):
        try:
            signal.raise_signal(signal.SIGINT)  # as the user's Ctrl-C, through bqc's handler
        except KeyboardInterrupt:
            raise RuntimeError from None  # what tvm-ffi makes of it

    monkeypatch.setattr(tvm_lower, "lower", compile_interrupted)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a worker may ignore it)
    try:
        code, _, err = run(["lower", "mnist16-bidm", "-o", tmp_path / "lib", "-q"], capsys)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main put Python's handler back
    finally:
        signal.signal(signal.SIGINT, old)
    assert code == 130 and "interrupted" in err and "Traceback" not in err and not (tmp_path / "lib").exists()


def test_warmup_not_below_steps_warns(monkeypatch, tmp_path, capsys):
    """`--warmup 10**12` was silent: the lr never left the warm-up. Allowed (a resume may extend the
    run), but warned about before any work; a warm-up below the steps is not."""
    from bqc.train import qat

    seen = []

    def fake_train(target, data, out, opts, resume=False):
        seen.append(opts.warmup)
        out.mkdir(parents=True)
        return out

    monkeypatch.setattr(qat, "train_artifact", fake_train)
    code, _, err = run(["train", tmp_path / "art", "--steps", "3", "--warmup", str(10**12), "-o", tmp_path / "a"], capsys)
    assert code == 0 and seen == [10**12]
    assert "--warmup 1000000000000 is not below --steps 3" in " ".join(err.split()), err
    code, _, err = run(["train", tmp_path / "art", "--steps", "3", "--warmup", "2", "-o", tmp_path / "b"], capsys)
    assert code == 0 and "warm-up" not in err


def test_sigint_in_train_exits_130_and_resumes(art, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bqc", "train", str(art), "--batch", "2", "--warmup", "1", "--sample-steps", "10",
           "--checkpoint-every", "1", "-o", str(out)]
    p = subprocess.Popen(cmd + ["--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    ckpt = out / "train" / "checkpoint.safetensors"
    t0 = time.time()
    while not ckpt.exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.2)
    assert ckpt.exists(), p.stderr.read() if p.poll() is not None else "no checkpoint after 300 s"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert len(line) == 1 and "checkpoint saved to" in line[0] and "--resume" in line[0], err
    from bqc.checkpoint import read_checkpoint_meta

    step = read_checkpoint_meta(ckpt)["step"]
    assert step >= 1
    # bqc's own run: `--resume RUN -o RUN` is not refused; finishing at the saved step writes the artifact
    r = subprocess.run(cmd + ["--steps", str(step), "--resume", str(out)], capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert (out / "bqc.json").is_file() and (out / "train.json").is_file()
    # and without --resume the run is refused before any work
    r = subprocess.run(cmd + ["--steps", str(step)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr


# files that are not what they claim: devices, pipes, binary, nesting bombs --------------------------
def _hostile_inputs(tmp_path: Path) -> dict:
    h = tmp_path
    os.mkfifo(h / "fifo.yaml")  # reading it blocked forever
    (h / "garbage.yaml").write_bytes(bytes(range(128, 256)) * 4)  # not UTF-8: a UnicodeDecodeError traceback
    (h / "deep.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000)  # yaml's RecursionError
    (h / "dif").mkdir()
    (h / "dif" / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # json's RecursionError
    (h / "zero").mkdir()
    (h / "zero" / "config.json").symlink_to("/dev/zero")  # read_text() filled memory
    (h / "art").mkdir()
    (h / "art" / "bqc.json").write_bytes(b"\xff\xfe" * 50)
    (h / "r.toml").symlink_to("/dev/zero")
    for d in ("list-art", "list-model", "list-compiled"):  # JSON that is not an object: AttributeError tracebacks
        (h / d).mkdir()
    (h / "list-art" / "bqc.json").write_text("[1]")
    (h / "list-model" / "config.json").write_text("[1]")
    (h / "list-compiled" / "manifest.json").write_text("[1]")
    (h / "string.json").write_text('"x"')
    (h / "opt.toml").write_text('extends = "bidm"\n[options.mixed_precision]\nkeep_fp = 3\n')  # a TypeError in the pass
    (h / "bad-field").mkdir()  # an object with a field of the wrong type: an AttributeError deep in the command
    (h / "bad-field" / "bqc.json").write_text(json.dumps({"format": 1, "source": [1], "recipe": {}, "wbits": 1, "abits": 1}))
    from bqc.pipeline import load_recipe

    for name, edit in {"bad-recipe-bits": ("wbits", "x"), "bad-recipe-option": ("passes", [["tbs_edges", {"connections": "x"}]]),
                       "bad-recipe-passes": ("passes", [7])}.items():  # TypeError / ValueError deep in the command
        (h / name).mkdir()
        recipe = {**load_recipe("bidm").to_dict(), edit[0]: edit[1]}
        (h / name / "bqc.json").write_text(json.dumps({"format": 1, "source": {}, "recipe": recipe, "wbits": 1, "abits": 1}))
    return {
        "config-dev-zero": (["inspect", "--config", "/dev/zero"], "is not a regular file"),
        "config-fifo": (["inspect", "--config", h / "fifo.yaml"], "is not a regular file"),
        "config-binary": (["inspect", "--config", h / "garbage.yaml"], "is not a text file (not UTF-8"),
        "config-deep": (["inspect", "--config", h / "deep.yaml"], "nests too deeply"),
        "diffusers-deep": (["inspect", h / "dif"], "nests too deeply"),
        "diffusers-zero": (["inspect", h / "zero"], "is not a regular file"),
        "artifact-binary": (["sample", h / "art", "-o", h / "s.png"], "is not a text file"),
        "recipe-dev-zero": (["transform", "mnist16", "--recipe", h / "r.toml", "-o", h / "o"], "is not a regular file"),
        "schedule-deep": (["transform", "mnist16", "--recipe", "fp", "--schedule", h / "dif" / "config.json",
                           "-o", h / "o"], "nests too deeply"),
        "artifact-list-report": (["report", h / "list-art"], "must hold a JSON object"),
        "artifact-list-sample": (["sample", h / "list-art", "-o", h / "s.png"], "must hold a JSON object"),
        "model-config-list": (["inspect", h / "list-model"], "must hold a JSON object"),
        "artifact-field-type": (["sample", h / "bad-field", "-o", h / "s.png"], "its 'source' must be a JSON object"),
        "artifact-recipe-bits": (["sample", h / "bad-recipe-bits", "-o", h / "s.png"], "recipe's 'wbits' must be a JSON integer"),
        "artifact-recipe-option": (["report", h / "bad-recipe-option"], "option connections = 'x' must be an integer"),
        "artifact-recipe-passes": (["sample", h / "bad-recipe-passes", "-o", h / "s.png"], "must be [name, options] pairs"),
        "recipe-option-type": (["transform", "mnist16", "--recipe", h / "opt.toml", "-o", h / "o"],
                               "option keep_fp = 3 must be a list"),
        "compiled-manifest-list": (["eval", h / "list-compiled", "-n", "4"], "must hold a JSON object"),
        "schedule-string": (["transform", "mnist16", "--recipe", "fp", "--schedule", h / "string.json",
                             "-o", h / "o"], "must hold a JSON object"),
    }


def test_hostile_text_files_are_one_paragraph(tmp_path, capsys):
    """A config, manifest or recipe that is a device (/dev/zero filled memory), a pipe (blocked), not
    UTF-8 or nested 100 000 deep (tracebacks) is one paragraph and exit 2, and nothing is written."""
    for name, (cmd, says) in _hostile_inputs(tmp_path).items():
        code, _, err = run(cmd, capsys)
        assert code == 2 and says in " ".join(err.split()) and "Traceback" not in err, (name, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s.png").exists()


def test_runner_manifest_that_is_a_device_is_refused(tmp_path):
    """The bundle runner reads manifest.json with the same bounded reader; a pipe is not read."""
    from bqc.run import RunError, read_manifest, read_small_file

    os.mkfifo(tmp_path / "manifest.json")
    with pytest.raises(RunError, match="no manifest.json"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="is not a regular file"):
        read_small_file(tmp_path / "manifest.json")
    from bqc.run import _embedding

    with pytest.raises(RunError, match="not a regular file"):  # np.load opened the pipe and blocked
        _embedding(tmp_path / "manifest.json", "--context", (77, 768), None)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("../../evil.so", "/usr/lib/evil.so", "..", 7):  # a library from outside the bundle would be loaded
        (bundle / "manifest.json").write_text(json.dumps({"format": "bqc-tvm", "files": {"library": name}}))
        with pytest.raises(RunError, match="must be a file in the bundle folder"):
            read_manifest(bundle)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2048)
    with pytest.raises(ValueError, match="at most"):
        read_small_file(big, limit=1024)
    assert read_small_file(big, limit=2048) == b" " * 2048
