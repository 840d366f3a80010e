"""One-call evaluation of generated 16x16 MNIST samples against real images."""
from __future__ import annotations

import torch

from bqc.errors import BqcError
from bqc.metrics.classifier import MnistClassifier, load_classifier
from bqc.metrics.stats import fid_from_features, inception_score, kid_from_features, precision_recall

__all__ = ["evaluate", "format_metrics", "real_split"]


def image_batch(x, what: str, context: str, ok, expected: str, hint: str | None = None) -> torch.Tensor:
    """Images (a Dataset, array or tensor; (N, H, W) or (N, C, H, W)) as a float CPU (N, C, H, W)
    tensor clamped to [-1, 1]; a shape ``ok(shape)`` rejects or a non-finite value is a BqcError
    (``context: what have shape ...<expected>``)."""
    if hasattr(x, "images"):
        x = x.images
    x = torch.as_tensor(x).detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or not ok(tuple(x.shape)):
        raise BqcError(f"{context}: {what} have shape {tuple(x.shape)}{expected}", hint=hint)
    if not torch.isfinite(x).all():
        raise BqcError(f"{context}: {what} contain NaN or infinite values")
    return x.clamp(-1, 1)


def _as_images(x, what: str) -> torch.Tensor:
    return image_batch(x, what, "evaluate", lambda s: s[1:] == (1, 16, 16),
                       ", but the metrics classifier takes (N, 1, 16, 16)",
                       hint="the built-in metrics are for the mnist16 data set")


def real_split(r: torch.Tensor, n: int, seed: int = 0, *, need: int = 2):
    """The two disjoint random sets of ``n`` real images (A = reference, B = real-vs-real floor)
    that every metric uses: a permutation seeded by ``seed``. ``need=1`` allows fewer than 2n
    images and returns ``(A, None)``."""
    if len(r) < need * n:
        raise BqcError(f"evaluate: the real-vs-real floor needs 2n={2 * n} real images, got {len(r)}" if need == 2 else
                       f"evaluate: need n={n} real images, got {len(r)}", hint="lower n or pass more real images")
    perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(seed))
    return r[perm[:n]], (r[perm[n:2 * n]] if need >= 2 else None)


#: the fewest samples :func:`evaluate` scores with its default k = 3 (precision / recall need k + 2)
MIN_N = 5


def evaluate(samples, real=None, n: int = 1000, *, classifier: MnistClassifier | None = None,
             k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """Score ``samples`` (N,1,16,16 in [-1,1]) against ``real`` images (default: the mnist16
    test split) with the shipped MNIST classifier's features and logits.

    Uses the first ``n`` samples and two disjoint random sets of ``n`` real images (a seeded
    permutation): A is the reference for every metric, B gives the real-vs-real floor of the
    same size (what a perfect generator would score at this N).

    Keys: ``n``, ``fid``, ``fid_floor``, ``kid``, ``kid_std``, ``kid_floor``, ``precision``,
    ``recall``, ``precision_floor``, ``recall_floor`` (k-NN manifolds, ``k``), ``is``
    (exp E KL(p(y|x)||p(y)) over all n), ``is_real``, ``confident`` (fraction of samples whose
    top class has probability > 0.9, a "readable digit" rate), ``confident_real``,
    ``class_hist`` / ``class_hist_real`` (predicted-class counts, length 10).
    """
    n = int(n)
    s = _as_images(samples, "samples")
    if real is None:
        from bqc.data import load_dataset

        real = load_dataset("mnist16", "test").images
    r = _as_images(real, "real images")
    if n < k + 2:
        raise BqcError(f"evaluate: n={n} is too small (need more than k+1={k + 1})")
    if len(s) < n:
        raise BqcError(f"evaluate: asked for n={n} but got only {len(s)} samples")
    ra, rb = real_split(r, n, seed)
    clf = classifier or load_classifier()
    fs, ls = clf.features_and_logits(s[:n])
    fa, la = clf.features_and_logits(ra)
    fb, _ = clf.features_and_logits(rb)
    kid, kid_std = kid_from_features(fs, fa, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    kid_floor, _ = kid_from_features(fb, fa, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    prec, rec = precision_recall(fa, fs, k=k)
    prec_f, rec_f = precision_recall(fa, fb, k=k)
    is_s, _ = inception_score(ls)
    is_r, _ = inception_score(la)
    ps, pr = ls.softmax(1), la.softmax(1)
    return {
        "n": n,
        "fid": fid_from_features(fs, fa),
        "fid_floor": fid_from_features(fb, fa),
        "kid": kid, "kid_std": kid_std, "kid_floor": kid_floor,
        "precision": prec, "recall": rec, "precision_floor": prec_f, "recall_floor": rec_f,
        "is": is_s, "is_real": is_r,
        "confident": float((ps.max(1).values > 0.9).double().mean()),
        "confident_real": float((pr.max(1).values > 0.9).double().mean()),
        "class_hist": torch.bincount(ls.argmax(1), minlength=10).tolist(),
        "class_hist_real": torch.bincount(la.argmax(1), minlength=10).tolist(),
    }


def format_metrics(m: dict) -> str:
    """A compact one-line summary of :func:`evaluate`'s dict."""
    return (f"n={m['n']} FID {m['fid']:.3f} (floor {m['fid_floor']:.3f})  KID {m['kid']:.5f} (floor {m['kid_floor']:.5f})  "
            f"P {m['precision']:.3f} R {m['recall']:.3f} (floor {m['precision_floor']:.3f}/{m['recall_floor']:.3f})  "
            f"IS {m['is']:.2f} (real {m['is_real']:.2f})  confident {m['confident']:.3f}  hist {m['class_hist']}")
