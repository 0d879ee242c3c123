"""DPM-Solver++(2S) (pflow/solvers/singlestep.py, arXiv 2211.01095 Algorithm 1): the same
sample as diffusers' singlestep DPM-Solver++ of order 2 on a small random UNet, its order
on the exact Gaussian mixture, first order is DDIM, NFE, options, and gradients with
respect to the grid."""

from __future__ import annotations

import math

import diffusers
import pytest
import torch

import pflow
from pflow.solvers import parse_solver

from .conftest import make_gmm
from .reference import SIGMA_HI, geometric, order_problem, rms, slope

# --- diffusers: DPMSolverSinglestepScheduler(solver_order=2, algorithm_type="dpmsolver++") ---
#
# diffusers' singlestep order 2 takes its timesteps in pairs (get_order_list: orders
# [1, 2, 1, 2, ...]): from s0 a first-order step to s1, then a second-order step from s0 to
# s2 with the model outputs at s0 and s1 ("midpoint": D0 = x0_0, D1 = (x0_1 - x0_0) / r,
# x_2 = (sigma_2/sigma_0) x_0 + alpha_2 (1 - e^-h) (D0 + D1 / 2)). That pair is one 2S step
# s0 -> s2 with r = (lambda_1 - lambda_0) / (lambda_2 - lambda_0). diffusers' sigma is
# sqrt((1 - a) / a), pflow's, and its lambda = log(alpha_t / sigma_t) = -log(sigma).
# Its samples are in the network's scale (init_noise_sigma = 1), as pflow's state is.
#
# Which grids can match:
# - final_sigmas_type="zero" forces lower_order_final=True, and the last scheduler step
#   (into 0) is then first order, x0_hat: pflow's Euler step into 0. With an odd number of
#   scheduler steps the pairs end right before it; with an even number one more first-order
#   step comes before it (pflow: that step with order=1).
# - final "sigma_min" needs lower_order_final=False and an even number of steps: every
#   pair is a 2S step, the last one ends at sigma_min.
# - use_exponential_sigmas=True spaces the sigmas evenly in log sigma, so each middle
#   point is at r = 1/2 (to the float32 rounding of diffusers' sigmas, ~1e-8 in r) and one
#   pflow.sample with the default r takes the whole grid. (Its "sigma_min" grid ends with
#   sigma_min twice, a zero-length step: only "zero" is compared there.) On the default
#   grid (integer timesteps, sigmas at table entries) r is 0.43..0.54 and varies from step
#   to step: pflow takes one step per call, with that step's r (r = 1/2 there is 5e-3 off).
#
# Timesteps: with exponential sigmas diffusers computes the fractional timestep of each
# sigma (linear in log sigma between table entries, as pflow.NoiseSchedule.sigma_to_t) and
# then casts it to int64, i.e. truncates it, while its update uses the untruncated sigma.
# pflow hands the network the continuous t(sigma) (EpsModel(quantize=True) would round,
# not truncate), so the network would see different timesteps. For a fair comparison
# pflow's network here is given diffusers' own timestep for each sigma it asks about. On
# the default grid every sigma, pflow's intermediate ones included, is a table entry,
# whose t pflow computes as the exact integer diffusers uses (float32 t).
#
# Tolerance: the random UNet's outputs reach ~570, so differences are judged relative to
# the sample's scale (as in test_peers.py). Measured: at most 7.5e-7 relative (4.3e-4 at a
# scale of 570) over the cases below; pflow in float32 is 2.1e-7 .. 6.1e-7 from pflow in
# float64 and diffusers 2.4e-7 .. 6.1e-7 from it: float32 arithmetic done in another order
# (diffusers rounds its sigmas to float32, forms h from float32 logarithms and x0 in its own
# scale), passed on by the UNet. REL_TOL leaves a factor ~2.7 for other BLAS and threads.
REL_TOL = 2e-6


def _scheduler(steps: int, **config):
    scheduler = diffusers.DPMSolverSinglestepScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        **config,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def _run_diffusers(unet, scheduler, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    nfe = 0
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        nfe += 1
    return x, nfe


def _check(ref: torch.Tensor, x: torch.Tensor, nfe: int, ref_nfe: int) -> float:
    assert x.dtype == torch.float32
    scale = max(1.0, ref.abs().max().item())
    err = (x - ref).abs().max().item()
    assert err <= REL_TOL * scale, (err, scale, err / scale)
    assert nfe == ref_nfe
    return err / scale


@pytest.mark.parametrize("steps", [9, 15])
def test_matches_diffusers_on_exponential_sigmas(unet, noise, steps):
    scheduler = _scheduler(steps, use_exponential_sigmas=True, final_sigmas_type="zero")
    assert scheduler.order_list == [1, 2] * (steps // 2) + [1]
    ref, ref_nfe = _run_diffusers(unet, scheduler, noise.clone())

    schedule = pflow.NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    sigmas = scheduler.sigmas.double()  # float32 values, as diffusers steps with them
    frac = torch.as_tensor(schedule.sigma_to_t(sigmas[:-1].numpy()))
    assert torch.equal(frac.floor().long(), scheduler.timesteps)  # truncated, not rounded
    assert not torch.equal(frac.round().long(), scheduler.timesteps)

    def net(x, t):
        # diffusers' timestep for the sigma pflow asks about (the nearest fractional t)
        i = int((frac - float(t[0])).abs().argmin())
        assert abs(float(frac[i]) - float(t[0])) < 1e-3, (float(frac[i]), float(t[0]))
        return unet(x, scheduler.timesteps[i].expand(x.shape[0])).sample

    model = pflow.EpsModel(net, schedule)
    grid = torch.cat([sigmas[0:-1:2], sigmas[-1:]])  # the pairs' ends, then 0
    assert grid[-2] == sigmas[-2] and grid[-1] == 0
    res = pflow.sample(model, noise, "dpmpp_2s", sigmas=grid)
    _check(ref, res.x, res.nfe, ref_nfe)


def _chain(model, grid: list[float], pairs: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``pairs`` 2S steps over ``grid`` two points at a time, each with its own ``r``; the
    rest of the grid first order (the step into 0 is the driver's Euler step)."""
    nfe = 0
    for j in range(pairs):
        s0, s1, s2 = grid[2 * j : 2 * j + 3]
        r = math.log(s0 / s1) / math.log(s0 / s2)
        step = torch.tensor([s0, s2], dtype=torch.float64)
        res = pflow.sample(model, x, "dpmpp_2s", sigmas=step, r=r)
        x, nfe = res.x, nfe + res.nfe
    rest = grid[2 * pairs :]
    if len(rest) > 1:
        res = pflow.sample(
            model, x, "dpmpp_2s", sigmas=torch.tensor(rest, dtype=torch.float64), order=1
        )
        x, nfe = res.x, nfe + res.nfe
    return x, nfe


@pytest.mark.parametrize(
    "steps,final,lower_order_final",
    [(10, "sigma_min", False), (20, "sigma_min", False), (9, "zero", True), (10, "zero", True)],
)
def test_matches_diffusers_with_per_step_r(unet, noise, steps, final, lower_order_final):
    scheduler = _scheduler(steps, final_sigmas_type=final, lower_order_final=lower_order_final)
    ref, ref_nfe = _run_diffusers(unet, scheduler, noise.clone())

    schedule = pflow.NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    model = pflow.EpsModel(lambda x, t: unet(x, t).sample, schedule)
    end = 0.0 if final == "zero" else schedule.sigma_min
    grid = schedule.sigmas[scheduler.timesteps].tolist() + [end]
    assert torch.allclose(
        torch.tensor(grid, dtype=torch.float64), scheduler.sigmas.double(), rtol=1e-6
    )
    pairs = scheduler.order_list.count(2)
    assert scheduler.order_list[: 2 * pairs] == [1, 2] * pairs
    x, nfe = _chain(model, grid, pairs, noise)
    _check(ref, x, nfe, ref_nfe)
    if steps == 10 and final == "sigma_min":
        # the middle points are not at r = 1/2 here, and it shows
        half = pflow.sample(
            model, noise, "dpmpp_2s", sigmas=torch.tensor(grid[::2], dtype=torch.float64)
        )
        assert (half.x - ref).abs().max() > 1e-3 * ref.abs().max()


# --- the exact Gaussian mixture -------------------------------------------------------------


@pytest.fixture(scope="module")
def problem():
    return order_problem()


def test_order(problem):
    """A singlestep method starts at full order: the plain geometric grid (tests/reference.py)
    from sigma = 20 to 0.1. Measured slope 1.93 over 40..320 steps (1.88 over 20..160: the
    local slopes rise 1.81, 1.89, 1.94, 1.97 towards 2)."""
    gmm, noise, ref = problem
    steps = [40, 80, 160, 320]
    errors = []
    for n in steps:
        res = pflow.sample(gmm, noise, "dpmpp_2s", sigmas=geometric(n))
        assert res.nfe == 2 * n
        errors.append(rms(res.x - ref))
    measured = slope(steps, errors)
    assert abs(measured - 2) <= 0.3, (measured, errors)


def test_first_order_is_ddim(problem):
    gmm, noise, _ = problem
    for grid in (geometric(7), pflow.get_sigmas(gmm.schedule, 10, "trailing")):
        euler = pflow.sample(gmm, noise, "euler", sigmas=grid)
        res = pflow.sample(gmm, noise, "dpmpp_2s", sigmas=grid, order=1)
        assert res.nfe == euler.nfe == len(grid) - 1
        assert (res.x - euler.x).abs().max() <= 1e-12
    assert pflow.solvers.get_solver("dpmpp_2s").ddim_options == {"order": 1}


def test_nfe_and_the_step_into_zero(problem):
    gmm, noise, _ = problem
    positive = geometric(5, hi=SIGMA_HI, lo=0.5)
    to_zero = torch.cat([positive, torch.zeros(1, dtype=torch.float64)])
    before = pflow.sample(gmm, noise, "dpmpp_2s", sigmas=positive)
    res = pflow.sample(gmm, noise, "dpmpp_2s", sigmas=to_zero)
    assert before.nfe == 2 * 5 and res.n_accepted == 6
    assert res.nfe == 2 * 6 - 1
    _, x0_hat = gmm.predict_xt(before.x, 0.5)  # Euler into 0: x0_hat at the last sigma
    assert (res.x - x0_hat).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="supports last_step='euler' only"):
        pflow.sample(gmm, noise, "dpmpp_2s", sigmas=to_zero, last_step="solver")
    # the intermediate point moves with r; the step into 0 does not use it
    other = pflow.sample(gmm, noise, "dpmpp_2s", sigmas=positive, r=0.3)
    assert (other.x - before.x).abs().max() > 1e-6


def test_listed_parsed_and_checked(unet, noise):
    assert "dpmpp_2s" in pflow.available_solvers()
    solver, options = parse_solver("dpmpp_2s[r=0.5]")
    assert solver.name == "dpmpp_2s" and options == {"r": 0.5}
    assert solver.order == 2 and solver.nfe_per_step == 2 and solver.differentiable
    model = pflow.EpsModel(lambda x, t: unet(x, t).sample, pflow.NoiseSchedule.linear())
    res = pflow.sample(model, noise, "dpmpp_2s", steps=10)
    assert res.sigmas[-1] == 0 and res.nfe == 19 and bool(torch.isfinite(res.x).all())
    gmm = make_gmm()
    x = torch.randn(2, 4)
    for bad in ("dpmpp_2s[r=1.5]", "dpmpp_2s[r=0]"):
        with pytest.raises(ValueError, match=r"solver 'dpmpp_2s'.*\br\b"):
            pflow.sample(gmm, x, bad, steps=3)
    with pytest.raises(ValueError, match=r"solver 'dpmpp_2s'.*\br\b"):
        pflow.sample(gmm, x, "dpmpp_2s", steps=3, r=1.5)
    with pytest.raises(ValueError, match="order"):
        pflow.sample(gmm, x, "dpmpp_2s", steps=3, order=3)


@pytest.mark.parametrize("r", [0.5, 0.3])
@pytest.mark.parametrize("into_zero", [False, True])
def test_gradient_through_the_grid(r, into_zero):
    """d(sum of the sample)/d(sigmas) by backpropagation against a central difference
    (float64, step 1e-4 sigma): measured within 1e-7 relative for every grid point."""
    gmm = make_gmm(dim=4, k=3, seed=3)
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = geometric(5, lo=0.5)
    if into_zero:
        grid = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])

    def total(sigmas: torch.Tensor) -> torch.Tensor:
        return pflow.sample(gmm, noise, "dpmpp_2s", sigmas=sigmas, r=r).x.sum()

    sigmas = grid.clone().requires_grad_(True)
    total(sigmas).backward()
    assert sigmas.grad is not None
    for i, s in enumerate(grid.tolist()):
        if s == 0.0:
            assert sigmas.grad[i] == 0  # the Euler step into 0 does not depend on it
            continue
        d = 1e-4 * s
        up, down = grid.clone(), grid.clone()
        up[i] += d
        down[i] -= d
        fd = float(total(up) - total(down)) / (2 * d)
        assert abs(float(sigmas.grad[i]) - fd) <= 1e-6 * abs(fd), (i, float(sigmas.grad[i]), fd)
