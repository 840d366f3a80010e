"""``bqc unfold``: a deploy artifact back into a QAT artifact. The unfolded graph computes what the
deploy graph computes, folds back to the same bits, and trains; a deploy artifact that does not
match the recipe is refused with exit code 2.

Every recipe's QAT graph is first moved away from its initial values (as training would: weights,
scales, thresholds, K maps, TBS coefficients, steps), folded, and unfolded into a fresh graph of
the same recipe, which starts from the teacher's weights: so a passing check cannot come from the
two graphs sharing their initial values.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from test_deploy import program, qat

from bqc import artifact
from bqc import deploy as D
from bqc.deploy.unfold import check_equivalent, unfold, unfold_into
from bqc.diffusion.schedule import NoiseSchedule
from bqc.errors import BqcError
from bqc.pipeline import load_recipe
from clirun import run_cli

# every weight binarizer, activation quantizer and epilogue part the recipes use
RECIPES = [("bidm", False), ("binarydm", False), ("binarydm", True), ("binarydm-lmb", False), ("lsq", False),
           ("reactnet", False), ("xnor++", False), ("dorefa", False), ("reste", False), ("xnor", False)]


def _trained_like(gm, seed: int = 0):
    """A copy of ``gm`` with every parameter and step moved, as training moves them."""
    gm = copy.deepcopy(gm)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g)).add_(0.01 * torch.randn(p.shape, generator=g))
            if name.endswith(("scale", "alpha", ".s1", ".s2")):
                p.abs_()
        for name, b in gm.named_buffers():
            if name.endswith("amax"):
                b.mul_(1.3)
    return gm


def _fresh(recipe: str):
    rec = load_recipe(recipe)
    gm, _ = artifact.build_graph(program("tiny"), rec, rec.wbits, rec.abits, schedule=NoiseSchedule())
    return gm


@pytest.mark.parametrize("recipe,stage2", RECIPES)
def test_unfold_computes_what_the_deploy_graph_computes(recipe, stage2):
    trained = _trained_like(qat("tiny", recipe, stage2=stage2))
    dg = D.to_deploy(trained)
    fresh = _fresh(recipe)
    counts = unfold_into(fresh, dg)
    assert counts["layers"] > 0
    assert check_equivalent(fresh, dg, tol=1e-4) <= 1e-4
    # and folds back to the same sign bits, codes and thresholds
    again = dict(D.to_deploy(fresh).named_buffers())
    for name, b in dg.named_buffers():
        if b is None:
            continue
        if b.dtype in (torch.int32, torch.int8):
            assert torch.equal(again[name], b), name
        else:
            torch.testing.assert_close(again[name], b, rtol=1e-5, atol=1e-7, msg=name)


def test_check_equivalent_finds_a_wrong_float_parameter():
    """The node-by-node check names the node whose value is wrong: a norm weight that was not
    copied (each node is fed the deploy graph's inputs, so only the wrong node differs)."""
    dg = D.to_deploy(_trained_like(qat("tiny", "bidm")))
    fresh = _fresh("bidm")
    unfold_into(fresh, dg)
    assert check_equivalent(fresh, dg) <= 1e-5
    node = next(n for n in fresh.graph.nodes if n.op == "call_function" and "group_norm" in str(n.target))
    weight = fresh.get_parameter(node.args[2].target)
    with torch.no_grad():
        weight.mul_(1.01)
    with pytest.raises(BqcError, match=f"at node ({node.args[2].name}|{node.name}) "):  # the weight or its norm
        check_equivalent(fresh, dg)


def test_unfold_refuses_a_graph_of_another_recipe():
    dg = D.to_deploy(_trained_like(qat("tiny", "bidm")))
    with pytest.raises(BqcError):
        unfold_into(_fresh("binarydm"), dg)


def test_unfold_shipped_bidm_trains_on(tmp_path, capsys):
    """The shipped W1A1 model unfolds (by name) into an artifact that computes what it computes,
    records where it came from, and trains; a wrong recipe is exit 2 without a traceback."""
    out = tmp_path / "art"
    code, stdout, err = run_cli(["unfold", "mnist16-bidm", "-o", out], capsys)
    assert code == 0, err
    assert "matches it node by node to" in stdout
    man = json.loads((out / "bqc.json").read_text())
    assert man["unfolded_from"]["deploy"] == "mnist16-bidm" and man["unfolded_from"]["recipe"] == "bidm01-skip"
    art = artifact.load_artifact(out)
    check_equivalent(art.gm, D.load("mnist16-bidm").gm, tol=1e-5)
    code, _, err = run_cli(["train", out, "--steps", "2", "--batch", "4", "--sample-steps", "100",
                            "--threads", "1", "-q", "-o", tmp_path / "run"], capsys)
    assert code == 0, err
    rows = (tmp_path / "run" / "train" / "metrics.csv").read_text().splitlines()
    assert len(rows) >= 2 and float(rows[-1].split(",")[1]) < 0.2  # a trained model's loss, not a fresh one's

    code, _, err = run_cli(["unfold", "mnist16-bidm", "--recipe", "binarydm-skip", "-o", tmp_path / "bad"], capsys)
    assert code == 2 and "Traceback" not in err
    code, _, err = run_cli(["unfold", tmp_path / "art", "-o", tmp_path / "bad2"], capsys)
    assert code == 2 and "deploy artifact" in err and "Traceback" not in err


def test_unfold_by_api_names_its_source():
    res, info = unfold("mnist16-binarydm")
    assert info["model"] == "mnist16" and info["recipe"] == "binarydm-skip" and info["max_rel_diff"] <= 1e-4
