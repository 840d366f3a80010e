"""Text-conditioned UNets (issue 16, parts 1-2): capture with the text embedding as a graph input,
transformer-block analysis, recipes, report and artifacts, on tiny random-weight configs of both
families (diffusers UNet2DConditionModel; LDM / SD-1.x UNetModel with a SpatialTransformer)."""
from __future__ import annotations

import json

import pytest
import torch

from bqc import artifact, frontend, ir
from bqc import transform as tf
from bqc.errors import BqcError
from bqc.models.unet import UNetModel
from bqc.report import cost_report

CTX_DIM = 16
#: a tiny LDM text UNet: every structural feature of SD-1.x (spatial transformers at two levels,
#: in the encoder, middle and decoder; channel changes; learned resampling) at 32/64 channels
TINY_LDM = dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=2, use_spatial_transformer=True,
                context_dim=CTX_DIM)
TINY_DIFFUSERS = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CTX_DIM,
                      attention_head_dim=8, norm_num_groups=8)
#: SD-1.5's UNet as LDM's v1-inference.yaml gives it (and diffusers' unet/config.json)
SD15_LDM = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
SD15_PARAMS = 859_520_964
RECIPES = ["baseline", "binarydm", "binarydm-w1a32", "binarydm-lmb", "bidm"]


def _randomise_zero_inits(m: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised output convs (proj_out, out.2, out_layers.3) get weights, so every path
    contributes to the output the capture is compared on."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


def _ldm_model():
    torch.manual_seed(0)
    return _randomise_zero_inits(UNetModel(**TINY_LDM).eval())


def _diffusers_model():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return _randomise_zero_inits(diffusers.UNet2DConditionModel(**TINY_DIFFUSERS).eval())


_CACHE: dict = {}


def _source(family: str):
    """The tiny model of ``family`` and its source, captured once per module (recipes replay on it)."""
    if family not in _CACHE:
        if family == "ldm":
            m = _ldm_model()
            src = frontend._from_module(m, "zoo", "tiny LDM text UNet", config={"arch": "openai-unet", "params": TINY_LDM})
            eager = lambda x, t, c: m(x, t, context=c)  # noqa: E731
        else:
            m = _diffusers_model()
            src = frontend._from_module(m, "diffusers", "tiny diffusers UNet2DConditionModel", call="diffusers")
            eager = lambda x, t, c: m(x, t, encoder_hidden_states=c).sample  # noqa: E731
        frontend.set_context_len(src, 5)  # a short prompt keeps the test fast; the default is 77
        src.exported = frontend.capture(src)
        _CACHE[family] = (m, src, eager)
    return _CACHE[family]


def _inputs(b: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g),
            torch.randn(b, 5, CTX_DIM, generator=g))


def _call(gm, x, t, c):
    """One step of a transformed graph: (x, t, context) plus, for BiDM, the first step's TBS state."""
    meta = ir.graph_meta(gm)
    state = [torch.zeros(x.shape[0], *s["shape"]) for s in meta.get("state_inputs", [])]
    flag = [torch.zeros(())] if state else []
    return gm(x, t, c, *state, *flag)[0]


# capture ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["ldm", "diffusers"])
def test_capture_matches_eager(family):
    m, src, eager = _source(family)
    gm = ir.from_exported(src.exported)
    meta = ir.graph_meta(gm)
    assert meta["inputs"] == ["x", "t", "context"] and meta["context"] == [5, CTX_DIM]
    assert not meta["conditional"]  # no class labels
    for b in (1, 3):  # dynamic batch
        x, t, c = _inputs(b)
        with torch.no_grad():
            want = eager(x, t, c)
            got = gm(x, t, c)[0]
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5
    # the text embedding matters: another prompt gives another prediction
    with torch.no_grad():
        assert (gm(x, t, c)[0] - gm(x, t, torch.randn_like(c))[0]).abs().max().item() > 1e-4


def test_diffusers_folder_loads_and_the_old_refusal_is_gone(tmp_path):
    m = _diffusers_model()
    m.save_pretrained(tmp_path / "unet")
    src = frontend.load_source(str(tmp_path / "unet"))
    assert src.kind == "diffusers" and src.context == (frontend.CONTEXT_LEN, CTX_DIM)
    assert src.info["context"] == [77, CTX_DIM]
    src = frontend.load_source(str(tmp_path / "unet"), context_len=5)
    assert src.context == (5, CTX_DIM)
    for bad in (0, 10**9):  # 10**9 asked the capture for terabytes of example context
        with pytest.raises(BqcError, match=r"must be in \[1, 65536\]"):
            frontend.load_source(str(tmp_path / "unet"), context_len=bad)


def test_diffusers_extra_conditioning_is_refused(tmp_path):
    cfg = {"_class_name": "UNet2DConditionModel", **TINY_DIFFUSERS, "addition_embed_type": "text_time"}
    with pytest.raises(BqcError, match="addition_embed_type"):
        frontend._check_text_unet_config(tmp_path, cfg)


def test_ldm_yaml_with_spatial_transformer(tmp_path):
    """An SD-1.x-style YAML (use_checkpoint / legacy keys included) loads into bqc's UNetModel."""
    params = {**TINY_LDM, "attention_resolutions": [1, 2], "channel_mult": [1, 2], "use_checkpoint": True, "legacy": False}
    (tmp_path / "m.yaml").write_text(json.dumps({"model": {"params": {"unet_config": {
        "target": "bqc.models.unet.UNetModel", "params": params}}}}))
    src = frontend.load_source(config=str(tmp_path / "m.yaml"))
    assert src.context == (77, CTX_DIM)
    keys = set(src.module.state_dict())
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys  # LDM's names
    assert "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight" in keys
    with pytest.raises(TypeError, match="context_dim"):
        UNetModel(**{**TINY_LDM, "context_dim": None})


def test_sd15_config_has_sd15_parameter_count():
    """bqc's LDM UNet and diffusers' UNet2DConditionModel built from SD-1.5's config (on the meta
    device: no memory) both have SD-1.5's 859,520,964 parameters."""
    with torch.device("meta"):
        ldm = UNetModel(**SD15_LDM)
    assert sum(p.numel() for p in ldm.parameters()) == SD15_PARAMS
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
               down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4,
               layers_per_block=2, sample_size=64)
    with torch.device("meta"):
        d = diffusers.UNet2DConditionModel(**cfg)
    assert sum(p.numel() for p in d.parameters()) == SD15_PARAMS


# analysis -----------------------------------------------------------------------------------
TRANSFORMER_PARTS = {"proj-in", "self-q", "self-k", "self-v", "self-out", "self-attn", "cross-q", "cross-k", "cross-v",
                     "cross-out", "cross-attn", "ff-in", "ff-out", "proj-out"}


@pytest.mark.parametrize("family", ["ldm", "diffusers"])
def test_transformer_roles_and_blocks(family):
    _, src, _ = _source(family)
    gm = ir.from_exported(src.exported)
    ir.annotate(gm, head_tail_blocks=2)
    rows = ir.layers(gm)
    parts = {r["part"] for r in rows if r["part"]}
    assert parts == TRANSFORMER_PARTS
    for r in rows:
        if r["part"] in ("cross-k", "cross-v"):  # read the text embedding only
            assert r["role"] == "cross-kv" and r["block"] >= 0, r
        elif r["part"]:  # everything else in a transformer: placed like the ResBlock beside it
            assert r["role"] in ("head", "body", "tail"), r
            assert r["level"] >= 1, r
    assert not any(r["role"] == "cross-kv" for r in rows if r["part"] not in ("cross-k", "cross-v"))
    # a transformer counts as part of the UNet block it sits in: same block id as its ResBlock
    by_module = {r["module"]: r for r in rows}
    res, attn = (("input_blocks.1.0.in_layers.2", "input_blocks.1.1.proj_in") if family == "ldm" else
                 ("down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in"))
    assert by_module[res]["block"] == by_module[attn]["block"]
    assert by_module[attn.replace("proj_in", "transformer_blocks.0.attn2.to_k")]["block"] == by_module[res]["block"]
    norms = [n for n in gm.graph.nodes if ir.info(n).get("part") == "norm"]
    assert norms and all(ir.info(n)["kind"] == "norm" for n in norms)
    assert ir.info(next(n for n in gm.graph.nodes if ir.info(n).get("role") == "input"))["dist_in"] >= 0


# recipes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["ldm", "diffusers"])
def test_recipes_run_forward_and_backward(family):
    _, src, _ = _source(family)
    x, t, c = _inputs(2)
    for recipe in RECIPES:
        res = tf.transform(src, recipe)
        rows = ir.layers(res.gm)
        kv = [r for r in rows if r["role"] == "cross-kv"]
        assert kv and all((r["w_bits"], r["a_bits"]) == (32, 32) for r in kv), recipe  # cross_kv = "fp"
        inner = [r for r in rows if r["part"] in ("self-q", "cross-q", "ff-in", "ff-out", "proj-in")]
        assert inner and all(r["w_bits"] == 1 for r in inner), recipe
        want_a = 32 if recipe == "binarydm-w1a32" else res.ctx.abits
        assert all(r["a_bits"] == want_a for r in inner), recipe
        res.gm.train()
        out = _call(res.gm, x, t, c)
        assert out.shape == x.shape and torch.isfinite(out).all()
        out.square().mean().backward()
        grads = [p.grad for p in res.gm.parameters() if p.requires_grad]
        assert grads and sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2, recipe
        del res


def test_explain_says_why_cross_kv_stays_fp_and_place_option(tmp_path):
    _, src, _ = _source("ldm")
    res = tf.transform(src, "binarydm")
    kv = {r["name"] for r in res.layers if r["role"] == "cross-kv"}
    why = [e.reason for e in res.ctx.explanations if e.node in kv and e.pass_name == "plan_quant"]
    assert len(why) == len(kv) and all("text embedding" in w and "plan_quant.cross_kv" in w for w in why)
    r = tmp_path / "kv.toml"
    r.write_text('extends = "baseline"\nname = "baseline-kv"\n[options.plan_quant]\ncross_kv = "place"\n')
    res = tf.transform(src, str(r))
    kv = [row for row in res.layers if row["role"] == "cross-kv"]
    assert kv and all((row["w_bits"], row["a_bits"]) == (1, 4) for row in kv)


def test_report_and_artifact_round_trip(tmp_path):
    m, src, _ = _source("diffusers")
    fp = cost_report(tf.transform(src, "fp").gm)
    assert fp["params"] == sum(p.numel() for p in m.parameters())
    res = tf.transform(src, "binarydm-w1a32")
    rep = cost_report(res.gm)
    assert rep["params"] == fp["params"] and rep["size_saving"] > 2
    assert "cross-kv" in rep["by_role"]
    path = tf.save(res, tmp_path / "art")
    manifest = json.loads((path / "bqc.json").read_text())
    assert manifest["source"]["context"] == [5, CTX_DIM]
    assert manifest["signature"]["inputs"] == ["x", "t", "context"]
    art = artifact.load_artifact(path)
    x, t, c = _inputs(2)
    with torch.no_grad():
        assert torch.equal(art.gm(x, t, c)[0], res.gm(x, t, c)[0])
    assert ir.graph_meta(art.gm)["context"] == [5, CTX_DIM]
