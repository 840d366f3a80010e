"""``bqc encode``: an image folder -> a latents file (:func:`bqc.data.save_latents`), with the
user's VAE and, optionally, text embeddings.

The UNet of a latent diffusion model denoises VAE latents, not pixels, and a text-conditioned
one reads a text embedding; both come from models outside the UNet, which bqc runs once here
so that ``bqc train`` / ``bqc sample`` need only the latents file:

* the VAE: a diffusers ``AutoencoderKL`` folder (``config.json`` + safetensors weights; a
  pipeline folder's ``vae/`` is found too). Each image (RGB, in [-1, 1]) is encoded to the
  mean of its latent distribution (deterministic: the same file every run) and scaled,
  ``(z - shift_factor) * scaling_factor`` with the VAE's own config values, as diffusers'
  pipelines do; :func:`decode_latents` inverts it for ``bqc sample --vae``.
* or the first stage of an LDM yaml (``model.params.first_stage_config``; SD's
  v1-inference.yaml, LDM-4's lsun_bedrooms-ldm-vq-4.yaml) with its weights in a separate file
  (``weights``, the CLI's ``--vae-weights``: the full LDM checkpoint, whose first-stage keys
  start ``first_stage_model.``, or the first stage's own state dict). The yaml's ``target`` is
  never imported: the two first stages LDM uses are mapped to diffusers models built from the
  ``ddconfig`` (:data:`LDM_FIRST_STAGES`) and the weights converted by diffusers' own
  ``convert_ldm_vae_checkpoint``. The scale is ``model.params.scale_factor`` (LDM's default 1.0;
  with ``scale_by_std`` the value the checkpoint stores). A ``VQModelInterface`` encodes, as
  LDM's ``encode_first_stage``, to the latents before the quantizer, and decodes by quantizing
  them first, as LDM's ``decode_first_stage``.
* text: ``captions`` (a JSON list in image order, a JSON object image-name -> caption, or a
  ``.txt`` with one caption per line in image order) encoded with ``text_encoder``, a
  transformers CLIP text model folder (``config.json`` + safetensors; its tokenizer in the same
  folder or a sibling ``tokenizer/``, as in an SD pipeline folder), padded to ``context_len``
  tokens (default: the tokenizer's, 77 for CLIP): ``context`` is the last hidden state, and the
  empty prompt's is stored as ``uncond`` (classifier-free guidance). Or ``context``: a
  safetensors file of precomputed embeddings (``context`` [N,L,D], optional ``uncond`` [1,L,D]).

Weights are read from safetensors only; a folder with only pickled ``.bin`` weights (or a pickled
``--vae-weights`` checkpoint) is refused unless ``trust_pickle`` (the CLI's ``--trust-pickle``),
since unpickling runs code from the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from bqc.data import image_files, load_dataset, save_latents
from bqc.errors import BqcError, read_json_object, read_text_file, read_yaml_file, require_file

__all__ = ["load_vae", "LDM_FIRST_STAGES", "encode_images", "decode_latents", "load_text_encoder", "embed_prompts",
           "read_captions", "read_context_file", "encode_folder"]

_PIP_DIFFUSERS = "python3 -m pip install diffusers"


def _model_dir(path, class_names: tuple[str, ...], sub: str, what: str) -> Path:
    """The folder holding a model of one of ``class_names`` (``path`` or its ``sub/``)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise BqcError(f"{what} folder not found: {p}", hint=f"give the folder with the {what}'s config.json and weights")
    for d in (p, p / sub):
        cfg = d / "config.json"
        if cfg.is_file():
            c = read_json_object(cfg, "config")
            name = c.get("_class_name") or (c.get("architectures") or [None])[0]
            if name in class_names:
                return d
            if d == p and not (p / sub).is_dir():
                raise BqcError(f"{p} holds a {name or 'model of unknown class'}, not a {' / '.join(class_names)}",
                               hint=f"give the {what} folder (in a diffusers pipeline folder: {sub}/)")
    raise BqcError(f"no {' / '.join(class_names)} config.json in {p} (nor in {p / sub})",
                   hint=f"give the {what} folder (in a diffusers pipeline folder: {sub}/)")


def _weights_safetensors(d: Path, trust_pickle: bool, what: str) -> bool:
    """True: load safetensors weights; False: pickled weights the user trusts. Refuses the rest."""
    if any(d.glob("*.safetensors")):
        return True
    pickled = sorted(f.name for f in d.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if not pickled:
        raise BqcError(f"no weights in the {what} folder {d} (expected a .safetensors file)")
    if not trust_pickle:
        raise BqcError(f"the {what} folder {d} has only pickled weights ({', '.join(pickled)}); unpickling runs code "
                       "from the file, so bqc reads safetensors only",
                       hint="convert them to safetensors, or pass --trust-pickle if you trust the file")
    return False


def load_vae(path, *, weights=None, trust_pickle: bool = False):
    """``(vae, scaling_factor, shift_factor)`` (eval mode) from a diffusers ``AutoencoderKL`` folder, or
    from an LDM yaml's first stage with its ``weights`` file (see the module docstring)."""
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        if weights is None:
            raise BqcError(f"--vae {path} is an LDM yaml: it describes the first stage, but its weights are in a "
                           "checkpoint", hint="give the checkpoint with --vae-weights FILE (the full LDM checkpoint or "
                           "the first stage's own state dict, .safetensors)")
        return _load_ldm_vae(path, weights, trust_pickle)
    if weights is not None:
        raise BqcError(f"--vae-weights is for an LDM yaml's first stage; the diffusers folder {path} holds its own "
                       "weights", hint="drop --vae-weights, or give the LDM yaml as --vae")
    d = _model_dir(path, ("AutoencoderKL",), "vae", "VAE")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise BqcError("reading a diffusers AutoencoderKL needs the diffusers package", hint=_PIP_DIFFUSERS) from None
    safe = _weights_safetensors(d, trust_pickle, "VAE")
    try:
        vae = AutoencoderKL.from_pretrained(str(d), use_safetensors=safe)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise BqcError(f"cannot load the AutoencoderKL in {d}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       hint="check that config.json and the weights belong together") from None
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None)
    return vae.eval().requires_grad_(False), float(cfg.scaling_factor), (None if shift is None else float(shift))


_OWN_CODE = "encode the images with the VAE's own code and write the latents file with bqc.data.save_latents"

#: the LDM first stages bqc maps (never imports), LDM target -> diffusers class
LDM_FIRST_STAGES = {"ldm.models.autoencoder.AutoencoderKL": "AutoencoderKL",
                    "ldm.models.autoencoder.VQModelInterface": "VQModel"}


def _ldm_first_stage(path) -> tuple[str, dict, float, bool]:
    """``(diffusers class name, its config, scale_factor, scale_by_std)`` from an LDM yaml's first stage."""
    p = require_file(Path(path).expanduser(), "VAE yaml")
    doc = read_yaml_file(p, "VAE yaml")
    ldm = doc.get("model") if isinstance(doc, dict) else None
    params = ldm.get("params") if isinstance(ldm, dict) else None
    stage = params.get("first_stage_config") if isinstance(params, dict) else None
    if not isinstance(stage, dict):
        raise BqcError(f"{p} has no model.params.first_stage_config (the first stage of a latent diffusion model)",
                       hint="give the LDM yaml of a latent diffusion model, or a diffusers AutoencoderKL folder")
    target, sp = stage.get("target"), stage.get("params")
    if target not in LDM_FIRST_STAGES:
        raise BqcError(f"{p}: the first stage's target {target!r} is not one bqc maps (it is never imported: bqc runs "
                       f"no code named by a yaml); known: {', '.join(LDM_FIRST_STAGES)}",
                       hint="convert the VAE to a diffusers AutoencoderKL folder and give that folder as --vae")
    if not isinstance(sp, dict) or not isinstance(sp.get("ddconfig"), dict):
        raise BqcError(f"{p}: first_stage_config.params.ddconfig (the {target} architecture) is missing")
    where = f"{p} first_stage_config"
    kind = LDM_FIRST_STAGES[target]
    cfg = _ddconfig_to_diffusers(sp["ddconfig"], where, double_z=kind == "AutoencoderKL")
    z, embed = cfg["latent_channels"], _int(sp, "embed_dim", where)
    if kind == "AutoencoderKL" and embed != z:
        raise BqcError(f"{where}: embed_dim {embed} differs from ddconfig z_channels {z}; diffusers' AutoencoderKL "
                       "(what bqc runs the first stage as) has latents of z_channels channels")
    if kind == "VQModel":
        if sp.get("remap") is not None:
            raise BqcError(f"{where}: a VQ codebook remap ({sp['remap']}) is not supported (diffusers' VQModel has none)")
        cfg.update(vq_embed_dim=embed, num_vq_embeddings=_int(sp, "n_embed", where))
    scale = params.get("scale_factor", 1.0)  # LatentDiffusion's default
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise BqcError(f"{p}: model.params.scale_factor must be a positive number, not {scale!r}")
    cfg["scaling_factor"] = float(scale)
    return kind, cfg, float(scale), bool(params.get("scale_by_std", False))


def _int(d: dict, key: str, where: str, default=None) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise BqcError(f"{where}: {key} must be a positive integer, not {v!r}")
    return v


def _ddconfig_to_diffusers(dd: dict, where: str, *, double_z: bool) -> dict:
    """The diffusers ``AutoencoderKL``/``VQModel`` config of an LDM ``Encoder``/``Decoder`` ``ddconfig``.

    What diffusers' VAE blocks cannot express is refused: attention inside the down/up levels (LDM
    adds an ``AttnBlock`` after each ResBlock of a level whose resolution is in
    ``attn_resolutions``; diffusers' VAEs have attention only in the mid block), linear
    attention, a first level wider than ``ch`` (LDM's ``conv_in`` gives ``ch`` channels, diffusers'
    ``block_out_channels[0]``), pooling instead of strided convs, and the decoder's
    ``give_pre_end`` / ``tanh_out``.
    """
    where = f"{where}.params.ddconfig"
    ch, res = _int(dd, "ch", where), _int(dd, "resolution", where)
    mult = dd.get("ch_mult", [1, 2, 4, 8])
    if not isinstance(mult, (list, tuple)) or not mult or not all(isinstance(m, int) and not isinstance(m, bool)
                                                                   and m > 0 for m in mult):
        raise BqcError(f"{where}: ch_mult must be a list of positive integers, not {mult!r}")
    if mult[0] != 1:
        raise BqcError(f"{where}: ch_mult starts with {mult[0]}; diffusers' VAE blocks need 1 there (LDM's conv_in "
                       "gives ch channels, diffusers' the first level's)")
    attn = dd.get("attn_resolutions", [])
    if not isinstance(attn, (list, tuple)):
        raise BqcError(f"{where}: attn_resolutions must be a list, not {attn!r}")
    levels = [res // 2 ** i for i in range(len(mult))]
    inside = sorted({r for r in attn if r in levels}, reverse=True)
    if inside:
        raise BqcError(f"{where}: attn_resolutions {list(attn)} puts attention in the down/up levels at resolution "
                       f"{inside} (the levels run at {levels}); diffusers' VAEs have attention only in the mid block, "
                       "so bqc cannot run this first stage", hint=_OWN_CODE)
    attn_type = "linear" if dd.get("use_linear_attn") else dd.get("attn_type", "vanilla")
    if attn_type not in ("vanilla", "vanilla-xformers", "none"):
        raise BqcError(f"{where}: attention type {attn_type!r} is not supported (diffusers' VAEs have vanilla "
                       "attention in the mid block, or none)")
    ldm_default = {"double_z": True, "resamp_with_conv": True, "give_pre_end": False, "tanh_out": False}
    for key, want in (("double_z", double_z), ("resamp_with_conv", True), ("give_pre_end", False), ("tanh_out", False)):
        if bool(dd.get(key, ldm_default[key])) != want:
            raise BqcError(f"{where}: {key} {dd.get(key, ldm_default[key])} does not map to diffusers' blocks for this "
                           f"first stage (they have {key} {want})")
    n = len(mult)
    return {"in_channels": _int(dd, "in_channels", where), "out_channels": _int(dd, "out_ch", where),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [ch * m for m in mult], "layers_per_block": _int(dd, "num_res_blocks", where),
            "latent_channels": _int(dd, "z_channels", where), "norm_num_groups": 32,  # LDM's Normalize: GroupNorm(32)
            "sample_size": res, "mid_block_add_attention": attn_type != "none"}


def _read_weights(path, trust_pickle: bool) -> dict:
    """Every key of a safetensors file, or (with ``trust_pickle``) of a ``weights_only`` torch
    checkpoint (:func:`bqc.frontend.load_state_dict_file`, which still refuses anything but tensors)."""
    from bqc.frontend import load_state_dict_file

    p = require_file(Path(path).expanduser(), "--vae-weights file")
    if p.suffix.lower() != ".safetensors" and not trust_pickle:
        raise BqcError(f"--vae-weights {p} is not safetensors; reading a pickled checkpoint (.ckpt) unpickles it, which "
                       "can run code from the file, so bqc reads safetensors only",
                       hint="convert it to .safetensors, or pass --trust-pickle if you trust the file")
    return load_state_dict_file(p, prefix=None)


def _load_ldm_vae(path, weights, trust_pickle: bool):
    """:func:`load_vae` of an LDM yaml's first stage: a diffusers model built from its ddconfig,
    with the weights converted from LDM's key names by diffusers' own converter."""
    kind, cfg, scale, scale_by_std = _ldm_first_stage(path)
    try:
        import diffusers
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    except ImportError:
        raise BqcError("running an LDM first stage needs the diffusers package", hint=_PIP_DIFFUSERS) from None
    full = _read_weights(weights, trust_pickle)
    if scale_by_std:  # LatentDiffusion then computes scale_factor in training and keeps it as a buffer
        if not isinstance(full.get("scale_factor"), torch.Tensor) or full["scale_factor"].numel() != 1:
            raise BqcError(f"{path} sets scale_by_std, so the scale factor was computed in training and is stored in "
                           f"the full LDM checkpoint as 'scale_factor'; {weights} has none",
                           hint="give the full LDM checkpoint as --vae-weights")
        scale = cfg["scaling_factor"] = float(full["scale_factor"])
    prefix = "first_stage_model."
    sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)} if any(
        k.startswith(prefix) for k in full) else full
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()
          if not k.startswith("loss.")}  # loss.*: the autoencoder's training loss (discriminator, LPIPS)
    codebook = sd.get("quantize.embedding.weight") if kind == "VQModel" else None
    new = convert_ldm_vae_checkpoint(sd, cfg)
    if codebook is not None:
        new["quantize.embedding.weight"] = codebook
    used = {t.data_ptr() for t in new.values()}  # the converter keeps (views of) the tensors it maps
    ignored = sorted(k for k, t in sd.items() if t.data_ptr() not in used)
    with torch.device("meta"):  # no random init: every tensor comes from the weights (checked below)
        vae = getattr(diffusers, kind)(**cfg)
    want = vae.state_dict()
    shapes = [f"{k} {list(v.shape)} (the yaml's: {list(want[k].shape)})" for k, v in new.items()
              if k in want and v.shape != want[k].shape]
    if shapes:
        raise _mismatch(path, weights, kind, f"{len(shapes)} tensors of another shape, e.g. {'; '.join(shapes[:2])}")
    missing, unexpected = vae.load_state_dict(new, strict=False, assign=True)
    if missing or unexpected or ignored:
        raise _mismatch(path, weights, kind, "; ".join(f"{what} {len(ks)} keys, e.g. {list(ks)[:4]}" for what, ks in (
            ("missing (diffusers names)", missing), ("unexpected", list(unexpected) + ignored)) if ks))
    return vae.eval().requires_grad_(False), scale, None


def _mismatch(path, weights, kind: str, what: str) -> BqcError:
    return BqcError(f"the weights {weights} do not match the first stage of {path} ({kind} from its ddconfig): {what}",
                    hint="give the checkpoint that belongs to this yaml (its first-stage keys start with "
                    "'first_stage_model.', or are the first stage's own)")


def _latent_channels(vae) -> int:
    """Channels of the latents ``vae`` encodes to and decodes from (a VQModel's are its codebook's)."""
    return int(getattr(vae.config, "vq_embed_dim", None) or vae.config.latent_channels)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, scaling_factor: float, shift_factor: Optional[float] = None, *,
                  batch: int = 8) -> torch.Tensor:
    """``(N, 3, H, W)`` images in [-1, 1] -> scaled latents: an AutoencoderKL's latent distribution's
    mean, a VQModel's latents before the quantizer (as LDM's ``encode_first_stage``)."""
    out = []
    for i in range(0, len(images), batch):
        enc = vae.encode(images[i:i + batch])
        z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latents
        out.append(((z - (shift_factor or 0.0)) * scaling_factor).float())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scaling_factor: float, shift_factor: Optional[float] = None, *,
                   batch: int = 8) -> torch.Tensor:
    """Scaled latents -> images ``(N, 3, H, W)`` in [-1, 1] (the inverse of :func:`encode_images`; a
    VQModel quantizes the latents first, as LDM's ``decode_first_stage``)."""
    want = _latent_channels(vae)
    if latents.dim() != 4 or latents.shape[1] != want:
        raise BqcError(f"the VAE decodes latents of {want} channels; the samples are {tuple(latents.shape)}",
                       hint="--vae is for latent diffusion models (their samples are the VAE's latents)")
    out = []
    for i in range(0, len(latents), batch):
        z = latents[i:i + batch] / scaling_factor + (shift_factor or 0.0)
        out.append(vae.decode(z).sample.float().clamp(-1, 1))
    return torch.cat(out)


def load_text_encoder(path, *, trust_pickle: bool = False):
    """``(tokenizer, text_model)`` from a transformers CLIP text model folder (eval mode)."""
    d = _model_dir(path, ("CLIPTextModel", "CLIPTextModelWithProjection"), "text_encoder", "text encoder")
    try:
        import transformers
    except ImportError:
        raise BqcError("encoding captions needs the transformers package (for the CLIP text encoder)",
                       hint="python3 -m pip install transformers, or give precomputed embeddings with --context") from None
    safe = _weights_safetensors(d, trust_pickle, "text encoder")
    tok_dir = next((t for t in (d, d.parent / "tokenizer") if (t / "tokenizer_config.json").is_file()
                    or (t / "vocab.json").is_file()), None)
    if tok_dir is None:
        raise BqcError(f"no tokenizer next to the text encoder {d} (looked in {d} and {d.parent / 'tokenizer'})",
                       hint="put the tokenizer files (vocab.json, merges.txt, tokenizer_config.json) in one of them")
    transformers.utils.logging.disable_progress_bar()  # bqc prints its own progress
    try:
        tok = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
        model = transformers.CLIPTextModel.from_pretrained(str(d), use_safetensors=safe)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise BqcError(f"cannot load the text encoder in {d}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return tok, model.eval().requires_grad_(False)


@torch.no_grad()
def embed_prompts(tokenizer, model, prompts: list[str], length: Optional[int] = None, *, batch: int = 16) -> torch.Tensor:
    """``(len(prompts), L, D)``: the text model's last hidden state for prompts padded/truncated
    to ``length`` tokens (default: the tokenizer's ``model_max_length``)."""
    length = int(length or tokenizer.model_max_length)
    out = []
    for i in range(0, len(prompts), batch):
        ids = tokenizer(prompts[i:i + batch], padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        out.append(model(ids)[0].float())
    return torch.cat(out)


def read_captions(path, files: list[Path], root: Path) -> list[str]:
    """One caption per image of ``files`` (see the module docstring for the formats)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BqcError(f"captions file not found: {p}")
    try:
        text = read_text_file(p, "captions file", limit=1 << 30)
    except (OSError, UnicodeDecodeError) as e:
        raise BqcError(f"cannot read the captions file {p}: {e}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise BqcError(f"{p} is not valid JSON: {str(e)[:200]}") from None
        if isinstance(data, dict):
            names = [f.relative_to(root).as_posix() for f in files]
            missing = [n for n, f in zip(names, files) if n not in data and f.name not in data]
            if missing:
                raise BqcError(f"{p} has no caption for {len(missing)} of the {len(files)} images, e.g. {missing[:3]}",
                               hint="key the captions by the image's path inside the folder (or its file name)")
            caps = [data[n] if n in data else data[f.name] for n, f in zip(names, files)]
        elif isinstance(data, list):
            caps = data
        else:
            raise BqcError(f"{p}: the captions are a JSON list (in image order) or an object image -> caption")
    else:
        caps = text.splitlines()
        if caps and caps[-1] == "":
            caps = caps[:-1]
    if not all(isinstance(c, str) for c in caps):
        raise BqcError(f"{p}: every caption must be a string")
    if len(caps) != len(files):
        raise BqcError(f"{p} has {len(caps)} captions for {len(files)} images; there is one per image, in the order "
                       "of their sorted paths", hint="or key them by file name in a JSON object")
    return caps


def read_context_file(path) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(context [N,L,D], uncond [1,L,D] or None)`` from a safetensors file of precomputed embeddings."""
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise BqcError(f"embeddings file not found: {p}")
    hint = "the embeddings file is safetensors with 'context' float [N,L,D] and optionally 'uncond' float [1,L,D]"
    try:
        with safe_open(str(p), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BqcError(f"cannot read {p} as safetensors: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                       hint=hint) from None
    if "context" not in t:
        raise BqcError(f"{p} has no 'context' tensor (it holds {sorted(t) or 'nothing'})", hint=hint)
    return t["context"], t.get("uncond")  # shapes, dtypes, finiteness: checked by save_latents


def encode_folder(images, vae_dir, out, *, vae_weights=None, captions=None, text_encoder=None, context=None,
                  resize=None, context_len: Optional[int] = None, batch: int = 8, trust_pickle: bool = False) -> Path:
    """Encode the image folder ``images`` into the latents file ``out`` with the VAE ``vae_dir`` (a
    diffusers folder, or an LDM yaml with its ``vae_weights``; module docstring)."""
    if captions and context:
        raise BqcError("--captions and --context both give text embeddings; give one")
    if captions and not text_encoder:
        raise BqcError("--captions needs --text-encoder DIR (the CLIP text model that turns captions into embeddings)",
                       hint="or give precomputed embeddings with --context FILE.safetensors")
    if text_encoder and not captions:
        raise BqcError("--text-encoder needs --captions FILE (the caption of each image)")
    if context_len is not None and not text_encoder:
        raise BqcError("--context-len sets the token count of captions encoded with --text-encoder")
    root = Path(images).expanduser()
    ds = load_dataset(str(root), resize=resize, channels=3)  # the VAE takes RGB in [-1, 1]
    files = image_files(root)
    ctx = unc = None
    source = {"images": str(root), "vae": str(vae_dir), "count": len(files)}
    if vae_weights is not None:
        source["vae_weights"] = str(vae_weights)
    if context:
        ctx, unc = read_context_file(context)
        source["context"] = str(context)
        if len(ctx) != len(files):
            raise BqcError(f"{context} has {len(ctx)} embeddings for {len(files)} images; there is one per image, in "
                           "the order of their sorted paths")
    elif captions:
        caps = read_captions(captions, files, root)
        tok, text_model = load_text_encoder(text_encoder, trust_pickle=trust_pickle)
        ctx = embed_prompts(tok, text_model, caps, context_len)
        unc = embed_prompts(tok, text_model, [""], context_len)
        source.update(captions=str(captions), text_encoder=str(text_encoder))
    vae, scale, shift = load_vae(vae_dir, weights=vae_weights, trust_pickle=trust_pickle)
    lat = encode_images(vae, ds.images, scale, shift, batch=batch)
    return save_latents(out, lat, context=ctx, uncond=unc, scaling_factor=scale, shift_factor=shift, source=source)
