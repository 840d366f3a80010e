"""The QAT step's speed changes compute what the straightforward code computed (no timings here:
benchmarks/train_speed.py measures the speed).

Each fast path is checked against its reference written the plain way: the SPD patches against
the 6-D permute gather, the multi-tensor AdamW and EMA against the per-parameter loops, and a few
whole QAT steps of baseline, binarydm and bidm (trained weights and logged losses) against the
same steps run with the reference pieces patched back in.
"""
from __future__ import annotations

import csv

import pytest
import torch

from bqc.train import loop, losses


def _reference_patches(f: torch.Tensor, p: int) -> torch.Tensor:
    """The channel-major gather the fast ``_patches`` replaced: (B, p*p, C, h*w)."""
    b, c, h, w = f.shape
    ph, pw = max(h // p, 1), max(w // p, 1)
    gh, gw = h // ph, w // pw
    f = f[:, :, : gh * ph, : gw * pw]
    return f.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, ph * pw)


def _reference_optimizer(param_groups, config):
    """AdamW with the per-parameter update loop (the default for CPU tensors)."""
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                             weight_decay=config.weight_decay, foreach=False)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    return bool((a - b).abs().max() <= rel * max(float(b.abs().max()), 1e-12))


@pytest.mark.parametrize("shape", [(3, 24, 16, 16), (2, 8, 9, 11), (2, 40, 4, 4)])
def test_patches_equal_the_channel_major_gather(shape):
    f = torch.randn(shape)
    assert torch.equal(losses._patches(f, 4), _reference_patches(f, 4))


@pytest.mark.parametrize("form", ["paper", "code"])
@pytest.mark.parametrize("shape", [(4, 32, 16, 16), (3, 8, 16, 16)])  # Gram-free (n < C) and Gram (n >= C) branches
def test_spd_loss_and_grads_match_the_reference_gather(monkeypatch, form, shape):
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(shape, generator=g) for _ in range(2)]
    teach = [f + 0.3 * torch.randn(shape, generator=g) for f in feats]

    def run():
        s = [f.clone().requires_grad_() for f in feats]
        loss = losses.spd_loss(s, teach, 4, form=form)
        loss.backward()
        return loss.detach(), [x.grad for x in s]

    fast_loss, fast_grads = run()
    monkeypatch.setattr(losses, "_patches", _reference_patches)
    ref_loss, ref_grads = run()
    assert _close(fast_loss, ref_loss)
    assert all(_close(a, b) for a, b in zip(fast_grads, ref_grads))
    assert float(ref_loss) > 0 and all(float(x.abs().max()) > 0 for x in ref_grads)


def test_multi_tensor_adamw_is_bitwise_the_per_parameter_loop():
    torch.manual_seed(0)
    init = [torch.randn(s) for s in [(8, 4, 3, 3), (8,), (), (16, 8)]]
    cfg = loop.LoopConfig(steps=4, lr=1e-2, weight_decay=0.05)

    def run(make):
        ps = [p.clone().requires_grad_() for p in init]
        opt = make([{"params": ps}], cfg)
        g = torch.Generator().manual_seed(1)
        for i in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.param_groups[0]["lr"] = cfg.lr * (i + 1) / 4
            opt.step()
        return ps

    fast, ref = run(loop.make_optimizer), run(_reference_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    assert not torch.equal(fast[0], init[0])


@pytest.fixture(scope="module")
def tiny_src():
    from conftest import TINY_CONFIG
    from bqc import frontend
    from bqc.models.unet import UNetModel

    torch.manual_seed(0)
    src = frontend._from_module(UNetModel(**TINY_CONFIG).eval(), "zoo", "tiny")
    src.exported = frontend.capture(src)
    return src


def test_multi_tensor_ema_is_bitwise_the_per_tensor_update():
    g = torch.Generator().manual_seed(0)
    ema = [torch.randn(s, generator=g) for s in [(5, 3), (7,), ()]]
    w = [torch.randn(e.shape, generator=g) for e in ema]
    ref = [e.clone().mul_(0.9).add_(x, alpha=1 - 0.9) for e, x in zip(ema, w)]
    torch._foreach_mul_(ema, 0.9)
    torch._foreach_add_(ema, w, alpha=1 - 0.9)
    assert all(torch.equal(a, b) for a, b in zip(ema, ref))


def _stepper(src, recipe):
    """``recipe``'s QAT model, real loss (teacher, distillation, TBS cache) and trainer AdamW."""
    from bqc import ir, transform as tf
    from bqc.diffusion.schedule import NoiseSchedule
    from bqc.pipeline import load_recipe
    from bqc.train.qat import QATModel, QATOptions, _tap_views, make_loss

    student = tf.transform(src, recipe).gm.train()
    teacher = tf.transform(src, "fp").gm.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    s_view, _, taps = _tap_views(student, teacher)
    lrm = None
    if ir.graph_meta(student).get("distill", {}).get("loss") == "lrm":
        nodes = {n.name: n for n in student.graph.nodes}
        lrm = losses.LRMProjections([int(nodes[tp["node"]].meta["val"].shape[1]) for tp in taps])
    model = QATModel(student, lrm, s_view)
    opts = QATOptions(steps=3, batch=4, progress=False)
    loss_fn = make_loss(student, teacher, dict(load_recipe(recipe).train), opts, NoiseSchedule(), 3)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, loss_fn, params, loop.make_optimizer([{"params": params}], loop.LoopConfig(steps=3, lr=1e-3))


@pytest.mark.parametrize("recipe", ["binarydm", "bidm"])  # binarydm = baseline's quantizers + EBB + LRM
def test_qat_steps_match_the_reference_path(tiny_src, monkeypatch, recipe):
    """Three QAT steps from the same seed: at each step the loss and every gradient of the fast
    path equal the reference path's (same weights, same noise) to float rounding. (Weights after
    several Adam steps are not compared: Adam's first steps move a parameter by +-lr whatever
    its gradient's size, so a rounding-level gradient near 0 may legitimately flip a step.)"""
    model, loss_fn, params, opt = _stepper(tiny_src, recipe)
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # TINY_CONFIG: 1 channel, 8x8

    def loss_and_grads(step):
        torch.manual_seed(100 + step)
        loss, _ = loss_fn(model, (x0, None), step)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), grads

    for step in range(3):
        state = {k: v.clone() for k, v in model.state_dict().items()}  # forwards update observers, LSQ init
        with monkeypatch.context() as m:
            m.setattr(losses, "_patches", _reference_patches)
            ref_loss, ref_grads = loss_and_grads(step)
        model.load_state_dict(state)
        loss, grads = loss_and_grads(step)
        assert _close(loss, ref_loss), (step, float(loss), float(ref_loss))
        scale = max(float(g.abs().max()) for g in ref_grads if g is not None)
        for p, g, r in zip(params, grads, ref_grads):
            assert (g is None) == (r is None)
            if r is not None:
                assert float((g - r).abs().max()) <= 1e-6 * scale, (step, p.shape)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    assert float(loss) > 0
