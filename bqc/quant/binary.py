"""1-bit weight quantizers: W_b = sum_i scale_i (per output channel) * sign_i.

Every binarizer describes itself as a list of bases (scale (O,), sign tensor). The training
forward evaluates the bases with the straight-through sign (autograd of the written formula);
``deploy_form`` evaluates the same bases with the hard sign, so both paths cannot diverge.
"""
from __future__ import annotations

import torch
from torch import nn

from .ste import ReSTE, channel_view, hard_sign, per_channel_absmean, sign_ste


class BinaryWeight(nn.Module):
    """Base class: subclasses implement ``bases(w, sign)`` and set ``kind``."""

    kind = "binary"
    bits = 1
    SUPPORTED_BITS = (1,)

    def _sign(self, v: torch.Tensor) -> torch.Tensor:  # training estimator
        return sign_ste(v)

    def bases(self, w: torch.Tensor, sign) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = None
        for scale, s in self.bases(w, self._sign):
            term = channel_view(scale, w.dim(), 0) * s
            out = term if out is None else out + term
        return out

    @torch.no_grad()
    def deploy_form(self, w: torch.Tensor) -> dict:
        """``{"kind": "binary", "signs": [int8 ±1 per basis], "scales": [(O,) per basis]}``."""
        bases = self.bases(w, hard_sign)
        return {
            "kind": "binary",
            "signs": [s.to(torch.int8) for _, s in bases],
            "scales": [sc.detach().expand(w.shape[0]).clone().float() for sc, _ in bases],
        }

    def num_bases(self) -> int:
        return 1

    def describe(self) -> dict:
        return {"kind": self.kind, "bits": 1, "bases": self.num_bases()}


class SignScale(BinaryWeight):
    """alpha ⊙ sign(W) (METHODS §1), also XNOR (alpha recomputed) and DoReFa (per layer).

    learnable=True: alpha is a parameter initialised once to mean|W_o| (BinaryDM).
    learnable=False: alpha is recomputed from W every forward, ``detach`` says whether
    gradient flows through it (BiDM: detached; XNOR-Net: not), ``per_channel=False`` uses
    one E|W| for the whole layer (DoReFa). ``kind`` is only the name ``describe`` reports.
    """

    kind = "sign_scale"

    def __init__(self, weight: torch.Tensor, learnable: bool = True, per_channel: bool = True,
                 detach: bool = True, kind: str | None = None):
        super().__init__()
        self.kind = kind or type(self).kind
        self.learnable, self.per_channel, self.detach = bool(learnable), bool(per_channel), bool(detach)
        if self.learnable:
            self.alpha = nn.Parameter(self._absmean(weight.detach()))

    def _absmean(self, w: torch.Tensor) -> torch.Tensor:
        return per_channel_absmean(w) if self.per_channel else w.abs().mean().reshape(1)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        if self.learnable:
            return self.alpha
        a = self._absmean(w)
        return a.detach() if self.detach else a

    def bases(self, w, sign):
        return [(self.scale(w), sign(w))]

    def describe(self) -> dict:
        return {**super().describe(), "learnable": self.learnable,
                "per_channel": self.per_channel, "detach": self.detach}


class ReSTEWeight(SignScale):
    """alpha ⊙ sign(W) trained with the rectified STE (``self.estimator.o`` is annealed)."""

    kind = "reste"

    def __init__(self, weight: torch.Tensor, o_start: float = 1.0, o_end: float = 3.0,
                 t: float = 1.5, learnable: bool = False, per_channel: bool = True,
                 detach: bool = True, kind: str | None = None):
        super().__init__(weight, learnable=learnable, per_channel=per_channel, detach=detach, kind=kind)
        self.estimator = ReSTE(o_start, o_end, t)

    def _sign(self, v):
        return self.estimator(v)

    def anneal(self, progress: float) -> None:
        self.estimator.anneal(progress)


class TwoBasis(BinaryWeight):
    """s1 ⊙ sign(W) + s2 ⊙ sign(W - s1 ⊙ sign(W)) with learnable per-channel s1, s2.

    Init (METHODS §3): s1 = mean|W_o|, s2 = mean|W_o - s1 sign(W_o)|.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach()
        s1 = per_channel_absmean(w)
        self.s1 = nn.Parameter(s1)
        self.s2 = nn.Parameter(per_channel_absmean(w - channel_view(s1, w.dim(), 0) * hard_sign(w)))

    def two_bases_active(self) -> bool:
        return True

    def num_bases(self) -> int:
        return 2 if self.two_bases_active() else 1

    def bases(self, w, sign):
        b1 = sign(w)
        out = [(self.s1, b1)]
        if self.two_bases_active():
            out.append((self.s2, sign(w - channel_view(self.s1, w.dim(), 0) * b1)))
        return out


class EBB(TwoBasis):
    """BinaryDM's Evolvable-Basis Binarizer: two bases in stage 1, s2 dropped in stage 2."""

    kind = "ebb"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.register_buffer("stage2", torch.tensor(False))

    def two_bases_active(self) -> bool:
        return not bool(self.stage2)

    def switch_to_stage2(self) -> None:
        self.stage2.fill_(True)

    def reg(self) -> torch.Tensor:
        """Stage-1 regulariser term mean|s2| (0 in stage 2); the trainer sums tau * this."""
        if bool(self.stage2):
            return self.s2.new_zeros(())
        return self.s2.abs().mean()

    def describe(self) -> dict:
        return {**super().describe(), "stage": 2 if bool(self.stage2) else 1}


class LMB(TwoBasis):
    """BinaryDM v1 "LMB": the two bases are kept at inference (never switches)."""

    kind = "lmb"
