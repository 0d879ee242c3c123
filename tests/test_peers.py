"""The same method in diffusers gives the same sample: DPM-Solver++(2M) and (3M, diffusers'
variant), UniPC (bh2, orders 2 and 3), iPNDM, LMS and EDM's Heun, on a small random UNet
(tests/conftest.py: tiny_unet), from the same noise and at the same timesteps.

pflow gets diffusers' grid as ``sigmas = schedule.sigmas[timesteps]`` (+ the final sigma),
with the schedule built from the scheduler's own ``alphas_cumprod``; ``EpsModel`` feeds the
network ``x_t = xbar / sqrt(1 + sigma^2)`` and the timestep of each sigma (exact on table
entries), as the schedulers do.

Tolerance: the outputs of a random UNet reach hundreds, so differences are judged relative
to the output's scale (DESIGN.md, section 4). Measured: at most 9.7e-7 relative (5.5e-4 absolute
at a scale of 570) for every case here but two (2.2e-6 and 3.6e-6: third order over a large
last step, see AMPLIFIED_TOL). What remains is float32 arithmetic done in a
different order: diffusers rounds its sigmas to float32 and forms ``h`` as a difference of
float32 logarithms (relative error ~1e-6 for h ~ 0.3), forms ``x0`` and ``(x - x0) / sigma``
in its own scale, and the UNet passes these ~1e-7 differences on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pflow

diffusers = pytest.importorskip("diffusers")

REL_TOL = 2e-6
# A third-order step from sigma ~0.1-0.3 to sigma_min = 0.01 (h = 2.9-3.5) extrapolates the
# quadratic through x0_hat many of its intervals out and amplifies the float32 rounding of
# x0_hat (the random UNet's reach ~570): diffusers and pflow in float32 then each lie
# 1.6e-6 .. 2.6e-6 (relative) from pflow in float64, up to 3.6e-6 apart. That
# amplification is what lower_order_final avoids on short grids.
AMPLIFIED_TOL = 5e-6


def _check(ref: torch.Tensor, res: pflow.SolveResult, ref_nfe: int, tol: float = REL_TOL) -> None:
    assert res.x.dtype == torch.float32
    scale = ref.abs().max().item()
    err = (res.x - ref).abs().max().item()
    assert err <= tol * max(1.0, scale), (err, scale, err / max(1.0, scale))
    assert res.nfe == ref_nfe


def _eps_model(unet, scheduler) -> tuple[pflow.NoiseSchedule, pflow.EpsModel]:
    schedule = pflow.NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    return schedule, pflow.EpsModel(lambda x, t: unet(x, t).sample, schedule)


def _grid(schedule: pflow.NoiseSchedule, timesteps: torch.Tensor, final: str) -> torch.Tensor:
    end = 0.0 if final == "zero" else float(schedule.sigmas[0])
    sigmas = schedule.sigmas[timesteps.long()]
    return torch.cat([sigmas, torch.tensor([end], dtype=torch.float64)])


def _run_multistep(unet, scheduler, x):
    nfe = 0
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        nfe += 1
    return x, nfe


# (steps, final_sigmas_type, lower_order_final). Below 15 steps diffusers' DPM-Solver++
# takes its last step at first order (and UniPC always does): with final "sigma_min" that
# step is a real one, and pflow has to make the same choice. Into sigma = 0 both take
# x0_hat, whatever lower_order_final says.
CASES = [
    (10, "zero", True),
    (20, "zero", True),
    (10, "sigma_min", True),
    (20, "sigma_min", True),
    (10, "sigma_min", False),
]


@pytest.mark.parametrize("steps,final,lower_order_final", CASES)
def test_dpmpp_2m_matches_dpm_solver_multistep(unet, noise, steps, final, lower_order_final):
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type=final,
        lower_order_final=lower_order_final,
    )
    scheduler.set_timesteps(steps)
    ref, ref_nfe = _run_multistep(unet, scheduler, noise.clone())
    schedule, model = _eps_model(unet, scheduler)
    grid = _grid(schedule, scheduler.timesteps, final)
    res = pflow.sample(model, noise, "dpmpp_2m", sigmas=grid, lower_order_final=lower_order_final)
    _check(ref, res, ref_nfe)


@pytest.mark.parametrize("steps,final", [(10, "zero"), (20, "sigma_min")])
def test_dpmpp_3m_reference_variant_matches_dpm_solver_multistep(unet, noise, steps, final):
    """diffusers' third-order update (like the DPM-Solver reference code it follows) weights
    the second difference D2 = h^2 x0''/2 with -((e^-h - 1 + h)/h^2 - 1/2) ~ h/6 where the
    exactly integrated quadratic has ~h/3, so its local error is O(h^3) (measured order
    2.3 on the exact Gaussian mixture against 3.1: test_exponential.py). pflow's dpmpp_3m
    integrates exactly by default (and agrees with UniPC's third-order predictor to
    1e-12); ``variant="reference"`` is diffusers' update, and matches it. The exact one
    differs from diffusers by ~3e-3 relative here."""
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=3,
        final_sigmas_type=final,
    )
    scheduler.set_timesteps(steps)
    ref, ref_nfe = _run_multistep(unet, scheduler, noise.clone())
    schedule, model = _eps_model(unet, scheduler)
    grid = _grid(schedule, scheduler.timesteps, final)
    res = pflow.sample(model, noise, "dpmpp_3m", sigmas=grid, variant="reference")
    # with 20 steps the last step (h = 2.9 into sigma_min) is third order: AMPLIFIED_TOL
    _check(ref, res, ref_nfe, tol=AMPLIFIED_TOL if final == "sigma_min" else REL_TOL)
    exact = pflow.sample(model, noise, "dpmpp_3m", sigmas=grid)
    assert (exact.x - ref).abs().max() > 1e-3 * ref.abs().max()


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize(
    "steps,final,lower_order_final",
    [CASES[0], CASES[3], CASES[4]],
    ids=["10-zero", "20-min", "10-min-full"],
)
def test_unipc_matches_unipc_multistep(unet, noise, order, steps, final, lower_order_final):
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        solver_order=order,
        solver_type="bh2",
        predict_x0=True,
        final_sigmas_type=final,
        lower_order_final=lower_order_final,
    )
    scheduler.set_timesteps(steps)
    ref, ref_nfe = _run_multistep(unet, scheduler, noise.clone())
    schedule, model = _eps_model(unet, scheduler)
    grid = _grid(schedule, scheduler.timesteps, final)
    res = pflow.sample(
        model, noise, "unipc", sigmas=grid, order=order, lower_order_final=lower_order_final
    )
    # third order over the last step (h = 3.5): see AMPLIFIED_TOL
    amplified = order == 3 and final == "sigma_min" and not lower_order_final
    _check(ref, res, ref_nfe, tol=AMPLIFIED_TOL if amplified else REL_TOL)


@pytest.mark.parametrize("spacing,steps,offset", [("trailing", 10, 0), ("leading", 12, 1)])
def test_heun_matches_heun_discrete(unet, noise, spacing, steps, offset):
    """EDM's Heun (Algorithm 1: Euler into 0, 2N - 1 evaluations) on diffusers' own sigma
    grid. diffusers works on ``xbar`` and scales the network input by 1/sqrt(sigma^2 + 1);
    its sample starts at ``noise * init_noise_sigma`` = ``noise * sigma_max`` for
    "trailing" (the VE convention), so it is started here at ``noise * sqrt(1 +
    sigma_max^2)``, pflow's ``xbar`` at ``x_T = noise``. With "linspace" spacing the
    timesteps are fractional: diffusers interpolates sigma linearly in t, pflow t
    linearly in log sigma, and the two then differ by ~2e-6 relative (7 steps)."""
    scheduler = diffusers.HeunDiscreteScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        timestep_spacing=spacing,
        steps_offset=offset,
    )
    scheduler.set_timesteps(steps)
    # diffusers repeats every inner sigma (the two stages of a step); the grid is
    # sigmas[0], sigmas[1::2], and 0
    sigmas = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2], scheduler.sigmas[-1:]])
    timesteps = torch.cat([scheduler.timesteps[:1], scheduler.timesteps[1::2]])
    schedule, model = _eps_model(unet, scheduler)
    grid = _grid(schedule, timesteps, "zero")
    assert torch.allclose(grid, sigmas.double(), rtol=1e-6)
    x = noise * math.sqrt(1 + float(grid[0]) ** 2)
    nfe = 0
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(out, t, x).prev_sample
        nfe += 1
    res = pflow.sample(model, noise, "heun", sigmas=grid)
    assert nfe == 2 * steps - 1
    _check(x, res, nfe)


@pytest.mark.parametrize("spacing,steps", [("trailing", 10), ("leading", 20)])
def test_lms_matches_lms_discrete(unet, noise, spacing, steps):
    """diffusers' LMS (order 4) integrates the Lagrange basis over the actual sigmas with
    scipy's quad and takes its last step into 0 as a full LMS step, without evaluating
    there: pflow's ``last_step="solver"``."""
    scheduler = diffusers.LMSDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="linear", timestep_spacing=spacing
    )
    scheduler.set_timesteps(steps)
    schedule, model = _eps_model(unet, scheduler)
    grid = _grid(schedule, scheduler.timesteps, "zero")
    x = noise * math.sqrt(1 + float(grid[0]) ** 2)  # xbar, as for Heun
    nfe = 0
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(out, t, x).prev_sample
        nfe += 1
    res = pflow.sample(model, noise, "lms", sigmas=grid, last_step="solver")
    _check(x, res, nfe)


class _IPNDMModel:
    """The network as ``IPNDMScheduler`` sees it: a v-prediction in continuous time
    ``t in [0, 1]`` of the process ``x_t = alpha x0 + sigma_vp eps`` with ``alpha^2 +
    sigma_vp^2 = 1``, ``t = (2/pi) atan2(sigma_vp, alpha)``; ``eps = sigma_vp x_t + alpha v``
    (the scheduler's ``ets``). In pflow's variables ``sigma = sigma_vp / alpha``, so
    ``t = (2/pi) atan(sigma)``."""

    def __init__(self, unet):
        self.unet = unet

    def eps_from_xt(self, x_t, sigma):
        alpha = 1 / math.sqrt(1 + sigma**2)
        t = torch.full((x_t.shape[0],), 2 / math.pi * math.atan(sigma), dtype=torch.float32)
        return sigma * alpha * x_t + alpha * self.unet(x_t, t).sample

    def __call__(self, xbar, sigma):
        return self.eps_from_xt(xbar / math.sqrt(1 + sigma**2), sigma)


@pytest.mark.parametrize("steps", [10, 20])
def test_ipndm_matches_ipndm_scheduler(unet, noise, steps):
    """diffusers' ``IPNDMScheduler`` is iPNDM with the fixed weights on its own
    parameterisation: its step ``x_next = alpha_next (x - sigma_vp ets) / alpha +
    sigma_vp_next ets`` is, divided by ``alpha_next``, ``xbar_next = xbar + (sigma_next -
    sigma) ets``, Adams–Bashforth in ``sigma = sigma_vp / alpha`` with ``ets`` the fixed-weight
    combination of past ``eps``, and its last step goes into ``sigma = 0`` with those weights
    (``last_step="solver"``). What cannot match: its default grid starts at ``t = 1``, where
    ``alpha = 0`` and ``sigma`` is infinite (its first step there just rescales the noise);
    a grid must be finite. ``trained_betas`` sets the grid (``sigma_vp`` per step, here
    ``sin^2(pi s / 2)`` for ``s`` from 0.9 to 0, its own formula short of 1), and on it
    pflow's ``ipndm(variable_step=False)`` matches. With the default variable-step weights
    the two differ (by ~2e-2 relative at 10 steps: that grid is far from uniform in sigma)."""
    s = np.linspace(0.9, 0.0, steps + 1)
    betas = (np.sin(s * math.pi / 2) ** 2).tolist()
    scheduler = diffusers.IPNDMScheduler(num_train_timesteps=1000, trained_betas=betas)
    scheduler.set_timesteps(steps)
    grid = scheduler.betas.double() / scheduler.alphas.double()  # its float32 sigma_vp, alpha
    assert grid[-1] == 0
    ref, ref_nfe = _run_multistep(unet, scheduler, noise.clone())
    model = _IPNDMModel(unet)
    res = pflow.sample(model, noise, "ipndm", sigmas=grid, last_step="solver", variable_step=False)
    _check(ref, res, ref_nfe)
    variable = pflow.sample(model, noise, "ipndm", sigmas=grid, last_step="solver")
    assert (variable.x - ref).abs().max() > 1e3 * REL_TOL * max(1.0, ref.abs().max().item())
