"""DDPM noise schedule, forward noising and the epsilon-prediction loss.

All schedule tables are computed in float64 (the sampler's coefficients are ratios of
numbers close to 1) and cast to the data's dtype where they meet tensors.

Conventions (Ho et al. 2020): timesteps are integers ``0 .. T-1``; ``alphas_cumprod[t]`` is
the signal fraction of ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; step ``t = 0`` is
the first noising step (not "clean data").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bqc.errors import BqcError

__all__ = ["NoiseSchedule", "q_sample", "sample_timesteps", "randn", "eps_loss"]


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM beta schedule. ``kind`` is ``"linear"`` (DDPM default) or ``"cosine"``
    (Nichol & Dhariwal 2021; ``beta_start``/``beta_end`` are then ignored)."""

    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    kind: str = "linear"
    betas: np.ndarray = field(init=False, repr=False, compare=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if int(self.T) != self.T or self.T < 1:
            raise BqcError(f"diffusion schedule: T must be a positive integer, got {self.T!r}")
        if self.kind == "linear":
            if not (0 < self.beta_start <= self.beta_end < 1):
                raise BqcError(
                    f"diffusion schedule: need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}"
                )
            betas = np.linspace(self.beta_start, self.beta_end, self.T, dtype=np.float64)
        elif self.kind == "cosine":
            s = 0.008
            steps = np.arange(self.T + 1, dtype=np.float64) / self.T
            f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
            betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
        else:
            raise BqcError(f"diffusion schedule: unknown kind {self.kind!r}", hint="use 'linear' or 'cosine'")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", np.cumprod(1.0 - betas))

    # -- tables ---------------------------------------------------------------------------
    @property
    def alphas(self) -> np.ndarray:
        return 1.0 - self.betas

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        """``abar_{t-1}`` with ``abar_{-1} = 1``."""
        return np.concatenate([[1.0], self.alphas_cumprod[:-1]])

    @property
    def posterior_variance(self) -> np.ndarray:
        """``beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` of q(x_{t-1} | x_t, x0)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``abar_t`` gathered for a batch of timesteps, shaped to broadcast against ``like``.
        ``t = -1`` gives 1 (the clean end used by DDIM's last step)."""
        table = torch.as_tensor(np.concatenate([self.alphas_cumprod, [1.0]]), dtype=torch.float64)
        idx = torch.as_tensor(t, dtype=torch.long).cpu()
        idx = torch.where(idx < 0, torch.full_like(idx, self.T), idx)
        out = table[idx].to(device=like.device, dtype=like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("betas", None)
        d.pop("alphas_cumprod", None)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "NoiseSchedule":
        d = dict(d or {})
        unknown = set(d) - {"T", "beta_start", "beta_end", "kind"}
        if unknown:
            raise BqcError(f"diffusion schedule: unknown keys {sorted(unknown)}")
        return cls(**d)


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` for per-sample ``t``."""
    a = schedule.abar(t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def sample_timesteps(schedule: NoiseSchedule, n: int, *, generator: torch.Generator | None = None,
                     device=None, low: int = 0, high: int | None = None) -> torch.Tensor:
    """Uniform integer timesteps in ``[low, high)`` (default the whole ``[0, T)``).

    ``generator=None`` uses the global torch RNG (the training loop seeds it per step)."""
    high = schedule.T if high is None else high
    gdev = generator.device if generator is not None else "cpu"
    return torch.randint(low, high, (n,), generator=generator, device=gdev).to(device or "cpu")


def randn(shape, *, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (CPU generators work for any
    target device, so a seed gives the same numbers everywhere), then moved to ``device``."""
    gdev = generator.device if generator is not None else (device or "cpu")
    return torch.randn(tuple(shape), generator=generator, device=gdev, dtype=dtype).to(device or gdev)


def eps_loss(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, y: torch.Tensor | None = None, *,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, return_parts: bool = False):
    """The DDPM "simple" loss ``|| eps - model(x_t, t[, y]) ||^2`` (mean over all elements).

    ``model`` is a plain ``model(x, t)`` / ``model(x, t, y)`` callable. ``t`` and ``noise``
    are drawn (from ``generator`` or the global RNG) when not given. With ``return_parts``
    the result is ``(loss, dict(t=..., noise=..., x_t=..., eps_pred=...))`` so callers
    (QAT distillation) can reuse the same x_t for a teacher.
    """
    b = x0.shape[0]
    if t is None:
        t = sample_timesteps(schedule, b, generator=generator, device=x0.device)
    if noise is None:
        noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    eps_pred = model(x_t, t) if y is None else model(x_t, t, y)
    loss = F.mse_loss(eps_pred, noise)
    if return_parts:
        return loss, {"t": t, "noise": noise, "x_t": x_t, "eps_pred": eps_pred}
    return loss
