"""BiDM's cross-timestep feature connection (TBS), as a module the ``tbs_edges`` pass inserts.

    out = F + flag * a[g(t)] * (stopgrad(cache) - F)  ==  (1 - a) F + a stopgrad(cache)

``a`` is learnable per timestep group (reference: 100 groups of 10 steps, init 0.3);
``g(t) = t * groups // T``. ``cache`` is the block's feature from the previous sampling step,
a graph *input*; ``flag`` is 0 on the first step (no cache yet) and 1 afterwards, so the
first step is exactly the un-blended network. With ``a = 0`` the block is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn


class TBSBlend(nn.Module):
    bqc_kind = "tbs"

    def __init__(self, groups: int = 100, timesteps: int = 1000, init: float = 0.3):
        super().__init__()
        self.groups, self.timesteps = int(groups), int(timesteps)
        self.alpha = nn.Parameter(torch.full((self.groups,), float(init)))

    def coefficient(self, t: torch.Tensor) -> torch.Tensor:
        g = (t.long() * self.groups // self.timesteps).clamp(0, self.groups - 1)
        return self.alpha[g]

    def forward(self, feat: torch.Tensor, cache: torch.Tensor, t: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        a = (self.coefficient(t) * flag).view(-1, *([1] * (feat.dim() - 1))).to(feat.dtype)
        return torch.lerp(feat, cache.detach(), a)  # feat + a (cache - feat), one fused op

    def describe(self) -> dict:
        """JSON-able options (``bqc.ir.dump`` shows them): the timestep grouping of ``alpha``."""
        return {"groups": self.groups, "timesteps": self.timesteps}

    def extra_repr(self) -> str:
        return f"groups={self.groups}, timesteps={self.timesteps}"
