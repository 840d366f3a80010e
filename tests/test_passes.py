"""Quantization passes and recipes: golden graphs, every recipe on every zoo model, bad input."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from bqc import frontend, ir, report, transform as tf
from bqc.errors import BqcError
from bqc.graph import BqcModel
from bqc.pipeline import PassContext, PassManager, get_pass, load_recipe, recipe_names


def _run(src, recipe, **kw):
    return tf.transform(src, recipe, **kw)


def _forward_backward(gm, shape, steps=2):
    model = BqcModel(gm).train()
    x = torch.randn(2, *shape)
    t = torch.tensor([3, 700])
    eps, state = model(x, t)
    loss = eps.square().mean()
    for _ in range(steps - 1):  # a second sampling step consumes the TBS state
        eps, state = model(x, t, state=state)
        loss = loss + eps.square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    trainable = {n: p for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable
    # the TBS blend weights act from the second sampling step on (the first has no cache yet)
    no_grad = [n for n, p in trainable.items() if p.grad is None and (steps > 1 or not n.startswith("tbs."))]
    assert not no_grad, f"trainable parameters the loss does not reach: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    return eps, state


# golden graphs ------------------------------------------------------------------------------
def _tiny_recipe(name):
    """Recipe ``name`` for the tiny reference UNet: it has 9 blocks, so head/tail = 2 blocks
    each (the default 6 would leave no body), as the foundation goldens of tests/test_ir.py."""
    recipe = load_recipe(name)
    recipe.passes[0][1]["head_tail_blocks"] = 2
    return recipe


#: passes whose graph on the tiny UNet has a foundation golden of its own (tests/test_ir.py,
#: the same pass and options): a recipe's dump after them must equal it
FOUNDATION_GOLDENS = ("annotate", "conv1d_to_conv2d")


@pytest.mark.parametrize("recipe", ["baseline", "binarydm", "bidm"])
def test_golden_recipe_graphs(tiny_source, golden, tmp_path, recipe):
    """The graph after each pass of the recipe (--dump-dir), kept only where the pass changed
    it: ``RECIPE/NN_pass.txt`` (or the foundation golden it must equal), and the index
    ``RECIPE/passes.txt`` saying which passes changed the graph, so a pass that starts or stops
    changing it shows in review."""
    _run(tiny_source, _tiny_recipe(recipe), dump_dir=tmp_path)
    before = (tmp_path / "00_input.txt").read_text()
    index = []
    for path in sorted(p for p in tmp_path.iterdir() if p.name != "00_input.txt"):
        text, pass_name = path.read_text(), path.stem[3:]
        if text == before:
            index.append(f"{path.stem} unchanged")
            continue
        name = pass_name if pass_name in FOUNDATION_GOLDENS else f"{recipe}/{path.stem}"
        index.append(f"{path.stem} changed" + (f" (= {name}.txt)" if name == pass_name else ""))
        golden(name, text)
        before = text
    golden(f"{recipe}/passes", "\n".join(index) + "\n")


def _binarizers_by_role(dump: str) -> dict[str, set[str]]:
    """{role: weight quantizer kinds} of the quantized layers in an ``ir.dump``."""
    out: dict[str, set[str]] = {}
    for line in dump.splitlines():
        m = re.search(r":Q(?:Conv2d|Linear)\(.*# \w+ role=(\S+) .*\| wq=(\w+)\(", line)
        if m:
            out.setdefault(m[1], set()).add(m[2])
    return out


def test_binarydm_dump_names_ebb_on_head_tail_and_sign_scale_on_body(tiny_source):
    """BinaryDM's EBB sits on the first/last blocks and the plain binarizer on the body (the
    recipe's plan_quant.head_tail / body): the dump, hence the golden, must say so."""
    wq = _binarizers_by_role(ir.dump(_run(tiny_source, _tiny_recipe("binarydm")).gm))
    assert wq["head"] == wq["tail"] == {"ebb"}
    assert wq["body"] == {"sign_scale"}
    assert wq["input"] == wq["output"] == {"uniform"}


def test_plan_and_insert_on_reference_unet(tiny_source):
    res = _run(tiny_source, _tiny_recipe("binarydm"))
    by_module = {r["module"]: r for r in res.layers}
    assert (by_module["input_blocks.0.0"]["w_bits"], by_module["input_blocks.0.0"]["a_bits"]) == (8, 8)
    assert (by_module["out.2"]["w_bits"], by_module["out.2"]["a_bits"]) == (8, 8)
    assert by_module["time_embed.0"]["w_bits"] == 32
    mods = dict(res.gm.named_modules())
    from bqc.quant.binary import EBB, SignScale

    head = mods["quant." + by_module["input_blocks.1.0.in_layers.2"]["name"]]
    assert isinstance(head.wq, EBB)  # EBB only on the first/last N blocks
    body = mods["quant." + by_module["middle_block.0.in_layers.2"]["name"]]
    assert type(body.wq) is SignScale
    # attention matmuls get LSQ operands at the activation bits
    matmuls = [r for r in res.layers if r["kind"] == "matmul"]
    assert matmuls and all(r["a_bits"] == 4 for r in matmuls)



def test_insert_explains_and_planned_fact_is_checked(tiny_source):
    """insert_quantizers explains every planned layer (the module it built, or why it kept the float op), and the
    'planned' fact has a checker: a layer whose plan disagrees with its bits breaks verify."""
    res = _run(tiny_source, "binarydm")
    ins = {e.node: e for e in res.ctx.explanations if e.pass_name == "insert_quantizers"}
    planned = [r for r in res.layers if r["kind"] in ir.QUANTIZABLE_KINDS]
    assert planned and len(ins) == len(planned)
    assert {e.action for e in ins.values()} >= {"-> QConv2d", "-> QLinear", "kept float op"}
    pm = PassManager([])
    pm.verify(res.gm)  # consistent as transformed
    node = next(n for n in res.gm.graph.nodes if ir.info(n).get("kind") == "conv" and ir.info(n)["w_bits"] == 1)
    ir.info(node)["plan"] = {**ir.info(node)["plan"], "weight": "fp"}
    with pytest.raises(AssertionError, match="invariant 'planned' broken"):
        pm.verify(res.gm)

def test_fp_recipe_is_bit_identical(tiny_source, tiny_unet):
    gm = _run(tiny_source, "fp").gm
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    assert torch.equal(BqcModel(gm)(x, t)[0], tiny_unet(x, t))


def test_tbs_with_zero_blend_equals_untransformed(tiny_source):
    bidm = _run(tiny_source, "bidm").gm
    no_tbs = load_recipe("bidm")
    no_tbs.passes = [(n, o) for n, o in no_tbs.passes if n != "tbs_edges"]
    plain = _run(tiny_source, no_tbs).gm
    plain.load_state_dict({k: v for k, v in bidm.state_dict().items() if not k.startswith("tbs.")})
    meta = ir.graph_meta(bidm)
    assert len(meta["state_inputs"]) == 4 and meta["state_flag"] == "tbs_flag"
    model, ref = BqcModel(bidm).eval(), BqcModel(plain).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([40, 41])
    _, state = model(x, t)
    fake_state = [torch.randn_like(s) for s in state]
    with torch.no_grad():
        for blend in bidm.tbs.children():
            blend.alpha.zero_()
    assert torch.equal(model(x, t, state=fake_state)[0], ref(x, t)[0])
    with torch.no_grad():
        for blend in bidm.tbs.children():
            blend.alpha.fill_(0.3)
    assert not torch.equal(model(x, t, state=fake_state)[0], ref(x, t)[0])
    # the first step (no state) is the un-blended network whatever alpha is
    assert torch.equal(model(x, t)[0], ref(x, t)[0])


def test_state_dict_round_trip_every_recipe(tiny_source, tmp_path):
    """Every recipe: transform, perturb all state, write an artifact, load it: identical."""
    from bqc import artifact

    src = copy.copy(tiny_source)
    src.exported = frontend.capture(tiny_source)  # capture once
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 600])
    for name in recipe_names():
        res = _run(src, name)
        model = BqcModel(res.gm).train()
        model(x, t)  # first batch initialises LSQ steps etc.
        with torch.no_grad():
            for p in res.gm.parameters():
                p.add_(0.01 * torch.randn_like(p))
        out = tf.save(res, tmp_path / name)
        art = artifact.load_artifact(out)
        sd1, sd2 = res.gm.state_dict(), art.gm.state_dict()
        assert sd1.keys() == sd2.keys()
        assert all(torch.equal(sd1[k], sd2[k]) for k in sd1), name
        m1, m2 = BqcModel(res.gm).eval(), art.model.eval()
        assert torch.equal(m1(x, t)[0], m2(x, t)[0]), name


def test_ebb_stage_switch_pass(tiny_source):
    from bqc.quant.binary import EBB

    res = _run(tiny_source, "binarydm")
    ebbs = [m for m in res.gm.modules() if isinstance(m, EBB)]
    assert ebbs and not any(bool(m.stage2) for m in ebbs)
    ctx = PassContext()
    get_pass("ebb_stage")().run(res.gm, ctx)
    assert all(bool(m.stage2) for m in ebbs)
    w = res.gm.get_submodule("quant." + next(r["name"] for r in res.layers if r["role"] == "head" and r["kind"] == "conv"))
    per_channel = w.qweight().detach().flatten(1)
    assert all(len(torch.unique(row)) <= 2 for row in per_channel)


def test_distill_taps_cover_every_block(tiny_source):
    res = _run(tiny_source, "bidm")
    meta = ir.graph_meta(res.gm)
    assert [tp["block"] for tp in meta["taps"]] == [b["id"] for b in meta["blocks"]]
    assert meta["distill"] == {"loss": "spd", "patches": 4, "weight": 1e-2}
    view = ir.with_outputs(res.gm, [tp["node"] for tp in meta["taps"]])
    phs = [n.name for n in view.graph.nodes if n.op == "placeholder"]
    b = 2
    args = [torch.randn(b, 1, 8, 8), torch.tensor([5, 6])] + [torch.zeros(b, *s["shape"]) for s in meta["state_inputs"]] + [torch.tensor(0.0)]
    assert len(args) == len(phs)
    outs = view(*args)
    assert len(outs) == 1 + len(meta["state_outputs"]) + len(meta["taps"])
    # the trainer's cache pass: the state outputs alone, without what only eps needs
    states = ir.state_view(res.gm)
    got, full = states(*args), res.gm(*args)
    assert len(got) == len(meta["state_outputs"]) and all(torch.equal(a, b) for a, b in zip(got, full[1:]))
    assert len(states.graph.nodes) < len(res.gm.graph.nodes)
    eps = next(n for n in res.gm.graph.nodes if n.op == "output").args[0][0]  # the output conv's node
    assert eps.name not in {n.name for n in states.graph.nodes}


def test_mixed_precision_overrides(tiny_source):
    res = _run(tiny_source, "bidm", keep_fp=["middle_block.*"], bits=["output_blocks.3.*=8/8"])
    kept = [r for r in res.layers if r["module"].startswith("middle_block.") and r["kind"] != "matmul"]
    eight = [r for r in res.layers if r["module"].startswith("output_blocks.3.") and r["kind"] == "conv"]
    assert kept and all((r["w_bits"], r["a_bits"]) == (32, 32) for r in kept), kept
    assert eight and all((r["w_bits"], r["a_bits"]) == (8, 8) for r in eight), eight
    others = [r for r in res.layers if r not in kept + eight and r["role"] in ("head", "body", "tail")
              and r["kind"] == "conv"]
    assert others and all((r["w_bits"], r["a_bits"]) == (1, 1) for r in others)  # the rest stays W1A1
    _forward_backward(res.gm, (1, 8, 8))


def test_keep_fp_wins_over_bits(tiny_source):
    """An overlapping --bits glob must not silently quantize what --keep-fp keeps float (the
    residual projections under a decoder-wide =1/4 glob)."""
    res = _run(tiny_source, "bidm", keep_fp=["*skip_connection"], bits=["output_blocks.*=1/4"])
    dec = [r for r in res.layers if r["module"].startswith("output_blocks.") and r["kind"] == "conv"]
    skips = [r for r in dec if r["module"].endswith("skip_connection")]
    convs = [r for r in dec if r not in skips and r["role"] in ("head", "body", "tail")]
    assert skips and all((r["w_bits"], r["a_bits"]) == (32, 32) for r in skips), skips
    assert convs and all((r["w_bits"], r["a_bits"]) == (1, 4) for r in convs), convs
    mix = dict(kv.split() for kv in report.precision_mix(res.layers).split(", "))
    assert int(mix["W1A4"]) == sum((r["w_bits"], r["a_bits"]) == (1, 4) for r in res.layers) >= len(convs)
    assert "W32A32" not in mix and int(mix["W1A1"]) > 0  # float layers are not counted
    assert not any("skip_connection" in w for w in res.ctx.warnings)  # --keep-fp protects them: not warned about
    _forward_backward(res.gm, (1, 8, 8))


def test_bits_reaching_recipe_float_layers_warns(tiny_source):
    """A --bits glob over BiDM's decoder also binarizes the residual projections the recipe keeps
    float: that happens (the user asked for it), but not silently."""
    plain = _run(tiny_source, "bidm")
    kept = {r["name"] for r in plain.layers if r["module"].startswith("output_blocks.") and r["w_bits"] == 32}
    assert any(r["module"].endswith("skip_connection") for r in plain.layers if r["name"] in kept)
    assert plain.ctx.warnings == []
    res = _run(tiny_source, "bidm", bits=["output_blocks.*=1/4"])
    assert all(r["w_bits"] == 1 for r in res.layers if r["name"] in kept)
    assert len(res.ctx.warnings) == 1, res.ctx.warnings
    w = res.ctx.warnings[0]
    assert f"{len(kept)} layer(s)" in w and "skip_connection" in w and "--keep-fp" in w
    # a glob that only reaches layers the recipe quantizes anyway says nothing
    assert _run(tiny_source, "bidm", bits=["output_blocks.*.in_layers*=1/4"]).ctx.warnings == []


def test_section_and_role_selectors(tiny_source):
    """``@decoder`` / ``@res-proj`` select what the openaimodel globs select, by the annotation
    (so they mean the same on diffusers' ``up_blocks``); an unknown selector is an error."""
    by_glob = _run(tiny_source, "bidm", bits=["output_blocks.*=1/4"], keep_fp=["*skip_connection"])
    by_sel = _run(tiny_source, "bidm", bits=["@decoder=1/4"], keep_fp=["@res-proj"])
    key = lambda res: [(r["name"], r["w_bits"], r["a_bits"]) for r in res.layers]  # noqa: E731
    assert key(by_sel) == key(by_glob)
    assert any(r["a_bits"] == 4 for r in by_sel.layers)
    enc, plain = _run(tiny_source, "bidm", bits=["@encoder=8/8"]), _run(tiny_source, "bidm")
    changed = {a["name"] for a, b in zip(enc.layers, plain.layers) if (a["w_bits"], a["a_bits"]) != (b["w_bits"], b["a_bits"])}
    assert changed and all(r["module"].startswith("input_blocks.") for r in enc.layers if r["name"] in changed)
    with pytest.raises(BqcError, match="unknown selector.*did you mean '@decoder'"):
        _run(tiny_source, "bidm", bits=["@decodr=1/4"])


def test_wbits_abits_override(tiny_source):
    res = _run(tiny_source, "baseline", abits=32)  # W1A32
    inner = [r for r in res.layers if r["role"] in ("head", "body", "tail") and r["kind"] == "conv"]
    assert inner and all((r["w_bits"], r["a_bits"]) == (1, 32) for r in inner)
    res = _run(tiny_source, "baseline", abits=8)
    inner = [r for r in res.layers if r["role"] in ("head", "body", "tail") and r["kind"] == "conv"]
    assert inner and all((r["w_bits"], r["a_bits"]) == (1, 8) for r in inner)


# every recipe on every model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo_sources():
    """The three zoo models (ldm4-bedrooms and ddim-cifar10 captured at a smaller image size:
    the graph has every layer of the real model, at a fraction of the compute). LDM-4 is also
    built at 1/7 of its width (model_channels 32 instead of 224; every block, level, attention
    and skip as the real one): its 274M float parameters, cloned per recipe with gradients,
    were most of the suite's 23 GB peak. Its real size is checked by test_models/test_cli."""
    from bqc.models import zoo

    out = {}
    for name, size in (("mnist16", 16), ("ddim-cifar10", 8), ("ldm4-bedrooms", 8)):
        if name == "ldm4-bedrooms":
            cfg = zoo.model_config(name)
            cfg = {**cfg, "params": {**cfg["params"], "model_channels": 32, "num_head_channels": 8}}
            src = frontend._from_module(zoo.build_model(cfg), "zoo", "ldm4-bedrooms at 1/7 width", name=name,
                                        config=cfg, pretrained=False)
        else:
            src = frontend.load_source(name)
        src.image_size = size
        src.exported = frontend.capture(src)  # capture once per module; recipes replay on it
        out[name] = src
    return out


@pytest.fixture(scope="module")
def diffusers_source():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    m = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval()
    src = frontend._from_module(m, "diffusers", "tiny diffusers UNet2DModel", call="diffusers")
    src.exported = frontend.capture(src)
    return src


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_on_mnist16_and_diffusers(zoo_sources, diffusers_source, recipe):
    for src in (zoo_sources["mnist16"], diffusers_source):
        res = _run(src, recipe)
        nq = sum(r["w_bits"] < 32 or r["a_bits"] < 32 for r in res.layers)
        assert (nq == 0) == (recipe == "fp"), (src.description, nq)
        _forward_backward(res.gm, (src.in_channels, src.image_size, src.image_size))


def test_decoder_selector_on_diffusers(diffusers_source):
    """``@decoder`` is diffusers' ``up_blocks`` (the same selector as openaimodel's output_blocks)."""
    res = _run(diffusers_source, "bidm", bits=["@decoder=1/4"], keep_fp=["@res-proj"])
    a4 = [r for r in res.layers if (r["w_bits"], r["a_bits"]) == (1, 4)]
    assert a4 and all(r["module"].startswith("up_blocks.") for r in a4)
    assert not any(r["role"] == "res-proj" and r["w_bits"] < 32 for r in res.layers)
    _forward_backward(res.gm, (diffusers_source.in_channels, diffusers_source.image_size, diffusers_source.image_size))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ddim-cifar10", "ldm4-bedrooms"])
def test_every_recipe_on_large_zoo_models(zoo_sources, model):
    src = zoo_sources[model]
    for recipe in recipe_names():
        res = _run(src, recipe)
        _forward_backward(res.gm, (src.in_channels, src.image_size, src.image_size), steps=1)
        del res


@pytest.mark.parametrize("model,n_blocks", [("mnist16", 19), ("ddim-cifar10", 25)])
def test_roles_by_layer_name(zoo_sources, model, n_blocks):
    src = zoo_sources[model]
    gm = ir.from_exported(frontend.capture(src))
    ir.annotate(gm, head_tail_blocks=6)
    by_module = {r["module"]: r for r in ir.layers(gm)}
    blocks = ir.graph_meta(gm)["blocks"]
    assert len(blocks) == n_blocks
    assert by_module["input_blocks.0.0"]["role"] == "input"
    assert by_module["out.2"]["role"] == "output"
    assert by_module["time_embed.0"]["role"] == by_module["time_embed.2"]["role"] == "time-embed"
    assert by_module["input_blocks.1.0.emb_layers.1"]["role"] == "emb-proj"
    assert by_module["input_blocks.5.0.in_layers.2"]["role"] == "head"  # 6th block (index 5)
    assert by_module["input_blocks.6.0.op"]["role"] == "body"
    last = blocks[-1]["name"]
    assert by_module[f"{last}.0.in_layers.2"]["role"] == "tail"
    assert by_module[f"{blocks[-7]['name']}.0.in_layers.2"]["role"] == "body"


def test_roles_ldm4_bedrooms(zoo_sources):
    gm = ir.from_exported(frontend.capture(zoo_sources["ldm4-bedrooms"]))
    ir.annotate(gm, head_tail_blocks=6)
    by_module = {r["module"]: r for r in ir.layers(gm)}
    assert len(ir.graph_meta(gm)["blocks"]) == 25
    assert by_module["input_blocks.0.0"]["role"] == "input"
    assert by_module["input_blocks.5.0.in_layers.2"]["role"] == "head"
    assert by_module["input_blocks.7.0.in_layers.2"]["role"] == "body"
    assert by_module["output_blocks.6.0.in_layers.2"]["role"] == "tail"  # last 6 = output_blocks 6..11
    assert by_module["output_blocks.5.0.in_layers.2"]["role"] == "body"
    assert by_module["out.2"]["role"] == "output"
    assert by_module["time_embed.2"]["role"] == "time-embed"


# bad input ----------------------------------------------------------------------------------
def test_unknown_recipe_lists_valid(tiny_source):
    with pytest.raises(BqcError, match="valid recipes: .*bidm.*binarydm"):
        _run(tiny_source, "bidn")


def test_unsupported_bits(tiny_source):
    with pytest.raises(BqcError, match="unsupported abits 5.*|supported"):
        _run(tiny_source, "baseline", abits=5)
    with pytest.raises(BqcError, match="supported: 1"):
        _run(tiny_source, "bidm", wbits=2)  # BiDM's binarizer is 1-bit only
    from bqc.passes.mixed_precision import parse_bits

    assert parse_bits("out*=8/4") == ("out*", 8, 4)
    for bad in ("out*=0/0", "out*=99/8", "out*=8/5"):  # 0/0 was taken as W1A32
        with pytest.raises(BqcError, match="unsupported .* bits"):
            parse_bits(bad)


def test_recipe_typo_key_named(tmp_path, tiny_source):
    r = tmp_path / "r.toml"
    r.write_text('extends = "baseline"\n[options.plan_quant]\nbody = { wieght = "ebb" }\n')
    with pytest.raises(BqcError, match="'wieght'"):
        _run(tiny_source, str(r))


def test_keep_fp_matching_nothing(tiny_source):
    with pytest.raises(BqcError, match="matches no layer"):
        _run(tiny_source, "bidm", keep_fp=["no_such_layer*"])


def test_model_without_convs():
    class MLP(torch.nn.Module):
        in_channels, image_size = 1, 4

        def forward(self, x, t):
            return x * 2

    src = frontend._from_module(MLP(), "pickle", "no-conv toy")
    with pytest.raises(BqcError, match="no conv"):
        _run(src, "baseline")


# output_skip ---------------------------------------------------------------------------------
def test_output_skip_golden_and_formula(tiny_source, golden):
    """bidm-skip = bidm + output_skip: the graph's eps is ``sqrt(1-abar_t) x + sqrt(abar_t) F``
    with F the bidm graph's output (same weights), the tables are the schedule's, and the FP
    tables are counted as the pass's parameters."""
    from bqc.diffusion.schedule import NoiseSchedule

    plain, skip = _run(tiny_source, "bidm").gm, _run(tiny_source, "bidm-skip").gm
    golden("output_skip", ir.dump(skip))
    skip.load_state_dict(plain.state_dict(), strict=False)
    abar = torch.as_tensor(NoiseSchedule().alphas_cumprod, dtype=torch.float64)
    c_in, c_out = (1 - abar).sqrt().float(), abar.sqrt().float()
    assert torch.equal(skip.output_skip.c_in, c_in) and torch.equal(skip.output_skip.c_out, c_out)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    with torch.no_grad():
        f, _ = BqcModel(plain)(x, t)
        eps, _ = BqcModel(skip)(x, t)
    assert torch.allclose(eps, c_in[t].view(-1, 1, 1, 1) * x + c_out[t].view(-1, 1, 1, 1) * f, atol=1e-5)
    node = next(n for n in skip.graph.nodes if n.name == "output_skip")
    assert ir.info(node)["kind"] == "output_skip" and ir.info(node)["params"] == 2000
    assert list(skip.graph.output_node().args[0])[0] is node


def test_output_skip_refuses_other_predictions_and_a_second_run(tiny_source):
    with pytest.raises(BqcError, match="eps-prediction"):
        _run(tiny_source, "bidm-skip", prediction="v")
    gm = _run(tiny_source, "bidm-skip").gm
    ctx = PassContext()
    with pytest.raises(BqcError, match="diffusion schedule"):
        get_pass("output_skip")().run(gm, ctx)
    ctx.schedule = tf.frontend.diffusion_of(tiny_source)[0]
    with pytest.raises(BqcError, match="twice"):
        get_pass("output_skip")().run(gm, ctx)
