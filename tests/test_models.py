"""The model zoo: openaimodel UNet, named configs, the model file format, export."""
from __future__ import annotations

import json

import pytest
import torch

from bqc.errors import BqcError
from bqc.models import zoo
from bqc.models.unet import UNetModel, timestep_embedding


def _inputs(model: UNetModel, batch: int = 2, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random ``(x, t[, y])`` for a zoo UNet (bqc's own: ``bqc.frontend.example_inputs`` of its source)."""
    g = torch.Generator().manual_seed(seed)
    s = model.image_size
    out = [torch.randn(batch, model.in_channels, s, s, generator=g), torch.randint(0, 1000, (batch,), generator=g)]
    if model.num_classes is not None:
        out.append(torch.randint(0, model.num_classes, (batch,), generator=g))
    return tuple(out)


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # openaimodel zero-initialises the output convs, so a fresh model outputs zeros; give
    # every parameter a random value so that comparisons mean something.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def mnist16():
    torch.manual_seed(0)
    return _randomize(zoo.build_model("mnist16")).eval()


TINY = dict(
    image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
    attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=32,
)


# ----------------------------------------------------------------------- parameter counts


def test_ldm4_bedrooms_param_count_exact():
    n = zoo.count_parameters("ldm4-bedrooms")
    assert n == 274_056_163
    assert round(n * 4 / 2**20, 1) == 1045.4  # MiB in fp32


def test_ddim_cifar10_param_count():
    n = zoo.count_parameters("ddim-cifar10")
    assert abs(n - 35_746_307) / 35_746_307 < 0.005
    assert n == 35_746_307  # in fact exact


def test_mnist16_param_count(mnist16):
    n = zoo.count_parameters(mnist16)
    assert 500_000 <= n <= 1_500_000
    assert n == zoo.CONFIG_INFO["mnist16"]["parameters"]


def test_config_info_consistent():
    assert set(zoo.CONFIG_INFO) == set(zoo.CONFIGS)
    for name, info in zoo.CONFIG_INFO.items():
        cfg = zoo.CONFIGS[name]
        json.dumps(cfg)  # JSON-serialisable
        assert info["image_size"] == cfg["image_size"]
        assert info["in_channels"] == cfg["in_channels"]
        assert info["out_channels"] == cfg["out_channels"]
        assert zoo.count_parameters(name) == info["parameters"]


def test_state_dict_keys_follow_openaimodel_naming():
    with torch.device("meta"):
        m = zoo.build_model("ldm4-bedrooms")
    keys = set(m.state_dict())
    for k in [
        "time_embed.0.weight", "time_embed.2.weight",
        "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
        "input_blocks.4.1.qkv.weight", "input_blocks.4.1.norm.weight",
        "middle_block.0.in_layers.0.weight", "middle_block.1.qkv.weight", "middle_block.1.proj_out.weight",
        "output_blocks.3.1.proj_out.weight", "output_blocks.2.2.conv.weight",
        "out.0.weight", "out.2.weight",
    ]:
        assert k in keys, k
    assert m.middle_block[1].qkv.weight.shape == (3 * 896, 896, 1)
    assert m.middle_block[1].num_heads == 896 // 32


# ----------------------------------------------------------------------- forward


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 10]), 7)
    assert e.shape == (2, 7)
    assert torch.equal(e[0, :3], torch.ones(3)) and torch.equal(e[:, 6], torch.zeros(2))


def test_forward_shape(mnist16):
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = mnist16(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_fresh_model_is_zero_init_like_openaimodel():
    m = zoo.build_model("mnist16")
    with torch.no_grad():
        assert torch.equal(m(torch.randn(2, 1, 16, 16), torch.tensor([1, 2])), torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize(
    "extra",
    [
        dict(use_scale_shift_norm=True),
        dict(resblock_updown=True),
        dict(conv_resample=False),
        dict(use_new_attention_order=True, num_head_channels=-1, num_heads=2),
        dict(out_channels=6),
    ],
)
def test_variants_forward(extra):
    torch.manual_seed(0)
    m = _randomize(UNetModel(**{**TINY, **extra})).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 8, 8), torch.tensor([3, 4]))
    assert out.shape == (2, m.out_channels, 8, 8)
    assert torch.isfinite(out).all()


def test_new_attention_order():
    # with one head per block the legacy and the new qkv layouts are the same computation;
    # with several heads they differ
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    outs = {}
    for heads in (1, 2):
        p = {**TINY, "num_head_channels": -1, "num_heads": heads}
        torch.manual_seed(0)
        legacy = _randomize(UNetModel(**p)).eval()
        new = UNetModel(**p, use_new_attention_order=True).eval()
        new.load_state_dict(legacy.state_dict())
        with torch.no_grad():
            outs[heads] = (legacy(x, t), new(x, t))
    torch.testing.assert_close(*outs[1], atol=1e-6, rtol=0)
    assert not torch.allclose(*outs[2], atol=1e-4)


def test_class_conditional():
    torch.manual_seed(0)
    m = _randomize(UNetModel(**TINY, num_classes=10)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 6])
    with torch.no_grad():
        a = m(x, t, torch.tensor([0, 1]))
        b = m(x, t, torch.tensor([2, 1]))
    assert a.shape == x.shape
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert "label_emb.weight" in m.state_dict()
    with pytest.raises(AssertionError, match="must specify y if and only if"):
        m(x, t)


def test_unconditional_rejects_y(mnist16):
    with pytest.raises(AssertionError, match="must specify y if and only if"):
        mnist16(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([0]))


def test_unknown_constructor_key_is_rejected():
    with pytest.raises(TypeError, match="use_flux_capacitor"):
        UNetModel(**TINY, use_flux_capacitor=True)


# ----------------------------------------------------------------------- export


def test_export_dynamic_batch(mnist16):
    x, t = _inputs(mnist16, batch=2)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(mnist16, (x, t), dynamic_shapes={"x": {0: batch}, "timesteps": {0: batch}})
    gm = ep.module()
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("bmm" in s for s in targets) == 2 * 6  # 5 attention blocks at ds 2 + middle
    assert any("softmax" in s for s in targets)
    with torch.no_grad():
        for b in (1, 5):
            x, t = _inputs(mnist16, batch=b, seed=b)
            torch.testing.assert_close(gm(x, t), mnist16(x, t), atol=1e-5, rtol=0)


def test_export_class_conditional_dynamic_batch():
    torch.manual_seed(0)
    m = _randomize(UNetModel(**TINY, num_classes=4)).eval()
    args = _inputs(m, batch=2)
    assert len(args) == 3
    batch = torch.export.Dim("batch")
    ep = torch.export.export(m, args, dynamic_shapes={"x": {0: batch}, "timesteps": {0: batch}, "y": {0: batch}})
    x, t, y = _inputs(m, batch=3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, t, y), m(x, t, y), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------- files


def test_save_load_round_trip(mnist16, tmp_path):
    d = zoo.save_model(mnist16, "mnist16", tmp_path / "m")
    assert (d / "config.json").exists() and (d / "model.safetensors").exists()
    cfg_file = json.loads((d / "config.json").read_text())
    assert cfg_file["arch"] == "openai-unet" and cfg_file["params"] == zoo.CONFIGS["mnist16"]
    x, t = _inputs(mnist16, batch=3)
    for src in (d, d / "config.json"):
        m2, cfg = zoo.load_model(src)
        assert cfg["params"] == zoo.CONFIGS["mnist16"]
        assert not m2.training
        assert all(p.requires_grad and p.device.type == "cpu" for p in m2.parameters())
        with torch.no_grad():
            assert torch.equal(m2(x, t), mnist16(x, t))


def test_load_with_explicit_weights_and_build_from_json(mnist16, tmp_path):
    d = zoo.save_model(mnist16, "mnist16", tmp_path / "m")
    x, t = _inputs(mnist16, batch=2)
    for w in (d, d / "model.safetensors"):
        m2, _ = zoo.load_model(d / "config.json", weights=w)
        with torch.no_grad():
            assert torch.equal(m2(x, t), mnist16(x, t))
    assert zoo.count_parameters(zoo.build_model(str(d / "config.json"))) == zoo.count_parameters(mnist16)


def test_save_shared_tensors(tmp_path):
    m = UNetModel(**TINY)
    # tie two same-shaped parameters (safetensors refuses shared storage by itself)
    m.middle_block[2].in_layers[2].weight = m.middle_block[0].in_layers[2].weight
    _randomize(m)
    d = zoo.save_model(m, TINY, tmp_path / "tied")
    m2, _ = zoo.load_model(d)
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k


def test_build_from_params_and_full_config():
    a = zoo.build_model(dict(TINY))
    b = zoo.build_model({"arch": "openai-unet", "params": dict(TINY), "name": "tiny"})
    assert zoo.count_parameters(a) == zoo.count_parameters(b)


# ----------------------------------------------------------------------- errors


def test_error_unknown_config_name():
    with pytest.raises(BqcError) as e:
        zoo.build_model("mnist32")
    for name in zoo.CONFIGS:
        assert name in str(e.value)


def test_error_unknown_config_key():
    with pytest.raises(BqcError) as e:
        zoo.build_model({**TINY, "num_resblocks": 2})
    msg = str(e.value)
    assert "'num_resblocks'" in msg and "num_res_blocks" in msg and "channel_mult" in msg
    with pytest.raises(BqcError, match="'param'"):
        zoo.build_model({"arch": "openai-unet", "param": TINY})


def test_error_missing_required_key():
    p = dict(TINY)
    del p["model_channels"]
    with pytest.raises(BqcError, match="model_channels"):
        zoo.build_model(p)


def test_error_invalid_value():
    with pytest.raises(BqcError, match="multiple of 32"):
        zoo.build_model({**TINY, "model_channels": 48})


def test_error_unknown_arch(tmp_path):
    with pytest.raises(BqcError, match="unknown model arch 'sd-unet'"):
        zoo.build_model({"arch": "sd-unet", "params": TINY})
    (tmp_path / "config.json").write_text(json.dumps({"arch": "dit", "params": TINY}))
    with pytest.raises(BqcError, match="'dit'"):
        zoo.load_model(tmp_path)


def test_error_missing_files(tmp_path):
    with pytest.raises(BqcError, match="not found"):
        zoo.load_model(tmp_path / "nope")
    with pytest.raises(BqcError, match="config.json"):
        zoo.load_model(tmp_path)  # a directory without config.json
    (tmp_path / "config.json").write_text(json.dumps({"arch": "openai-unet", "params": TINY}))
    with pytest.raises(BqcError, match="model.safetensors"):
        zoo.load_model(tmp_path)
    with pytest.raises(BqcError, match="other.safetensors"):
        zoo.load_model(tmp_path, weights=tmp_path / "other.safetensors")


def test_error_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BqcError, match="not valid JSON"):
        zoo.load_model(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_error_corrupt_weights(tmp_path, damage):
    d = zoo.save_model(UNetModel(**TINY), TINY, tmp_path)
    w = d / "model.safetensors"
    data = w.read_bytes()
    if damage == "truncate":
        w.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        w.write_bytes(b"\x12\x34" * 100)
    else:
        w.write_bytes(b"")
    with pytest.raises(BqcError, match="corrupt or truncated"):
        zoo.load_model(d)


def test_error_mismatched_weights(tmp_path):
    zoo.save_model(UNetModel(**TINY), TINY, tmp_path / "a")
    other = {**TINY, "model_channels": 64, "num_head_channels": 32}
    zoo.save_model(UNetModel(**other), other, tmp_path / "b")
    with pytest.raises(BqcError) as e:
        zoo.load_model(tmp_path / "a", weights=tmp_path / "b" / "model.safetensors")
    msg = str(e.value)
    assert "shape mismatch" in msg and "time_embed.0.weight" in msg and "more" in msg
    # missing / unexpected keys
    cond = {**TINY, "num_classes": 3}
    zoo.save_model(UNetModel(**cond), cond, tmp_path / "c")
    with pytest.raises(BqcError, match="unexpected key.*label_emb.weight"):
        zoo.load_model(tmp_path / "a", weights=tmp_path / "c" / "model.safetensors")
    with pytest.raises(BqcError, match="missing from the file.*label_emb.weight"):
        zoo.load_model(tmp_path / "c", weights=tmp_path / "a" / "model.safetensors")
