"""Model-wide hooks the trainer calls on the quantizers a pass inserted."""
from __future__ import annotations

import torch
from torch import nn

from .binary import EBB
from .ste import ReSTE


def ebb_modules(model: nn.Module) -> list[EBB]:
    return [m for m in model.modules() if isinstance(m, EBB)]


def ebb_regulariser(model: nn.Module) -> torch.Tensor:
    """Mean over EBB layers of ``reg()`` (mean|s2|); 0 without EBB layers or in stage 2.

    The trainer adds ``tau * ebb_regulariser(model)`` (tau = 9e-2, METHODS §3).
    """
    terms = [m.reg() for m in ebb_modules(model)]
    return torch.stack(terms).mean() if terms else torch.zeros(())


def switch_ebb_to_stage2(model: nn.Module) -> int:
    """Drop s2 in every EBB layer; returns how many were switched."""
    mods = ebb_modules(model)
    for m in mods:
        m.switch_to_stage2()
    return len(mods)


def anneal(model: nn.Module, progress: float) -> int:
    """Set every ReSTE estimator's exponent for training ``progress`` in [0, 1]."""
    mods = [m for m in model.modules() if isinstance(m, ReSTE)]
    for m in mods:
        m.anneal(progress)
    return len(mods)
