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
* text: ``captions`` (a JSON list in image order, a JSON object image-name -> caption, or a
  ``.txt`` with one caption per line in image order) encoded with ``text_encoder``, a
  transformers CLIP text model folder (``config.json`` + safetensors; its tokenizer in the same
  folder or a sibling ``tokenizer/``, as in an SD pipeline folder), padded to ``context_len``
  tokens (default: the tokenizer's, 77 for CLIP): ``context`` is the last hidden state, and the
  empty prompt's is stored as ``uncond`` (classifier-free guidance). Or ``context``: a
  safetensors file of precomputed embeddings (``context`` [N,L,D], optional ``uncond`` [1,L,D]).

Weights are read from safetensors only; a folder with only pickled ``.bin`` weights is refused
unless ``trust_pickle`` (the CLI's ``--trust-pickle``), since unpickling runs code from the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from bqc.data import image_files, load_dataset, save_latents
from bqc.errors import BqcError

__all__ = ["load_vae", "encode_images", "decode_latents", "load_text_encoder", "embed_prompts", "read_captions",
           "read_context_file", "encode_folder"]

_PIP_DIFFUSERS = "python3 -m pip install diffusers"


def _model_dir(path, class_names: tuple[str, ...], sub: str, what: str) -> Path:
    """The folder holding a model of one of ``class_names`` (``path`` or its ``sub/``)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise BqcError(f"{what} folder not found: {p}", hint=f"give the folder with the {what}'s config.json and weights")
    for d in (p, p / sub):
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                c = json.loads(cfg.read_text())
            except (OSError, ValueError) as e:
                raise BqcError(f"cannot read {cfg}: {e}") from None
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


def load_vae(path, *, trust_pickle: bool = False):
    """``(vae, scaling_factor, shift_factor)`` from a diffusers ``AutoencoderKL`` folder (eval mode)."""
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


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, scaling_factor: float, shift_factor: Optional[float] = None, *,
                  batch: int = 8) -> torch.Tensor:
    """``(N, 3, H, W)`` images in [-1, 1] -> scaled latents (the latent distribution's mean)."""
    out = []
    for i in range(0, len(images), batch):
        z = vae.encode(images[i:i + batch]).latent_dist.mode()
        out.append(((z - (shift_factor or 0.0)) * scaling_factor).float())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scaling_factor: float, shift_factor: Optional[float] = None, *,
                   batch: int = 8) -> torch.Tensor:
    """Scaled latents -> images ``(N, 3, H, W)`` in [-1, 1] (the inverse of :func:`encode_images`)."""
    want = int(vae.config.latent_channels)
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
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BqcError(f"cannot read the captions file {p}: {e}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise BqcError(f"{p} is not valid JSON: {e}") from None
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


def encode_folder(images, vae_dir, out, *, captions=None, text_encoder=None, context=None, resize=None,
                  context_len: Optional[int] = None, batch: int = 8, trust_pickle: bool = False) -> Path:
    """Encode the image folder ``images`` into the latents file ``out`` (module docstring)."""
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
    vae, scale, shift = load_vae(vae_dir, trust_pickle=trust_pickle)
    lat = encode_images(vae, ds.images, scale, shift, batch=batch)
    return save_latents(out, lat, context=ctx, uncond=unc, scaling_factor=scale, shift_factor=shift, source=source)
