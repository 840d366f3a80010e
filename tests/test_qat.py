"""QAT trainer: losses, exact resume, NaN stop, mismatch refusal, trained artifacts."""
from __future__ import annotations

import math

import pytest
import torch

from bqc import artifact, transform as tf
from bqc.errors import BqcError
from bqc.train.losses import LRMProjections, spd_loss
from bqc.train.qat import QATOptions, train_artifact


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A folder of 8x8 grayscale images, so the tiny UNet trains on real files."""
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        arr = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr, mode="L").save(d / f"{i:02d}.png")
    return str(d)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from conftest import TINY_CONFIG
    from bqc import frontend
    from bqc.models.unet import UNetModel

    torch.manual_seed(0)
    m = UNetModel(**TINY_CONFIG).eval()
    src = frontend._from_module(m, "zoo", "tiny")
    src.exported = frontend.capture(src)
    out = {}
    root = tmp_path_factory.mktemp("arts")
    for r in ("binarydm", "bidm", "baseline"):
        out[r] = tf.save(tf.transform(src, r), root / r)
    return out


def _opts(steps, **kw):
    return QATOptions(steps=steps, batch=4, lr=1e-3, warmup=1, checkpoint_every=2, progress=False, **kw)


def _weights(path):
    from bqc.frontend import load_safetensors

    return load_safetensors(path / "model.safetensors")


@pytest.mark.parametrize("recipe", ["binarydm", "bidm"])
def test_resume_is_exact(artifacts, tiny_data, tmp_path, recipe, monkeypatch):
    """A 4-step run interrupted after step 2 and resumed equals an uninterrupted one. (The
    schedule is a function of the total: binarydm drops s2 at half of it, so the first leg must
    be the same 4-step run, interrupted, not a 2-step run.)"""
    from bqc.train import qat
    from bqc.train.loop import TrainingInterrupted

    one = train_artifact(artifacts[recipe], tiny_data, tmp_path / "one", _opts(4))
    real = qat.make_loss

    def interrupting(*a, **k):
        fn = real(*a, **k)

        def loss_fn(model, batch, step):
            if step >= 2:  # steps are 0-based: two steps done, checkpoint written at step 2
                raise KeyboardInterrupt
            return fn(model, batch, step)
        return loss_fn

    monkeypatch.setattr(qat, "make_loss", interrupting)
    with pytest.raises(TrainingInterrupted):
        train_artifact(artifacts[recipe], tiny_data, tmp_path / "two", _opts(4))
    monkeypatch.setattr(qat, "make_loss", real)
    two = train_artifact(artifacts[recipe], tiny_data, tmp_path / "two", _opts(4), resume=True)
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the trained artifact loads and differs from the untrained one
    art = artifact.load_artifact(one)
    before = _weights(artifacts[recipe])
    assert any(not torch.equal(before[k], a[k]) for k in before if before[k].is_floating_point())
    assert art.manifest["train"]["steps"] == 4


def test_teacher_is_not_trained(artifacts, tiny_data, tmp_path):
    """Student and teacher come from one captured program; they must not share weights."""
    before = artifact.load_artifact(artifacts["baseline"]).teacher().gm.state_dict()
    out = train_artifact(artifacts["baseline"], tiny_data, tmp_path / "r", _opts(2))
    art = artifact.load_artifact(out)
    after = art.teacher().gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    student = art.gm.state_dict()
    shared = [k for k in student if k in before and before[k].is_floating_point()]
    assert shared and any(not torch.equal(before[k], student[k]) for k in shared)  # student's float params trained


def test_binarydm_switches_ebb_and_keeps_lrm_state(artifacts, tiny_data, tmp_path):
    from bqc.quant.binary import EBB

    out = train_artifact(artifacts["binarydm"], tiny_data, tmp_path / "r", _opts(3))
    art = artifact.load_artifact(out)
    ebbs = [m for m in art.gm.modules() if isinstance(m, EBB)]
    assert ebbs and all(bool(m.stage2) for m in ebbs)  # ebb_switch = 0.1 of 3 steps
    from bqc.checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(out / "train" / "checkpoint.safetensors")
    assert any(k.startswith("model/lrm.proj_") for k in tensors)  # PCA projections are checkpointed
    assert bool(tensors["model/lrm.initialised"])


def test_resume_other_recipe_refused(artifacts, tiny_data, tmp_path):
    train_artifact(artifacts["binarydm"], tiny_data, tmp_path / "r", _opts(2))
    with pytest.raises(BqcError, match="different settings"):
        train_artifact(artifacts["baseline"], tiny_data, tmp_path / "r", _opts(4), resume=True)


def test_nan_loss_stops_and_keeps_checkpoint(artifacts, tiny_data, tmp_path):
    out = tmp_path / "r"
    train_artifact(artifacts["baseline"], tiny_data, out, _opts(2))
    ck = (out / "train" / "checkpoint.safetensors").read_bytes()
    art = artifact.load_artifact(artifacts["baseline"])
    with torch.no_grad():
        for p in art.gm.parameters():
            p.fill_(float("nan"))
    bad = tmp_path / "nan_art"
    art.gm.recompile()
    artifact.save_artifact(bad, base_ep=art.base_ep, gm=art.gm, recipe=art.recipe, wbits=1, abits=4,
                           source=art.manifest["source"])
    with pytest.raises(BqcError, match="(?i)non-finite|nan"):
        train_artifact(bad, tiny_data, tmp_path / "r2", _opts(2))
    assert (out / "train" / "checkpoint.safetensors").read_bytes() == ck


def test_wrong_data_shape(artifacts, tmp_path):
    from PIL import Image

    d = tmp_path / "big"
    d.mkdir()
    for i in range(4):
        Image.new("L", (16, 16)).save(d / f"{i}.png")
    with pytest.raises(BqcError, match="shape"):
        train_artifact(artifacts["baseline"], str(d), tmp_path / "r", _opts(1))


def test_lrm_projection_is_frozen_pca():
    lrm = LRMProjections([8], k=4)
    f = torch.randn(4, 8, 5, 5)
    loss0 = lrm.loss([f], [f])
    assert loss0 == 0 and bool(lrm.initialised)
    e = lrm.proj_0.clone()
    assert e.shape == (8, 2) and torch.allclose(e.T @ e, torch.eye(2), atol=1e-5)
    lrm.loss([torch.randn(4, 8, 5, 5)], [torch.randn(4, 8, 5, 5)])
    assert torch.equal(lrm.proj_0, e)  # computed once, then frozen


def test_spd_loss_properties():
    f = torch.randn(2, 4, 8, 8)
    assert spd_loss([f], [f]).item() == 0
    assert spd_loss([f], [3 * f]).item() < 1e-5  # Gram normalisation: scale invariant
    assert spd_loss([f], [torch.randn_like(f)]).item() > 0.1
    assert math.isfinite(spd_loss([torch.zeros_like(f)], [f]).item())


def test_spd_small_patch_form_equals_gram_form():
    """Patches with fewer pixels than channels use n x n inner products: same distances and
    gradients as the written C x C Gram formula, finite gradient when student == teacher."""
    from bqc.train.losses import _patch_grams, spd_distances

    torch.manual_seed(0)
    fs = torch.randn(3, 32, 8, 8, requires_grad=True)  # 2x2-pixel patches (n = 4 < C = 32)
    ft = fs.detach() + 0.5 * torch.randn(3, 32, 8, 8)
    ref_fs = fs.detach().clone().requires_grad_(True)
    ref = (_patch_grams(ref_fs, 4) - _patch_grams(ft, 4)).flatten(2).norm(dim=-1)
    got = spd_distances(fs, ft, 4)
    assert got.shape == ref.shape == (3, 16)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
    got.mean().backward()
    ref.mean().backward()
    assert torch.allclose(fs.grad, ref_fs.grad, rtol=1e-3, atol=1e-6)
    same = fs.detach().clone().requires_grad_(True)
    d = spd_distances(same, fs.detach(), 4)
    assert d.max() < 1e-3
    d.mean().backward()
    assert torch.isfinite(same.grad).all()
    zero = spd_distances(torch.zeros(1, 32, 8, 8), ft[:1], 4)
    assert torch.allclose(zero, torch.ones_like(zero))


def test_spd_inner_form_backward_is_the_derivative():
    """SPD's n x n form has a hand-written backward (``_InnerSPD``): gradcheck in float64 for
    both inputs, incl. an all-zero patch (its distance's gradient is defined by the clamps), and
    in float32 on a 16x16 feature the same forward (bitwise) and gradient (to 1e-5) as autograd
    through the written formula."""
    from bqc.train.losses import _InnerSPD, _patches, spd_distances

    torch.manual_seed(0)
    ps = torch.randn(2, 3, 4, 6, dtype=torch.float64).transpose(-1, -2)  # (B, P, C=6, n=4), pixel-major storage
    pt = torch.randn(2, 3, 4, 6, dtype=torch.float64).transpose(-1, -2)
    ps[0, 1] = 0  # an all-zero student patch
    assert torch.autograd.gradcheck(_InnerSPD.apply, (ps.requires_grad_(True), pt.requires_grad_(True)))

    def written(fs, ft):
        a_, b_ = _patches(fs, 4), _patches(ft, 4)

        def sq(m):
            d = m.double()
            return (d * d).sum(dim=(-1, -2))

        a = sq(a_.transpose(-1, -2) @ a_).sqrt()
        b = sq(b_.transpose(-1, -2) @ b_).sqrt()
        x = sq(a_.transpose(-1, -2) @ b_)
        d2 = (a > 1e-12).double() + (b > 1e-12).double() - 2 * x / (a.clamp_min(1e-12) * b.clamp_min(1e-12))
        return torch.where(d2 > 0, d2.clamp_min(1e-30).sqrt(), d2.new_zeros(())).float()

    fs = torch.randn(4, 32, 16, 16, requires_grad=True)
    ft = fs.detach() + 0.3 * torch.randn(4, 32, 16, 16)
    ref_fs = fs.detach().clone().requires_grad_(True)
    got, ref = spd_distances(fs, ft, 4), written(ref_fs, ft)
    assert torch.equal(got, ref)
    w = torch.rand_like(ref)
    (got * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(fs.grad, ref_fs.grad, rtol=1e-4, atol=1e-5 * ref_fs.grad.abs().max().item())
