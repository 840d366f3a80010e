"""Property tests for bqc.quant: value sets, gradients, init-once, shapes, state round trips.

Reference formulas here are written independently of the modules: the clipped-identity STE
is v.clamp(-1, 1) with the hard sign's value, LSQ's gradient is the LSQ paper's expression.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bqc.quant as q
from bqc.errors import BqcError

FAST = settings(max_examples=20, deadline=None)
BINARY_NAMES = ["sign_scale", "bidm", "xnor", "dorefa", "reste", "ebb", "lmb"]
seeds = st.integers(0, 2**31 - 1)


def rand(seed, *shape, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def sgn(v):
    return torch.where(v >= 0, 1.0, -1.0)


def ste_ref(v):
    """sign(v) forward, gradient 1[|v| <= 1]: independent of bqc's autograd Function."""
    c = v.clamp(-1, 1)
    return c + (sgn(v) - c).detach()


def per_channel(values):
    return [torch.unique(r) for r in values.reshape(values.shape[0], -1)]


weight_shapes = st.tuples(st.integers(1, 6), st.integers(1, 4), st.sampled_from([1, 3]))


# --- W1: value sets of binary weights -------------------------------------------------------

@FAST
@given(seed=seeds, shape=weight_shapes, scale=st.floats(0.05, 3.0),
       name=st.sampled_from(BINARY_NAMES), stage2=st.booleans())
def test_binary_weights_take_two_values_per_channel(seed, shape, scale, name, stage2):
    o, i, k = shape
    w = rand(seed, o, i, k, k, scale=scale)
    wq = q.make_weight_quantizer(name, w)
    if name == "ebb" and stage2:
        wq.switch_to_stage2()
    wb = wq(w).detach()
    form = wq.deploy_form(w)
    two = name == "lmb" or (name == "ebb" and not stage2)
    assert len(form["signs"]) == len(form["scales"]) == (2 if two else 1)
    recon = sum(sc.view(-1, 1, 1, 1) * s.float() for s, sc in zip(form["signs"], form["scales"]))
    assert torch.equal(recon, wb)
    for c, vals in enumerate(per_channel(wb)):
        assert len(vals) <= (4 if two else 2)
        if not two:
            alpha = form["scales"][0][c]
            assert set(vals.tolist()) <= {alpha.item(), -alpha.item()}
    for s in form["signs"]:
        assert s.dtype == torch.int8 and set(s.unique().tolist()) <= {-1, 1}


# --- EBB / LMB init and gradients -----------------------------------------------------------

@FAST
@given(seed=seeds, shape=weight_shapes)
def test_ebb_init_follows_methods(seed, shape):
    o, i, k = shape
    w = rand(seed, o, i, k, k).double()
    wq = q.EBB(w)
    for c in range(o):
        wc = w[c].flatten()
        s1 = wc.abs().mean()
        s2 = (wc - s1 * sgn(wc)).abs().mean()
        assert torch.allclose(wq.s1[c], s1) and torch.allclose(wq.s2[c], s2)


@FAST
@given(seed=seeds, shape=weight_shapes, scale=st.floats(0.1, 3.0), lmb=st.booleans())
def test_two_basis_gradients_match_written_formula(seed, shape, scale, lmb):
    o, i, k = shape
    w0 = rand(seed, o, i, k, k, scale=scale).double()
    up = rand(seed + 1, o, i, k, k).double()
    wq = (q.LMB if lmb else q.EBB)(w0)
    # perturb s1/s2 off their init so the test is not at a special point
    with torch.no_grad():
        wq.s1.mul_(1.3)
        wq.s2.mul_(0.7)
    w = w0.clone().requires_grad_(True)
    (wq(w) * up).sum().backward()

    s1 = wq.s1.detach().clone().requires_grad_(True)
    s2 = wq.s2.detach().clone().requires_grad_(True)
    w_ref = w0.clone().requires_grad_(True)
    v = lambda p: p.view(-1, 1, 1, 1)  # noqa: E731
    b1 = ste_ref(w_ref)
    ref = v(s1) * b1 + v(s2) * ste_ref(w_ref - v(s1) * b1)
    (ref * up).sum().backward()
    assert torch.allclose(wq.s1.grad, s1.grad)
    assert torch.allclose(wq.s2.grad, s2.grad)
    assert torch.allclose(w.grad, w_ref.grad)


def test_ebb_stage2_regulariser_and_switch():
    w = rand(0, 4, 3, 3, 3)
    model = torch.nn.ModuleList([q.EBB(w), q.EBB(w * 2), q.LMB(w)])
    ebb = model[0]
    assert torch.allclose(ebb.reg(), ebb.s2.abs().mean())
    expected = (model[0].s2.abs().mean() + model[1].s2.abs().mean()) / 2
    assert torch.allclose(q.ebb_regulariser(model), expected)
    assert q.switch_ebb_to_stage2(model) == 2
    assert float(q.ebb_regulariser(model)) == 0.0
    assert torch.equal(ebb(w), ebb.s1.view(-1, 1, 1, 1) * sgn(w))
    assert ebb.describe()["bases"] == 1 and model[2].describe()["bases"] == 2
    ww = w.clone().requires_grad_(True)
    ebb(ww).sum().backward()
    assert ebb.s2.grad is None and ebb.s1.grad is not None


def test_sign_scale_modes():
    w = rand(3, 5, 2, 3, 3)
    learned = q.SignScale(w)
    assert torch.allclose(learned.alpha, w.abs().flatten(1).mean(1))
    assert isinstance(learned.alpha, torch.nn.Parameter)
    for name, detach in [("bidm", True), ("xnor", False)]:
        wq = q.make_weight_quantizer(name, w)
        assert not list(wq.parameters())
        ww = w.clone().requires_grad_(True)
        wq(ww).pow(2).sum().backward()
        alpha = ww.detach().abs().flatten(1).mean(1).view(-1, 1, 1, 1)
        ste_part = 2 * alpha * sgn(w) * alpha * (w.abs() <= 1)
        assert torch.allclose(ww.grad, ste_part) == detach
    dorefa = q.make_weight_quantizer("dorefa", w)
    assert torch.allclose(dorefa(w).abs(), w.abs().mean().expand_as(w))


# --- STE helpers ----------------------------------------------------------------------------

@FAST
@given(seed=seeds)
def test_sign_estimators_gradient_shape(seed):
    x = torch.cat([rand(seed, 200, scale=1.5), torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0])])
    for fn in (q.sign_ste, q.approx_sign):
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        assert torch.equal(y.detach(), sgn(x))
        y.sum().backward()
        if fn is q.sign_ste:
            expected = (x.abs() <= 1).float()
        else:
            expected = torch.where(x < 0, 2 + 2 * x, 2 - 2 * x) * ((x >= -1) & (x < 1))
            assert torch.all(xx.grad[x.abs() >= 1] == 0)
            assert torch.all(xx.grad >= 0) and xx.grad.max() <= 2
        assert torch.allclose(xx.grad, expected)


def test_hard_sign_edge_values():
    """METHODS' sign: +1 for x >= 0 (both zeros, the smallest subnormals), -1 below, in x's
    dtype."""
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([-0.0, 0.0, 1e-45, -1e-45, tiny, -tiny, 2.0, -3.0, float("inf"), float("-inf")])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        xd = x.to(dtype)
        y = q.hard_sign(xd)
        assert y.dtype == dtype
        assert torch.equal(y, (xd >= 0).to(dtype) * 2 - 1)


def test_reste_estimator_and_anneal():
    est = q.ReSTE(o_start=1.0, o_end=3.0, t=1.5)
    x = torch.tensor([-2.0, -1.4, -0.5, -0.05, 0.0, 0.05, 0.5, 1.4, 2.0], requires_grad=True)
    est(x).sum().backward()
    assert torch.equal(x.grad, (x.detach().abs() <= 1.5).float())  # o = 1: STE clipped at t
    model = torch.nn.ModuleList([est, q.ReSTEWeight(rand(0, 2, 2)), q.SignAct(backward="reste")])
    assert q.anneal(model, 1.0) == 3
    assert float(est.o) == 3.0
    x.grad = None
    est(x).sum().backward()
    a = x.detach().abs()
    power = (1 / 3) * a.clamp_min(0.1) ** (1 / 3 - 1)
    expected = torch.where(a <= 0.1, 0.1 ** (1 / 3) / 0.1, power) * (a <= 1.5)
    assert torch.allclose(x.grad, expected)


# --- LSQ ------------------------------------------------------------------------------------

@FAST
@given(seed=seeds, bits=st.integers(1, 8), scale=st.floats(0.01, 10.0), signed=st.booleans())
def test_lsq_grid_and_gradients(seed, bits, scale, signed):
    if bits == 1 and signed:  # one bit is unsigned only: levels {0, s}
        with pytest.raises(BqcError, match="unsigned"):
            q.LSQ(1, signed=True)
        return
    x0 = rand(seed, 3, 5, 4, scale=scale).double()
    lsq = q.LSQ(bits, signed=signed).double()
    x = x0.clone().requires_grad_(True)
    y = lsq(x)
    s = lsq.scale.detach()
    qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    assert torch.allclose(s, 2 * x0.abs().mean() / math.sqrt(qp))
    k = y.detach() / s
    assert torch.allclose(k, k.round()) and k.round().min() >= qn and k.round().max() <= qp
    assert torch.equal(lsq.codes(x0).double() * s, y.detach())
    up = rand(seed + 1, 3, 5, 4).double()
    (y * up).sum().backward()
    # LSQ paper gradients
    v = x0 / s
    inside = (v >= qn) & (v <= qp)
    ds = torch.where(v < qn, float(qn), torch.where(v > qp, float(qp), v.round() - v))
    g = 1 / math.sqrt(x0.numel() * qp)
    assert torch.allclose(x.grad, up * inside)
    assert torch.allclose(lsq.scale.grad, (up * ds).sum() * g)


@FAST
@given(seed=seeds, bits=st.integers(2, 8))
def test_lsq_weight_gradients_per_channel(seed, bits):
    """Per-output-channel LSQ: the fused estimator reduces the step gradient per channel."""
    w0 = rand(seed, 4, 3, 2, 2).double()
    lw = q.LSQWeight(w0.float(), bits).double()
    w = w0.clone().requires_grad_(True)
    up = rand(seed + 1, 4, 3, 2, 2).double()
    (lw(w) * up).sum().backward()
    s = lw.scale.detach().view(-1, 1, 1, 1)
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    v = w0 / s
    inside = (v >= qn) & (v <= qp)
    ds = torch.where(v < qn, float(qn), torch.where(v > qp, float(qp), v.round() - v))
    g = 1 / math.sqrt(w0[0].numel() * qp)
    assert torch.allclose(w.grad, up * inside)
    assert torch.allclose(lw.scale.grad, (up * ds).sum(dim=(1, 2, 3)) * g)


@FAST
@given(seed=seeds, c=st.sampled_from([2, 3, 4, 6, 8, 12]), out=st.sampled_from([2, 3, 4, 6, 8, 12]))
def test_pool_channels_matches_adaptive_pooling(seed, c, out):
    """The group-mean / repeat fast paths equal adaptive average pooling over channels."""
    from bqc.quant.parts import pool_channels

    x = rand(seed, 2, c, 3, 5)
    ref = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(2, 15, c), out).reshape(2, 3, 5, out).permute(0, 3, 1, 2)
    assert pool_channels(x, out).shape == ref.shape
    assert torch.allclose(pool_channels(x, out), ref, atol=1e-6)


def test_lsq_initialises_once_and_not_after_reload():
    lsq = q.LSQ(4)
    x1, x2 = rand(0, 2, 8, scale=3.0), rand(1, 2, 8, scale=0.1)
    lsq(x1)
    s1 = lsq.scale.detach().clone()
    lsq(x2)
    assert torch.equal(lsq.scale.detach(), s1) and bool(lsq.initialised)
    fresh = q.LSQ(4)
    assert not bool(fresh.initialised)
    fresh.load_state_dict(lsq.state_dict())
    out = fresh(x2)
    assert torch.equal(fresh.scale.detach(), s1)
    assert torch.equal(out, lsq(x2))


@FAST
@given(seed=seeds, bits=st.integers(2, 8))
def test_uniform_quantizers_on_grid(seed, bits):
    w = rand(seed, 4, 3, 3, 3)
    uw = q.UniformWeight(w, bits)
    form = uw.deploy_form(w)
    qp = 2 ** (bits - 1) - 1
    assert form["codes"].abs().max() <= qp and form["bits"] == bits
    assert torch.allclose(form["codes"].float() * form["scale"].view(-1, 1, 1, 1), uw(w))
    lw = q.LSQWeight(w, bits)
    lf = lw.deploy_form(w)
    assert torch.allclose(lf["codes"].float() * lf["scale"].view(-1, 1, 1, 1), lw(w))
    x = rand(seed + 1, 2, 3, 4, 4)
    ua = q.UniformAct(bits)
    k = ua(x) / (ua.amax / ua.qp)
    assert torch.allclose(k, k.round(), atol=1e-4)
    d = q.DoReFaAct(bits)
    y = d(x)
    assert y.min() >= 0 and y.max() <= 1
    assert torch.allclose(y * (2 ** bits - 1), (y * (2 ** bits - 1)).round(), atol=1e-5)


# --- layers ---------------------------------------------------------------------------------

@FAST
@given(seed=seeds, groups=st.sampled_from([1, 2]), k=st.sampled_from([1, 3]),
       stride=st.sampled_from([1, 2]), padding=st.integers(0, 2), dilation=st.sampled_from([1, 2]),
       bias=st.booleans())
def test_layers_without_parts_are_the_float_ops(seed, groups, k, stride, padding, dilation, bias):
    x = rand(seed, 2, 4, 9, 9)
    w = rand(seed + 1, 6, 4 // groups, k, k)
    b = rand(seed + 2, 6) if bias else None
    conv = q.QConv2d(w, b, stride, padding, dilation, groups)
    assert torch.equal(conv(x), F.conv2d(x, w, b, stride, padding, dilation, groups))
    wl, bl, xl = rand(seed, 5, 7), (rand(seed + 3, 5) if bias else None), rand(seed + 4, 3, 2, 7)
    assert torch.equal(q.QLinear(wl, bl)(xl), F.linear(xl, wl, bl))
    a, bm = rand(seed, 2, 3, 4), rand(seed + 5, 2, 4, 5)
    assert torch.equal(q.QMatmul()(a, bm), torch.matmul(a, bm))


@FAST
@given(seed=seeds, cin=st.sampled_from([3, 4]), cout=st.sampled_from([4, 6]),
       k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), hw=st.integers(4, 9))
def test_bidm_conv_shortcut_shapes_and_gradients(seed, cin, cout, k, stride, hw):
    w = rand(seed, cout, cin, k, k)
    conv = q.make_qconv2d(w, rand(seed + 1, cout), stride, k // 2, weight_q="bidm", act_q="bidm",
                          kmap="learned", shortcut="scaled")
    x = rand(seed + 2, 2, cin, hw, hw).requires_grad_(True)
    y = conv(x)
    assert y.shape == F.conv2d(x, w, None, stride, k // 2).shape
    y.pow(2).mean().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert conv.shortcut.s.grad.abs() > 0 and x.grad.abs().sum() > 0
    assert torch.allclose(conv.kmap.weight, torch.full_like(conv.kmap.weight, 1 / (k * k)))
    assert conv.shortcut.proj is None  # default: parameter-free channel mapping
    assert conv.shortcut.channels == ("same" if cin == cout else "pool")


def test_kmap_and_factorised_scale():
    x = torch.full((1, 3, 6, 6), -2.0)
    km = q.KMap(3, 1, 1, learnable=False)
    assert not list(km.parameters())
    assert torch.allclose(km(x)[..., 1:-1, 1:-1], torch.tensor(2.0))
    fs = q.FactorisedScale(2, 3, 4)
    with torch.no_grad():
        fs.alpha.copy_(torch.tensor([1.0, 2.0]))
        fs.beta.copy_(torch.tensor([1.0, 3.0, 1.0]))
        fs.gamma.copy_(torch.tensor([1.0, 1.0, 5.0, 1.0]))
    y = fs(torch.ones(1, 2, 3, 4))
    assert y[0, 1, 1, 2] == 30 and y[0, 0, 0, 0] == 1


@pytest.mark.parametrize("batch,k,stride,pad,hw", [(1, 3, 1, 1, 6), (3, 3, 2, 1, 7), (5, 1, 1, 0, 4), (2, 3, 1, 0, 5)])
def test_kmap_is_a_one_channel_conv_of_mean_abs(batch, k, stride, pad, hw):
    """The batch-as-channels depthwise form equals K = k * mean_c|x| as a plain 1-channel conv,
    value and gradients (to x and to the learned kernel)."""
    km = q.KMap(k, stride, pad, learnable=True)
    with torch.no_grad():
        km.weight.copy_(torch.randn(1, 1, k, k, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(batch, 4, hw, hw, generator=torch.Generator().manual_seed(2), requires_grad=True)
    g = torch.randn_like(km(x))
    xr, wr = x.detach().clone().requires_grad_(), km.weight.detach().clone().requires_grad_()
    ref = F.conv2d(xr.abs().mean(dim=1, keepdim=True), wr, None, stride, pad)
    (ref * g).sum().backward()
    (km(x) * g).sum().backward()
    torch.testing.assert_close(km(x), ref)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(km.weight.grad, wr.grad)


def test_inactive_layer_is_float_and_describe_is_json():
    w, b, x = rand(0, 4, 4, 3, 3), rand(1, 4), rand(2, 1, 4, 6, 6)
    conv = q.make_qconv2d(w, b, 1, 1, weight_q="ebb", act_q="lsq", a_bits=4, post="rprelu")
    d = conv.describe()
    assert (d["w_bits"], d["a_bits"], d["w_bases"]) == (1, 4, 2)
    assert set(d["parts"]) == {"wq", "aq", "post"}
    json.dumps(d)
    conv.set_active(False)
    assert torch.equal(conv(x), F.conv2d(x, w, b, 1, 1))
    assert q.QConv2d(w, b).describe()["w_bits"] == 32
    mm = q.QMatmul(q.LSQ(8), q.LSQ(4))
    assert (mm.describe()["a_bits"], mm.describe()["w_bits"]) == (8, 4)
    json.dumps(mm.describe())


# --- state_dict round trips -----------------------------------------------------------------

def _layer_configs():
    conv = dict(stride=2, padding=1)
    return {
        "binarydm": lambda w, b: q.make_qconv2d(w, b, weight_q="ebb", act_q="lsq", a_bits=4, **conv),
        "lmb": lambda w, b: q.make_qconv2d(w, b, weight_q="lmb", act_q="lsq", a_bits=4, **conv),
        "baseline": lambda w, b: q.make_qconv2d(w, b, weight_q="sign_scale", act_q="lsq", a_bits=4, **conv),
        "bidm": lambda w, b: q.make_qconv2d(w, b, weight_q="bidm", act_q="bidm", kmap="learned",
                                            shortcut="scaled", keep_bias=False, **conv),
        "xnor": lambda w, b: q.make_qconv2d(w, b, weight_q="xnor", act_q="sign", kmap="fixed", **conv),
        "xnor++": lambda w, b: q.make_qconv2d(w, b, weight_q="xnor", act_q="sign", out_scale_hw=(4, 4), **conv),
        "dorefa": lambda w, b: q.make_qconv2d(w, b, weight_q="dorefa", act_q="dorefa", a_bits=2, **conv),
        "reactnet": lambda w, b: q.make_qconv2d(w, b, weight_q="sign_scale", act_q="rsign",
                                                shortcut="real", post="rprelu", **conv),
        "reste": lambda w, b: q.make_qconv2d(w, b, weight_q="reste", act_q="reste", **conv),
        "lsq": lambda w, b: q.make_qconv2d(w, b, weight_q="lsq", w_bits=2, act_q="lsq", a_bits=4, **conv),
        "w8a8": lambda w, b: q.make_qconv2d(w, b, weight_q="uniform", w_bits=8, act_q="uniform", **conv),
        "linear": lambda w, b: q.make_qlinear(w.flatten(1), b, weight_q="ebb", act_q="bidm", post="rprelu"),
    }


@pytest.mark.parametrize("name", list(_layer_configs()))
def test_state_dict_round_trip(name):
    make = _layer_configs()[name]
    w, b = rand(0, 6, 4, 3, 3), rand(1, 6)
    x = rand(2, 2, 4, 8, 8)
    if name == "linear":
        x = rand(2, 2, 5, 36)
    m = make(w, b)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    for step in range(2):  # train a little: LSQ init, scales move, stage flags and annealing change
        m(x).pow(2).mean().backward()
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
        opt.zero_grad()
        q.anneal(m, 0.5)
        q.switch_ebb_to_stage2(m)
    fresh = make(rand(7, 6, 4, 3, 3), rand(8, 6))
    x2 = x * 0.5
    assert not torch.equal(m(x2), fresh(x2))  # so the equality below is the state's doing
    fresh.load_state_dict(m.state_dict())  # strict: the same keys
    assert torch.equal(m(x2), fresh(x2))
    assert m.describe() == fresh.describe()  # e.g. EBB's stage, carried by a buffer


def test_forward_backward_reaches_weights_and_scales():
    for name, make in _layer_configs().items():
        x = rand(2, 2, 5, 36) if name == "linear" else rand(2, 2, 4, 8, 8)
        m = make(rand(0, 6, 4, 3, 3), rand(1, 6))
        m(x).pow(2).mean().backward()
        grads = {n: p.grad for n, p in m.named_parameters()}
        assert grads["weight"] is not None and grads["weight"].abs().sum() > 0, name
        missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
        assert not missing, (name, missing)  # every learned scale, threshold, K map, RPReLU ...


# --- registry -------------------------------------------------------------------------------

def test_registry_errors_and_names():
    w = rand(0, 2, 2, 1, 1)
    with pytest.raises(BqcError, match="valid names: .*ebb"):
        q.make_weight_quantizer("ebbb", w)
    with pytest.raises(BqcError, match="valid names: .*lsq"):
        q.make_act_quantizer("lsqq", 4)
    with pytest.raises(BqcError, match="supported: 1"):
        q.make_weight_quantizer("ebb", w, bits=2)
    with pytest.raises(BqcError, match="supported: 1, 2, 3, 4, 5, 6, 7, 8"):
        q.make_act_quantizer("lsq", 9)
    with pytest.raises(BqcError, match="supported: 2, 3"):
        q.make_weight_quantizer("uniform", w, bits=1)
    with pytest.raises(BqcError, match="channel"):
        q.make_act_quantizer("bidm")
    with pytest.raises(BqcError, match="bad options"):
        q.make_weight_quantizer("ebb", w, foo=1)
    assert q.make_weight_quantizer("fp", w) is None and q.make_act_quantizer("fp") is None
    for n in ["sign_scale", "ebb", "lmb", "xnor", "dorefa", "reste", "uniform", "lsq", "bidm"]:
        assert n in q.WEIGHT_QUANTIZERS
    for n in ["lsq", "dorefa", "sign", "rsign", "bidm", "uniform", "reste"]:
        assert n in q.ACT_QUANTIZERS
