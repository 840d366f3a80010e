"""Training loop: exact resume, atomic checkpoints, NaN stop, config mismatch, interrupts."""
import csv
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from bqc.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from bqc.errors import BqcError
from bqc.train.loop import CHECKPOINT_NAME, LoopConfig, batch_indices, train_loop


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 2))


DATA = (torch.randn(37, 4, generator=torch.Generator().manual_seed(1)),
        torch.randn(37, 2, generator=torch.Generator().manual_seed(2)))


def loss_fn(model, batch, step):
    x, y = batch
    x = x + 0.05 * torch.randn_like(x)  # uses the global RNG, as diffusion losses do
    loss = (model(x) - y).pow(2).mean()
    return loss, {"mse": loss, "half": 0.5 * loss.detach()}


def cfg(**kw):
    base = dict(steps=24, batch_size=8, lr=5e-3, warmup_steps=4, checkpoint_every=5, log_every=3,
                progress=False, ema_decay=0.9, ema_warmup=True, lr_schedule="cosine", decay_steps=24, seed=3)
    base.update(kw)
    return LoopConfig(**base)


def test_data_order_is_per_epoch_permutation():
    n, b = 37, 8  # 4 batches per epoch, one item dropped
    ep0 = torch.cat([batch_indices(n, b, 5, s) for s in range(4)])
    assert len(set(ep0.tolist())) == 32
    assert torch.equal(batch_indices(n, b, 5, 6), batch_indices(n, b, 5, 6))
    assert not torch.equal(batch_indices(n, b, 5, 0), batch_indices(n, b, 5, 4))


def test_exact_resume(tmp_path):
    ref_model = make_model()
    ref = train_loop(ref_model, DATA, loss_fn, cfg(), tmp_path / "full", fingerprint={"m": "tiny"})
    assert ref.step == 24

    half_model = make_model()
    r1 = train_loop(half_model, DATA, loss_fn, cfg(steps=12), tmp_path / "split", fingerprint={"m": "tiny"})
    assert r1.step == 12
    resumed = make_model()  # fresh weights: everything must come from the checkpoint
    r2 = train_loop(resumed, DATA, loss_fn, cfg(), tmp_path / "split", fingerprint={"m": "tiny"}, resume=True)
    assert r2.resumed_from == 12 and r2.step == 24
    for (k, a), b in zip(ref_model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    for k in ref.ema:
        assert torch.equal(ref.ema[k], r2.ema[k]), k
    # the final checkpoints agree too, and the CSV has each logged step once
    ta, ma = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)
    tb, mb = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert ma["step"] == mb["step"] == 24
    for k in ta:
        if not k.startswith("rng/"):
            assert torch.equal(ta[k], tb[k]), k
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 24 and {"loss", "mse", "half", "lr", "it_s"} <= set(rows[0])
    # a finished run resumed with the same total does nothing
    r3 = train_loop(make_model(), DATA, loss_fn, cfg(), tmp_path / "split", fingerprint={"m": "tiny"}, resume=True)
    assert r3.step == 24


def test_interrupt_saves_and_resumes_exactly(tmp_path):
    ref_model = make_model()
    train_loop(ref_model, DATA, loss_fn, cfg(checkpoint_every=0), tmp_path / "full")

    def interrupting(model, batch, step):
        if step == 9:
            raise KeyboardInterrupt
        return loss_fn(model, batch, step)

    with pytest.raises(KeyboardInterrupt):
        train_loop(make_model(), DATA, interrupting, cfg(checkpoint_every=0), tmp_path / "int")
    assert read_checkpoint_meta(tmp_path / "int" / CHECKPOINT_NAME)["step"] == 9
    m = make_model()
    train_loop(m, DATA, loss_fn, cfg(checkpoint_every=0), tmp_path / "int", resume=True)
    for a, b in zip(ref_model.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    def exploding(model, batch, step):
        loss, terms = loss_fn(model, batch, step)
        return (loss * float("nan"), terms) if step == 13 else (loss, terms)

    with pytest.raises(BqcError) as e:
        train_loop(make_model(), DATA, exploding, cfg(), tmp_path)
    msg = str(e.value)
    assert "step 13" in msg and "non-finite" in msg and "step 10" in msg
    meta = read_checkpoint_meta(tmp_path / CHECKPOINT_NAME)
    assert meta["step"] == 10
    tensors, _ = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())


def test_resume_refuses_mismatch(tmp_path):
    train_loop(make_model(), DATA, loss_fn, cfg(steps=5), tmp_path, fingerprint={"model": "a", "recipe": "bidm"})
    with pytest.raises(BqcError) as e:
        train_loop(make_model(), DATA, loss_fn, cfg(steps=10), tmp_path, fingerprint={"model": "b", "recipe": "bidm"},
                   resume=True)
    assert "fingerprint.model" in str(e.value) and "'a'" in str(e.value) and "'b'" in str(e.value)
    with pytest.raises(BqcError, match="lr"):
        train_loop(make_model(), DATA, loss_fn, cfg(steps=10, lr=1e-3), tmp_path,
                   fingerprint={"model": "a", "recipe": "bidm"}, resume=True)
    with pytest.raises(BqcError, match="cosine_horizon"):
        train_loop(make_model(), DATA, loss_fn, cfg(steps=10, decay_steps=None), tmp_path,
                   fingerprint={"model": "a", "recipe": "bidm"}, resume=True)
    with pytest.raises(BqcError, match="data set size"):
        train_loop(make_model(), (DATA[0][:30], DATA[1][:30]), loss_fn, cfg(steps=10), tmp_path,
                   fingerprint={"model": "a", "recipe": "bidm"}, resume=True)
    # no silent overwrite of an existing run, and nothing to resume in an empty folder
    with pytest.raises(BqcError, match="--resume"):
        train_loop(make_model(), DATA, loss_fn, cfg(steps=10), tmp_path, fingerprint={"model": "a", "recipe": "bidm"})
    with pytest.raises(BqcError, match="nothing to resume"):
        train_loop(make_model(), DATA, loss_fn, cfg(steps=10), tmp_path / "empty", resume=True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"step": 1})
    real_save = safetensors.torch.save_file
    seen = []

    def failing_save(tensors, filename, metadata=None):
        seen.append(filename)
        assert filename != str(path)  # never written under the real name
        real_save(tensors, filename, metadata=metadata)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"w": torch.zeros(3)}, {"step": 2})
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    tensors, meta = load_checkpoint(path)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]
    assert seen and all(s.startswith(str(tmp_path / ".tmp-")) for s in seen)
    assert json.loads((tmp_path / "ck.json").read_text())["step"] == 1


def test_pretrain_smoke(tmp_path):
    from bqc.models.zoo import load_model
    from bqc.train.pretrain import load_training_ema, pretrain, schedule_from_config

    out = pretrain("mnist16", "mnist16", steps=2, batch=4, out_dir=tmp_path / "fp", warmup=1,
                   checkpoint_every=1, log_every=1, progress=False)
    model, cfg = load_model(out)
    assert cfg["name"] == "mnist16" and cfg["meta"]["pretrain"]["steps"] == 2
    assert schedule_from_config(cfg).T == 1000
    ema_model, step = load_training_ema(out / "train")
    assert step == 2
    for a, b in zip(model.state_dict().values(), ema_model.state_dict().values()):
        assert torch.equal(a, b)


def test_bqc_pretrain_takes_the_shipped_teachers_options(tmp_path):
    """`bqc pretrain` said it is "how the shipped mnist16 was made", but the teacher's stages 2 and 3
    need --init, --lr-schedule cosine, --min-lr-ratio, --ema and --warmup, which only
    `python -m bqc.train.pretrain` took. The CLI takes them now and records them; a warm start
    begins at the --init model's weights, and a /dev/zero --init is one paragraph, exit 2."""
    import os
    import subprocess
    import sys

    from bqc.models.zoo import load_model

    init = Path(__file__).resolve().parents[1] / "models" / "checkpoints" / "mnist16"
    out = tmp_path / "fp2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "bqc", "pretrain", "--steps", "1", "--batch", "2", "--threads", "1", "-q"]
    res = subprocess.run([*base, "--init", str(init), "--lr", "1e-12", "--warmup", "0", "--lr-schedule", "cosine",
                          "--min-lr-ratio", "0.05", "--ema", "0.5", "-o", str(out)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    meta = load_model(out)[1]["meta"]["pretrain"]
    assert (meta["lr_schedule"], meta["min_lr_ratio"], meta["ema_decay"], meta["warmup"]) == ("cosine", 0.05, 0.5, 0)
    assert Path(meta["init_from"]["path"]) == init
    teacher, trained = load_model(init)[0].state_dict(), load_model(out)[0].state_dict()
    gap = max((teacher[k].float() - trained[k].float()).abs().max().item() for k in teacher)
    assert gap < 1e-6  # one step at lr 1e-12 from the teacher's weights: still the teacher (a cold start is far off)
    res = subprocess.run([*base, "--init", "/dev/zero", "-o", str(tmp_path / "z")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "regular file" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_is_deferred_to_step_boundary(tmp_path, sig):
    import os
    import signal

    def signalling(model, batch, step):
        if step == 6:
            os.kill(os.getpid(), getattr(signal, sig))  # arrives mid-step
        return loss_fn(model, batch, step)

    before = signal.getsignal(getattr(signal, sig))
    with pytest.raises(KeyboardInterrupt):
        train_loop(make_model(), DATA, signalling, cfg(checkpoint_every=0), tmp_path)
    assert read_checkpoint_meta(tmp_path / CHECKPOINT_NAME)["step"] == 7  # step 6 completed, then saved
    assert signal.getsignal(getattr(signal, sig)) == before


def test_metrics_mirrored_to_tensorboard_when_installed(tmp_path, monkeypatch):
    """With the optional tensorboard package present, each CSV row is written as scalars.

    tensorboard is not a dependency: a stand-in ``torch.utils.tensorboard`` module records
    what the loop writes (the real SummaryWriter has this interface)."""
    import sys
    import types

    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train_loop(make_model(), DATA, loss_fn, cfg(steps=6), tmp_path / "run", fingerprint={"m": "tiny"})
    assert calls[0] == ("open", str(tmp_path / "run" / "tensorboard")) and calls[-1] == ("close",)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    logged = {(tag, step): v for tag, v, step in (c for c in calls if len(c) == 3)}
    for r in rows:
        for k in ("loss", "mse", "lr", "grad_norm"):
            assert abs(logged[(k, int(r["step"]))] - float(r[k])) <= 1e-5 * max(1.0, abs(float(r[k]))), (k, r["step"])
