"""DDIM and DDPM samplers with explicit cross-timestep state.

Every sampler calls the network through one protocol::

    step_model(x, t, y, state) -> (out, new_state)

``out`` is the network's raw prediction in the schedule's parameterisation (eps, v or x0;
``schedule.prediction``); the samplers turn it into (eps, x0) with
:meth:`NoiseSchedule.split`, so a v- or x0-model is sampled correctly.

``x`` is the current noisy batch, ``t`` a ``(B,)`` long tensor of the current timestep,
``y`` the class labels or ``None``, and ``state`` an opaque list of tensors or ``None``
(``None`` on the first step). The sampler never looks inside the state: whatever the model
returns at step k is handed back to it at step k+1. This is how BiDM's cross-timestep
(TBS) caches travel: the UNet's block outputs of one sampling step become its cache inputs
at the next. A plain ``module(x, t[, y]) -> eps`` is adapted with :func:`as_step_model`.

Randomness comes only from a ``torch.Generator`` (seeded from ``seed`` when none is given),
drawn on the CPU and moved to the target device, so a seed gives the same samples on any
device and the global RNG is never touched.

Text conditioning and classifier-free guidance: ``cond`` (e.g. ``{"context": c}``) is passed to
the step model as keywords, ``step_model(x, t, y, state, **cond)`` (and only when given, so a
plain step model never sees it). With ``uncond`` (the same inputs for the empty prompt) and a
``guidance`` scale S != 1, each step runs the model twice, once per branch, and combines the raw
predictions as ``out_u + S * (out_c - out_u)`` (:func:`guided_call`). The state is then the pair
``(state_c, state_u)``: each branch gets back only its own TBS caches, so the cached block
features of the conditional and unconditional branches never mix. The branches are separate
calls rather than one batch of 2B rows, so nothing batch-wide (a quantizer's batch statistics)
couples them either. S = 1 runs only the conditional branch: the same computation as unguided.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Protocol, Sequence

import torch

from bqc.errors import BqcError
from bqc.diffusion.schedule import NoiseSchedule, randn

__all__ = [
    "StepModel", "as_step_model", "timestep_experts", "ddim_timesteps", "step_gap", "guided_call",
    "ddim_sample", "ddpm_sample", "generate",
]

State = Optional[List[torch.Tensor]]


class StepModel(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor],
                 state: State) -> tuple[torch.Tensor, State]: ...


def as_step_model(module: Callable) -> StepModel:
    """Adapt a plain ``module(x, t)`` / ``module(x, t, y)`` predictor to the step
    protocol (its state is always ``None``). ``y`` is passed only when it is not ``None``; conditioning
    inputs (``context=...``) by keyword."""

    def step(x, t, y, state, **cond):
        eps = module(x, t, **cond) if y is None else module(x, t, y, **cond)
        return eps, None

    step.module = module  # for introspection (e.g. to switch it to eval mode)
    return step


def timestep_experts(models: Sequence[StepModel], switches: Sequence[int]) -> StepModel:
    """One step model made of timestep experts: ``models[0]`` for ``t > switches[0]``,
    ``models[1]`` for ``switches[0] >= t > switches[1]``, ..., the last one below the last switch
    (``switches`` descending, one fewer than ``models``; e.g. ``[high, low], [300]``).

    Its state is ``(k, state_k)``: a cross-timestep (TBS) cache goes back only to the expert that
    made it, and only at the next step; an expert's first step after another expert's runs
    without a cache, as the first sampling step always does. All rows of a sampling step share
    ``t`` (the samplers' convention), so one expert runs the whole batch.
    """
    models, switches = list(models), [int(s) for s in switches]
    if len(models) != len(switches) + 1 or any(a <= b for a, b in zip(switches, switches[1:])):
        raise BqcError(f"timestep experts: {len(models)} models need {len(models) - 1} descending switches, "
                       f"got {switches}")

    def step(x, t, y, state, **cond):
        tt = int(t.reshape(-1)[0])
        k = next((i for i, sw in enumerate(switches) if tt > sw), len(switches))
        own = state[1] if state is not None and state[0] == k else None
        out, new = models[k](x, t, y, own, **cond)
        return out, (k, new)

    step.module = models[0]
    return step


def _check_steps(T: int, steps: int) -> int:
    if int(steps) != steps or not (1 <= steps <= T):
        raise BqcError(f"sampler: steps must be an integer in [1, {T}], got {steps!r}")
    return int(steps)


def ddim_timesteps(T: int, steps: int) -> List[int]:
    """The timesteps a ``steps``-step sampler visits, in visiting order (descending).

    Uniform spacing ``i * T // steps`` for ``i = 0 .. steps-1`` (for ``T % steps == 0`` this
    is DDIM's ``range(0, T, T // steps)``), so the last visited step is always ``t = 0``."""
    steps = _check_steps(T, steps)
    return [i * T // steps for i in range(steps)][::-1]


def step_gap(T: int, steps: int) -> int:
    """The gap between consecutive sampling timesteps, ``round(T / steps)`` (exact when
    ``steps`` divides ``T``). BiDM's TBS is trained with this ``d``."""
    steps = _check_steps(T, steps)
    return max(1, int(round(T / steps)))


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator("cpu").manual_seed(0 if seed is None else int(seed))


def _x_T(shape, x_T, g, device, dtype):
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise BqcError(f"sampler: x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        return x_T.to(device=device, dtype=dtype)
    return randn(shape, generator=g, device=device, dtype=dtype)


def _call(step_model, x, t: int, y, state, cond=None):
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    out = step_model(x, tt, y, state, **cond) if cond else step_model(x, tt, y, state)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError("step_model must return (prediction, new_state); wrap plain modules with as_step_model()")
    eps, new_state = out
    if eps.shape != x.shape:
        raise BqcError(f"sampler: the model returned a prediction of shape {tuple(eps.shape)} for input {tuple(x.shape)}")
    return eps, new_state


def guided_call(step_model, x, t: int, y, state, cond=None, uncond=None, guidance: float = 1.0):
    """One model evaluation of a sampler step, with classifier-free guidance when ``uncond`` is
    given and ``guidance != 1`` (see the module docstring): ``(out, new_state)``; the guided state
    is the pair ``(state_c, state_u)``."""
    if uncond is None or guidance == 1.0:
        return _call(step_model, x, t, y, state, cond)
    s_c, s_u = state if state is not None else (None, None)
    out_c, s_c = _call(step_model, x, t, y, s_c, cond)
    out_u, s_u = _call(step_model, x, t, y, s_u, uncond)
    return out_u + guidance * (out_c - out_u), (s_c, s_u)


def _check_guidance(cond, uncond, guidance) -> float:
    guidance = float(guidance)
    if guidance != guidance or abs(guidance) == float("inf"):
        raise BqcError(f"sampler: the guidance scale must be a finite number, got {guidance!r}")
    if guidance != 1.0 and uncond is None:
        raise BqcError(f"sampler: guidance {guidance:g} needs the unconditional inputs (the empty-prompt embedding)",
                       hint="give a latents file with 'uncond' (bqc encode stores it when a text encoder is given), "
                            "or use guidance 1 (no guidance)")
    if uncond is not None and not cond:
        raise BqcError("sampler: unconditional inputs without conditional ones", hint="pass cond too")
    return guidance


def check_eta(eta, option: str = "eta") -> float:
    """DDIM's eta as a float in [0, 1]: 0 is the deterministic sampler, 1 the DDPM posterior's noise.
    Outside that range the update has no consistent marginals (a negative eta would shrink the
    direction term and add no noise; above 1 the noise exceeds what the next step can hold), and
    NaN or infinity poison every sample, so they are refused rather than sampled."""
    v = float(eta)
    if not 0.0 <= v <= 1.0:  # also NaN, which fails every comparison
        raise BqcError(f"{option} must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {eta!r}")
    return v


@torch.no_grad()
def ddim_sample(step_model: StepModel, shape: Sequence[int], *, schedule: NoiseSchedule | None = None,
                steps: int = 50, eta: float = 0.0, seed: int | None = 0,
                generator: torch.Generator | None = None, y: torch.Tensor | None = None,
                x_T: torch.Tensor | None = None, device="cpu", dtype=torch.float32,
                clip_x0: float | None = None, return_state: bool = False,
                callback: Callable[[int, int, torch.Tensor], None] | None = None,
                cond: dict | None = None, uncond: dict | None = None, guidance: float = 1.0):
    """DDIM (Song et al. 2021) with ``steps`` steps at ``schedule.timesteps(steps)`` (bqc's
    uniform spacing, or the model's diffusers/LDM spacing and offset); ``eta = 0`` is the
    deterministic sampler, ``eta = 1`` with ``steps = T`` is DDPM ancestral sampling. The last
    step always goes to the clean end (abar = 1, diffusers' ``set_alpha_to_one``).

    Returns the final ``x_0`` batch (and the last state when ``return_state``).
    ``callback(i, t, x)`` is called after each step. ``clip_x0`` clamps the predicted x0
    to ``[-clip_x0, clip_x0]`` (off by default). ``cond`` / ``uncond`` / ``guidance``: text
    conditioning and classifier-free guidance (module docstring).
    """
    guidance = _check_guidance(cond, uncond, guidance)
    eta = check_eta(eta)
    schedule = schedule or NoiseSchedule()
    ts = schedule.timesteps(steps)
    g = _generator(seed, generator)
    x = _x_T(shape, x_T, g, device, dtype)
    abar = schedule.alphas_cumprod
    state: State = None
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = float(abar[t])
        a_prev = float(abar[t_prev]) if t_prev >= 0 else 1.0
        out, state = guided_call(step_model, x, t, y, state, cond, uncond, guidance)
        eps, x0 = schedule.split(out, x, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(max(0.0, 1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(0.0, 1 - a_prev - sigma ** 2)) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback(i, t, x)
    return (x, state) if return_state else x


@torch.no_grad()
def ddpm_sample(step_model: StepModel, shape: Sequence[int], *, schedule: NoiseSchedule | None = None,
                seed: int | None = 0, generator: torch.Generator | None = None,
                y: torch.Tensor | None = None, x_T: torch.Tensor | None = None, device="cpu",
                dtype=torch.float32, variance: str = "posterior", clip_x0: float | None = None,
                return_state: bool = False,
                callback: Callable[[int, int, torch.Tensor], None] | None = None,
                cond: dict | None = None, uncond: dict | None = None, guidance: float = 1.0):
    """DDPM ancestral sampling over all ``T`` steps (Ho et al. 2020, algorithm 2).

    ``variance`` is ``"posterior"`` (beta~_t, the default) or ``"beta"`` (beta_t); no noise
    is added at ``t = 0``. ``cond`` / ``uncond`` / ``guidance`` as for :func:`ddim_sample`."""
    guidance = _check_guidance(cond, uncond, guidance)
    if variance not in ("posterior", "beta"):
        raise BqcError(f"ddpm_sample: variance must be 'posterior' or 'beta', got {variance!r}")
    schedule = schedule or NoiseSchedule()
    g = _generator(seed, generator)
    x = _x_T(shape, x_T, g, device, dtype)
    abar, betas = schedule.alphas_cumprod, schedule.betas
    var = schedule.posterior_variance if variance == "posterior" else betas
    state: State = None
    for i, t in enumerate(range(schedule.T - 1, -1, -1)):
        a_t = float(abar[t])
        a_prev = float(abar[t - 1]) if t > 0 else 1.0
        beta = float(betas[t])
        out, state = guided_call(step_model, x, t, y, state, cond, uncond, guidance)
        eps, x0 = schedule.split(out, x, t)
        if clip_x0 is None and schedule.prediction == "eps":
            mean = (x - beta / math.sqrt(1 - a_t) * eps) / math.sqrt(1 - beta)
        else:
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
            mean = (beta * math.sqrt(a_prev) / (1 - a_t)) * x0 + ((1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t)) * x
        if t > 0:
            x = mean + math.sqrt(float(var[t])) * randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        else:
            x = mean
        if callback is not None:
            callback(i, t, x)
    return (x, state) if return_state else x


def _check_sample_memory(n: int, shape: Sequence[int]) -> None:
    """``generate`` holds the starting noise of all ``n`` samples and their results (float32,
    about 3 copies with the final concatenation): refuse a request this machine cannot hold (an
    ``-n 100000000`` ended in the allocator's traceback) before any work."""
    from bqc.runtime import require_memory

    require_memory(3 * 4 * int(n) * math.prod(int(d) for d in shape),
                   f"{n} samples of shape {tuple(shape)} need, for their noise and results,",
                   hint="draw fewer samples (-n), or several runs with different --seed")


@torch.no_grad()
def generate(step_model: StepModel, n: int, shape: Sequence[int], *, schedule: NoiseSchedule | None = None,
             sampler: str = "ddim", steps: int = 50, eta: float = 0.0, seed: int = 0, batch: int = 256,
             y: torch.Tensor | None = None, device="cpu", clip_x0: float | None = None,
             progress: bool = False, context: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
             guidance: float = 1.0) -> torch.Tensor:
    """Draw ``n`` samples of per-sample ``shape`` (C, H, W) in batches.

    All starting noise ``x_T`` is drawn up front from ``seed``, so deterministic DDIM
    (``eta = 0``) gives the same images whatever ``batch`` is; the per-step noise of a
    stochastic sampler is drawn per batch from a generator seeded with ``(seed, batch index)``.
    Returns a CPU tensor ``(n, *shape)``. ``progress``: show progress on stderr
    (:class:`bqc.console.Progress`), advancing once per sampler step of each batch.
    ``context``: the text embedding of each sample ``(n, L, D)`` (a text-conditioned model);
    ``uncond``: the empty-prompt embedding ``(1, L, D)``, used with ``guidance`` S != 1 for
    classifier-free guidance (module docstring).
    """
    schedule = schedule or NoiseSchedule()
    _check_sample_memory(n, shape)
    g = torch.Generator("cpu").manual_seed(int(seed))
    x_T_all = torch.randn((n, *shape), generator=g)
    if y is not None and len(y) != n:
        raise BqcError(f"generate: got {len(y)} labels for {n} samples")
    if context is not None and len(context) != n:
        raise BqcError(f"generate: got {len(context)} text embeddings for {n} samples")
    if uncond is not None and (context is None or uncond.dim() != 3 or uncond.shape[0] != 1
                               or tuple(uncond.shape[1:]) != tuple(context.shape[1:])):
        raise BqcError(f"generate: the empty-prompt embedding must be (1, L, D) like the text embeddings "
                       f"(got {tuple(uncond.shape)} for {None if context is None else tuple(context.shape)})")
    from bqc.console import Progress

    outs = []
    nb = (n + batch - 1) // batch
    per_batch = steps if sampler == "ddim" else schedule.T
    label = f"sampling {n} ({sampler}-{per_batch}" + (f", {nb} batches)" if nb > 1 else ")")
    with Progress(label, total=nb * per_batch, enabled=progress) as bar:  # stderr: stdout stays clean for --json
        step_done = (lambda i, t, x: bar.advance()) if progress else None
        for b in range(nb):
            sl = slice(b * batch, min(n, (b + 1) * batch))
            xT = x_T_all[sl]
            yb = None if y is None else y[sl].to(device)
            cb = None if context is None else {"context": context[sl].to(device)}
            ub = None if uncond is None else {"context": uncond.to(device).expand(len(xT), -1, -1)}
            guide = dict(cond=cb, uncond=ub, guidance=guidance)
            gb = torch.Generator("cpu").manual_seed(int(seed) * 1_000_003 + b + 1)
            if sampler == "ddim":
                x = ddim_sample(step_model, xT.shape, schedule=schedule, steps=steps, eta=eta, generator=gb,
                                y=yb, x_T=xT, device=device, clip_x0=clip_x0, callback=step_done, **guide)
            elif sampler == "ddpm":
                x = ddpm_sample(step_model, xT.shape, schedule=schedule, generator=gb, y=yb, x_T=xT,
                                device=device, clip_x0=clip_x0, callback=step_done, **guide)
            else:
                raise BqcError(f"unknown sampler {sampler!r}", hint="use 'ddim' or 'ddpm'")
            outs.append(x.float().cpu())
    return torch.cat(outs)
