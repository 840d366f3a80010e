"""`bqc encode` / `bqc sample --vae` with the first stage of an LDM yaml (issue 16): tiny random
diffusers AutoencoderKL / VQModel, their weights renamed to LDM's key names (the inverse of
diffusers' ``convert_ldm_vae_checkpoint``, which bqc runs) and saved as an LDM checkpoint next to an
LDM-style yaml. The latents equal the diffusers model's (KL: the scaled posterior mean; VQ: the
scaled latents before the quantizer), a VQ latent is quantized before decoding (LDM's
``decode_first_stage``), and the refusals each give one paragraph and exit code 2."""
from __future__ import annotations

import re
import sys

import pytest
import torch
from safetensors.torch import save_file

from bqc.data import load_dataset
from bqc.errors import BqcError
from clirun import run_cli

diffusers = pytest.importorskip("diffusers")

SCALE = 0.3
DD = {"double_z": True, "z_channels": 4, "resolution": 8, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2],
      "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
KL = {"target": "ldm.models.autoencoder.AutoencoderKL",
      "params": {"embed_dim": 4, "ddconfig": DD, "lossconfig": {"target": "torch.nn.Identity"}}}
VQ = {"target": "ldm.models.autoencoder.VQModelInterface",
      "params": {"embed_dim": 3, "n_embed": 16, "ddconfig": {**DD, "double_z": False, "z_channels": 3},
                 "lossconfig": {"target": "torch.nn.Identity"}}}


def _diffusers_model(stage):
    """The random diffusers model the first stage ``stage`` maps to (LDM's GroupNorm(32) included)."""
    dd, p = stage["params"]["ddconfig"], stage["params"]
    n = len(dd["ch_mult"])
    kw = dict(block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
              down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
              latent_channels=dd["z_channels"], norm_num_groups=32)
    torch.manual_seed(0)
    if stage is VQ:
        return diffusers.VQModel(**kw, vq_embed_dim=p["embed_dim"], num_vq_embeddings=p["n_embed"]).eval()
    return diffusers.AutoencoderKL(**kw).eval()


_TO_LDM = [(r"conv_norm_out", "norm_out"), (r"conv_shortcut", "nin_shortcut"),
           (r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}"),
           (r"mid_block\.attentions\.0\.", "mid.attn_1."), (r"group_norm", "norm"), (r"to_([qkv])\.", r"\1."),
           (r"to_out\.0\.", "proj_out."), (r"down_blocks\.(\d)\.resnets", r"down.\1.block"),
           (r"down_blocks\.(\d)\.downsamplers\.0", r"down.\1.downsample")]


def _ldm_state_dict(model, levels: int) -> dict:
    """``model``'s weights under LDM's first-stage names (1x1 conv attention weights, reversed up levels)."""
    up = [(rf"up_blocks\.{i}\.resnets", f"up.{levels - 1 - i}.block") for i in range(levels)]
    up += [(rf"up_blocks\.{i}\.upsamplers\.0", f"up.{levels - 1 - i}.upsample") for i in range(levels)]
    out = {}
    for k, v in model.state_dict().items():
        for pat, rep in _TO_LDM + up:
            k = re.sub(pat, rep, k)
        out[k] = v[:, :, None, None] if ".attn_1." in k and k.endswith("weight") and v.dim() == 2 else v
    return out


def _write(tmp_path, stage, *, name="model", prefix="first_stage_model.", scale=SCALE):
    """(model, yaml, weights) of a tiny first stage: an LDM yaml and its checkpoint (safetensors)."""
    import yaml

    model = _diffusers_model(stage)
    params = {"linear_start": 0.0015, "first_stage_config": stage, "cond_stage_config": "__is_unconditional__"}
    if scale is not None:
        params["scale_factor"] = scale
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}))
    sd = {prefix + k: v.contiguous() for k, v in _ldm_state_dict(model, len(stage["params"]["ddconfig"]["ch_mult"])).items()}
    if prefix:
        sd["model.diffusion_model.out.0.weight"] = torch.ones(3)  # a full checkpoint's UNet keys are left alone
    w = tmp_path / f"{name}.safetensors"
    save_file(sd, str(w))
    return model, cfg, w


def _images(path, n=3):
    from PIL import Image

    path.mkdir()
    g = torch.Generator().manual_seed(3)
    for i in range(n):
        Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB").save(path / f"{i}.png")
    return path


def _encode(tmp_path, capsys, cfg, w, *extra):
    imgs = tmp_path / "imgs" if (tmp_path / "imgs").is_dir() else _images(tmp_path / "imgs")
    out = tmp_path / "lat.safetensors"
    code, _, err = run_cli(["encode", imgs, "--vae", cfg, "--vae-weights", w, "-o", out, "--threads", "1", "--force",
                            *extra], capsys)
    return code, " ".join(err.split()), out, load_dataset(str(imgs)).images


def test_kl_first_stage_encodes_and_decodes_as_ldm(tmp_path, capsys):
    import yaml
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    from bqc.encode import decode_latents, load_vae

    model, cfg, w = _write(tmp_path, KL)
    code, err, out, x = _encode(tmp_path, capsys, cfg, w)
    assert code == 0, err
    ds = load_dataset(str(out))
    with torch.no_grad():
        want = model.encode(x).latent_dist.mean * SCALE
    assert ds.info["scaling_factor"] == SCALE and ds.info["source"]["vae_weights"] == str(w)
    assert ds.images.shape == (3, 4, 4, 4) and (ds.images - want).abs().max() <= 1e-5
    vae, scale, shift = load_vae(cfg, weights=w)
    ref = create_vae_diffusers_config_from_ldm(yaml.safe_load(cfg.read_text()), {})  # diffusers' own mapping
    assert shift is None and {k: vae.config[k] for k in ref if k != "sample_size"} == {
        k: v for k, v in ref.items() if k != "sample_size"}
    with torch.no_grad():
        assert (decode_latents(vae, ds.images, scale) - model.decode(want / SCALE).sample.clamp(-1, 1)).abs().max() <= 1e-5
    # a first-stage-only state dict (no prefix) loads the same; no scale_factor in the yaml is LDM's 1.0
    _, cfg1, w1 = _write(tmp_path, KL, name="bare", prefix="", scale=None)
    vae1, scale1, _ = load_vae(cfg1, weights=w1)
    assert scale1 == 1.0 and all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), vae1.state_dict().values()))


def test_vq_first_stage_encodes_before_and_decodes_after_the_quantizer(tmp_path, capsys):
    from bqc.encode import decode_latents, load_vae

    model, cfg, w = _write(tmp_path, VQ)
    code, err, out, x = _encode(tmp_path, capsys, cfg, w)
    assert code == 0, err
    lat = load_dataset(str(out)).images
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x))  # LDM's VQModelInterface.encode: no quantizer
        assert lat.shape == (3, 3, 4, 4) and (lat - h * SCALE).abs().max() <= 1e-5
        quantized = model.decode(h).sample.clamp(-1, 1)
        unquantized = model.decode(h, force_not_quantize=True).sample.clamp(-1, 1)
    vae, scale, _ = load_vae(cfg, weights=w)
    img = decode_latents(vae, lat, scale)
    assert (img - quantized).abs().max() <= 1e-5 and (img - unquantized).abs().max() > 1e-3


def test_sample_decodes_with_the_yaml_first_stage(tmp_path, tmp_path_factory, capsys):
    import numpy as np
    from PIL import Image

    from bqc.diffusion.grid import save_grid
    from bqc.encode import decode_latents, load_vae
    from test_latents import _artifact, _latents_file

    _, cfg, w = _write(tmp_path, KL, scale=0.5)  # the latents file records 0.5 too
    art = _artifact("diffusers", "binarydm", tmp_path_factory)
    lat = _latents_file(tmp_path / "lat.safetensors")
    code, _, err = run_cli(["sample", art, "--data", lat, "-n", "2", "--steps", "2", "--threads", "1", "-q", "--vae", cfg,
                            "--vae-weights", w, "--npz", tmp_path / "x.npz", "-o", tmp_path / "img.png"], capsys)
    assert code == 0, err
    vae, scale, _ = load_vae(cfg, weights=w)
    x = torch.from_numpy(np.load(tmp_path / "x.npz")["samples"])
    save_grid(decode_latents(vae, x, scale), tmp_path / "want.png", nrow=1)
    with Image.open(tmp_path / "img.png") as im, Image.open(tmp_path / "want.png") as want:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), np.asarray(want))


def _refused(tmp_path, capsys, cfg, w, *extra) -> str:
    """The one-paragraph error of a refused `bqc encode --vae CFG --vae-weights W`."""
    code, err, _, _ = _encode(tmp_path, capsys, cfg, w, *extra)
    assert code == 2 and "Traceback" not in err, err
    return err


def test_refusals(tmp_path, capsys, monkeypatch):
    import yaml

    model, cfg, w = _write(tmp_path, KL)
    # an unknown target is never imported: its module would write a file
    (tmp_path / "evil_first_stage.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\nclass VAE: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = yaml.safe_load(cfg.read_text())
    doc["model"]["params"]["first_stage_config"]["target"] = "evil_first_stage.VAE"
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(doc))
    err = _refused(tmp_path, capsys, tmp_path / "evil.yaml", w)
    assert "'evil_first_stage.VAE' is not one bqc maps" in err
    assert not (tmp_path / "pwned").exists() and "evil_first_stage" not in sys.modules
    # attention inside a level (resolution 8 is the first level's)
    doc["model"]["params"]["first_stage_config"] = {**KL, "params": {**KL["params"], "ddconfig": {**DD, "attn_resolutions": [8]}}}
    (tmp_path / "attn.yaml").write_text(yaml.safe_dump(doc))
    assert "attention only in the mid block" in _refused(tmp_path, capsys, tmp_path / "attn.yaml", w)
    # weights of another first stage: the VQ's under the KL yaml, and a missing tensor
    _, _, wvq = _write(tmp_path, VQ, name="vq")
    err = _refused(tmp_path, capsys, cfg, wvq)
    assert "do not match the first stage" in err and "another shape" in err
    sd = {k: v for k, v in _ldm_state_dict(model, 2).items() if k != "decoder.conv_out.bias"}
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "short.safetensors"))
    err = _refused(tmp_path, capsys, cfg, tmp_path / "short.safetensors")
    assert "missing (diffusers names) 1 keys" in err and "decoder.conv_out.bias" in err and "'extra.weight'" in err
    # a pickled checkpoint needs --trust-pickle (and then loads, read weights-only)
    torch.save({"state_dict": _ldm_state_dict(model, 2)}, tmp_path / "model.ckpt")
    assert "--trust-pickle" in _refused(tmp_path, capsys, cfg, tmp_path / "model.ckpt")
    code, err, out, x = _encode(tmp_path, capsys, cfg, tmp_path / "model.ckpt", "--trust-pickle")
    assert code == 0, err
    # the yaml without --vae-weights, --vae-weights with a diffusers folder or without --vae
    model.save_pretrained(tmp_path / "folder")
    out = tmp_path / "o.safetensors"
    for args, msg in ((["encode", tmp_path / "imgs", "--vae", cfg, "-o", out], "give the checkpoint with --vae-weights"),
                      (["encode", tmp_path / "imgs", "--vae", tmp_path / "folder", "--vae-weights", w, "-o", out],
                       "drop --vae-weights"),
                      (["sample", "mnist16", "--vae-weights", w, "-n", "1", "-o", tmp_path / "s.png"], "--vae is missing")):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and msg in " ".join(err.split()), err
    with pytest.raises(BqcError, match="scale_by_std"):
        from bqc.encode import load_vae

        doc = yaml.safe_load(cfg.read_text())
        doc["model"]["params"]["scale_by_std"] = True
        (tmp_path / "std.yaml").write_text(yaml.safe_dump(doc))
        load_vae(tmp_path / "std.yaml", weights=w)
