"""Diffusion core: noise schedule, samplers with cross-timestep state, image grids."""
from bqc.diffusion.schedule import NoiseSchedule, eps_loss, q_sample, randn, sample_timesteps
from bqc.diffusion.samplers import (
    StepModel, as_step_model, ddim_sample, ddim_timesteps, ddpm_sample, generate, step_gap,
)
from bqc.diffusion.grid import make_grid, save_grid

__all__ = [
    "NoiseSchedule", "eps_loss", "q_sample", "randn", "sample_timesteps",
    "StepModel", "as_step_model", "ddim_sample", "ddim_timesteps", "ddpm_sample", "generate", "step_gap",
    "make_grid", "save_grid",
]
