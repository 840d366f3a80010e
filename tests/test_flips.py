"""bqc.deploy.flips: explaining a compiled model's difference from the reference by forced flips.

The "compiled" output is played by the reference itself with one decision forced (a sign for
bidm, a 4-bit code for binarydm) at the quantizer input nearest its boundary: explain() must
find that flip and then match to float precision; a difference that is not a flip (noise added
to the output) must come back not explained; the wrappers leave the graph as it was.
"""
from __future__ import annotations

import pytest
import torch

from bqc import deploy as D
from bqc.backends.onnx import example_inputs
from bqc.deploy.flips import Flip, explain, forced, near_boundary, quantizers, record_inputs
from bqc.graph import BqcModel
from test_deploy import qat


@pytest.fixture(scope="module", params=["bidm", "binarydm"])
def deployed(request):
    gm = qat("tiny", request.param)
    dg = D.to_deploy(gm)
    x, t = example_inputs(gm, batch=2, seed=3)[:2]
    return request.param, dg, BqcModel(dg).eval(), x, t


def test_forced_flip_is_found_and_explains_the_difference(deployed):
    recipe, dg, model, x, t = deployed
    out, inputs = record_inputs(model, dg, x, t)
    assert set(inputs) == set(quantizers(dg)) and inputs
    kinds = {type(q).__name__ for q in quantizers(dg).values()}
    assert ("SignBinarize" in kinds) if recipe == "bidm" else ("QuantizeCodes" in kinds)
    # the element nearest its boundary whose flip changes the output (a code flip can be masked
    # downstream, e.g. by a later clamp)
    for cand in near_boundary(dg, inputs, rel_eps=1e-1, limit=64):
        with forced(dg, [cand]), torch.no_grad():
            target = model(x, t)
        if (target[0] - out[0]).abs().max() > 1e-5:
            break
    else:
        pytest.skip("no flip near a boundary changes this tiny model's output")
    r = explain(model, dg, target, x, t, rel_eps=1e-1)
    assert r["error"] > 1e-5 and r["explained"], r
    assert r["flips"] == [cand] and r["error_after"] <= 1e-6


def test_a_real_difference_is_not_explained(deployed):
    _, dg, model, x, t = deployed
    with torch.no_grad():
        eps, state = model(x, t)
    noisy = (eps + 0.05 * torch.randn(eps.shape, generator=torch.Generator().manual_seed(0)), state)
    r = explain(model, dg, noisy, x, t, rel_eps=1e-3, max_flips=3)
    assert not r["explained"] and r["error_after"] > 1e-3


def test_exact_output_needs_no_flip_and_wrappers_are_removed(deployed):
    _, dg, model, x, t = deployed
    with torch.no_grad():
        want = model(x, t)
    r = explain(model, dg, want, x, t)
    assert r["explained"] and r["flips"] == [] and r["error"] == 0.0
    name, q = next(iter(quantizers(dg).items()))
    with forced(dg, [Flip(name, (0,) * 4, 0.0)]):
        assert "forward" in q.__dict__
    assert not any(m in q.__dict__ for m in ("quantize", "codes", "forward"))
    with torch.no_grad():
        again = model(x, t)
    assert torch.equal(again[0], want[0])


@pytest.mark.parametrize("qmin,qmax,u,before,after", [
    (0, 1, 0.5, 0, 1),     # {0, 1} codes (DoReFa's 1-bit activation): exactly at the tie rounds to 0
    (-8, 7, 1.5, 2, 1),    # half to even: 1.5 -> 2, so the other side is 1
    (-8, 7, 2.5, 2, 3),
    (0, 1, 0.4999, 0, 1),
    (-8, 7, -0.5, 0, -1),
])
def test_forcing_a_tie_moves_the_decision(qmin, qmax, u, before, after):
    """A quantizer input exactly on a decision boundary (round half to even decides it) is forced
    to the code on the boundary's other side, not to the one it already has (a flip at an exact
    0.5 tie of a {0, 1}-activation model was left unexplained before)."""
    step = torch.tensor(0.75, dtype=torch.float64)
    q = D.UnsignedBinarize(step) if (qmin, qmax) == (0, 1) else D.QuantizeCodes(step, qmin, qmax, 4)
    x = torch.full((1, 3, 2, 2), u * 0.75)
    assert int(q.codes(x)[0, 1, 1, 0]) == before
    with forced_module(q, (0, 1, 1, 0)):
        c = q.codes(x)
    assert int(c[0, 1, 1, 0]) == after and int(c[0, 0, 0, 0]) == before


def forced_module(q, index):
    """:func:`forced` on a one-quantizer 'graph'."""
    holder = torch.nn.Module()
    holder.act = q
    return forced(holder, [Flip("act", index, 0.0)])
