"""A lowered folder is a self-contained bundle (backends/tvm/lower.py, bqc/run.py, docs/deploy.md).

The bundles are the tiny bidm artifact of tests/test_lower.py (TBS state, batch 2), built once
per session for both modules: its source is a bqc model folder, so the artifact records an
absolute path, which the bundle must not. Checked here: the manifest has no absolute paths and
holds what sampling needs; the runner (bqc/run.py, copied as DIR/run.py; numpy + TVM runtime
only) samples exactly like ``bqc sample``'s torch DDIM given the same noise, on the host and, under
qemu with the arm64 root's python and TVM's aarch64 runtime, from the tvm-arm bundle; a missing
cross compiler is refused before any work, and a failed lowering leaves nothing behind; ``bqc
bench`` needs no artifact path. The qemu test needs `.ci/arm_setup.sh` (skips with the reason,
fails under BQC_REQUIRE_ARM=1 as tests/test_arm.py does).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from clirun import run_cli  # noqa: E402
from armenv import require_arm  # noqa: E402
from test_lower import _CACHE, lowered  # noqa: E402

import bqc.run as R  # noqa: E402
from bqc.backends.tvm import lower as L  # noqa: E402
from bqc.errors import BqcError  # noqa: E402

RUN_ARGS = ["-n", "3", "--steps", "3", "--seed", "0"]  # 3 rows against a batch-2 library: pad + split


def _strings(v):
    if isinstance(v, dict):
        for k, x in v.items():
            yield str(k)
            yield from _strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)
    elif isinstance(v, str):
        yield v


def _bundle(tmp_path_factory, backend="tvm-x86"):
    """(QAT graph, artifact folder, bundle folder) of the tiny bidm model."""
    gm, _, out = lowered("bidm", tmp_path_factory, backend)
    return gm, _CACHE["bidm"][2], out


def test_manifest_has_no_host_paths_and_what_sampling_needs(tmp_path_factory):
    _, art, out = _bundle(tmp_path_factory)
    assert str(art.parent) in (art / "bqc.json").read_text()  # the artifact does record host paths
    man = json.loads((out / "manifest.json").read_text())
    leaks = [s for s in _strings(man) if s.startswith("/") or "/tmp/" in s or str(art.parent) in s
             or str(Path.home()) + "/" in s]
    assert leaks == []
    assert "artifact" not in man
    src = man["source"]  # the artifact by name and content hash
    assert src["name"] == "art"
    # the weights it holds: the deploy artifact's deploy.safetensors (`bqc lower RUN` folds RUN as `bqc fold` does)
    from bqc import deploy as D

    folded = D.fold(art).save(tmp_path_factory.mktemp("folded"))
    assert src["sha256"] == hashlib.sha256((folded / "deploy.safetensors").read_bytes()).hexdigest()
    assert src["teacher_sha256"] == hashlib.sha256((art / "base.pt2").read_bytes()).hexdigest()
    # the runner's copy is bqc/run.py itself (one home), and the library is the only other file
    assert man["files"] == {"library": "model.so", "runner": "run.py"}
    assert (out / "run.py").read_bytes() == Path(R.__file__).read_bytes()
    assert sorted(f.name for f in out.iterdir()) == ["manifest.json", "model.so", "run.py"]
    # the schedule (betas = the artifact's process) and the sampler defaults
    from bqc import artifact
    from bqc.diffusion.schedule import NoiseSchedule

    ref = NoiseSchedule.from_manifest(artifact.read_manifest(art))
    assert man["diffusion"]["prediction"] == ref.prediction
    np.testing.assert_array_equal(np.asarray(man["sampler"]["betas"]), ref.betas)
    assert man["sampler"]["defaults"] == {"steps": 50, "eta": 0.0}
    assert man["runtime"]["apache-tvm"] and man["state_inputs"] and man["batch"] == 2
    # the host commands read the bundle without the artifact
    assert artifact.read_schedule(out) == ref
    assert artifact.source_manifest(out) == src


def test_source_record_keeps_what_eval_needs(tmp_path):
    """A deploy artifact's record in a bundle, read from its manifest (the backend loads no
    training artifact): no path, but the training data `bqc eval` reads (artifact.trained_on),
    the sampling steps it was trained for (the runner's default), the hash of the weights it
    holds (deploy.safetensors) and the FP teacher's hash recorded when it was folded."""
    from types import SimpleNamespace

    from bqc import artifact

    run = tmp_path / "run-deploy"
    run.mkdir()
    (run / "deploy.safetensors").write_bytes(b"weights")
    fake = SimpleNamespace(path=run, tensors_sha256=lambda: hashlib.sha256(b"weights").hexdigest(), manifest={
        "source": {"kind": "bqc", "description": f"bqc checkpoint <path>/model"},
        "artifact": {"name": "run", "sha256": "aa", "teacher_sha256": "bb"},
        "train": {"data": "mnist16", "steps": 500, "from": str(tmp_path / "art"),
                  "options": {"resize": [8, 8], "sample_steps": 25, "lr": 1e-4}}})
    rec = L._source_record(fake)
    assert rec["sha256"] == hashlib.sha256(b"weights").hexdigest() and rec["name"] == "run-deploy"
    assert rec["teacher_sha256"] == "bb"
    assert rec["train"] == {"data": "mnist16", "steps": 500, "options": {"resize": [8, 8], "sample_steps": 25}}
    assert str(tmp_path) not in json.dumps(L._portable(rec))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps(L._portable({"format": "bqc-tvm", "source": rec})))
    assert artifact.trained_on(bundle) == {"data": "mnist16", "resize": (8, 8)}
    assert L._sampling_entries(fake)["sampler"]["defaults"] == {"steps": 25, "eta": 0.0}
    fake.path = None  # folded in memory by `bqc lower RUN`: named after the trained artifact
    assert L._source_record(fake)["name"] == "run"


def test_runner_schedule_matches_bqc():
    """The runner's timesteps and (eps, x0) split are bqc.diffusion.schedule's, for every spacing
    and prediction type (the runner cannot import bqc)."""
    from bqc.diffusion.schedule import NoiseSchedule

    for spacing in ("uniform", "leading", "trailing", "linspace"):
        for offset in ((0, 1) if spacing in ("uniform", "leading") else (0,)):
            ns = NoiseSchedule(kind="scaled_linear", beta_start=8.5e-4, beta_end=1.2e-2, spacing=spacing,
                               steps_offset=offset)
            rs = R.Schedule(ns.betas.tolist(), "eps", spacing, offset)
            np.testing.assert_array_equal(rs.abar, ns.alphas_cumprod)
            for steps in (1, 3, 7, 50, 999):
                assert rs.timesteps(steps) == ns.timesteps(steps), (spacing, offset, steps)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    for pred in ("eps", "v", "x0"):
        ns = NoiseSchedule(kind="cosine", prediction=pred)
        rs = R.Schedule(ns.betas.tolist(), pred)
        for t in (0, 500, 999):
            for a, b in zip(rs.split(out.numpy(), x.numpy(), t), ns.split(out, x, t)):
                np.testing.assert_allclose(a, b.numpy(), rtol=1e-6, atol=1e-6)


def test_runner_matches_bqc_sample(tmp_path_factory):
    """Given the same starting and eta noise, the runner's numpy DDIM over the bundle equals the
    torch DDIM `bqc sample` runs over the same library (load_compiled), with the TBS state
    threaded, eta 0 and 1, 3 rows against a batch-2 library."""
    from bqc.artifact import read_schedule
    from bqc.backends.runtime import load_compiled
    from bqc.diffusion.samplers import ddim_sample

    _, _, out = _bundle(tmp_path_factory)
    host, runner = load_compiled(out), R.load(out)
    assert runner.state_specs  # bidm: TBS caches travel between steps
    sched, rs = read_schedule(out), R.Schedule.from_manifest(runner.manifest)
    for eta in (0.0, 1.0):
        x_T = torch.randn(3, *host.input_shape, generator=torch.Generator().manual_seed(3))
        want = ddim_sample(host, x_T.shape, schedule=sched, steps=4, eta=eta, x_T=x_T,
                           generator=torch.Generator().manual_seed(5)).numpy()
        g = torch.Generator().manual_seed(5)  # the same eta noise, drawn in the same order
        got = R.ddim(runner, x_T.numpy(), rs, 4, eta=eta, noise=lambda shape: torch.randn(shape, generator=g).numpy())
        assert np.isfinite(want).all() and got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (eta, np.abs(got - want).max())
    # and the state matters: without it (a fresh first step every time) the samples differ
    x_T = np.random.default_rng(0).standard_normal((3, *host.input_shape), dtype=np.float32)
    stateless = R.ddim(lambda x, t, y, s: (runner(x, t)[0], None), x_T, rs, 4)
    assert np.abs(stateless - R.ddim(runner, x_T, rs, 4)).max() > 1e-3


def test_runner_standalone_and_as_module(tmp_path_factory, tmp_path, capsys):
    """DIR/run.py runs with numpy and the TVM runtime only (torch, PIL and bqc blocked), writes a
    bqc-marked PNG; `python -m bqc.run DIR` (in-process here) writes the same file; an existing
    file bqc did not write is refused (exit 2)."""
    _, _, out = _bundle(tmp_path_factory)
    code = ("import runpy, sys\n"
            "for m in ('torch', 'PIL', 'bqc'): sys.modules[m] = None\n"
            f"sys.argv = ['run.py', *{RUN_ARGS!r}, '-o', {str(tmp_path / 'a.png')!r}, '--npy', {str(tmp_path / 'a.npy')!r}]\n"
            "try:\n"
            f"    runpy.run_path({str(out / 'run.py')!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "used = sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('tvm', 'torch', 'PIL', 'bqc'))\n"
            "assert not used, used  # tvm_ffi + libtvm_runtime.so, not the tvm package\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "TVM_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout and "Scope Loaded" not in r.stderr
    assert R.is_bqc_png(tmp_path / "a.png")
    from PIL import Image

    from bqc.outputs import is_bqc_file

    assert is_bqc_file(tmp_path / "a.png")  # bqc may replace it, as its own
    with Image.open(tmp_path / "a.png") as im:  # a 2x2 grid of 8x8 images, 1-pixel gaps, x4
        assert im.size == (4 * 19, 4 * 19) and im.mode == "L"
    x = np.load(tmp_path / "a.npy")
    assert x.shape == (3, 1, 8, 8) and np.isfinite(x).all()
    assert R.main([str(out), *RUN_ARGS, "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"not bqc's")
    assert R.main([str(out), *RUN_ARGS, "-o", str(mine)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and mine.read_bytes() == b"not bqc's"
    (tmp_path / "link.png").symlink_to(mine)  # never written through, --force or not
    assert R.main([str(out), *RUN_ARGS, "--force", "-o", str(tmp_path / "link.png")]) == 2
    assert "symbolic link" in capsys.readouterr().err and mine.read_bytes() == b"not bqc's"
    assert R.main([str(out), *RUN_ARGS, "--threads", "99999", "-o", str(tmp_path / "c.png")]) == 2
    assert "--threads 99999: this machine has" in capsys.readouterr().err
    assert R.main([str(out), *RUN_ARGS, "-n", str(10**9), "-o", str(tmp_path / "c.png")]) == 2  # numpy's MemoryError
    assert "needs about" in capsys.readouterr().err and not (tmp_path / "c.png").exists()
    real_sample = R.sample
    try:  # an allocation refused mid-run: one paragraph, exit 1
        R.sample = lambda *a, **k: (_ for _ in ()).throw(MemoryError())
        assert R.main([str(out), *RUN_ARGS, "-o", str(tmp_path / "c.png")]) == 1
        assert "out of memory" in capsys.readouterr().err

        def vm_call_interrupted(*a, **k):  # Ctrl-C inside a VM call comes back from tvm-ffi as a bare RuntimeError
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                raise RuntimeError from None

        R.sample = vm_call_interrupted
        old = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            assert R.main([str(out), *RUN_ARGS, "-o", str(tmp_path / "c.png")]) == 130
        finally:
            signal.signal(signal.SIGINT, old)
        assert "interrupted" in capsys.readouterr().err and not (tmp_path / "c.png").exists()
    finally:
        R.sample = real_sample
    assert R.main([str(out), *RUN_ARGS, "--seed", "-1", "-o", str(tmp_path / "c.png")]) == 2  # numpy's ValueError
    assert "--seed must be an integer in [0, 2**63 - 1]" in capsys.readouterr().err
    assert R.main([str(out), *RUN_ARGS, "-o", str(tmp_path)]) == 2  # a folder (`-o .` was a traceback)
    assert "is a folder" in capsys.readouterr().err
    assert R.main([str(out), *RUN_ARGS, "-o", str(tmp_path / ("a" * 300 + ".png"))]) == 2  # was the OSError's traceback
    assert "File name too long" in capsys.readouterr().err
    for eta in ("-1", "nan", "1.5"):  # DDIM's eta is a number in [0, 1]: usage error, nothing written
        assert R.main([str(out), *RUN_ARGS, "--eta", eta, "-o", str(tmp_path / "c.png")]) == 2
        assert "--eta must be a number in [0, 1]" in capsys.readouterr().err and not (tmp_path / "c.png").exists()


def test_arm_bundle_runs_under_qemu(tmp_path_factory, tmp_path):
    """The tvm-arm bundle's run.py, run by the arm64 root's python3.11 with the aarch64 wheels
    (apache-tvm runtime, apache-tvm-ffi, numpy: what docs/deploy.md installs on a board), samples
    what the host runner samples from the tvm-x86 bundle: 3 DDIM steps through the TBS state."""
    require_arm()
    require_arm(vm=True)
    import qemu

    _, _, x86 = _bundle(tmp_path_factory)
    _, _, out = _bundle(tmp_path_factory, "tvm-arm")
    lib = (out / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and lib[18] == 183  # EM_AARCH64
    assert json.loads((out / "manifest.json").read_text())["backend"] == "tvm-arm"
    proc = qemu.run_python_under_qemu([out / "run.py", out, *RUN_ARGS, "-o", tmp_path / "arm.png",
                                       "--npy", tmp_path / "arm.npy"], what="the bundle's run.py")
    assert "wrote" in proc.stdout
    assert R.main([str(x86), *RUN_ARGS, "-o", str(tmp_path / "x86.png"), "--npy", str(tmp_path / "x86.npy")]) == 0
    got, want = np.load(tmp_path / "arm.npy"), np.load(tmp_path / "x86.npy")
    assert np.isfinite(want).all()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()
    from PIL import Image

    with Image.open(tmp_path / "arm.png") as a, Image.open(tmp_path / "x86.png") as b:
        pa, pb = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 1


def _no_work(monkeypatch):
    """Make any lowering work (loading the artifact) fail the test."""
    from bqc import artifact

    def loaded(*a, **k):
        raise AssertionError("the artifact was loaded: the check came after work started")

    monkeypatch.setattr(artifact, "load_artifact", loaded)


def test_arm_without_cross_compiler_fails_first(monkeypatch, tmp_path, capsys):
    """No aarch64-linux-gnu-gcc: `bqc lower --backend tvm-arm` exits 2 before any work, naming
    what to install, and leaves no folder."""
    from bqc.backends.tvm import arm

    art = tmp_path / "art"
    art.mkdir()
    (art / "bqc.json").write_text("{}")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no cross compiler (and no gcc)
    monkeypatch.setattr(arm, "_native", lambda: False)
    _no_work(monkeypatch)
    code, _, err = run_cli(["lower", art, "--backend", "tvm-arm", "-o", tmp_path / "new" / "bundle"], capsys)
    assert code == 2
    assert "apt-get install gcc-aarch64-linux-gnu" in " ".join(err.split()) and "arm_setup.sh" in err
    assert "Traceback" not in err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["art"]


@pytest.mark.parametrize("failure", [BqcError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failed_lowering_leaves_nothing_behind(monkeypatch, tmp_path, tmp_path_factory, failure):
    """A failure during lowering removes what this run created, and only that: a new folder is
    not left (empty or partial), an existing empty folder stays empty, an existing bundle
    (replaced with --force) keeps its files."""
    _, _, bundle = _bundle(tmp_path_factory)
    old = tmp_path / "old"
    old.mkdir()
    for f in bundle.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    before = {f.name: f.read_bytes() for f in old.iterdir()}

    def fail(*a, **k):
        raise failure

    from bqc import deploy

    monkeypatch.setattr(deploy, "as_deploy_artifact", fail)  # the first step of the work
    for out in (tmp_path / "new" / "bundle", empty, old):
        with pytest.raises(type(failure)):
            L.lower(_CACHE["bidm"][2], "tvm-x86", out, batch=2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["empty", "old"]
    assert list(empty.iterdir()) == []
    assert {f.name: f.read_bytes() for f in old.iterdir()} == before


def test_bench_needs_no_artifact_path(tmp_path_factory, capsys):
    """`bqc bench DIR`: without a teacher it times the compiled step alone and says so (a bundle
    records no artifact path); `--teacher ART` adds the FP32 side, checked by content hash."""
    _, art, out = _bundle(tmp_path_factory)
    r = L.bench(out, threads=1, repeat=1, profile=False)
    assert r["bqc_ms"] > 0 and r["torch_fp32_ms"] is None and r["teacher"] is None
    assert "timed alone" in r["note"] and "--teacher" in r["note"]
    from bqc.teacher import bundle_teacher

    r = L.bench(out, threads=1, teacher=bundle_teacher(out, str(art)), repeat=1, profile=False)
    assert r["torch_fp32_ms"] > 0 and r["speedup"] > 0 and r["note"] is None and str(art) in r["teacher"]
    code, stdout, err = run_cli(["bench", out, "--threads", "1"], capsys)
    assert code == 0 and "ms at 1 threads" in stdout and "--teacher" in " ".join(err.split())
