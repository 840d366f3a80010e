"""Sample-quality statistics on feature vectors: FID, KID, precision/recall, IS.

Everything here works on plain float64 feature matrices ``(N, D)`` (numpy or torch), so it
is independent of which network produced them. No scipy: the matrix square root in FID uses
the symmetric form ``tr sqrt(S1^1/2 S2 S1^1/2)`` computed with ``eigh``, which is stable for
the positive semi-definite (possibly singular) covariances of small sets.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "frechet_distance", "fid_from_features", "kid_from_features",
    "precision_recall", "inception_score",
]


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)`` for Gaussians N(mu1,S1), N(mu2,S2)."""
    mu1, mu2, s1, s2 = _np(mu1), _np(mu2), _np(s1), _np(s2)
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(w, 0, None)).sum())
    d = mu1 - mu2
    return float(max(0.0, d @ d + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))


def fid_from_features(f1, f2) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets (unbiased covariance)."""
    f1, f2 = _np(f1), _np(f2)
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def kid_from_features(f1, f2, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD^2 estimate with the
    cubic polynomial kernel ``k(x,y) = (x.y / d + 1)^3``, averaged over random subsets of
    ``min(subset_size, n1, n2)`` drawn without replacement. Returns ``(mean, std)``."""
    f1, f2 = _np(f1), _np(f2)
    d = f1.shape[1]
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError("kid: need at least 2 samples per set")
    rng = np.random.default_rng(seed)
    if m == len(f1) == len(f2):
        subsets = 1  # every "subset" would be the whole sets: the estimate is the same each time
    vals = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def _kth_nn_radius(f: torch.Tensor, k: int) -> torch.Tensor:
    dist = torch.cdist(f, f)
    # the k+1-th smallest distance includes the point itself at distance 0
    return dist.kthvalue(k + 1, dim=1).values


def precision_recall(real, fake, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    The real manifold is the union of balls around each real feature with radius its
    distance to its k-th nearest real neighbour; precision is the fraction of fake samples
    inside it. Recall swaps the roles (fraction of real samples inside the fake manifold)."""
    r = torch.as_tensor(_np(real))
    f = torch.as_tensor(_np(fake))
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"precision/recall: need more than k={k} samples per set")

    def coverage(ref: torch.Tensor, query: torch.Tensor) -> float:
        rad = _kth_nn_radius(ref, k)
        inside = torch.zeros(len(query), dtype=torch.bool)
        for i in range(0, len(query), 2048):
            dq = torch.cdist(query[i:i + 2048], ref)
            inside[i:i + 2048] = (dq <= rad[None, :]).any(1)
        return float(inside.double().mean())

    return coverage(r, f), coverage(f, r)


def inception_score(logits, *, splits: int = 1) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` from classifier logits; with ``splits > 1`` the mean
    and std over disjoint splits (p(y) estimated per split), else ``(score, 0.0)``."""
    lg = torch.as_tensor(_np(logits))
    logp = torch.log_softmax(lg, dim=1)
    p = logp.exp()
    scores = []
    for chunk_logp, chunk_p in zip(logp.chunk(splits), p.chunk(splits)):
        py = chunk_p.mean(0, keepdim=True).clamp_min(1e-30)
        kl = (chunk_p * (chunk_logp - py.log())).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), (float(np.std(scores)) if splits > 1 else 0.0)
