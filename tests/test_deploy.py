"""The deploy graph (``fold_deploy`` / bqc.deploy): golden graph, agreement with the QAT graph
(end to end and layer by layer, integer codes identical), packed layout, sizes, hand-off.

The QAT graphs here are untrained but calibrated (one batch sets every activation step).
End-to-end comparisons run in float32 (tolerance 1e-4, the deploy contract) and in float64
(where the only differences are scales the QAT side recomputes from float32 weights).
"""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIG

from bqc import artifact, frontend, ir
from bqc import deploy as D
from bqc.backends.onnx import example_inputs
from bqc.diffusion.schedule import NoiseSchedule
from bqc.errors import BqcError
from bqc.graph import BqcModel
from bqc.pipeline import load_recipe
from bqc.quant.layers import QMatmul, _Quantized
from bqc.quant.training import switch_ebb_to_stage2

CASES = {"baseline": ("baseline", False), "binarydm-s1": ("binarydm", False),
         "binarydm-s2": ("binarydm", True), "bidm": ("bidm", False)}
OTHER_RECIPES = ["binarydm-lmb", "xnor", "xnor++", "reactnet", "reste", "dorefa", "lsq"]


# --- sources, captured once per module ----------------------------------------------------------
def _perturb_zero_init(model: torch.nn.Module) -> None:
    """openaimodel zero-inits the output convs; give them weights so outputs differ."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 4 and ("out_layers.3" in name or name.startswith("out.2")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _tiny_source():
    from bqc.models.unet import UNetModel

    torch.manual_seed(0)
    m = UNetModel(**TINY_CONFIG).eval()
    _perturb_zero_init(m)
    return frontend._from_module(m, "zoo", "tiny reference UNet", config=TINY_CONFIG)


def _mnist_source():
    src = frontend.load_source("mnist16")
    _perturb_zero_init(src.module)
    return src


_PROGRAMS: dict = {}
_QAT: dict = {}


def program(model: str):
    if model not in _PROGRAMS:
        _PROGRAMS[model] = frontend.capture(_tiny_source() if model == "tiny" else _mnist_source())
    return _PROGRAMS[model]


def qat(model: str, recipe: str, stage2: bool = False, calibrate: bool = True):
    """A calibrated QAT graph (cached; callers must not modify it)."""
    key = (model, recipe, stage2, calibrate)
    if key not in _QAT:
        rec = load_recipe(recipe)
        gm, _ = artifact.build_graph(program(model), rec, rec.wbits, rec.abits, schedule=NoiseSchedule())
        gm.eval()
        if calibrate:
            with torch.no_grad():
                gm(*example_inputs(gm, batch=2, seed=0))
        if stage2:
            switch_ebb_to_stage2(gm)
        _QAT[key] = gm
    return _QAT[key]


def case(model: str, name: str):
    recipe, stage2 = CASES[name]
    return qat(model, recipe, stage2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def as_float64(gm):
    """A float64 copy (dtype arguments of casts too: GroupNorm32 casts to float32)."""
    g = ir.fresh_copy(gm)

    def sub(a):
        if a is torch.float32:
            return torch.float64
        if isinstance(a, (list, tuple)):
            return type(a)(sub(v) for v in a)
        return a

    for n in g.graph.nodes:
        n.args = sub(n.args)
        n.kwargs = {k: sub(v) for k, v in n.kwargs.items()}
    g.recompile()
    return g.double()


def capture_inputs(gm, args, kinds) -> dict:
    """Inputs and outputs of every call_module node whose module is one of ``kinds``."""
    seen, hooks = {}, []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, kinds):
                hooks.append(mod.register_forward_hook(
                    lambda m, i, o, name=n.name: seen.__setitem__(name, (i, o))))
    try:
        with torch.no_grad():
            gm(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen


def check_layerwise(gm, dg, args, tol=1e-5) -> float:
    """Feed each deploy layer its QAT layer's input: codes identical, outputs within tol."""
    caps = capture_inputs(gm, args, (_Quantized,))
    dmods = {n.name: dg.get_submodule(n.target) for n in dg.graph.nodes if n.op == "call_module"}
    worst = 0.0
    assert caps
    for name, (inp, out) in caps.items():
        q, d = gm.get_submodule(next(n.target for n in gm.graph.nodes if n.name == name)), dmods[name]
        with torch.no_grad():
            got = d(*inp)
            if isinstance(q, QMatmul):
                for aq, da, x in ((q.aq_a, d.act_a, inp[0]), (q.aq_b, d.act_b, inp[1])):
                    if aq is not None:
                        assert torch.equal(da.codes(x), aq.codes(x)), name
            elif bool(q.quant_active) and q.aq is not None:
                assert torch.equal(d.act.codes(inp[0]), q.aq.codes(inp[0])), name
        err = rel(got, out)
        assert err <= tol, (name, type(d).__name__, err)
        worst = max(worst, err)
    return worst


# --- golden ---------------------------------------------------------------------------------------
def test_fold_deploy_golden(golden):
    dg = D.to_deploy(case("tiny", "bidm"))
    golden("fold_deploy_bidm", ir.dump(dg) + D.format_summary(D.deploy_summary(dg)))


# --- agreement with the QAT graph ---------------------------------------------------------------
def run_with_codes(gm, args):
    """Outputs and, per layer in graph order, (inputs, integer codes of its quantized inputs)."""
    seen, hooks = {}, []

    def hook(name):
        def h(m, inp, out):
            if isinstance(m, (QMatmul, D.IntMatmul)):
                acts = (m.aq_a, m.aq_b) if isinstance(m, QMatmul) else (m.act_a, m.act_b)
                pairs = [(x, a) for a, x in zip(acts, inp) if a is not None]
            else:
                act = m.aq if isinstance(m, _Quantized) else m.act
                on = act is not None and bool(getattr(m, "quant_active", True))
                pairs = [(inp[0], act)] if on else []
            if pairs:
                seen[name] = ([x for x, _ in pairs], [a.codes(x) for x, a in pairs])
        return h

    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, (_Quantized,) + D.DEPLOY_LAYERS):
                hooks.append(mod.register_forward_hook(hook(n.name)))
    try:
        with torch.no_grad():
            out = gm(*args)
    finally:
        for h in hooks:
            h.remove()
    order = [n.name for n in gm.graph.nodes if n.name in seen]
    return out, {k: seen[k] for k in order}


def check_float32(gm, dg, args) -> tuple[float, int]:
    """End to end in float32: returns (eps rel err, number of codes that differ).

    The deploy graph computes exact integer accumulators where the QAT graph sums float32
    products, so activations differ by float rounding. A value within that rounding of a code
    boundary (sign threshold, LSQ half step) then flips one code, and an untrained random
    binary net amplifies one flip into many downstream. So: with no flipped code the outputs
    agree to 1e-4; otherwise the *first* layer with a flipped code must have received inputs
    that agree to float rounding (so the flip is a boundary case, not a folding error) and
    flipped only a handful of codes. (The float64 run of the test shows no flips at all.)
    """
    want, cq = run_with_codes(gm, args)
    got, cd = run_with_codes(dg, args)
    assert list(cq) == list(cd) and cq
    err = max(rel(g, w) for g, w in zip(got, want))
    flips = {k: sum(int((a != b).sum()) for a, b in zip(cq[k][1], cd[k][1])) for k in cq}
    total = sum(flips.values())
    if total == 0:
        assert err <= 1e-4
        return err, 0
    first = next(k for k in cq if flips[k])
    for xq, xd in zip(cq[first][0], cd[first][0]):
        assert rel(xd, xq) <= 1e-5, (first, rel(xd, xq))
    assert flips[first] <= max(2, sum(c.numel() for c in cq[first][1]) // 1000), (first, flips[first])
    return err, total


@pytest.mark.parametrize("model", ["tiny", "mnist16"])
@pytest.mark.parametrize("name", list(CASES))
def test_deploy_matches_qat(model, name):
    gm = case(model, name)
    dg = D.to_deploy(gm)
    tbs = bool(ir.graph_meta(gm).get("state_inputs"))
    # float32, through the samplers' calling convention: first step (no state), then with state.
    # With trained weights a value can sit within float rounding of a code boundary: the first
    # step is checked like every float32 run (no flipped code: outputs agree to 1e-4; a flip:
    # only at a boundary, verified), and the state path compares outputs only without flips.
    x, t = example_inputs(gm, batch=2, seed=1)[:2]
    _, flips = check_float32(gm, dg, example_inputs(gm, batch=2, seed=1, state=False))
    qm, dm = BqcModel(gm), BqcModel(dg)
    with torch.no_grad():
        e_q, s_q = qm(x, t)
        e_d, s_d = dm(x, t)
        assert (s_q is None) == (s_d is None) == (not tbs)
        if tbs and flips == 0:
            for a, b in zip(s_d, s_q):
                assert rel(a, b) <= 1e-4
            x2 = example_inputs(gm, batch=2, seed=7)[0]
            e_q2, s_q2 = qm(x2, t - 1, state=s_q)
            e_d2, s_d2 = dm(x2, t - 1, state=s_q)  # same cache into both
            assert rel(e_q2, qm(x2, t - 1)[0]) > 1e-3  # the cache really enters
            _, flips2 = check_float32(gm, dg, [x2, t - 1, *s_q, torch.ones(())])
            if flips2 == 0:
                for a, b in zip(s_d2, s_q2):
                    assert rel(a, b) <= 1e-4
    # float32 on more inputs (random TBS state, flag 1): agreement up to rare code flips
    for seed in (2, 3):
        check_float32(gm, dg, example_inputs(gm, batch=4, seed=seed, state=True))
    # float64 end to end: no flips, only the float32-computed scales differ
    args = [a.double() if a.is_floating_point() else a for a in example_inputs(gm, batch=4, seed=2)]
    with torch.no_grad():
        want, got = as_float64(gm)(*args), as_float64(dg)(*args)
    for w, g in zip(want, got):
        assert rel(g, w) <= 1e-6
    # layer by layer, float32: identical integer codes
    check_layerwise(gm, dg, example_inputs(gm, batch=2, seed=3))


@pytest.mark.parametrize("recipe", OTHER_RECIPES)
def test_other_recipes_layerwise(recipe):
    """Every other recipe folds, and each layer agrees with its QAT layer (codes identical).

    (End to end, random-init W1A1 nets without thresholds hit sign flips of values within
    float rounding of 0 after GroupNorm of constant groups, so only layers are compared.)
    """
    gm = qat("tiny", recipe)
    dg = D.to_deploy(gm)
    check_layerwise(gm, dg, example_inputs(gm, batch=2, seed=3))


LSQ1_RECIPE = """name = "lsq1-test"
extends = "dorefa"
[options.plan_quant]
body = { weight = "dorefa", act = "lsq", a_bits = 1, act_opts = { signed = false } }
"""


@pytest.mark.parametrize("recipe", ["dorefa", "lsq1"])
def test_dorefa_w1a1_folds_to_unsigned_bits(recipe, tmp_path):
    """DoReFa's 1-bit {0, 1} activations on binary-weight layers fold to packed bits
    (``UnsignedBinarize``, input kind ``"bits01"``) for the popcount kernels: the deploy graph
    matches the QAT graph (float32 and float64), the codes are the QAT quantizer's, and the
    reference executor's accumulators equal bqc.packing's popcount reference. ``lsq1``: 1-bit
    unsigned LSQ (levels {0, s}, s learned) folds the same way with its own step."""
    if recipe == "lsq1":
        (tmp_path / "lsq1.toml").write_text(LSQ1_RECIPE)
        recipe = str(tmp_path / "lsq1.toml")
    gm = qat("tiny", recipe)
    learned = recipe != "dorefa"
    dg = D.to_deploy(gm)
    layers = D.deploy_layers(dg)
    binary = [(n, m) for n, m in layers if isinstance(m, (D.BinaryConv2d, D.BinaryLinear))]
    assert {type(m) for _, m in binary} == {D.BinaryConv2d, D.BinaryLinear}
    for _, m in binary:
        assert type(m.act) is D.UnsignedBinarize and m.input_kind == "bits01"
        assert m.act.ch_axis == (1 if isinstance(m, D.BinaryConv2d) else -1)
        assert (float(m.act.step) != 1.0 and float(m.act.step) > 0) if learned else float(m.act.step) == 1.0
        d = m.describe()
        assert (d["w_bits"], d["a_bits"], d["input"]) == (1, 1, "bits01")
    # integer-weight layers (the 8-bit head/tail) keep their integer codes
    assert all(m.input_kind in ("codes", "float") for _, m in layers if isinstance(m, (D.IntConv2d, D.IntLinear)))
    args = example_inputs(gm, batch=2, seed=1)
    with torch.no_grad():
        assert rel(dg(*args)[0], gm(*args)[0]) <= 1e-4
        args64 = [a.double() if a.is_floating_point() else a for a in args]
        assert rel(as_float64(dg)(*args64)[0], as_float64(gm)(*args64)[0]) <= 1e-6
    check_layerwise(gm, dg, example_inputs(gm, batch=2, seed=3))
    caps = capture_inputs(dg, example_inputs(dg, batch=2, seed=4), D.DEPLOY_LAYERS)
    lo = hi = 0
    for n, m in binary:
        x = caps[n.name][0][0]
        a, b = m.accumulate(x, impl="torch"), m.accumulate(x, impl="packing")
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b), n.name
        scale = m.scale(torch.float32)[0]
        assert torch.equal(m.core(x), a[0].float() * (scale.view(-1, 1, 1) if a.dim() == 5 else scale)), n.name
        lo, hi = min(lo, int(a.min())), max(hi, int(a.max()))
    assert lo < 0 < hi  # ±1 weights on {0, 1} inputs


def test_unsigned_binarize_tie_matches_dorefa():
    """At and around x / step == 0.5 (round half to even: code 0) the deploy quantizer's codes,
    values and packed bits equal the QAT DoReFa 1-bit quantizer's."""
    from bqc import packing as P
    from bqc.quant.uniform import DoReFaAct

    aq = DoReFaAct(1).eval()
    half = torch.tensor(0.5)
    vals = torch.stack([half, torch.nextafter(half, torch.tensor(1.0)), torch.nextafter(half, torch.tensor(0.0)),
                        -half, torch.tensor(0.0), torch.tensor(1.0), torch.tensor(2.0), torch.tensor(-3.0)])
    x = vals[torch.randint(0, len(vals), (2, 37, 3, 4), generator=torch.Generator().manual_seed(0))]
    x[0, :3, 0, 0] = vals[:3]
    act = D.UnsignedBinarize(torch.tensor(1.0, dtype=torch.float64), ch_axis=1)
    codes = aq.codes(x)
    assert codes[0, :3, 0, 0].tolist() == [0, 1, 0]
    assert torch.equal(act.codes(x), codes) and torch.equal(act(x), aq(x))
    words = D.words_numpy(act.quantize(x))
    assert words.shape == (2, 3, 4, 2)
    assert (words == P.pack_mask(codes.permute(0, 2, 3, 1).numpy() == 1)).all()
    dense = D.UnsignedBinarize(torch.tensor(1.0, dtype=torch.float64), ch_axis=-1)
    assert (D.words_numpy(dense.quantize(x)) == P.pack_mask(codes.numpy() == 1)).all()


def test_quant_inactive_layer_folds_to_float():
    gm = ir.fresh_copy(case("tiny", "baseline"))
    gm.quant.conv2d_2.set_active(False)
    dg = D.to_deploy(gm)
    assert type(dg.deploy.conv2d_2) is D.FloatConv2d and dg.deploy.conv2d_2.act is None
    args = example_inputs(gm, batch=2, seed=1)
    with torch.no_grad():
        assert rel(dg(*args)[0], gm(*args)[0]) <= 1e-4


# --- graph form -------------------------------------------------------------------------------
def test_deploy_graph_form():
    gm = case("tiny", "bidm")
    before = ir.dump(gm)
    dg = D.to_deploy(gm)
    assert ir.dump(gm) == before  # to_deploy works on a copy
    assert D.is_deployed(dg) and not D.is_deployed(gm)
    assert [n.name for n in dg.graph.nodes] == [n.name for n in gm.graph.nodes]
    for k in ("inputs", "state_inputs", "state_outputs", "state_flag", "input_shape"):
        assert ir.graph_meta(dg)[k] == ir.graph_meta(gm)[k]
    assert not any(isinstance(m, _Quantized) for m in dg.modules())
    assert not hasattr(dg, "quant")
    layers = D.deploy_layers(dg)
    assert layers and all("deploy" in ir.info(n) for n, _ in layers)
    kinds = {type(m).__name__ for _, m in layers}
    assert kinds == {"BinaryConv2d", "BinaryLinear", "IntConv2d"}
    for n, m in layers:
        if isinstance(m, D.BinaryConv2d):
            assert m.input_kind == "bits" and m.act.tau is not None and m.kmap is not None
            assert m.shortcut is not None and m.bases == 1
    assert D.to_deploy(dg) is not dg and D.is_deployed(D.to_deploy(dg))  # idempotent


def test_uncalibrated_graph_is_an_error():
    gm = qat("tiny", "baseline", calibrate=False)
    with pytest.raises(BqcError, match="calibrated"):
        D.to_deploy(gm)


def test_packed_weights_and_scales_come_from_the_binarizer():
    for name, bases in (("binarydm-s1", 2), ("binarydm-s2", 1), ("bidm", 1)):
        gm = case("tiny", name)
        dg = D.to_deploy(gm)
        seen_bases = set()
        for n, m in D.deploy_layers(dg):
            if not isinstance(m, (D.BinaryConv2d, D.BinaryLinear)):
                continue
            q = gm.get_submodule(f"quant.{n.target.split('.', 1)[1]}")
            form = q.deploy_form()["weight"]
            signs = m.signs()
            assert m.w_packed.dtype == torch.uint32 and signs.shape[0] == len(form["signs"]) == m.bases
            for b in range(m.bases):
                assert torch.equal(signs[b], form["signs"][b])
                assert torch.equal(m.w_scale[b], form["scales"][b])
            seen_bases.add(m.bases)
        assert max(seen_bases) == bases


def test_reference_executor_agrees_with_packing_references():
    """The custom ops' kernels equal bqc.packing's popcount / integer references exactly."""
    for name in ("bidm", "baseline", "binarydm-s1"):
        dg = D.to_deploy(case("tiny", name))
        caps = capture_inputs(dg, example_inputs(dg, batch=2, seed=4), D.DEPLOY_LAYERS)
        checked = set()
        for n, m in D.deploy_layers(dg):
            if isinstance(m, D.IntMatmul) or m.act is None or n.name not in caps:
                continue
            x = caps[n.name][0][0]
            a, b = m.accumulate(x, impl="torch"), m.accumulate(x, impl="packing")
            assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b), n.name
            # the float output is sum_b float(acc_b) * scale_b, bit for bit
            scale = m.scale(torch.float32)
            scale = scale.unsqueeze(0) if scale.dim() == 1 else scale  # IntConv2d: [OC]
            y = sum(a[i].float() * (scale[i].view(-1, 1, 1) if a.dim() == 5 else scale[i])
                    for i in range(a.shape[0]))
            assert torch.equal(m.core(x), y), n.name
            checked.add((type(m).__name__, m.input_kind, m.bases))
        assert checked
    kinds = {(k, i) for k, i, _ in checked}
    assert ("IntConv2d", "codes") in kinds


def test_deploy_summary_sizes():
    dg = D.to_deploy(case("tiny", "binarydm-s1"))
    s = D.deploy_summary(dg)
    assert s["total_bytes"] == s["layer_bytes"] + s["float_bytes"]
    two = 0
    for r, (n, m) in zip(s["layers"], D.deploy_layers(dg)):
        assert r["name"] == n.name
        if isinstance(m, D.BinaryConv2d):
            oc, c, (kh, kw) = m.out_channels, m.in_channels, m.kernel_size
            assert r["weight_bytes"] == m.bases * oc * kh * kw * -(-c // 32) * 4
            assert r["weights"] == oc * c * kh * kw
            two += m.bases == 2
        elif isinstance(m, D.IntConv2d):
            assert r["weight_bytes"] == m.w_codes.numel() and r["w_bits"] == 8
    assert two > 0  # EBB stage 1 head/tail layers keep two bases
    s2 = D.deploy_summary(D.to_deploy(case("tiny", "binarydm-s2")))
    assert s2["layer_bytes"] < s["layer_bytes"]
    assert "BinaryConv2d" in D.format_summary(s)


def test_deploy_size_close_to_cost_report():
    """The stored size of the inference form is within 10% of the paper-style accounting."""
    from bqc import report

    for name in ("baseline", "binarydm-s2", "bidm"):
        gm = case("tiny", name)
        stored = D.deploy_summary(D.to_deploy(gm))["total_bytes"]
        paper = report.cost_report(gm)["size_mb"] * 2**20
        assert abs(stored - paper) <= 0.1 * paper, (name, stored, paper)



def test_cost_report_reads_the_ebb_stage_from_the_buffers():
    """A binarydm graph in stage 1 is counted at one basis (the papers' count), and the report says how many
    layers hold two bases now and what they add: exactly what folding it now stores on top of stage 2."""
    from bqc import report

    s1, s2 = case("tiny", "binarydm-s1"), case("tiny", "binarydm-s2")
    r1, r2 = report.cost_report(s1), report.cost_report(s2)
    ebb = [r for r in r1["layers"] if "ebb_stage" in r]
    assert ebb and all(r["ebb_stage"] == 1 for r in ebb) and r1["ebb_stage1"]["layers"] == len(ebb)
    assert r2["ebb_stage1"]["layers"] == 0 and all(r.get("ebb_stage") == 2 for r in r2["layers"] if "ebb_stage" in r)
    assert r1["size_mb"] == pytest.approx(r2["size_mb"])  # one basis either way
    d1, d2 = (report.cost_report(D.to_deploy(g)) for g in (s1, s2))
    assert d1["size_mb"] - d2["size_mb"] == pytest.approx(r1["ebb_stage1"]["extra_size_mb"], rel=1e-9)

def test_deploy_state_dict_roundtrips_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    gm = case("tiny", "bidm")
    dg = D.to_deploy(gm)
    save_file(artifact.state_dict_for_save(dg), str(tmp_path / "deploy.safetensors"))
    sd = load_file(str(tmp_path / "deploy.safetensors"))
    assert any(v.dtype == torch.uint32 for v in sd.values())
    other = D.to_deploy(gm)
    for m in other.modules():  # scramble, then restore from the file
        for k, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[k] = torch.zeros_like(b)
    other.load_state_dict(sd, strict=True)
    args = example_inputs(dg, batch=2, seed=1)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(dg(*args), other(*args)))


def test_export_program_keeps_bqc_ops():
    """torch.export of the deploy graph (the TVM hand-off): one node per integer core."""
    dg = D.to_deploy(case("tiny", "bidm"))
    ep = D.export_program(dg)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    nbin = sum(isinstance(m, (D.BinaryConv2d, D.BinaryLinear)) for _, m in D.deploy_layers(dg))
    assert targets.count("bqc.binary_conv2d.default") + targets.count("bqc.binary_dense.default") == nbin
    assert targets.count("bqc.sign_pack.default") == nbin
    args = example_inputs(dg, batch=3, seed=5)  # another batch size: the batch is dynamic
    with torch.no_grad():
        for a, b in zip(ep.module()(*args), dg(*args)):
            assert torch.equal(a, b)


def test_reference_kernels_pick_an_exact_float_dtype():
    """The reference kernels compute integer dot products in float32 where every partial sum
    stays below 2^24 (exact in any order), in float64 beyond; both equal int64 arithmetic."""
    from bqc.deploy import ops

    bits = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    assert ops._exact_dtype(bits, "bits", 9 * 4096, 1) is torch.float32
    assert ops._exact_dtype(bits, "bits", 2 ** 24, 1) is torch.float64
    assert ops._exact_dtype(torch.ones(3), "float", 10, 1) is None
    g = torch.Generator().manual_seed(0)
    for k in (64, 4096):  # 127 * 127 * k: below 2^24, then above
        a = torch.randint(-127, 128, (3, k), generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (5, k), generator=g, dtype=torch.int8)
        w[0, 0] = -128  # the int8 corner: |-128| must not overflow in the bound
        got = ops.int_dense(a, w, torch.ones(5), "codes")
        want = (a.long() @ w.long().t()).double()
        assert torch.equal(got.double(), want.to(torch.float32).double())
        assert ops._exact_dtype(a, "codes", k, 128) is (torch.float32 if k == 64 else torch.float64)
