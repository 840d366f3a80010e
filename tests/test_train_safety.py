"""Training safety (issue 12, part 5): the NaN stop keeps a usable checkpoint, a resume may change
lr / grad clip explicitly, hints name options that exist, and untrained artifacts are not
silently calibrated or labelled trained."""
from __future__ import annotations

import ast
import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bqc.checkpoint import load_checkpoint, read_checkpoint_meta
from bqc.errors import BqcError
from bqc.train.loop import CHECKPOINT_NAME, NONFINITE_NAME, PREV_NAME, LoopConfig, train_loop

from conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]
DATA = (torch.randn(40, 4, generator=torch.Generator().manual_seed(1)),
        torch.randn(40, 2, generator=torch.Generator().manual_seed(2)))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 2)
        self.register_buffer("running", torch.zeros(()))  # like a quantizer's running range


def plain_loss(model, batch, step):
    x, y = batch
    loss = (model.lin(x) - y).pow(2).mean()
    return loss, {"mse": loss}


def cfg(**kw):
    base = dict(steps=20, batch_size=8, lr=1e-2, checkpoint_every=5, log_every=1, progress=False, ema_decay=0.9, seed=0)
    base.update(kw)
    return LoopConfig(**base)


def _all_finite(path) -> bool:
    tensors, _ = load_checkpoint(path)
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    """A buffer turns NaN at step 12 while the loss stays finite: the old loop wrote it into the
    checkpoints of steps 15 and 20 (and never stopped); now the run stops at the next checkpoint
    and the one of step 10 is kept."""

    def poison(model, batch, step):
        if step == 12:
            model.running.fill_(float("nan"))
        return plain_loss(model, batch, step)

    with pytest.raises(BqcError) as e:
        train_loop(Net(), DATA, poison, cfg(), tmp_path)
    msg = str(e.value)
    assert "non-finite weights" in msg and "running" in msg and "step 10" in msg
    assert read_checkpoint_meta(tmp_path / CHECKPOINT_NAME)["step"] == 10
    assert _all_finite(tmp_path / CHECKPOINT_NAME)
    assert not (tmp_path / PREV_NAME).exists()


def test_nan_right_after_a_checkpoint_restores_the_one_before(tmp_path):
    """The loss of step 10 (computed from the checkpoint of step 10) is NaN: that checkpoint
    produced the NaN, so resuming from it would repeat it; the checkpoint of step 5 is restored."""

    def nan_at_10(model, batch, step):
        loss, terms = plain_loss(model, batch, step)
        return (loss * float("nan"), terms) if step == 10 else (loss, terms)

    with pytest.raises(BqcError) as e:
        train_loop(Net(), DATA, nan_at_10, cfg(), tmp_path)
    msg = str(e.value)
    assert "stopped at step 10" in msg and "step 5" in msg and NONFINITE_NAME in msg
    assert read_checkpoint_meta(tmp_path / CHECKPOINT_NAME)["step"] == 5
    assert read_checkpoint_meta(tmp_path / NONFINITE_NAME)["step"] == 10
    assert not (tmp_path / PREV_NAME).exists()
    # ... and the restored checkpoint resumes (exactly: same settings) past the bad step
    res = train_loop(Net(), DATA, plain_loss, cfg(), tmp_path, resume=True)
    assert res.resumed_from == 5 and res.step == 20


def test_nan_later_keeps_the_newest_checkpoint_and_cleans_up(tmp_path):
    def nan_at_13(model, batch, step):
        loss, terms = plain_loss(model, batch, step)
        return (loss * float("nan"), terms) if step == 13 else (loss, terms)

    with pytest.raises(BqcError) as e:
        train_loop(Net(), DATA, nan_at_13, cfg(), tmp_path)
    assert "step 10" in str(e.value)
    assert read_checkpoint_meta(tmp_path / CHECKPOINT_NAME)["step"] == 10
    assert not (tmp_path / PREV_NAME).exists() and not (tmp_path / NONFINITE_NAME).exists()
    res = train_loop(Net(), DATA, plain_loss, cfg(), tmp_path / "ok")
    assert res.step == 20 and not (tmp_path / "ok" / PREV_NAME).exists()  # a finished run keeps one checkpoint


def test_resume_may_change_lr_and_grad_clip_explicitly(tmp_path):
    train_loop(Net(), DATA, plain_loss, cfg(steps=10), tmp_path)
    lower = cfg(lr=2e-3, grad_clip=0.5)
    with pytest.raises(BqcError) as e:  # not asked for: refused as before, the hint says how
        train_loop(Net(), DATA, plain_loss, lower, tmp_path, resume=True)
    assert "loop.lr" in str(e.value) and "--grad-clip" in e.value.hint
    with pytest.raises(BqcError, match="only lr, grad_clip"):
        train_loop(Net(), DATA, plain_loss, cfg(batch_size=4), tmp_path, resume=True, change=["batch_size"])

    res = train_loop(Net(), DATA, plain_loss, lower, tmp_path, resume=True, change=["lr", "grad_clip"])
    assert res.step == 20 and res.resumed_from == 10
    assert res.changes == [{"step": 10, "grad_clip": [1.0, 0.5], "lr": [1e-2, 2e-3]}]
    meta = read_checkpoint_meta(tmp_path / CHECKPOINT_NAME)
    assert meta["changes"] == res.changes and meta["loop"]["lr"] == 2e-3
    with open(tmp_path / "metrics.csv") as f:  # the new lr is the one used (not the checkpoint's)
        lrs = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    assert lrs[10] == pytest.approx(1e-2) and lrs[11] == pytest.approx(2e-3) and lrs[20] == pytest.approx(2e-3)
    # the changed settings are now the run's: a further resume needs no change, and the record stays
    res2 = train_loop(Net(), DATA, plain_loss, cfg(steps=25, lr=2e-3, grad_clip=0.5), tmp_path, resume=True)
    assert res2.changes == res.changes


# ---- hints name options that exist ------------------------------------------------------------
def _known_options() -> set[str]:
    import typer.main

    from bqc.cli import app

    cmd = typer.main.get_command(app)
    opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
    for sub in cmd.commands.values():
        opts |= {o for p in sub.params for o in list(getattr(p, "opts", [])) + list(getattr(p, "secondary_opts", []))}
    for path in ROOT.glob("bqc/**/*.py"):  # python -m bqc.<module> tools (argparse)
        opts |= set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', path.read_text()))
    return opts | {"--nproc_per_node"}  # torchrun's


def _hint_texts(path: Path):
    tree = ast.parse(path.read_text())
    src = path.read_text()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg in ("hint", "nonfinite_hint"):
                    yield node.lineno, ast.get_source_segment(src, kw.value) or ""
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and "hint" in t.id for t in node.targets):
            yield node.lineno, ast.get_source_segment(src, node.value) or ""


def test_every_hint_names_existing_options():
    known = _known_options()
    files = [p for d in ("bqc", "passes", "backends") for p in (ROOT / d).rglob("*.py")]
    unknown = []
    for path in files:
        for line, text in _hint_texts(path):
            for opt in re.findall(r"(?<![\w-])--[a-z][\w-]*", text):
                if opt not in known:
                    unknown.append(f"{path.relative_to(ROOT)}:{line}: {opt}")
    assert not unknown, "hints name options that no command has:\n" + "\n".join(unknown)
    assert "--grad-clip" in known  # named by the NaN stop of `bqc train`


# ---- untrained artifacts ------------------------------------------------------------------------
def _tiny16_artifact(tmp_path, recipe="baseline"):
    from bqc import frontend, transform as tf
    from bqc.models.unet import UNetModel

    config = {**TINY_CONFIG, "image_size": 16}
    torch.manual_seed(0)
    src = frontend._from_module(UNetModel(**config).eval(), "zoo", "tiny 16px UNet", config=config)
    return tf.save(tf.transform(src, recipe), tmp_path / f"art-{recipe}")


def test_untrained_artifact_is_refused_unless_calibrated(tmp_path):
    from bqc import artifact, deploy as D
    resolve_deploy_graph = D.deploy_graph  # what `bqc lower` / `bqc fold` apply before a backend

    art = _tiny16_artifact(tmp_path)
    with pytest.raises(BqcError) as e:
        resolve_deploy_graph(art)
    assert "never calibrated" in str(e.value) and "--calibrate mnist16" in e.value.hint

    info: dict = {}
    dg = resolve_deploy_graph(artifact.load_artifact(art), calibrate="mnist16", info=info)
    assert D.is_deployed(dg) and info["calibration"].startswith("mnist16 (64 training images")
    a = artifact.load_artifact(art)
    D.calibrate(a.gm, "mnist16", manifest=a.manifest)
    assert not D.uncalibrated(a.gm)
    b = artifact.load_artifact(art)
    D.calibrate(b.gm, "random")
    steps_real = {k: float(v) for k, v in a.gm.state_dict().items() if k.endswith(".scale")}
    steps_rand = {k: float(v) for k, v in b.gm.state_dict().items() if k.endswith(".scale")}
    assert steps_real and steps_real != steps_rand  # real images, not Gaussian noise


def test_cli_lower_refuses_untrained_artifact(tmp_path):
    art = _tiny16_artifact(tmp_path)
    r = subprocess.run([sys.executable, "-m", "bqc", "lower", str(art), "--backend", "onnx", "-o", str(tmp_path / "lib")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "never calibrated" in r.stderr and "--calibrate" in r.stderr
    assert "--calibrate" in subprocess.run([sys.executable, "-m", "bqc", "lower", "--help"], capture_output=True,
                                           text=True, timeout=300).stdout


def test_train_steps_0_is_refused():
    from bqc.train.qat import QATOptions, train_artifact

    with pytest.raises(BqcError) as e:
        train_artifact("no-such-artifact", "mnist16", "unused", QATOptions(steps=0))
    assert "--calibrate mnist16" in e.value.hint


@pytest.mark.parametrize("bad", [dict(lr=float("inf")), dict(lr=float("nan")), dict(lr=0.0),
                                 dict(weight_decay=-1.0), dict(weight_decay=float("inf")),
                                 dict(grad_clip=-1.0), dict(grad_clip=float("nan")),
                                 dict(min_lr_ratio=2.0), dict(warmup_steps=-3), dict(ema_decay=1.5),
                                 dict(checkpoint_every=-5)])
def test_bad_hyperparameters_are_refused_before_training(tmp_path, bad):
    """A negative --grad-clip flipped every gradient's sign inside clip_grad_norm_ (gradient ascent,
    exit 0), a negative --weight-decay ended in AdamW's traceback, an infinite --lr trained until
    the NaN stop: each is refused by LoopConfig.validate before a step, and nothing is written."""
    with pytest.raises(BqcError, match="must be"):
        train_loop(Net(), DATA, plain_loss, cfg(**bad), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_second_process_training_into_the_same_folder_is_refused(tmp_path):
    """Two `bqc train -o run` at once (a --resume typed while the first still runs) interleaved their
    checkpoints and metrics rows: the folder is locked while a loop writes it."""
    from bqc.train.loop import _exclusive

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BqcError, match="being written by another bqc process"):
            train_loop(Net(), DATA, plain_loss, cfg(), out)
        assert not list(out.iterdir())  # nothing written
    finally:
        holder.kill()
        holder.wait()
    with _exclusive(out):  # free again once the other process is gone
        pass
    train_loop(Net(), DATA, plain_loss, cfg(), out)


@pytest.mark.parametrize("meta", ["{not json", "[" * 100_000 + "]" * 100_000, "[1, 2]"])
def test_damaged_checkpoint_metadata_is_one_paragraph(tmp_path, meta):
    """A checkpoint whose bqc metadata is not a JSON object was json's traceback (or a RecursionError)."""
    from safetensors.torch import save_file

    from bqc.checkpoint import META_KEY, read_checkpoint_meta

    p = tmp_path / "checkpoint.safetensors"
    save_file({"w": torch.zeros(1)}, str(p), metadata={META_KEY: meta})
    with pytest.raises(BqcError, match="metadata is not"):
        read_checkpoint_meta(p)
