"""1-bit activations (sign with a chosen backward, optional learnable threshold) and RPReLU."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BqcError
from .ste import ReSTE, approx_sign, channel_view, sign_ste

BACKWARDS = ("ste", "approx", "reste")


class SignAct(nn.Module):
    """x -> sign(x + tau) with a selectable backward.

    ``channels=None``: plain sign (no threshold). With ``channels`` a learnable threshold
    tau per channel along ``ch_axis`` (init 0) is added first: this is ReActNet's RSign
    (tau = -beta) and BiDM's input threshold (METHODS §5), which use ``backward="approx"``.
    ``backward``: "ste" clipped identity, "approx" ApproxSign, "reste" rectified STE (its
    exponent is annealed through ``anneal``; ``reste_opts`` go to :class:`ReSTE`).
``kind`` is only the name ``describe`` reports.
    """

    kind = "sign"
    bits = 1
    SUPPORTED_BITS = (1,)

    def __init__(self, channels: int | None = None, backward: str = "ste", ch_axis: int = 1,
                 kind: str | None = None, **reste_opts):
        super().__init__()
        self.kind = kind or type(self).kind
        if backward not in BACKWARDS:
            raise BqcError(f"unknown sign backward {backward!r}; valid: {', '.join(BACKWARDS)}")
        self.backward, self.ch_axis = backward, int(ch_axis)
        self.tau = nn.Parameter(torch.zeros(int(channels))) if channels is not None else None
        self.estimator = ReSTE(**reste_opts) if backward == "reste" else None

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tau is None else x + channel_view(self.tau, x.dim(), self.ch_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.shifted(x)
        if self.estimator is not None:
            return self.estimator(v)
        return approx_sign(v) if self.backward == "approx" else sign_ste(v)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """int8 ±1 codes (forward(x) == codes(x))."""
        return torch.where(self.shifted(x) >= 0, 1, -1).to(torch.int8)

    def anneal(self, progress: float) -> None:
        if self.estimator is not None:
            self.estimator.anneal(progress)

    def describe(self) -> dict:
        return {"kind": self.kind, "bits": 1, "backward": self.backward,
                "threshold": self.tau is not None}


class RPReLU(nn.Module):
    """ReActNet RPReLU: PReLU(x - gamma) + zeta, per channel (slope init 0.25, shifts 0)."""

    kind = "rprelu"

    def __init__(self, channels: int, ch_axis: int = 1, init_slope: float = 0.25):
        super().__init__()
        self.ch_axis = int(ch_axis)
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.full((channels,), float(init_slope)))
        self.zeta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = lambda p: channel_view(p, x.dim(), self.ch_axis)  # noqa: E731
        z = x - view(self.gamma)
        # z for z >= 0, slope z below (clamps, not torch.where: that is slow on CPU)
        return z.clamp_min(0) + view(self.slope) * z.clamp_max(0) + view(self.zeta)

    def describe(self) -> dict:
        return {"kind": self.kind}
