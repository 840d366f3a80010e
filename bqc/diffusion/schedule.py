"""Noise schedules (the model's own diffusion process), forward noising and the training loss.

All schedule tables are computed in float64 (the sampler's coefficients are ratios of
numbers close to 1) and cast to the data's dtype where they meet tensors.

Conventions (Ho et al. 2020): timesteps are integers ``0 .. T-1``; ``alphas_cumprod[t]`` is
the signal fraction of ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; step ``t = 0`` is
the first noising step (not "clean data").

A :class:`NoiseSchedule` is the whole diffusion process a model was trained with: the betas
(``kind``: ``linear``, ``scaled_linear`` = linear in sqrt(beta) as in LDM/Stable Diffusion,
``cosine`` = diffusers' ``squaredcos_cap_v2``, or ``trained`` = an explicit list), how a
sampler spaces its timesteps (``spacing``, ``steps_offset``), and what the network predicts
(``prediction``: ``eps``, ``v`` or ``x0``). :meth:`NoiseSchedule.split` turns a network output
into (eps, x0) and :meth:`NoiseSchedule.target` gives the regression target: the samplers, the
losses and evaluation all go through these two, so every command follows the model's own
parameterisation. Sources: :meth:`from_diffusers` (``scheduler_config.json``),
:meth:`from_ldm` (LDM yaml ``model.params``), :meth:`from_bqc_config` (``meta.diffusion``
of a bqc/zoo ``config.json``) and :func:`parse_schedule_spec` (``--schedule``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bqc.errors import BqcError, read_json_object, read_yaml_file

__all__ = ["NoiseSchedule", "q_sample", "sample_timesteps", "randn", "eps_loss", "diffusion_loss",
           "normalize_prediction", "parse_schedule_spec", "apply_overrides", "PREDICTIONS", "KINDS", "SPACINGS"]

KINDS = ("linear", "scaled_linear", "cosine", "trained")
_KIND_ALIASES = {"squaredcos_cap_v2": "cosine"}
PREDICTIONS = ("eps", "v", "x0")
_PRED_ALIASES = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "x0": "x0", "sample": "x0"}
# uniform: bqc's ``i * T // steps`` (the historical default; equals "leading" when steps divides T);
# leading / trailing / linspace: diffusers' ``timestep_spacing`` (DDIMScheduler.set_timesteps)
SPACINGS = ("uniform", "leading", "trailing", "linspace")
MAX_T = 100_000  # diffusion steps a schedule may have (models use 1000 to 4000); bounds the tables' memory
_DEFAULT_KEYS = ("T", "beta_start", "beta_end", "kind")


def normalize_prediction(p: str, where: str = "prediction") -> str:
    """``eps``/``epsilon``, ``v``/``v_prediction``, ``x0``/``sample`` -> ``eps``/``v``/``x0``."""
    key = str(p).strip().lower()
    if key not in _PRED_ALIASES:
        raise BqcError(f"{where}: unknown prediction type {p!r}",
                       hint="bqc knows eps (epsilon), v (v_prediction) and x0 (sample)")
    return _PRED_ALIASES[key]


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM-style discrete diffusion process (see the module docstring).

    ``beta_start``/``beta_end`` are used by ``linear`` and ``scaled_linear``; ``cosine`` is
    Nichol & Dhariwal's (s = 0.008, betas capped at 0.999); ``trained`` takes
    ``trained_betas`` (``T`` is then their count)."""

    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    kind: str = "linear"
    trained_betas: tuple | None = None
    steps_offset: int = 0
    spacing: str = "uniform"
    prediction: str = "eps"
    betas: np.ndarray = field(init=False, repr=False, compare=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        kind = _KIND_ALIASES.get(self.kind, self.kind)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "prediction", normalize_prediction(self.prediction, "diffusion schedule"))
        if self.trained_betas is not None:
            if kind not in ("trained", "linear"):
                raise BqcError(f"diffusion schedule: trained_betas given with kind {kind!r}")
            tb = tuple(float(b) for b in self.trained_betas)
            object.__setattr__(self, "trained_betas", tb)
            object.__setattr__(self, "kind", "trained")
            object.__setattr__(self, "T", len(tb))
            kind = "trained"
        if int(self.T) != self.T or not 1 <= self.T <= MAX_T:
            # a hostile T = 10**9 in a model file took 21 GB before the kernel killed bqc
            raise BqcError(f"diffusion schedule: T must be an integer in [1, {MAX_T}], got {self.T!r}",
                           hint="diffusion models train with T = 1000 (improved DDPM: 4000)")
        object.__setattr__(self, "T", int(self.T))
        if self.spacing not in SPACINGS:
            raise BqcError(f"diffusion schedule: unknown timestep spacing {self.spacing!r}",
                           hint=f"bqc implements {', '.join(SPACINGS)}")
        if int(self.steps_offset) != self.steps_offset or not (0 <= self.steps_offset < self.T):
            raise BqcError(f"diffusion schedule: steps_offset must be an integer in [0, T), got {self.steps_offset!r}")
        object.__setattr__(self, "steps_offset", int(self.steps_offset))
        T = self.T
        if kind in ("linear", "scaled_linear"):
            if not (0 < self.beta_start <= self.beta_end < 1):
                raise BqcError(
                    f"diffusion schedule: need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}"
                )
            if kind == "linear":
                betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
            else:  # LDM's "linear" / diffusers' "scaled_linear": linear in sqrt(beta)
                betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=np.float64) ** 2
        elif kind == "cosine":
            s = 0.008
            steps = np.arange(T + 1, dtype=np.float64) / T
            f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
            betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
        elif kind == "trained":
            if self.trained_betas is None:
                raise BqcError("diffusion schedule: kind 'trained' needs trained_betas (the explicit list)")
            betas = np.asarray(self.trained_betas, dtype=np.float64)
            if not np.all((betas > 0) & (betas < 1)):
                raise BqcError("diffusion schedule: every trained beta must lie in (0, 1)")
        else:
            raise BqcError(f"diffusion schedule: unknown kind {self.kind!r}",
                           hint="bqc implements linear, scaled_linear (linear in sqrt(beta)), cosine "
                                "(squaredcos_cap_v2) and an explicit trained_betas list")
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

    def _coefs(self, t, like: torch.Tensor):
        """(sqrt(abar_t), sqrt(1 - abar_t)): Python floats for an int ``t``, else broadcast tensors."""
        if isinstance(t, (int, np.integer)):
            a = float(self.alphas_cumprod[t]) if t >= 0 else 1.0
            return math.sqrt(a), math.sqrt(1 - a)
        a = self.abar(t, like)
        return a.sqrt(), (1 - a).sqrt()

    # -- the parameterisation -------------------------------------------------------------
    def split(self, out: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eps, x0)`` implied by the network output ``out`` at ``(x_t, t)`` under this
        schedule's ``prediction`` (``t``: an int or a per-sample tensor).

        eps: ``x0 = (x_t - sqrt(1-a) eps) / sqrt(a)``; x0: ``eps = (x_t - sqrt(a) x0) / sqrt(1-a)``;
        v (``v = sqrt(a) eps - sqrt(1-a) x0``): ``x0 = sqrt(a) x_t - sqrt(1-a) v``,
        ``eps = sqrt(1-a) x_t + sqrt(a) v``."""
        sa, s1a = self._coefs(t, x_t)
        if self.prediction == "eps":
            return out, (x_t - s1a * out) / sa
        if self.prediction == "x0":
            return (x_t - sa * out) / s1a, out
        return s1a * x_t + sa * out, sa * x_t - s1a * out

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the network regresses at ``x_t = q_sample(x0, t, noise)``: ``noise`` (eps),
        ``x0`` (x0) or ``v = sqrt(abar) noise - sqrt(1 - abar) x0`` (v)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        sa, s1a = self._coefs(t, x0)
        return sa * noise - s1a * x0

    # -- sampling timesteps ---------------------------------------------------------------
    def timesteps(self, steps: int) -> list[int]:
        """The timesteps a ``steps``-step DDIM sampler visits, descending (``spacing``:
        uniform / leading / trailing / linspace; :func:`bqc.run.ddim_timesteps` is the one
        definition, shared with the bundle runner)."""
        from bqc.run import RunError, ddim_timesteps

        try:
            return ddim_timesteps(self.T, steps, self.spacing, self.steps_offset)
        except RunError as e:
            raise BqcError(f"sampler: {e.message}", hint=e.hint) from None

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able; keys beyond the historical four appear only when they differ from the
        defaults, so fingerprints of eps/linear runs are what they always were."""
        d = {"T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end, "kind": self.kind}
        if self.trained_betas is not None:
            d["trained_betas"] = list(self.trained_betas)
        if self.steps_offset:
            d["steps_offset"] = self.steps_offset
        if self.spacing != "uniform":
            d["spacing"] = self.spacing
        if self.prediction != "eps":
            d["prediction"] = self.prediction
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "NoiseSchedule":
        d = dict(d or {})
        unknown = set(d) - {"T", "beta_start", "beta_end", "kind", "trained_betas", "steps_offset", "spacing", "prediction"}
        if unknown:
            raise BqcError(f"diffusion schedule: unknown keys {sorted(unknown)}")
        return cls(**d)

    def manifest_entry(self, origin: str) -> dict:
        """``{"schedule": ..., "prediction": ..., "from": origin}``: the artifact manifest's
        ``diffusion`` entry."""
        sched = self.to_dict()
        sched.pop("prediction", None)
        return {"schedule": sched, "prediction": self.prediction, "from": origin}

    @classmethod
    def from_manifest(cls, manifest: dict | None) -> "NoiseSchedule":
        """The schedule of an artifact manifest; artifacts written before bqc recorded one
        (no ``diffusion`` key) used the DDPM linear eps default."""
        entry = (manifest or {}).get("diffusion")
        if not entry:
            return cls()
        return cls.from_dict({**(entry.get("schedule") or {}), "prediction": entry.get("prediction", "eps")})

    def replace(self, **kw) -> "NoiseSchedule":
        d = {k: getattr(self, k) for k in ("T", "beta_start", "beta_end", "kind", "trained_betas",
                                           "steps_offset", "spacing", "prediction")}
        d.update(kw)
        if "trained_betas" not in kw and d["kind"] != "trained":
            d["trained_betas"] = None
        return NoiseSchedule(**d)

    # -- sources --------------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, cfg: dict, where: str = "scheduler config") -> "NoiseSchedule":
        """A diffusers scheduler config (``scheduler_config.json``); refuses what bqc does not
        implement, with the reason. Sampler-only settings (clip_sample, thresholding,
        set_alpha_to_one, solver orders, ...) are ignored: they do not change the training process."""
        cls_name = str(cfg.get("_class_name", "") or "")
        if cls_name.startswith(("FlowMatch", "ScoreSde", "EDM", "CMStochastic", "KarrasVe", "VQDiffusion", "Amused")):
            raise BqcError(f"{where}: {cls_name} is not a discrete beta-schedule (DDPM-type) diffusion process",
                           hint="bqc trains and samples DDPM/DDIM-type models (betas over T steps); pass --schedule/--prediction if the model is one")
        if not any(k in cfg for k in ("beta_schedule", "trained_betas", "beta_start", "beta_end")):
            raise BqcError(f"{where} has no beta schedule (no beta_schedule/beta_start/trained_betas): "
                           f"{cls_name or 'this scheduler'} is not a DDPM-type process bqc can follow",
                           hint="pass --schedule and --prediction explicitly if the model was trained with betas")
        if cfg.get("rescale_betas_zero_snr"):
            raise BqcError(f"{where}: rescale_betas_zero_snr is set; bqc does not implement zero-terminal-SNR betas",
                           hint="bqc's samplers divide by sqrt(abar_T), which that rescaling makes 0")
        if float(cfg.get("snr_shift_scale", 1.0) or 1.0) != 1.0 or cfg.get("shift") not in (None, 1, 1.0):
            raise BqcError(f"{where}: a shifted SNR schedule (snr_shift_scale/shift) is not implemented by bqc")
        T = int(cfg.get("num_train_timesteps", 1000) or 1000)
        bs, be = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        kind = cfg.get("beta_schedule", "linear") or "linear"
        trained = cfg.get("trained_betas")
        if trained is not None:
            kind = "trained"
        elif kind not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise BqcError(f"{where}: unknown beta_schedule {kind!r}",
                           hint="bqc implements linear, scaled_linear and squaredcos_cap_v2 (or an explicit trained_betas list)")
        spacing = cfg.get("timestep_spacing", "leading") or "leading"
        if spacing not in ("leading", "trailing", "linspace"):
            raise BqcError(f"{where}: timestep_spacing {spacing!r} is not implemented by bqc",
                           hint="bqc implements leading, trailing and linspace (diffusers' DDIM spacings)")
        pred = normalize_prediction(cfg.get("prediction_type", "epsilon") or "epsilon", f"{where}: prediction_type")
        offset = int(cfg.get("steps_offset", 0) or 0)
        return cls(T=T, beta_start=bs, beta_end=be, kind=kind, trained_betas=tuple(trained) if trained is not None else None,
                   steps_offset=offset, spacing=spacing, prediction=pred)

    @classmethod
    def from_ldm(cls, params: dict, where: str = "LDM config") -> "NoiseSchedule":
        """LDM's ``model.params`` (``ldm.models.diffusion.ddpm.DDPM``/``LatentDiffusion``):
        ``timesteps``, ``beta_schedule`` (``linear`` = linear in sqrt(beta), LDM's default),
        ``linear_start``/``linear_end``, ``cosine_s``, ``given_betas``, ``parameterization``.
        LDM's DDIM sampler visits ``range(0, T, T // steps) + 1``: recorded as leading spacing
        with ``steps_offset = 1``."""
        T = int(params.get("timesteps", 1000))
        s, e = float(params.get("linear_start", 1e-4)), float(params.get("linear_end", 2e-2))
        kind = params.get("beta_schedule", "linear") or "linear"
        pred = normalize_prediction(params.get("parameterization", "eps") or "eps", f"{where}: parameterization")
        common = dict(steps_offset=1, spacing="leading", prediction=pred)
        if params.get("given_betas") is not None:
            return cls(kind="trained", trained_betas=tuple(params["given_betas"]), **common)
        if kind == "linear":
            return cls(T=T, beta_start=s, beta_end=e, kind="scaled_linear", **common)
        if kind == "sqrt_linear":  # LDM's name for betas linear in beta
            return cls(T=T, beta_start=s, beta_end=e, kind="linear", **common)
        if kind == "sqrt":
            return cls(T=T, kind="trained", trained_betas=tuple(np.linspace(s, e, T) ** 0.5), **common)
        if kind == "squaredcos_cap_v2":  # some LDM forks (karlo)
            return cls(T=T, kind="cosine", **common)
        if kind == "cosine":
            if abs(float(params.get("cosine_s", 8e-3)) - 8e-3) > 1e-12:
                raise BqcError(f"{where}: cosine_s {params.get('cosine_s')} is not implemented (bqc's cosine uses s = 0.008)")
            return cls(T=T, kind="cosine", **common)
        raise BqcError(f"{where}: unknown beta_schedule {kind!r}",
                       hint="LDM's make_beta_schedule knows linear, cosine, sqrt_linear and sqrt")

    @classmethod
    def from_bqc_config(cls, config: dict) -> "NoiseSchedule | None":
        """``meta.diffusion`` of a bqc/zoo ``config.json`` (``objective`` = the prediction);
        ``None`` when the config records none."""
        d = dict(((config or {}).get("meta") or {}).get("diffusion") or {})
        if not d:
            return None
        obj = d.pop("objective", None)
        if obj is not None:
            d["prediction"] = normalize_prediction(obj, "config meta.diffusion.objective")
        return cls.from_dict(d)


def _read_config_file(path: Path) -> NoiseSchedule:
    if path.suffix.lower() == ".json":
        cfg = read_json_object(path, "schedule config")
        return NoiseSchedule.from_diffusers(cfg, str(path))
    if path.suffix.lower() in (".yaml", ".yml"):
        doc = read_yaml_file(path, "schedule config") or {}
        params = ((doc.get("model") or {}).get("params")) if isinstance(doc, dict) else None
        if not isinstance(params, dict):
            raise BqcError(f"{path} has no model.params (an LDM config) to read the schedule from")
        return NoiseSchedule.from_ldm(params, str(path))
    raise BqcError(f"--schedule {path}: give a diffusers scheduler_config.json or an LDM .yaml")


def parse_schedule_spec(spec: str, base: NoiseSchedule | None = None) -> NoiseSchedule:
    """``--schedule``: ``linear:B0:B1[:T]``, ``scaled_linear:B0:B1[:T]``, ``cosine[:T]`` (or
    ``squaredcos_cap_v2[:T]``) replace the betas of ``base`` (its prediction and sampling
    spacing stay); a path to a diffusers ``scheduler_config.json`` or an LDM yaml replaces
    everything, prediction included."""
    base = base or NoiseSchedule()
    spec = str(spec).strip()
    p = Path(spec)
    if p.suffix.lower() in (".json", ".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise BqcError(f"--schedule {spec}: file not found")
        return _read_config_file(p)
    parts = spec.split(":")
    kind = _KIND_ALIASES.get(parts[0].strip().lower(), parts[0].strip().lower())
    usage = "use linear:BETA_START:BETA_END[:T], scaled_linear:BETA_START:BETA_END[:T], cosine[:T], or a scheduler_config.json"
    try:
        if kind in ("linear", "scaled_linear") and len(parts) in (3, 4):
            T = int(parts[3]) if len(parts) == 4 else base.T
            return base.replace(kind=kind, beta_start=float(parts[1]), beta_end=float(parts[2]), T=T)
        if kind == "cosine" and len(parts) in (1, 2):
            return base.replace(kind="cosine", T=int(parts[1]) if len(parts) == 2 else base.T)
    except ValueError:
        raise BqcError(f"--schedule {spec!r}: numbers expected after the kind", hint=usage) from None
    raise BqcError(f"--schedule {spec!r} is not a schedule bqc knows", hint=usage)


def apply_overrides(base: NoiseSchedule, schedule: str | None = None, prediction: str | None = None) -> NoiseSchedule:
    """``base`` with the ``--schedule`` spec and the ``--prediction`` type applied (each optional)."""
    if schedule:
        base = parse_schedule_spec(schedule, base)
    if prediction:
        base = base.replace(prediction=normalize_prediction(prediction, "--prediction"))
    return base


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


def diffusion_loss(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, y: torch.Tensor | None = None, *,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, return_parts: bool = False):
    """The DDPM "simple" loss ``|| target - model(x_t, t[, y]) ||^2`` (mean over all elements),
    with the target of the schedule's parameterisation (:meth:`NoiseSchedule.target`: the
    noise for eps models, v for v models, x0 for x0 models).

    ``model`` is a plain ``model(x, t)`` / ``model(x, t, y)`` callable. ``t`` and ``noise``
    are drawn (from ``generator`` or the global RNG) when not given. With ``return_parts``
    the result is ``(loss, dict(t=..., noise=..., x_t=..., pred=..., target=...))`` (``eps_pred``
    is the raw output too, for older callers) so callers can reuse the same x_t for a teacher.
    """
    b = x0.shape[0]
    if t is None:
        t = sample_timesteps(schedule, b, generator=generator, device=x0.device)
    if noise is None:
        noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    pred = model(x_t, t) if y is None else model(x_t, t, y)
    target = schedule.target(x0, noise, t)
    loss = F.mse_loss(pred, target)
    if return_parts:
        return loss, {"t": t, "noise": noise, "x_t": x_t, "pred": pred, "eps_pred": pred, "target": target}
    return loss


eps_loss = diffusion_loss  # the historical name: identical for eps-prediction schedules
