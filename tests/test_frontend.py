"""Front end: every model source loads, captures, and matches eager (max abs diff <= 1e-5)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bqc import frontend, ir
from bqc.errors import BqcError
from bqc.graph import BqcModel

from conftest import TINY_CONFIG


def _capture_matches(src, eager, conditional=False, tol=1e-5):
    gm = ir.from_exported(frontend.capture(src))
    model = BqcModel(gm)
    g = torch.Generator().manual_seed(1)
    for b in (1, 3):  # dynamic batch
        x = torch.randn(b, src.in_channels, src.image_size, src.image_size, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g)
        y = torch.randint(0, 3, (b,), generator=g) if conditional else None
        want = eager(x, t, y)
        got, state = model(x, t, y)
        assert state is None
        assert (got - want).abs().max().item() <= tol
    return gm


def test_tiny_unet_captures(tiny_source, tiny_unet):
    gm = _capture_matches(tiny_source, lambda x, t, y: tiny_unet(x, t))
    assert ir.graph_meta(gm)["inputs"] == ["x", "t"]


def test_class_conditional_needs_and_uses_labels():
    from bqc.models.unet import UNetModel

    m = UNetModel(**{**TINY_CONFIG, "num_classes": 3}).eval()
    src = frontend._from_module(m, "zoo", "tiny conditional")
    assert src.num_classes == 3
    gm = _capture_matches(src, lambda x, t, y: m(x, t, y), conditional=True)
    assert ir.graph_meta(gm)["conditional"]
    with pytest.raises(BqcError, match="class labels"):
        BqcModel(gm)(torch.randn(1, 1, 8, 8), torch.tensor([3]))


def test_bqc_checkpoint_dir(tmp_path, tiny_unet):
    from bqc.models import zoo

    zoo.save_model(tiny_unet, {"arch": "openai-unet", "params": TINY_CONFIG}, tmp_path / "ck")
    src = frontend.load_source(str(tmp_path / "ck"))
    assert src.kind == "bqc"
    _capture_matches(src, lambda x, t, y: tiny_unet(x, t))


def test_diffusers_dir(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    m = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval()
    m.save_pretrained(tmp_path / "d")
    src = frontend.load_source(str(tmp_path / "d"))
    assert src.kind == "diffusers"
    gm = _capture_matches(src, lambda x, t, y: m(x, t).sample)
    ir.annotate(gm, head_tail_blocks=2)
    assert {"down_blocks.0.0", "mid_block", "up_blocks.1.0"} <= {b["name"] for b in ir.graph_meta(gm)["blocks"]}


def test_diffusers_config_declaring_a_huge_model_is_refused_before_allocating(tmp_path):
    """A hostile config.json (block_out_channels of 16384: a 262 GiB UNet) next to small weights was
    built for real before the weights were read (the allocator or the OOM killer answered); the model is
    now built on the meta device and checked against the file first."""
    import json

    diffusers = pytest.importorskip("diffusers")
    from bqc.errors import BqcError

    m = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                              down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                              norm_num_groups=8)
    m.save_pretrained(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps(dict(cfg, block_out_channels=[16384, 16384])))
    with pytest.raises(BqcError, match="do not match the model config: .*shape mismatch"):
        frontend.load_source(str(tmp_path / "d"))


def test_ldm_yaml_nested_with_lightning_checkpoint(tmp_path, tiny_unet):
    import yaml

    cfg = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                     "params": {"unet_config": {"target": "bqc.models.unet.UNetModel", "params": dict(TINY_CONFIG, attention_resolutions=[2], channel_mult=[1, 1])}}}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    sd = {"model.diffusion_model." + k: v for k, v in tiny_unet.state_dict().items()}
    sd["first_stage_model.encoder.weight"] = torch.zeros(2)  # other LDM parts are dropped
    torch.save({"state_dict": sd, "global_step": 5}, tmp_path / "last.ckpt")
    src = frontend.load_source(config=str(tmp_path / "m.yaml"), weights=str(tmp_path / "last.ckpt"))
    assert src.kind == "config"
    _capture_matches(src, lambda x, t, y: tiny_unet(x, t))


def test_pt2_program(tmp_path, tiny_source, tiny_unet):
    torch.export.save(frontend.capture(tiny_source), str(tmp_path / "u.pt2"))
    src = frontend.load_source(str(tmp_path / "u.pt2"))
    assert src.kind == "pt2" and src.image_size == 8
    _capture_matches(src, lambda x, t, y: tiny_unet(x, t))


def test_weights_option_is_used_or_refused(tmp_path, tiny_source):
    """`--weights` with a zoo name was silently ignored (the shipped weights ran): it now loads
    into the zoo's architecture; with a source that holds its own weights it is refused."""
    from safetensors.torch import load_file, save_file

    from bqc.models import zoo

    shipped = load_file(str(Path(zoo.__file__).parent / "checkpoints" / "mnist16" / zoo.WEIGHTS_FILE))
    mine = {k: v * 0.5 for k, v in shipped.items()}
    save_file(mine, str(tmp_path / "mine.safetensors"))
    src = frontend.load_source("mnist16", weights=str(tmp_path / "mine.safetensors"))
    assert src.kind == "bqc" and "with the weights" in src.description  # never resolved by name to the shipped model
    got = src.module.state_dict()
    assert all(torch.equal(got[k], mine[k].to(got[k].dtype)) for k in mine)
    torch.export.save(frontend.capture(tiny_source), str(tmp_path / "u.pt2"))
    with pytest.raises(BqcError, match="does not apply"):
        frontend.load_source(str(tmp_path / "u.pt2"), weights=str(tmp_path / "mine.safetensors"))
    with pytest.raises(BqcError, match="do not fit|does not fit|missing|unexpected|shape"):  # another model's file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        frontend.load_source("mnist16", weights=str(tmp_path / "other.safetensors"))


def test_pickled_module_needs_trust(tmp_path, tiny_unet):
    torch.save(tiny_unet, tmp_path / "unet.pt")
    with pytest.raises(BqcError, match="--trust-pickle"):
        frontend.load_source(str(tmp_path / "unet.pt"))
    src = frontend.load_source(str(tmp_path / "unet.pt"), trust_pickle=True)
    _capture_matches(src, lambda x, t, y: tiny_unet(x, t))


def test_state_dict_file_is_not_a_model(tmp_path, tiny_unet):
    torch.save(tiny_unet.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(BqcError, match="--config"):
        frontend.load_source(str(tmp_path / "sd.pt"))


# bad input ------------------------------------------------------------------------------------
def test_missing_file():
    with pytest.raises(BqcError, match="not found"):
        frontend.load_source("/nonexistent/model.pt2")


def test_truncated_safetensors(tmp_path, tiny_unet):
    from bqc.models import zoo

    zoo.save_model(tiny_unet, {"arch": "openai-unet", "params": TINY_CONFIG}, tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(BqcError, match="(?i)corrupt|truncated"):
        frontend.load_source(str(tmp_path / "ck"))


def test_corrupt_checkpoint(tmp_path):
    import yaml

    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"target": "bqc.models.unet.UNetModel", "params": TINY_CONFIG}))
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(BqcError, match="(?i)corrupt"):
        frontend.load_source(config=str(tmp_path / "m.yaml"), weights=str(tmp_path / "bad.ckpt"))


def test_unknown_config_key(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"arch": "openai-unet", "params": {**TINY_CONFIG, "chanel_mult": [1]}}))
    with pytest.raises(BqcError, match="chanel_mult"):
        frontend.load_source(str(tmp_path / "ck"))


def test_pt2_with_pickled_entries_is_refused(tmp_path, tiny_source):
    import zipfile

    torch.export.save(frontend.capture(tiny_source), str(tmp_path / "u.pt2"))
    src = zipfile.ZipFile(tmp_path / "u.pt2")
    out = zipfile.ZipFile(tmp_path / "evil.pt2", "w")
    for item in src.infolist():
        data = src.read(item.filename)
        if item.filename.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            first = next(iter(cfg["config"]))
            cfg["config"][first]["use_pickle"] = True
            data = json.dumps(cfg).encode()
        out.writestr(item, data)
    out.close()
    with pytest.raises(BqcError, match="pickle"):
        frontend.load_source(str(tmp_path / "evil.pt2"))


def test_pt2_zip_bomb_is_refused_before_inflating(tmp_path, tiny_source, monkeypatch):
    """A .pt2 member of a few KB that inflates to 100s of GB was read into memory member by member;
    the declared sizes are checked against the machine's available memory first."""
    import zipfile

    from bqc import runtime

    torch.export.save(frontend.capture(tiny_source), str(tmp_path / "u.pt2"))
    src = zipfile.ZipFile(tmp_path / "u.pt2")
    root = src.namelist()[0].split("/")[0]
    with zipfile.ZipFile(tmp_path / "bomb.pt2", "w", zipfile.ZIP_DEFLATED) as out:
        for item in src.infolist():
            out.writestr(item.filename, src.read(item.filename))
        out.writestr(f"{root}/extra/padding", b"\0" * (64 << 20))  # 64 MiB of zeros: ~64 KB deflated
    assert (tmp_path / "bomb.pt2").stat().st_size < (tmp_path / "u.pt2").stat().st_size + (1 << 20)
    monkeypatch.setattr(runtime, "available_memory", lambda: 32 << 20)
    with pytest.raises(BqcError, match=r"zip members need, unpacked, about 6\d\.\d MiB; this machine has 32\.0 MiB"):
        frontend.load_source(str(tmp_path / "bomb.pt2"))


class _DataDependent(torch.nn.Module):
    in_channels, image_size = 1, 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        if x.mean() > 0:  # data-dependent control flow: cannot be captured
            return self.conv(x)
        return -self.conv(x)


def test_capture_failure_names_the_line():
    src = frontend._from_module(_DataDependent(), "pickle", "data-dependent toy")
    with pytest.raises(BqcError) as e:
        frontend.capture(src)
    msg = str(e.value)
    assert "test_frontend.py" in msg and "x.mean() > 0" in msg
    assert "concrete argument" in msg  # suggests a fix


def test_wrong_input_shape(tiny_source):
    model = BqcModel(ir.from_exported(frontend.capture(tiny_source)))
    with pytest.raises(BqcError, match=r"\(N, 1, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))


def test_export_load_memo_gives_the_same_program(tmp_path, tiny_unet):
    """load_exported memoises typing.get_type_hints inside torch's deserializer while it loads (a third of
    the time): the program equals torch.export.load's, and torch's module is restored afterwards."""
    from torch._export.serde import serialize as serde

    ep = torch.export.export(tiny_unet, (torch.randn(2, 1, 8, 8), torch.tensor([1, 500])))
    torch.export.save(ep, tmp_path / "m.pt2")
    before = serde.typing
    got = frontend.load_exported(tmp_path / "m.pt2")
    assert serde.typing is before
    want = torch.export.load(tmp_path / "m.pt2")
    assert str(got.graph) == str(want.graph) and got.graph_signature == want.graph_signature
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    assert torch.equal(got.module()(x, t), want.module()(x, t))
