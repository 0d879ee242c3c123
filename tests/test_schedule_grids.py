"""Schedules against diffusers' tables, the continuous sigma <-> t map, and grids that
select exactly the timesteps diffusers' DDIMScheduler selects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pflow

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize(
    "name,diffusers_name",
    [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")],
)
def test_schedules_match_diffusers(name, diffusers_name):
    ours = getattr(pflow.NoiseSchedule, name)()
    betas = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    theirs = diffusers.DDIMScheduler(beta_schedule=diffusers_name, **betas).alphas_cumprod
    theirs = theirs.double()
    # diffusers accumulates its product in float32
    assert torch.allclose(ours.alphas_cumprod, theirs, rtol=2e-5, atol=1e-12)
    assert ours.alphas_cumprod.dtype == torch.float64


def test_sigma_definition_and_range():
    s = pflow.NoiseSchedule.linear()
    a = s.alphas_cumprod
    assert torch.allclose(s.sigmas, ((1 - a) / a).sqrt(), rtol=0, atol=0)
    assert s.sigma_min == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-12)
    assert 150 < s.sigma_max < 160
    assert pflow.NoiseSchedule.cosine().sigma_max > 1e4


def test_sigma_t_maps_are_inverse_and_log_linear():
    s = pflow.NoiseSchedule.cosine()
    t = np.linspace(0, 999, 2001)
    assert np.allclose(s.sigma_to_t(s.t_to_sigma(t)), t, atol=1e-8)
    # linear in log sigma between entries: the midpoint in t is the geometric mean in sigma
    mid = s.t_to_sigma(10.5)
    assert mid == pytest.approx(math.sqrt(float(s.sigmas[10] * s.sigmas[11])), rel=1e-12)
    # torch path equals the numpy path, on tensors, and clamps outside the table
    sig = torch.tensor([1e-5, 0.5, 3.0, 1e6], dtype=torch.float64)
    tt = s.sigma_to_t(sig)
    assert torch.allclose(tt, torch.from_numpy(s.sigma_to_t(sig.numpy())), atol=1e-9)
    assert tt[0] == 0 and tt[-1] == 999
    assert torch.allclose(s.t_to_sigma(torch.from_numpy(t)), torch.from_numpy(s.t_to_sigma(t)))


def test_schedule_from_betas_and_errors():
    betas = np.linspace(1e-4, 0.02, 1000)
    assert torch.allclose(
        pflow.NoiseSchedule.from_betas(betas).alphas_cumprod,
        pflow.NoiseSchedule.linear().alphas_cumprod,
    )
    with pytest.raises(ValueError, match="alphas_cumprod must be strictly decreasing"):
        pflow.NoiseSchedule.from_alphas_cumprod([0.9, 0.95, 0.5])
    with pytest.raises(ValueError, match="betas must lie in"):
        pflow.NoiseSchedule.from_betas([0.1, 1.5])
    with pytest.raises(ValueError, match="num_train_timesteps"):
        pflow.NoiseSchedule.linear(num_train_timesteps=1)


STEP_COUNTS = [1, 3, 7, 10, 25, 50, 99, 250, 1000]
GRID_CASES = (
    [("leading", n, 0) for n in STEP_COUNTS]
    # offset 1 with 1000 steps selects t = 1000, past the table (diffusers indexes past it too)
    + [("leading", n, 1) for n in STEP_COUNTS[:-1]]
    + [("trailing", n, 0) for n in STEP_COUNTS]
    + [("linspace", n, 0) for n in STEP_COUNTS]
)


@pytest.mark.parametrize("spacing,steps,offset", GRID_CASES)
def test_grid_picks_diffusers_timesteps(spacing, steps, offset):
    sched = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(steps)
    s = pflow.NoiseSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    grid = pflow.get_sigmas(s, steps, spacing, steps_offset=offset)
    expected = s.sigmas[sched.timesteps.long()]
    assert grid.dtype == torch.float64
    assert torch.equal(grid[:-1], expected)
    assert grid[-1] == 0


def test_grid_end_and_monotone():
    s = pflow.NoiseSchedule.linear()
    g = pflow.get_sigmas(s, 10, "trailing", set_alpha_to_one=False)
    assert g[-1] == s.sigma_min and len(g) == 11
    # leading with offset 0 already ends at t = 0: the zero-length step is dropped
    g = pflow.get_sigmas(s, 10, "leading", set_alpha_to_one=False)
    assert g[-1] == s.sigma_min and len(g) == 10
    for spacing in pflow.grids.SPACINGS:
        for steps in (1, 2, 5, 50):
            g = pflow.get_sigmas(s, steps, spacing)
            assert (g[1:] < g[:-1]).all(), (spacing, steps)
            assert g[-1] == 0 and len(g) == steps + 1


def test_karras_logsnr_uniform_quadratic_formulas():
    s = pflow.NoiseSchedule.linear()
    rho = 7.0
    k = pflow.get_sigmas(s, 12, "karras", rho=rho)[:-1]
    assert k[0] == pytest.approx(s.sigma_max) and k[-1] == pytest.approx(s.sigma_min)
    assert np.allclose(np.diff(k.numpy() ** (1 / rho)), np.diff(k.numpy() ** (1 / rho))[0])
    lg = pflow.get_sigmas(s, 9, "logsnr")[:-1].log().numpy()
    assert np.allclose(np.diff(lg), np.diff(lg)[0])
    # DDIM paper: tau_i = floor(c i), and floor(c i^2) topping out at 0.8 N
    u = pflow.get_sigmas(s, 10, "uniform")[:-1]
    assert torch.equal(u, s.sigmas[torch.arange(9, -1, -1) * 100])
    q = pflow.get_sigmas(s, 10, "quadratic")[:-1]
    ts = np.floor(np.linspace(0, np.sqrt(800), 10) ** 2).astype(int)[::-1].copy()
    assert torch.equal(q, s.sigmas[torch.from_numpy(ts)])
    assert len(pflow.get_sigmas(s, 60, "quadratic")) == 61  # collisions pushed apart


def test_grid_errors_name_the_argument():
    s = pflow.NoiseSchedule.linear()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            pflow.get_sigmas(s, bad)
    with pytest.raises(ValueError, match="spacing must be one of .*karras"):
        pflow.get_sigmas(s, 10, "cosine")
    with pytest.raises(ValueError, match="strictly monotone"):
        pflow.validate_sigmas([10.0, 5.0, 7.0, 0.0])
    with pytest.raises(ValueError, match="strictly monotone"):
        pflow.validate_sigmas([10.0, 10.0, 0.0])
    with pytest.raises(ValueError, match="leaves the schedule's range"):
        pflow.validate_sigmas([500.0, 1.0, 0.0], schedule=s)
    with pytest.raises(ValueError, match="leaves the schedule's range"):
        pflow.validate_sigmas([10.0, 1e-4, 0.0], schedule=s)
    with pytest.raises(ValueError, match="finite"):
        pflow.validate_sigmas([float("nan"), 0.0])
    with pytest.raises(ValueError, match=">= 0"):
        pflow.validate_sigmas([1.0, -1.0])
    with pytest.raises(ValueError, match="at least 2 entries"):
        pflow.validate_sigmas([1.0])


def test_snapping_onto_the_range_never_repeats_a_sigma():
    """Entries within the float32 slack of sigma_min are snapped onto it; two such entries
    would become a repeated sigma (a zero step), which is an error naming both."""
    s = pflow.NoiseSchedule.linear()
    smin = s.sigma_min
    with pytest.raises(ValueError, match="entries 1 and 2 .* snapped onto the same sigma"):
        pflow.validate_sigmas([5.0, smin, smin * (1 - 1e-7)], schedule=s)
    grid = pflow.validate_sigmas([5.0, smin * (1 - 1e-7), 0.0], schedule=s)
    assert grid[1] == smin and (grid[1:] - grid[:-1] < 0).all()
