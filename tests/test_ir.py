"""IR analysis, pass framework and golden graphs of the foundation passes."""
from __future__ import annotations

import pytest
import torch

from bqc import frontend, ir
from bqc.errors import BqcError
from bqc.pipeline import Pass, PassContext, PassManager, PassResult, get_pass, load_recipe, recipe_names


@pytest.fixture
def fp_graph(tiny_source):
    gm = ir.from_exported(frontend.capture(tiny_source))
    return PassManager([get_pass("annotate")(head_tail_blocks=2)]).run(gm, PassContext())


def test_annotations_on_reference_unet(fp_graph):
    by_module = {r["module"]: r for r in ir.layers(fp_graph)}
    assert by_module["input_blocks.0.0"]["role"] == "input"
    assert by_module["out.2"]["role"] == "output"
    assert by_module["time_embed.0"]["role"] == "time-embed"
    assert by_module["input_blocks.1.0.emb_layers.1"]["role"] == "emb-proj"
    assert by_module["input_blocks.1.0.in_layers.2"]["role"] == "head"
    assert by_module["middle_block.0.in_layers.2"]["role"] == "body"
    assert by_module["output_blocks.3.0.out_layers.3"]["role"] == "tail"
    assert by_module["input_blocks.3.0.in_layers.2"]["level"] == 2
    assert by_module["output_blocks.1.2.conv"]["level"] == 1  # after the upsample
    # MACs of a 3x3 conv 32->32 at 8x8 per sample
    assert by_module["input_blocks.1.0.in_layers.2"]["macs"] == 8 * 8 * 32 * 32 * 9
    blocks = ir.graph_meta(fp_graph)["blocks"]
    assert [b["name"] for b in blocks] == [
        "input_blocks.0", "input_blocks.1", "input_blocks.2", "input_blocks.3", "middle_block",
        "output_blocks.0", "output_blocks.1", "output_blocks.2", "output_blocks.3"]
    assert ir.graph_meta(fp_graph)["skips"] == [(0, 8), (1, 7), (2, 6), (3, 5)]
    # params of all layers + norms = model params
    assert sum(r["params"] for r in ir.layers(fp_graph)) <= sum(p.numel() for p in fp_graph.parameters())


def test_golden_annotate(fp_graph, golden):
    golden("annotate", ir.dump(fp_graph))


def test_golden_conv1d_to_conv2d(fp_graph, golden, tiny_unet):
    gm = PassManager([get_pass("conv1d_to_conv2d")()]).run(fp_graph, PassContext())
    assert not any(n.target is torch.ops.aten.conv1d.default for n in gm.graph.nodes)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 900])
    assert torch.equal(gm(x, t)[0], tiny_unet(x, t)) or (gm(x, t)[0] - tiny_unet(x, t)).abs().max() < 1e-6
    golden("conv1d_to_conv2d", ir.dump(gm))


def test_decompose_sdpa_matches(golden):
    class Attn(torch.nn.Module):
        in_channels, image_size = 4, 4

        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Conv2d(4, 12, 1)

        def forward(self, x, t):
            b = x.shape[0]
            q, k, v = self.qkv(x).reshape(b, 3, 4, 16).transpose(-1, -2).unbind(1)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return o.transpose(-1, -2).reshape(b, 4, 4, 4) + t.float()[:, None, None, None]

    m = Attn().eval()
    src = frontend._from_module(m, "pickle", "attention toy")
    gm = ir.from_exported(frontend.capture(src))
    gm = PassManager([get_pass("annotate")(), get_pass("decompose_sdpa")()]).run(gm, PassContext())
    kinds = [ir.info(n)["kind"] for n in gm.graph.nodes]
    assert "attention" not in kinds and kinds.count("matmul") == 2
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    assert (gm(x, t)[0] - m(x, t)).abs().max() < 1e-5
    golden("decompose_sdpa", ir.dump(gm))


def test_pass_manager_checks_requires_and_invariants(fp_graph):
    class NeedsTaps(Pass):
        name = "needs_taps"
        requires = ("taps",)

        def run(self, gm, ctx):
            return PassResult(gm, False)

    with pytest.raises(BqcError, match="requires"):
        PassManager([NeedsTaps()]).run(fp_graph, PassContext())

    class BreaksAnnotations(Pass):
        name = "breaks"
        ensures = ("annotated",)

        def run(self, gm, ctx):
            n = next(n for n in gm.graph.nodes if ir.info(n).get("kind") == "conv")
            del n.meta["bqc"]
            return PassResult(gm, True)

    with pytest.raises(AssertionError, match="invariant 'annotated'"):
        PassManager([BreaksAnnotations()]).run(fp_graph, PassContext())


def test_dump_dir_and_option_typos(tmp_path, tiny_source):
    gm = ir.from_exported(frontend.capture(tiny_source))
    PassManager([get_pass("annotate")(), get_pass("conv1d_to_conv2d")()], dump_dir=tmp_path).run(gm, PassContext())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_input.txt", "01_annotate.txt", "02_conv1d_to_conv2d.txt"]
    with pytest.raises(BqcError, match="head_tail_block.*did you mean 'head_tail_blocks'"):
        get_pass("annotate")(head_tail_block=3)


def test_recipe_errors(tmp_path):
    with pytest.raises(BqcError, match="valid recipes: .*fp"):
        load_recipe("bdim")
    bad = tmp_path / "r.toml"
    bad.write_text('name = "r"\npases = []\n')
    with pytest.raises(BqcError, match="'pases'.*did you mean 'passes'"):
        load_recipe(str(bad))
    bad.write_text('name = "r"\n[[passes]]\nname = "anotate"\n')
    with pytest.raises(BqcError, match="unknown pass 'anotate'"):
        load_recipe(str(bad))
    with pytest.raises(BqcError, match="unsupported wbits 5"):
        load_recipe("fp").context(wbits=5)


def test_user_recipe_extends(tmp_path):
    r = tmp_path / "mine.toml"
    r.write_text('extends = "fp"\nname = "mine"\n[options.annotate]\nhead_tail_blocks = 3\n')
    rec = load_recipe(str(r))
    assert rec.name == "mine" and rec.passes == [("annotate", {"head_tail_blocks": 3})]


def test_recipe_append_and_shared_base(tmp_path):
    """`[[append]]` adds passes after the inherited ones; the quantized recipes share the
    `_quantized` pipeline (a base, not listed) and differ only in their options and appended
    passes."""
    base = load_recipe("_quantized")
    assert "_quantized" not in recipe_names()
    prefix = [n for n, _ in base.passes]
    for name in recipe_names():
        if name == "fp":
            continue
        rec = load_recipe(name)
        assert [n for n, _ in rec.passes][:len(prefix)] == prefix, name
    assert [n for n, _ in load_recipe("bidm").passes][len(prefix):] == ["tbs_edges", "distill_taps"]
    assert [n for n, _ in load_recipe("binarydm-lmb").passes][len(prefix):] == ["distill_taps"]
    lmb = dict(load_recipe("binarydm-lmb").passes)["plan_quant"]
    assert lmb["head_tail"]["weight"] == "lmb" and lmb["body"]["weight"] == "sign_scale"  # inherited from baseline
    r = tmp_path / "mine.toml"
    r.write_text('extends = "xnor"\nname = "xnor-spd"\n[[append]]\nname = "distill_taps"\nloss = "spd"\n'
                 '[options.distill_taps]\npatches = 2\n')
    rec = load_recipe(str(r))
    assert rec.passes[-1] == ("distill_taps", {"loss": "spd", "patches": 2})
    assert rec.passes[:-1] == load_recipe("xnor").passes and (rec.wbits, rec.abits) == (1, 1)
    r.write_text('extends = "xnor"\n[[append]]\nname = "distil_taps"\n')
    with pytest.raises(BqcError, match="distil_taps"):
        load_recipe(str(r))
