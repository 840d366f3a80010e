"""Multi-bit uniform quantizers: x_q = round(clamp(x / s, Qn, Qp)) * s with a round STE.

They differ only in where the step s comes from: learned (LSQ, activations and weights),
recomputed from the weight (uniform weights), a running abs-max observer (uniform
activations) or a constant (DoReFa activations).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import BqcError
from .ste import channel_view, check_bits, fake_quant, grad_scale

MULTIBIT = tuple(range(2, 9))


def int_codes(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    dtype = torch.int8 if qp <= 127 and qn >= -128 else torch.int16
    return torch.round(torch.clamp(x / step, qn, qp)).to(dtype)


def level_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    if not signed:
        return 0, 2 ** bits - 1
    qp = 2 ** (bits - 1) - 1
    return (-qp if narrow else -qp - 1), qp


class _StepQuant(nn.Module):
    """Shared shape of every step quantizer: bits, level range, ``step()``, ``codes``."""

    kind = "uniform"
    SUPPORTED_BITS = MULTIBIT

    def __init__(self, bits: int, signed: bool, narrow: bool = False):
        super().__init__()
        self.bits = check_bits(self.kind, bits, self.SUPPORTED_BITS)
        self.signed = bool(signed)
        self.qn, self.qp = level_range(self.bits, self.signed, narrow)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _broadcast_step(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self._broadcast_step(x), self.qn, self.qp)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes q with forward(x) == q * step."""
        return int_codes(x, self._broadcast_step(x), self.qn, self.qp)

    def describe(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "signed": self.signed}


class LSQ(_StepQuant):
    """Per-tensor LSQ activation quantizer (METHODS §2).

    The step is a parameter initialised to 2 mean|x| / sqrt(Qp) from the first batch it
    sees; the ``initialised`` buffer records that, so a reloaded module never re-initialises.
    One bit is unsigned only (``signed=False``): levels {0, s}, a learned threshold s / 2 (DoReFa's
    {0, 1} code with a learned scale; it folds to packed bits like DoReFa's).
    """

    kind = "lsq"
    SUPPORTED_BITS = (1, *MULTIBIT)

    def __init__(self, bits: int = 4, signed: bool = True):
        if int(bits) == 1 and signed:
            raise BqcError("quantizer 'lsq' supports bits=1 only unsigned (levels {0, s})",
                           hint="set act_opts = { signed = false } in the recipe's layer spec")
        super().__init__(bits, signed)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        self.scale.copy_((2 * x.detach().abs().mean() / math.sqrt(self.qp)).clamp_min(1e-8))
        self.initialised.fill_(True)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialised):
            self._init_from(x)
        return grad_scale(self.scale, 1.0 / math.sqrt(x.numel() * self.qp))


class UniformAct(_StepQuant):
    """Per-tensor uniform activation quantizer (8-bit head/tail default), step = amax / Qp.

    ``amax`` is a running abs-max (exponential average with ``momentum`` while training,
    set directly from the first batch, frozen in eval mode).
    """

    kind = "uniform"

    def __init__(self, bits: int = 8, signed: bool = True, momentum: float = 0.1):
        super().__init__(bits, signed)
        self.momentum = float(momentum)
        self.register_buffer("amax", torch.ones(()))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        cur = x.detach().abs().max().clamp_min(1e-8)
        if not bool(self.initialised):
            self.amax.copy_(cur)
            self.initialised.fill_(True)
        elif self.training:
            self.amax.lerp_(cur, self.momentum)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        self._observe(x)
        return self.amax / self.qp


class DoReFaAct(_StepQuant):
    """DoReFa activations: clip to [0, 1], k-bit uniform (step 1 / (2^k - 1))."""

    kind = "dorefa"
    SUPPORTED_BITS = tuple(range(1, 9))

    def __init__(self, bits: int = 4):
        super().__init__(bits, signed=False)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_tensor(1.0 / self.qp)


class _WeightStepQuant(_StepQuant):
    """Per-output-channel symmetric weight quantizer; ``deploy_form`` gives integer codes."""

    def __init__(self, bits: int, narrow: bool):
        super().__init__(bits, signed=True, narrow=narrow)

    def _broadcast_step(self, w: torch.Tensor) -> torch.Tensor:
        return channel_view(self.step(w), w.dim(), 0)

    @torch.no_grad()
    def deploy_form(self, w: torch.Tensor) -> dict:
        """``{"kind": "uniform", "codes": int tensor, "scale": (O,), "bits": b}``."""
        return {"kind": "uniform", "codes": self.codes(w),
                "scale": self.step(w).detach().float().clone(), "bits": self.bits}


class UniformWeight(_WeightStepQuant):
    """Symmetric k-bit weights, step_o = max|W_o| / Qp recomputed (detached), levels ±Qp."""

    kind = "uniform"

    def __init__(self, weight: torch.Tensor, bits: int = 8):
        super().__init__(bits, narrow=True)

    def step(self, w: torch.Tensor) -> torch.Tensor:
        return (w.detach().abs().reshape(w.shape[0], -1).amax(dim=1) / self.qp).clamp_min(1e-8)


class LSQWeight(_WeightStepQuant):
    """LSQ for weights: learned per-output-channel step, init 2 mean|W_o| / sqrt(Qp)."""

    kind = "lsq"

    def __init__(self, weight: torch.Tensor, bits: int = 2):
        super().__init__(bits, narrow=False)
        w = weight.detach()
        init = 2 * w.abs().reshape(w.shape[0], -1).mean(dim=1) / math.sqrt(self.qp)
        self.scale = nn.Parameter(init.clamp_min(1e-8))

    def step(self, w: torch.Tensor) -> torch.Tensor:
        per_channel = w.numel() // w.shape[0]
        return grad_scale(self.scale, 1.0 / math.sqrt(per_channel * self.qp))
