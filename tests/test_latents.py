"""Latent text-to-image data and conditioning (issue 16, parts 3-4): the latents file (layout,
round trip, refusals), `bqc encode` with a tiny random AutoencoderKL, QAT of text-conditioned
artifacts on a latents file (binarydm, bidm) through the CLI, and classifier-free guidance
sampling (S = 1 is unguided, the branches keep their own TBS state), decoded to PNG by the VAE.
The tiny UNets are tests/test_text2img.py's (both families)."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from bqc import artifact
from bqc import transform as tf
from bqc.data import LATENTS_FORMAT, LATENTS_VERSION, load_dataset, save_latents
from bqc.diffusion.samplers import generate
from bqc.errors import BqcError
from clirun import run_cli
from test_text2img import CTX_DIM, _source

L, N = 5, 4
SHAPE = (4, 8, 8)
META = {"format": LATENTS_FORMAT, "version": LATENTS_VERSION, "scaling_factor": "0.5", "source": "{}"}


def _tensors(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(n, *SHAPE, generator=g), "context": torch.randn(n, L, CTX_DIM, generator=g),
            "uncond": torch.randn(1, L, CTX_DIM, generator=g), "labels": torch.arange(n, dtype=torch.int64)}


def _latents_file(path, **drop):
    t = {k: v for k, v in _tensors().items() if k not in drop}
    return save_latents(path, t.pop("latents"), **t, scaling_factor=0.5, source={"test": True})


_ARTS: dict = {}


def _artifact(family, recipe, tmp_path_factory):
    """A transformed tiny text UNet artifact, made once per (family, recipe) in this module."""
    if (family, recipe) not in _ARTS:
        _, src, _ = _source(family)
        _ARTS[family, recipe] = tf.save(tf.transform(src, recipe), tmp_path_factory.mktemp(f"{family}-{recipe}") / "art")
    return _ARTS[family, recipe]


# the latents file -----------------------------------------------------------------------------
def test_latents_round_trip(tmp_path):
    want = _tensors()
    p = _latents_file(tmp_path / "lat.safetensors")
    ds = load_dataset(str(p))
    assert ds.is_latents and ds.info["scaling_factor"] == 0.5 and ds.info["source"] == {"test": True}
    for k, v in (("latents", ds.images), ("context", ds.context), ("uncond", ds.uncond), ("labels", ds.labels)):
        assert torch.equal(v, want[k]), k
    ds = load_dataset(str(_latents_file(tmp_path / "plain.safetensors", context=1, uncond=1, labels=1)))
    assert ds.context is None and ds.uncond is None and ds.labels is None and ds.images.shape == (N, *SHAPE)
    half = {**_tensors(), "latents": _tensors()["latents"].half()}  # float16 is read as float32
    save_file(half, str(tmp_path / "half.safetensors"), metadata=META)
    assert load_dataset(str(tmp_path / "half.safetensors")).images.dtype == torch.float32


BAD = {
    "missing latents": ({"context": _tensors()["context"]}, META, "no 'latents'"),
    "wrong rank": ({"latents": torch.zeros(N, 8, 8)}, META, "'latents' has shape"),
    "row mismatch": ({**_tensors(), "context": _tensors(n=N + 1)["context"]}, META, "rows"),
    "nan": ({"latents": torch.full((N, *SHAPE), float("nan"))}, META, "NaN"),
    "int latents": ({"latents": torch.zeros(N, *SHAPE, dtype=torch.int32)}, META, "float32"),
    "int32 labels": ({**_tensors(), "labels": torch.zeros(N, dtype=torch.int32)}, META, "int64"),
    "uncond width": ({**_tensors(), "uncond": torch.zeros(1, L, CTX_DIM + 1)}, META, "L and D"),
    "unknown key": ({**_tensors(), "images": torch.zeros(1)}, META, "does not have"),
    "not bqc": (_tensors(), {"format": "other"}, "not a bqc latents file"),
    "version": (_tensors(), {**META, "version": "9"}, "version"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_latents_are_refused(tmp_path, case):
    tensors, meta, msg = BAD[case]
    p = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta)
    with pytest.raises(BqcError, match=msg):
        load_dataset(str(p))


def test_pickles_and_missing_files_are_refused(tmp_path):
    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps({"latents": [1.0]}))
    with pytest.raises(BqcError, match="cannot read .* as safetensors"):
        load_dataset(str(p))
    with pytest.raises(BqcError, match="not found"):
        load_dataset(str(tmp_path / "missing.safetensors"))
    with pytest.raises(BqcError, match="image folders"):
        load_dataset(str(_latents_file(tmp_path / "ok.safetensors")), resize=(4, 4))


# bqc encode -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL (8x8 RGB -> 4x8x8 latents) saved with diffusers' save_pretrained."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8, sample_size=8,
                                  scaling_factor=0.7)
    d = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(d)
    return d


def _image_folder(path, n=N):
    from PIL import Image

    path.mkdir()
    g = torch.Generator().manual_seed(3)
    for i in range(n):
        a = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(a, "RGB").save(path / f"{i:02d}.png")
    return path


def test_encode_with_vae_and_precomputed_context(tmp_path, vae_dir, capsys):
    from bqc.encode import decode_latents, load_vae

    imgs = _image_folder(tmp_path / "imgs")
    emb = tmp_path / "emb.safetensors"
    t = _tensors()
    save_file({"context": t["context"], "uncond": t["uncond"]}, str(emb))
    out = tmp_path / "lat.safetensors"
    code, stdout, err = run_cli(["encode", imgs, "--vae", vae_dir, "--context", emb, "-o", out, "--threads", "1"], capsys)
    assert code == 0, err
    ds = load_dataset(str(out))
    vae, scale, shift = load_vae(vae_dir)
    assert scale == 0.7 and ds.info["scaling_factor"] == 0.7
    x = load_dataset(str(imgs)).images
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mode() * 0.7
    assert ds.images.shape == (N, *SHAPE) and torch.allclose(ds.images, want, atol=1e-6)
    assert torch.equal(ds.context, t["context"]) and torch.equal(ds.uncond, t["uncond"])
    assert decode_latents(vae, ds.images, scale).shape == (N, 3, 8, 8)
    # refusals: pickled-only weights, captions without a text encoder, a wrong count of embeddings
    pk = tmp_path / "pk"
    pk.mkdir()
    (pk / "config.json").write_text((vae_dir / "config.json").read_text())
    (pk / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
    for args, msg in ((["--vae", pk], "only pickled weights"),
                      (["--vae", vae_dir, "--captions", emb], "needs --text-encoder"),
                      (["--vae", imgs], "no AutoencoderKL config.json")):
        code, _, err = run_cli(["encode", imgs, *args, "-o", tmp_path / "x.safetensors"], capsys)
        assert code == 2 and msg in " ".join(err.split()), err
    save_file({"context": t["context"][:2]}, str(emb))
    code, _, err = run_cli(["encode", imgs, "--vae", vae_dir, "--context", emb, "-o", tmp_path / "y.safetensors"], capsys)
    assert code == 2 and "2 embeddings for 4 images" in " ".join(err.split())


class _Tokenizer:
    """Stands in for a CLIP tokenizer: one id per character, padded to max_length."""

    model_max_length = L

    def __call__(self, prompts, *, padding, max_length, truncation, return_tensors):
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            for j, ch in enumerate(p[:max_length]):
                ids[i, j] = ord(ch) % 50
        return type("Enc", (), {"input_ids": ids})


def test_encode_captions_with_text_encoder(tmp_path, vae_dir, monkeypatch):
    """The captions path of `bqc encode`: each image's caption embedded in image order and the
    empty prompt as uncond (a stand-in text model: transformers is optional, and loading a real CLIP
    folder needs the user's weights)."""
    from bqc import encode

    emb = torch.nn.Embedding(50, CTX_DIM)
    text_model = lambda ids: (emb(ids),)  # noqa: E731
    monkeypatch.setattr(encode, "load_text_encoder", lambda path, trust_pickle=False: (_Tokenizer(), text_model))
    imgs = _image_folder(tmp_path / "imgs", n=2)
    (tmp_path / "caps.json").write_text(json.dumps({"01.png": "a dog", "00.png": "a cat"}))
    out = encode.encode_folder(imgs, vae_dir, tmp_path / "lat.safetensors", captions=tmp_path / "caps.json",
                               text_encoder=tmp_path / "unused")
    ds = load_dataset(str(out))
    with torch.no_grad():
        want = encode.embed_prompts(_Tokenizer(), text_model, ["a cat", "a dog", ""])
    assert ds.context.shape == (2, L, CTX_DIM) and torch.equal(ds.context, want[:2]) and torch.equal(ds.uncond, want[2:])
    assert ds.info["source"]["captions"].endswith("caps.json")
    monkeypatch.undo()
    with pytest.raises(BqcError, match="holds a AutoencoderKL, not a CLIPTextModel"):
        encode.load_text_encoder(vae_dir)  # a folder of another model is refused before any import


def _clip_folder(root, ctx_len=6):
    """An SD-style pair of folders (text_encoder/, tokenizer/): a tiny random transformers CLIPTextModel and a
    character-level CLIPTokenizer (a real BPE vocabulary without merges), both saved by transformers."""
    transformers = pytest.importorskip("transformers")
    enc, tok_dir = root / "text_encoder", root / "tokenizer"
    tok_dir.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {t: i for i, t in enumerate([*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"])}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                               model_max_length=ctx_len).save_pretrained(str(tok_dir))
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=CTX_DIM, intermediate_size=2 * CTX_DIM,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=ctx_len,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                      pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    transformers.CLIPTextModel(cfg).save_pretrained(str(enc))
    return enc


def test_encode_captions_with_a_real_clip_folder(tmp_path, vae_dir, capsys):
    """`bqc encode --captions --text-encoder` on a folder transformers wrote: the tokenizer is found in the
    sibling tokenizer/ folder, the context length defaults to the tokenizer's, and each row is the CLIP text
    model's last hidden state for that image's caption (the empty prompt's is 'uncond')."""
    import transformers

    enc = _clip_folder(tmp_path / "sd")
    imgs = _image_folder(tmp_path / "imgs", n=2)
    (tmp_path / "caps.txt").write_text("a cat\nthe dog\n")
    out = tmp_path / "lat.safetensors"
    code, _, err = run_cli(["encode", imgs, "--vae", vae_dir, "--captions", tmp_path / "caps.txt", "--text-encoder", enc,
                            "-o", out, "--threads", "1"], capsys)
    assert code == 0, err
    ds = load_dataset(str(out))
    tok = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "sd" / "tokenizer"))
    model = transformers.CLIPTextModel.from_pretrained(str(enc)).eval()
    ids = tok(["a cat", "the dog", ""], padding="max_length", max_length=6, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).last_hidden_state
    assert ds.context.shape == (2, 6, CTX_DIM) and torch.allclose(ds.context, want[:2], atol=1e-6)
    assert torch.allclose(ds.uncond, want[2:], atol=1e-6) and not torch.allclose(ds.context[0], ds.context[1])
    # --context-len overrides the tokenizer's length; pickled-only text encoder weights are refused
    code, _, err = run_cli(["encode", imgs, "--vae", vae_dir, "--captions", tmp_path / "caps.txt", "--text-encoder", enc,
                            "--context-len", "4", "-o", tmp_path / "l4.safetensors"], capsys)
    assert code == 0 and load_dataset(str(tmp_path / "l4.safetensors")).context.shape == (2, 4, CTX_DIM), err
    for f in enc.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    code, _, err = run_cli(["encode", imgs, "--vae", vae_dir, "--captions", tmp_path / "caps.txt", "--text-encoder", enc,
                            "-o", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "only pickled weights" in " ".join(err.split()), err


def test_read_captions_formats(tmp_path):
    from bqc.encode import read_captions

    imgs = _image_folder(tmp_path / "imgs", n=2)
    files = sorted(imgs.glob("*.png"))
    (tmp_path / "c.txt").write_text("a cat\na dog\n")
    assert read_captions(tmp_path / "c.txt", files, imgs) == ["a cat", "a dog"]
    (tmp_path / "c.json").write_text(json.dumps({"01.png": "b", "00.png": "a"}))
    assert read_captions(tmp_path / "c.json", files, imgs) == ["a", "b"]
    (tmp_path / "short.json").write_text(json.dumps(["only one"]))
    with pytest.raises(BqcError, match="1 captions for 2 images"):
        read_captions(tmp_path / "short.json", files, imgs)


# QAT with conditioning ------------------------------------------------------------------------
@pytest.mark.parametrize("family,recipe", [("ldm", "bidm"), ("diffusers", "binarydm")])
def test_qat_on_latents_with_context(tmp_path, tmp_path_factory, capsys, family, recipe):
    art = _artifact(family, recipe, tmp_path_factory)
    lat = _latents_file(tmp_path / "lat.safetensors")
    code, _, err = run_cli(["train", art, "--data", lat, "--steps", "2", "--batch", "2", "--warmup", "1",
                            "--cond-drop", "0.5", "--threads", "1", "-q", "-o", tmp_path / "run"], capsys)
    assert code == 0, err
    trained = artifact.load_artifact(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "train.json").read_text())["options"]["cond_drop"] == 0.5
    ds = load_dataset(str(lat))
    with torch.no_grad():
        eps, _ = trained.model.eval()(ds.images[:2], torch.tensor([10, 500]), context=ds.context[:2])
    assert eps.shape == (2, *SHAPE) and torch.isfinite(eps).all()


def test_conditioned_artifact_needs_context_data(tmp_path, tmp_path_factory, capsys):
    art = _artifact("ldm", "bidm", tmp_path_factory)
    plain = _latents_file(tmp_path / "plain.safetensors", context=1, uncond=1)
    code, _, err = run_cli(["train", art, "--data", plain, "--steps", "1", "-q", "-o", tmp_path / "r1"], capsys)
    assert code == 2 and "has no text embeddings" in " ".join(err.split()), err
    imgs = _image_folder(tmp_path / "imgs")
    code, _, err = run_cli(["train", art, "--data", imgs, "--steps", "1", "-q", "-o", tmp_path / "r2"], capsys)
    assert code == 2 and "image data cannot condition it" in " ".join(err.split()), err
    noun = _latents_file(tmp_path / "nouncond.safetensors", uncond=1)
    code, _, err = run_cli(["train", art, "--data", noun, "--steps", "1", "--cond-drop", "0.1", "-q", "-o", tmp_path / "r3"],
                           capsys)
    assert code == 2 and "empty-prompt" in " ".join(err.split()), err


# sampling with guidance -----------------------------------------------------------------------
def test_guidance_scales_and_tbs_state_per_branch(tmp_path_factory):
    """BiDM (TBS state): S = 1 is exactly the unguided sample; S = 0 is exactly the sample with the
    empty prompt alone, which holds only if each branch gets back its own cached features."""
    model = artifact.load_artifact(_artifact("ldm", "bidm", tmp_path_factory)).model.eval()
    assert model.num_state > 0 and model.context == (L, CTX_DIM)
    t = _tensors(n=2)
    c, u = t["context"], t["uncond"]
    run = lambda **kw: generate(model, 2, SHAPE, steps=3, seed=1, **kw)  # noqa: E731
    unguided = run(context=c)
    assert torch.equal(run(context=c, uncond=u, guidance=1.0), unguided)
    assert torch.equal(run(context=c, uncond=u, guidance=0.0), run(context=u.expand(2, -1, -1)))
    guided = run(context=c, uncond=u, guidance=4.0)
    assert (guided - unguided).abs().max() > 1e-4 and torch.isfinite(guided).all()
    calls = []
    spy = lambda x, tt, y, state, **cond: (calls.append(cond["context"]), model(x, tt, y, state, **cond))[1]  # noqa: E731
    generate(spy, 2, SHAPE, steps=2, context=c, uncond=u, guidance=4.0)
    assert len(calls) == 4 and torch.equal(calls[0], c) and torch.equal(calls[1], u.expand(2, -1, -1))
    with pytest.raises(BqcError, match="empty-prompt"):
        generate(model, 2, SHAPE, steps=2, context=c, guidance=3.0)


def test_sample_cli_guided_decoded_and_latents(tmp_path, tmp_path_factory, vae_dir, capsys):
    from PIL import Image

    art = _artifact("diffusers", "binarydm", tmp_path_factory)
    lat = _latents_file(tmp_path / "lat.safetensors")
    base = ["sample", art, "--data", lat, "--guidance", "3", "-n", "2", "--steps", "2", "--threads", "1", "-q"]
    code, _, err = run_cli([*base, "--vae", vae_dir, "-o", tmp_path / "img.png"], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "img.png") as im:
        assert im.mode == "RGB"
    assert not (tmp_path / "img.safetensors").exists()
    code, _, err = run_cli([*base, "-o", tmp_path / "lat_out.png"], capsys)
    assert code == 0, err
    out = load_dataset(str(tmp_path / "lat_out.safetensors"))
    assert out.images.shape == (2, *SHAPE) and out.info["scaling_factor"] == 0.5 and out.info["source"]["guidance"] == 3
    assert (tmp_path / "lat_out.png").is_file()
    code, _, err = run_cli(["sample", art, "-n", "2", "--steps", "2", "-q", "-o", tmp_path / "none.png"], capsys)
    err = " ".join(err.split())
    assert code == 2 and "text-conditioned" in err and "--data" in err, err
    code, _, err = run_cli(["eval", art, "--data", lat, "-n", "2", "-q"], capsys)
    assert code == 2 and "latents file" in " ".join(err.split()), err


def test_context_len_option(tmp_path, capsys):
    code, _, err = run_cli(["inspect", "mnist16", "--context-len", "5"], capsys)
    assert code == 2 and "not text-conditioned" in " ".join(err.split()), err
    code, _, err = run_cli(["transform", "mnist16", "--context-len", "0", "-o", tmp_path / "a"], capsys)
    assert code == 2 and "--context-len must be in [1, 65536]" in " ".join(err.split()), err
    code, _, err = run_cli(["inspect", "mnist16", "--context-len", str(10**9)], capsys)
    assert code == 2 and "--context-len must be in [1, 65536]" in " ".join(err.split()), err


def test_latents_files_bqc_wrote_may_be_replaced_others_not(tmp_path):
    """A latents file bqc wrote (``format: bqc-latents`` in its metadata) is bqc's output, so
    re-running `bqc encode` / a latent `bqc sample` replaces it; any other safetensors file (or a
    damaged header) needs --force."""
    from bqc.outputs import SAFETENSORS_FORMATS, check_output, is_bqc_file

    assert LATENTS_FORMAT in SAFETENSORS_FORMATS
    ours = _latents_file(tmp_path / "ours.safetensors")
    assert is_bqc_file(ours) and check_output(ours, "file") == ours
    theirs = tmp_path / "theirs.safetensors"
    save_file({"latents": torch.zeros(1, 4, 8, 8)}, str(theirs), metadata={"format": "pt"})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    for p in (theirs, bad):
        assert not is_bqc_file(p)
        with pytest.raises(BqcError, match="--force"):
            check_output(p, "file")
    assert check_output(theirs, "file", force=True) == theirs
