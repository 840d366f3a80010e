"""Noise schedule, samplers (determinism, DDIM/DDPM agreement, state threading), grids."""
import math

import numpy as np
import pytest
import torch

from bqc.diffusion import (
    NoiseSchedule, as_step_model, ddim_sample, ddim_timesteps, ddpm_sample, eps_loss, generate, q_sample,
    save_grid, step_gap,
)
from bqc.diffusion.samplers import timestep_experts
from bqc.errors import BqcError


def toy_eps(x, t, y=None):
    # a smooth, timestep-dependent "network" with no parameters
    return 0.3 * torch.tanh(x) + 0.001 * t.float().view(-1, 1, 1, 1)


def test_schedule_values():
    s = NoiseSchedule()
    assert s.T == 1000 and len(s.betas) == 1000
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(2e-2)
    assert np.all(np.diff(s.betas) > 0)
    assert s.alphas_cumprod[0] == pytest.approx(1 - 1e-4)
    assert s.alphas_cumprod[-1] == pytest.approx(np.prod(1 - np.linspace(1e-4, 2e-2, 1000)))
    assert s.alphas_cumprod[-1] < 1e-4  # x_T is essentially pure noise
    assert s.posterior_variance[0] == 0.0
    s2 = NoiseSchedule(T=10, beta_start=1e-3, beta_end=1e-1)
    assert NoiseSchedule.from_dict(s2.to_dict()) == s2
    with pytest.raises(BqcError):
        NoiseSchedule(beta_start=0.5, beta_end=0.1)
    with pytest.raises(BqcError):
        NoiseSchedule(kind="quadratic")


def test_q_sample_and_loss():
    s = NoiseSchedule()
    x0 = torch.ones(3, 1, 2, 2)
    noise = torch.zeros_like(x0)
    t = torch.tensor([0, 500, 999])
    xt = q_sample(s, x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        assert torch.allclose(xt[i], torch.full_like(xt[i], math.sqrt(s.alphas_cumprod[ti])))
    # a model that predicts the true noise has zero loss
    g = torch.Generator().manual_seed(0)
    loss, parts = eps_loss(lambda x, t: torch.zeros_like(x), s, x0, generator=g, return_parts=True)
    assert loss.item() == pytest.approx(parts["noise"].pow(2).mean().item())
    assert parts["t"].min() >= 0 and parts["t"].max() < s.T


def test_timesteps_and_gap():
    assert ddim_timesteps(1000, 50)[:2] == [980, 960] and ddim_timesteps(1000, 50)[-1] == 0
    assert len(ddim_timesteps(1000, 50)) == 50 and step_gap(1000, 50) == 20
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    ts = ddim_timesteps(1000, 7)
    assert len(set(ts)) == 7 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    with pytest.raises(BqcError):
        ddim_timesteps(10, 11)
    with pytest.raises(BqcError):
        ddim_timesteps(10, 0)


def test_ddim_deterministic_for_seed_and_leaves_global_rng():
    s = NoiseSchedule(T=100)
    m = as_step_model(toy_eps)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = ddim_sample(m, (4, 1, 8, 8), schedule=s, steps=10, seed=7)
    b = ddim_sample(m, (4, 1, 8, 8), schedule=s, steps=10, seed=7)
    c = ddim_sample(m, (4, 1, 8, 8), schedule=s, steps=10, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before, torch.get_rng_state())
    # stochastic DDIM and DDPM are also reproducible from the seed
    assert torch.equal(ddim_sample(m, (2, 1, 4, 4), schedule=s, steps=5, eta=1.0, seed=1),
                       ddim_sample(m, (2, 1, 4, 4), schedule=s, steps=5, eta=1.0, seed=1))
    assert torch.equal(ddpm_sample(m, (2, 1, 4, 4), schedule=s, seed=1), ddpm_sample(m, (2, 1, 4, 4), schedule=s, seed=1))


def test_ddim_eta1_full_steps_equals_ddpm():
    s = NoiseSchedule(T=50)
    m = as_step_model(toy_eps)
    a = ddim_sample(m, (3, 1, 4, 4), schedule=s, steps=50, eta=1.0, seed=3, dtype=torch.float64)
    b = ddpm_sample(m, (3, 1, 4, 4), schedule=s, seed=3, dtype=torch.float64)
    assert torch.allclose(a, b, atol=1e-9)
    # also with x0 clipping (different code path in ddpm)
    a = ddim_sample(m, (3, 1, 4, 4), schedule=s, steps=50, eta=1.0, seed=3, dtype=torch.float64, clip_x0=1.0)
    b = ddpm_sample(m, (3, 1, 4, 4), schedule=s, seed=3, dtype=torch.float64, clip_x0=1.0)
    assert torch.allclose(a, b, atol=1e-9)


def test_ddim_exact_model_recovers_x0():
    # with the true eps of a single known x0, deterministic DDIM lands on x0 from any x_T
    s = NoiseSchedule(T=100)
    x0 = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)

    def oracle(x, t, y, state):
        a = s.abar(t, x)
        return (x - a.sqrt() * x0) / (1 - a).sqrt(), None

    out = ddim_sample(oracle, (2, 1, 4, 4), schedule=s, steps=7, seed=0, dtype=torch.float64)
    assert torch.allclose(out, x0.double().expand(2, -1, -1, -1), atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_state_threading(sampler):
    s = NoiseSchedule(T=20)
    seen = []

    def counting(x, t, y, state):
        seen.append(None if state is None else (int(state[0].item()), int(state[1][0].item())))
        k = 0 if state is None else int(state[0].item()) + 1
        # state = [call counter, the timestep this call saw]
        return torch.zeros_like(x), [torch.tensor(k), t.clone()]

    fn = ddim_sample if sampler == "ddim" else ddpm_sample
    kw = {"steps": 5} if sampler == "ddim" else {}
    _, final = fn(counting, (2, 1, 2, 2), schedule=s, seed=0, return_state=True, **kw)
    ts = ddim_timesteps(20, 5) if sampler == "ddim" else list(range(19, -1, -1))
    assert seen[0] is None
    assert seen[1:] == [(i, ts[i]) for i in range(len(ts) - 1)]
    assert int(final[0]) == len(ts) - 1 and int(final[1][0]) == 0


def test_timestep_experts_split_by_t_and_keep_their_own_state():
    """Each expert runs its timesteps (t > switch: the first) and gets back only the state it
    made at the step before; the composite samples what the experts would by hand."""
    s = NoiseSchedule(T=100)
    calls = []

    def expert(tag, scale):
        def step(x, t, y, state):
            calls.append((tag, int(t[0]), None if state is None else state[0]))
            return scale * torch.tanh(x), [tag]
        return step

    model = timestep_experts([expert("hi", 0.3), expert("lo", 0.1)], [30])
    out = ddim_sample(model, (2, 1, 2, 2), schedule=s, steps=10, seed=0)
    ts = ddim_timesteps(100, 10)
    assert [(c[0], c[1]) for c in calls] == [("hi" if t > 30 else "lo", t) for t in ts]
    first_lo = next(i for i, c in enumerate(calls) if c[0] == "lo")
    assert calls[0][2] is None and calls[first_lo][2] is None  # no cache across experts
    assert all(c[2] == c[0] for i, c in enumerate(calls) if i not in (0, first_lo))

    def by_hand(x, t, y, state):
        return (0.3 if int(t[0]) > 30 else 0.1) * torch.tanh(x), None

    assert torch.equal(out, ddim_sample(by_hand, (2, 1, 2, 2), schedule=s, steps=10, seed=0))
    with pytest.raises(BqcError, match="switches"):
        timestep_experts([by_hand, by_hand, by_hand], [10, 30])


def test_labels_reach_the_model():
    got = []

    def m(x, t, y=None):
        got.append(y)
        return torch.zeros_like(x)

    y = torch.tensor([3, 5])
    ddim_sample(as_step_model(m), (2, 1, 2, 2), schedule=NoiseSchedule(T=10), steps=2, y=y)
    assert all(torch.equal(g, y) for g in got)
    got.clear()
    ddim_sample(as_step_model(lambda x, t: got.append(None) or torch.zeros_like(x)), (2, 1, 2, 2),
                schedule=NoiseSchedule(T=10), steps=2)
    assert got == [None, None]


def test_generate_batch_independent():
    s = NoiseSchedule(T=100)
    m = as_step_model(toy_eps)
    a = generate(m, 10, (1, 4, 4), schedule=s, steps=5, seed=2, batch=3)
    b = generate(m, 10, (1, 4, 4), schedule=s, steps=5, seed=2, batch=10)
    assert a.shape == (10, 1, 4, 4) and torch.allclose(a, b, atol=1e-6)


def test_bad_model_output():
    with pytest.raises(TypeError):
        ddim_sample(lambda x, t, y, s: x, (1, 1, 2, 2), schedule=NoiseSchedule(T=10), steps=2)
    with pytest.raises(BqcError):
        ddim_sample(lambda x, t, y, s: (x[:, :, :1], None), (1, 1, 2, 2), schedule=NoiseSchedule(T=10), steps=2)


def test_save_grid(tmp_path):
    from PIL import Image

    x = torch.linspace(-1, 1, 10 * 16).view(10, 1, 4, 4)
    p = save_grid(x, tmp_path / "g.png", nrow=4, scale=2)
    im = Image.open(p)
    assert im.mode == "L" and im.size == (2 * (4 * 5 + 1), 2 * (3 * 5 + 1))
    p = save_grid(torch.zeros(3, 3, 4, 4), tmp_path / "c.png", nrow=3)
    assert Image.open(p).mode == "RGB"
