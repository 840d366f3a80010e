"""Distillation losses of the two papers (METHODS.md §4 and §6).

* LRM (BinaryDM): per tap, a PCA projection E of the teacher feature over channels, computed
  once from the first batch and then frozen (buffers: saved in checkpoints), keeping
  ``ceil(c / k)`` directions; loss = mean over taps of MSE(F_s E, F_t E).
* SPD (BiDM): split each feature map into a p x p grid of patches; per patch P (B, C, h*w),
  the Gram matrix over the spatial axis G = P P^T (B, C, C), normalised by its Frobenius
  norm; loss = mean over taps and patches of ||G_s - G_t||_F (mean over the batch).

The released reference code differs (METHODS §11); both forms exist for the ablation, chosen by
``distill_taps``' ``form = "code"``:

* LRM, code form: the PCA projects the feature's last (width) axis, not its channels.
* SPD, code form: per patch, per-channel h x h Gram matrices over the patch's width axis,
  normalised by the Frobenius norm of the whole batch's Gram tensor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _channels_last_2d(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, L, C)-free shapes -> (N, C) rows of channel vectors."""
    if f.dim() == 4:
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    if f.dim() == 3:  # (B, C, L)
        return f.permute(0, 2, 1).reshape(-1, f.shape[1])
    return f.reshape(f.shape[0], -1)


def _width_rows(f: torch.Tensor) -> torch.Tensor:
    """(..., W) -> (N, W) rows along the last axis (LRM's reference-code form)."""
    return f.reshape(-1, f.shape[-1])


class LRMProjections(nn.Module):
    """Frozen PCA projections, one per tap, initialised from the first teacher batch.

    ``axis="channel"`` (the paper): ``channels`` are the taps' channel counts;
    ``axis="width"`` (the reference code): they are the taps' widths (last axis)."""

    def __init__(self, channels: list[int], k: int = 4, axis: str = "channel"):
        super().__init__()
        if axis not in ("channel", "width"):
            raise ValueError(f"LRM axis must be 'channel' or 'width', got {axis!r}")
        self.k = int(k)
        self.rows = _channels_last_2d if axis == "channel" else _width_rows
        for i, c in enumerate(channels):
            self.register_buffer(f"proj_{i}", torch.zeros(c, math.ceil(c / self.k)))
            self.register_buffer(f"mean_{i}", torch.zeros(c))
        self.register_buffer("initialised", torch.tensor(False))
        self.n = len(channels)

    @torch.no_grad()
    def init_from(self, teacher_feats: list[torch.Tensor]) -> None:
        for i, f in enumerate(teacher_feats):
            rows = self.rows(f.float())
            mean = rows.mean(0)
            # principal directions of the channel covariance (eigh: ascending eigenvalues)
            cov = (rows - mean).T @ (rows - mean) / max(rows.shape[0] - 1, 1)
            _, vecs = torch.linalg.eigh(cov.double())
            r = getattr(self, f"proj_{i}").shape[1]
            getattr(self, f"proj_{i}").copy_(vecs[:, -r:].flip(1).to(rows.dtype))
            getattr(self, f"mean_{i}").copy_(mean)
        self.initialised.fill_(True)

    def loss(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        if not bool(self.initialised):
            self.init_from(teacher)
        total = 0.0
        for i, (fs, ft) in enumerate(zip(student, teacher)):
            e, m = getattr(self, f"proj_{i}"), getattr(self, f"mean_{i}")
            total = total + F.mse_loss((self.rows(fs) - m) @ e, (self.rows(ft) - m) @ e)
        return total / max(self.n, 1)


def _patches(f: torch.Tensor, p: int) -> torch.Tensor:
    """A p x p grid of patches of (B, C, H, W) as (B, p*p, C, h*w).

    The result is the transposed view of a pixel-major (B, p*p, h*w, C) tensor: gathering
    whole channel vectors (contiguous runs of C in a channels-last view) is one cheap copy,
    where a channel-major gather is a 6-D permute copy of 4-float runs, 3-7x slower forward
    and backward; the matmuls that consume the patches take either layout without a copy.
    """
    if f.dim() != 4:
        raise ValueError("SPD needs (B, C, H, W) features")
    b, c, h, w = f.shape
    ph, pw = max(h // p, 1), max(w // p, 1)
    gh, gw = h // ph, w // pw
    rows = f[:, :, : gh * ph, : gw * pw].permute(0, 2, 3, 1)  # (B, H, W, C) view
    rows = rows.reshape(b, gh, ph, gw, pw, c).transpose(2, 3).reshape(b, gh * gw, ph * pw, c)
    return rows.transpose(-1, -2)


_TINY = 1e-12  # a patch whose Gram norm is below this counts as all-zero (the clamped normalisation)


def _grams(patches: torch.Tensor) -> torch.Tensor:
    """Normalised Gram matrices P P^T of (B, p*p, C, n) patches: (B, p*p, C, C)."""
    g = patches @ patches.transpose(-1, -2)
    return g / g.flatten(2).norm(dim=-1).clamp_min(_TINY)[..., None, None]


def _patch_grams(f: torch.Tensor, p: int) -> torch.Tensor:
    """Normalised Gram matrices of a p x p grid of patches: (B, p*p, C, C)."""
    return _grams(_patches(f, p))


def _sq_frobenius(m: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norms over the last two axes, summed in float64 (no gradient)."""
    d = m.to(torch.float64, copy=True)  # a copy even of a float64 m: squared in place below
    return d.mul_(d).sum(dim=(-1, -2))


class _InnerSPD(torch.autograd.Function):
    """SPD's patch distances from n x n inner products, with a hand-written backward.

    ``ps``, ``pt``: (B, P, C, n) patches. Forward, with A = ps^T ps, T = pt^T pt, X = ps^T pt
    (n x n each) and a = |A|, b = |T|, x = |X|^2 summed in float64:
    d^2 = [a > 0] + [b > 0] - 2 x / (a b), d = sqrt(d^2) where d^2 > 0, else 0.
    Backward: since dd/dps = 4 c_a ps A + 2 c_x pt X^T (c_a = dd/d(a^2), c_x = dd/dx), the
    gradient is two small matmuls written pixel-major, ``A' ps^T + X' pt^T``: autograd through
    the three matmuls and the float64 sums ran three large matmuls, two full-size additions and
    float64 copies of every n x n matrix (mnist16 BiDM, batch 64, its 18 taps: SPD forward +
    backward 84 -> 55 ms, one thread). Used once per step: not twice differentiable.
    """

    @staticmethod
    def forward(ctx, ps, pt):
        sT, tT = ps.transpose(-1, -2), pt.transpose(-1, -2)
        A, T, X = sT @ ps, tT @ pt, sT @ pt
        a, b, x = _sq_frobenius(A).sqrt(), _sq_frobenius(T).sqrt(), _sq_frobenius(X)
        ac, bc = a.clamp_min(_TINY), b.clamp_min(_TINY)
        d2 = (a > _TINY).double() + (b > _TINY).double() - 2 * x / (ac * bc)
        d = torch.where(d2 > 0, d2.clamp_min(1e-30).sqrt(), d2.new_zeros(()))
        live = d2 >= 1e-30  # where the clamped sqrt passes a gradient
        ctx.save_for_backward(ps, pt, A, T, X, a, b, x, d, live)
        return d.to(ps.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        ps, pt, A, T, X, a, b, x, d, live = ctx.saved_tensors
        ac, bc = a.clamp_min(_TINY), b.clamp_min(_TINY)
        g_d2 = torch.where(live, g.double() / (2 * d.clamp_min(1e-15)), d.new_zeros(()))  # dd/d(d^2)
        c_x = g_d2 * (-2 / (ac * bc))  # dd/dx
        grads = []
        for own, other, norm, normc, oc, gram, cross in ((ps, pt, a, ac, bc, A, X),
                                                          (pt, ps, b, bc, ac, T, X.transpose(-1, -2))):
            if not ctx.needs_input_grad[len(grads)]:
                grads.append(None)
                continue
            # dd/d(norm^2) = dd/dnorm / (2 norm), dd/dnorm = 2 x / (norm^2 other) above the clamp, else 0
            c_n = torch.where(norm > _TINY, g_d2 * x / (normc * normc * normc * oc), d.new_zeros(()))
            w_own = (4 * c_n).to(own.dtype)[..., None, None] * gram  # (n, n), symmetric
            w_other = (2 * c_x).to(own.dtype)[..., None, None] * cross
            # the gradient pixel-major, (n, C) = w_other other^T + w_own own^T, returned as its (C, n) view
            gt = torch.matmul(w_other, other.transpose(-1, -2))
            gt.flatten(0, -3).baddbmm_(w_own.flatten(0, -3), own.transpose(-1, -2).flatten(0, -3))
            grads.append(gt.transpose(-1, -2))
        return tuple(grads)


def spd_distances(fs: torch.Tensor, ft: torch.Tensor, p: int = 4) -> torch.Tensor:
    """(B, p*p) distances || G_s/|G_s| - G_t/|G_t| ||_F between normalised patch Grams.

    With P (C, n) a patch's channel x pixel matrix, G = P P^T is C x C, but every quantity the
    distance needs is an inner product of Grams, and <P P^T, Q Q^T> = ||P^T Q||_F^2 only needs
    n x n matrices: |G_s - G_t|^2 = u_s + u_t - 2 <G_s, G_t> / (|G_s| |G_t|) with u = 1 (0 for
    an all-zero patch, like the clamped normalisation). That is n^2 C instead of C^2 n work,
    and no (B, p*p, C, C) tensors, when the patches have fewer pixels than channels (the usual
    case: 4x4-pixel patches of 64-512 channels; :class:`_InnerSPD`); otherwise the Grams are
    formed directly. The inner products are accumulated in float64 so the difference keeps its
    precision.
    """
    ps, pt = _patches(fs, p), _patches(ft, p)
    c, n = ps.shape[-2:]
    if n >= c:
        return (_grams(ps) - _grams(pt)).flatten(2).norm(dim=-1)
    return _InnerSPD.apply(ps, pt)


def spd_code_distances(fs: torch.Tensor, ft: torch.Tensor, p: int = 4) -> torch.Tensor:
    """(p*p,) distances of SPD's reference-code form: per patch (B, C, h, w), the per-channel
    h x h Grams G = P P^T over the width axis, each normalised by the Frobenius norm of the
    whole batch's Gram tensor, and ||G_s - G_t||_F over the batch."""
    b, c = fs.shape[:2]

    def grams(f):
        pt = _patches(f, p)  # (B, p*p, C, h*w)
        ph = max(f.shape[2] // p, 1)
        pt = pt.reshape(b, pt.shape[1], c, ph, -1)
        g = pt @ pt.transpose(-1, -2)  # (B, p*p, C, h, h)
        norm = g.transpose(0, 1).flatten(1).norm(dim=-1).clamp_min(_TINY)  # per patch, whole batch
        return g / norm[None, :, None, None, None]

    return (grams(fs) - grams(ft)).transpose(0, 1).flatten(1).norm(dim=-1)


def spd_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], patches: int = 4,
             form: str = "paper") -> torch.Tensor:
    """Mean over taps of the mean patch distance; ``form="code"``: the reference-code form."""
    if form not in ("paper", "code"):
        raise ValueError(f"SPD form must be 'paper' or 'code', got {form!r}")
    dist = spd_distances if form == "paper" else spd_code_distances
    total = 0.0
    for fs, ft in zip(student, teacher):
        total = total + dist(fs.float(), ft.float(), patches).mean()
    return total / max(len(student), 1)
