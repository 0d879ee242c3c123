"""Model families beyond the DDPM table (issue 15): EDM / k-diffusion denoisers, score-SDE's
continuous VP schedule and flow matching, each checked against its paper's own formulas
(written here in float64) and, for flow matching, against diffusers'
``FlowMatchEulerDiscreteScheduler``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pflow
from pflow.schedule import FLOW_T_MAX

from .conftest import make_gmm
from .reference import SIGMA_HI, SIGMA_LO, rms, slope, with_startup, x_of, xbar_of
from .reference import geometric as _geometric

F64 = torch.float64


@pytest.fixture(scope="module")
def gmm():
    return make_gmm(dim=4, k=3, seed=3)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=F64)


def _col(sigma, x):
    s = torch.as_tensor(sigma, dtype=F64)
    return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s


# ------------------------------------------------------------------------------ EDM


def gmm_denoiser(gmm):
    """The exact denoiser ``D(x; sigma) = E[x0 | x] = x - sigma eps(x, sigma)``, taking
    ``sigma`` of shape ``(batch,)`` as EDM's and k-diffusion's denoisers do."""

    def D(x, sigma):
        assert sigma.shape == (x.shape[0],)
        return x - _col(sigma, x) * gmm(x, sigma)

    return D


def _edm_start(noise, sigma_max):
    """pflow's ``x_T`` is the VP-scaled state: ``xbar = noise * sqrt(1 + sigma_max^2)``."""
    return noise * math.sqrt(1 + sigma_max**2)


def _call(D, x, sigma):
    return D(x, torch.full((x.shape[0],), sigma, dtype=F64))


def edm_algorithm_1(D, x, t):
    """EDM (arXiv 2206.00364) Algorithm 1, deterministic (S_churn = 0), sigma(t) = t,
    s(t) = 1: Euler step, then the 2nd-order correction unless t_{i+1} = 0."""
    for i in range(len(t) - 1):
        d = (x - _call(D, x, t[i])) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if t[i + 1] != 0:
            d_prime = (x_next - _call(D, x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def kdiff_euler(D, x, t):
    """k-diffusion's ``sample_euler`` (s_churn = 0): ``x += (dx/dsigma) dt``."""
    for i in range(len(t) - 1):
        d = (x - _call(D, x, t[i])) / t[i]
        x = x + d * (t[i + 1] - t[i])
    return x


def kdiff_dpmpp_2m(D, x, t):
    """DPM-Solver++(2M) (arXiv 2211.01095, Algorithm 2) as k-diffusion's
    ``sample_dpmpp_2m`` writes it, in ``lambda = -log sigma`` on the denoised ``D``."""
    old = None
    for i in range(len(t) - 1):
        denoised = _call(D, x, t[i])
        if t[i + 1] == 0:
            x = denoised
        else:
            h = math.log(t[i]) - math.log(t[i + 1])
            if old is None:
                d = denoised
            else:
                r = (math.log(t[i - 1]) - math.log(t[i])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (t[i + 1] / t[i]) * x - math.expm1(-h) * d
        old = denoised
    return x


@pytest.mark.parametrize(
    "solver,reference",
    [("heun", edm_algorithm_1), ("euler", kdiff_euler), ("dpmpp_2m", kdiff_dpmpp_2m)],
)
@pytest.mark.parametrize("steps", [5, 18])
def test_denoiser_equals_edm_and_k_diffusion(gmm, noise, solver, reference, steps):
    """pflow's heun is EDM's Algorithm 1 (and k-diffusion's sample_heun); euler and
    dpmpp_2m are k-diffusion's sample_euler and sample_dpmpp_2m, on EDM's karras grid."""
    D = gmm_denoiser(gmm)
    model = pflow.DenoiserModel(D, 0.002, 80.0)
    res = pflow.sample(model, noise, solver, steps=steps, spacing="karras")
    # EDM's time steps (eq. 5), rho = 7, then t_N = 0
    i = np.arange(steps)
    hi, lo = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    t = [*((hi + i / (steps - 1) * (lo - hi)) ** 7).tolist(), 0.0]
    assert torch.allclose(res.sigmas, torch.tensor(t, dtype=F64), rtol=1e-14, atol=0)
    expected = reference(D, _edm_start(noise, 80.0), t)
    assert (res.x - expected).abs().max() < 1e-10
    assert res.nfe == (2 * steps - 1 if solver == "heun" else steps)


def test_denoiser_conversions_and_per_sample_sigma(gmm):
    D = gmm_denoiser(gmm)
    model = pflow.DenoiserModel(D, 0.002, 80.0)
    xbar = 3 * torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    sig = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=F64)
    x_t = xbar / (1 + _col(sig, xbar) ** 2).sqrt()
    eps, x0 = model.predict_xt(x_t, sig)
    assert torch.allclose(eps, gmm(xbar, sig), rtol=1e-11, atol=1e-12)
    assert torch.allclose(x0, D(xbar, sig), rtol=1e-12, atol=1e-13)
    assert torch.allclose(model(xbar, sig), gmm(xbar, sig), rtol=1e-11, atol=1e-12)
    for j in range(5):  # one float sigma per row gives the same rows
        e_j, x0_j = model.predict_xt(x_t[j : j + 1], float(sig[j]))
        assert torch.allclose(e_j, eps[j : j + 1], rtol=1e-13, atol=1e-14)
    # The per-sample adaptive driver hands the model one sigma per sample.
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    shared = pflow.sample(model, noise, "rk45", rtol=1e-4, atol=1e-4)
    own = pflow.sample(model, noise, "rk45", rtol=1e-4, atol=1e-4, per_sample=True)
    assert own.finished and rms(shared.x - own.x) < 1e-2


def test_denoiser_grids_and_conditioning(gmm):
    """A denoiser's grids need only its sigma range; conditioning travels with samples."""
    model = pflow.DenoiserModel(gmm_denoiser(gmm), 0.002, 80.0)
    uniform = pflow.get_sigmas(model.schedule, 4, "uniform")
    assert torch.allclose(uniform, torch.tensor([80.0, 53.334, 26.668, 0.002, 0.0], dtype=F64))
    logsnr = pflow.get_sigmas(model.schedule, 3, "logsnr", set_alpha_to_one=False)
    assert torch.allclose(logsnr.log(), torch.linspace(math.log(80), math.log(0.002), 4, dtype=F64))

    seen = []

    def D(x, sigma, class_labels):
        seen.append(class_labels.clone())
        return x * 0 + class_labels[:, None].to(x.dtype)

    labels = torch.tensor([0, 1, 2, 3])
    cond = pflow.DenoiserModel(D, 0.1, 10.0).condition(class_labels=labels)
    assert cond.cond_rows == 4
    res = pflow.sample(cond, torch.zeros(4, 2, dtype=F64), "euler", steps=3, spacing="logsnr")
    assert torch.equal(res.x[:, 0], labels.to(F64))  # x0_hat = D = the label
    part = cond.take(slice(1, 3))
    x0 = part.predict_xt(torch.zeros(2, 2, dtype=F64), 1.0)[1]
    assert torch.equal(x0[:, 0], torch.tensor([1.0, 2.0], dtype=F64))
    batched = pflow.sample(
        cond, torch.zeros(4, 2, dtype=F64), "euler", steps=3, spacing="logsnr", batch_size=2
    )
    assert torch.equal(batched.x, res.x)


# ------------------------------------------------------------------------ continuous VP


def _vp_b(t, beta_min=0.1, beta_max=20.0):
    """score-SDE's ``B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2``:
    ``a(t) = exp(-B)``, ``sigma(t) = sqrt(1/a - 1) = sqrt(expm1(B))``."""
    return beta_min * t + 0.5 * (beta_max - beta_min) * t**2


def vp_gmm_net(gmm, time_scale=1.0, seen=None):
    """The exact GMM as a score-SDE network ``eps(x_t, t)`` in continuous time: ``t``
    gives ``a(t)`` directly (not through pflow's maps), then ``xbar = x_t / sqrt(a)``."""

    def net(x_t, tau):
        if seen is not None:
            seen.append(tau.clone())
        b = _vp_b(tau.to(F64) / time_scale)
        xbar = x_t * _col(torch.exp(0.5 * b), x_t)  # x_t / sqrt(a)
        return gmm(xbar, torch.expm1(b).sqrt())

    return net


def test_continuous_vp_maps():
    vp = pflow.ContinuousVPSchedule(0.1, 20.0, t_min=1e-5)
    t = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 0.9, 1.0], dtype=F64)
    sig = torch.expm1(_vp_b(t)).sqrt()
    assert torch.allclose(vp.t_to_sigma(t), sig, rtol=1e-13, atol=0)
    assert torch.allclose(vp.sigma_to_t(sig), t, rtol=1e-12, atol=0)
    assert torch.allclose(vp.alpha_bar(t), torch.exp(-_vp_b(t)), rtol=1e-15)
    naive = ((1 - vp.alpha_bar(t)) / vp.alpha_bar(t)).sqrt()  # 1 - a cancels at small t
    assert torch.allclose(naive, sig, rtol=1e-9)
    assert vp.sigma_min == pytest.approx(float(sig[0]), rel=1e-13)
    assert vp.sigma_max == pytest.approx(float(sig[-1]), rel=1e-13)
    assert vp.sigma_max == pytest.approx(152.17, rel=1e-4)
    # floats, numpy and the unchecked tensor map agree
    assert vp.sigma_to_t(float(sig[3])) == pytest.approx(0.5, rel=1e-13)
    assert np.allclose(vp.sigma_to_t(sig.numpy()), t.numpy(), rtol=1e-12)
    assert torch.allclose(vp._sigma_to_t_torch(sig), t, rtol=1e-12)
    assert vp.sigma_to_t(0.0) == 0.0
    # time_scale: the network's time input is 999 t, and t_to_sigma takes it back
    vp999 = pflow.ContinuousVPSchedule(time_scale=999)
    assert vp999.sigma_to_t(float(sig[3])) == pytest.approx(499.5, rel=1e-13)
    assert vp999.t_to_sigma(499.5) == pytest.approx(float(sig[3]), rel=1e-13)
    # constant beta: the quadratic degenerates to t = log(1 + sigma^2) / beta
    flat = pflow.ContinuousVPSchedule(2.0, 2.0)
    assert flat.sigma_to_t(3.0) == pytest.approx(math.log(10.0) / 2.0, rel=1e-14)
    # uniform spacing is uniform in t, from t_max down to t_min, then 0
    grid = pflow.get_sigmas(pflow.ContinuousVPSchedule(), 10, "uniform")
    ts = torch.linspace(1.0, 1e-3, 10, dtype=F64)
    assert torch.allclose(grid[:-1], torch.expm1(_vp_b(ts)).sqrt(), rtol=1e-13)
    assert grid[-1] == 0.0


def test_continuous_vp_eps_model(gmm):
    seen: list[torch.Tensor] = []
    vp = pflow.ContinuousVPSchedule(time_scale=999)
    model = pflow.EpsModel(vp_gmm_net(gmm, 999, seen), vp)
    xbar = 2 * torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    sig = torch.tensor([0.02, 1.0, 100.0], dtype=F64)
    assert torch.allclose(model(xbar, sig), gmm(xbar, sig), rtol=1e-10, atol=1e-12)
    assert torch.allclose(seen[-1], 999 * vp.sigma_to_t(sig) / 999, rtol=1e-14)
    assert torch.allclose(model(xbar, 1.0), gmm(xbar, 1.0), rtol=1e-10, atol=1e-12)
    assert float(seen[-1][0]) == pytest.approx(999 * vp.sigma_to_t(1.0) / 999, rel=1e-14)
    assert 0 < float(seen[-1][0]) < 999


# Step counts as in test_convergence.py and test_exponential.py (asymptotic range).
# Orders on a full-covariance single Gaussian, whose flow is known in closed form (no
# reference solve); measured slopes: euler 0.99, heun 2.04, rk4 4.01, dpmpp_2m 1.95.
@pytest.mark.parametrize(
    "solver,order,steps,options",
    [
        ("euler", 1, [20, 40, 80], {}),
        ("heun", 2, [10, 20, 40], {}),
        ("rk4", 4, [10, 20, 40], {}),
        ("dpmpp_2m", 2, [20, 40, 80], {"lower_order_final": False}),
    ],
)
def test_continuous_vp_orders(solver, order, steps, options):
    """Orders of accuracy of an EpsModel on the continuous VP schedule: the exact Gaussian
    written as a network of continuous t, so every evaluation goes sigma -> t (pflow's
    closed-form inverse) -> a(t) (the network's own formula)."""
    gauss = make_gmm(dim=4, k=1, seed=5, full=True)
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    exact = x_of(gauss.flow(xbar_of(noise, SIGMA_HI), SIGMA_HI, SIGMA_LO), SIGMA_LO)
    model = pflow.EpsModel(vp_gmm_net(gauss), pflow.ContinuousVPSchedule())
    assert model.schedule.sigma_min < SIGMA_LO and SIGMA_HI < model.schedule.sigma_max
    errors = []
    for n in steps:
        grid = with_startup(n) if solver == "dpmpp_2m" else _geometric(n)
        errors.append(rms(pflow.sample(model, noise, solver, sigmas=grid, **options).x - exact))
    assert abs(slope(steps, errors) - order) <= 0.25, (solver, slope(steps, errors), errors)


# --------------------------------------------------------------------------- flow matching


def flow_gmm_velocity(gmm, time_scale=1.0):
    """The exact GMM as a flow-matching velocity ``v(x_t, t) = E[eps - x0 | x_t]``, with
    ``x_t = (1 - t) x0 + t eps``: ``xbar = x_t / (1 - t)``, ``sigma = t / (1 - t)``."""

    def v(x_t, tau):
        t = _col(tau.to(F64) / time_scale, x_t)
        sigma = t / (1 - t)
        xbar = x_t / (1 - t)
        eps = gmm(xbar, sigma.reshape(-1))
        return eps - (xbar - sigma * eps)

    return v


def test_flow_conversions(gmm):
    """``x0_hat = x_t - t v``, ``eps = x_t + (1 - t) v`` from the VP-scaled state, also at
    ``sigma = inf`` (t = 1) and with one sigma per sample."""

    def vel(x_t, tau):  # any network: here a smooth nonlinear one
        return torch.tanh(x_t) * (1 + _col(tau, x_t)) - 0.5 * x_t

    model = pflow.VelocityModel(vel)
    x_t = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    sig = torch.tensor([0.05, 1.0, 30.0, math.inf], dtype=F64)
    t = torch.tensor([0.05 / 1.05, 0.5, 30 / 31, 1.0], dtype=F64)[:, None]
    # pflow's state x = xbar / sqrt(1 + sigma^2) = x_t / sqrt(t^2 + (1 - t)^2)
    state = x_t / (t**2 + (1 - t) ** 2).sqrt()
    eps, x0 = model.predict_xt(state, sig)
    v = vel(x_t, t[:, 0])
    assert torch.allclose(x0, x_t - t * v, rtol=1e-14, atol=1e-15)
    assert torch.allclose(eps, x_t + (1 - t) * v, rtol=1e-14, atol=1e-15)
    assert torch.equal(eps[3], x_t[3])  # t = 1: eps is x_1, the noise
    for j in range(4):  # one float sigma at a time gives the same rows
        e_j, x0_j = model.predict_xt(state[j : j + 1], float(sig[j]))
        assert torch.allclose(e_j, eps[j : j + 1], rtol=1e-14, atol=1e-15)
        assert torch.allclose(x0_j, x0[j : j + 1], rtol=1e-14, atol=1e-15)
    xbar = x_t[:3] / (1 - t[:3])  # model(xbar, sigma) is the same eps
    assert torch.allclose(model(xbar, sig[:3]), eps[:3], rtol=1e-13, atol=1e-14)
    assert torch.allclose(model(xbar[1:2], 1.0), eps[1:2], rtol=1e-13, atol=1e-14)
    # the exact mixture as a velocity has the mixture's own eps
    exact = pflow.VelocityModel(flow_gmm_velocity(gmm))
    assert torch.allclose(exact(xbar, sig[:3]), gmm(xbar, sig[:3]), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "solver,t_max",
    [("euler", FLOW_T_MAX), ("dpmpp_2m", FLOW_T_MAX), ("midpoint", 0.999), ("heun", 0.999)],
)
def test_flow_velocity_equals_eps_form(gmm, noise, solver, t_max):
    """The exact mixture as a velocity field and as its own eps give the same endpoint."""
    schedule = pflow.FlowSchedule(shift=3.0, t_max=t_max)
    model = pflow.VelocityModel(flow_gmm_velocity(gmm), schedule)
    exact = make_gmm(dim=4, k=3, seed=3)
    exact.schedule = schedule  # the grid's range
    for steps in (6, 25):
        a = pflow.sample(model, noise, solver, steps=steps, spacing="uniform")
        b = pflow.sample(exact, noise, solver, sigmas=a.sigmas)
        assert (a.x - b.x).abs().max() < 1e-10, (solver, steps)


def test_flow_euler_is_flow_euler(gmm, noise):
    """pflow's Euler on a flow model is ``x_{t'} = x_t + (t' - t) v(x_t, t)`` on the same
    grid of t (float64, to 1e-10), starting from the noise at ``t_max``."""
    vel = flow_gmm_velocity(gmm, time_scale=1000)
    schedule = pflow.FlowSchedule(shift=3.0, time_scale=1000)
    res = pflow.sample(
        pflow.VelocityModel(vel, schedule), noise, "euler", steps=12, spacing="uniform"
    )
    ts = (res.sigmas / (1 + res.sigmas)).tolist()
    s0 = float(res.sigmas[0])
    x = noise * math.sqrt(1 + s0**2) / (1 + s0)  # the noise, in the flow's scale, at t_max
    assert (x - noise).abs().max() < 1e-7
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * vel(x, torch.full((8,), 1000 * t, dtype=F64))
    # The check's own velocity loses digits at t ~ 1 (1 - t from t), not pflow.
    assert (res.x - x).abs().max() < 1e-10


class _TinyVelocity(torch.nn.Module):
    """A small random velocity network on (batch, 3, 4, 4) images, fed t * 1000."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)
        self.emb = torch.nn.Linear(1, 16)

    def forward(self, x, timestep):
        h = self.conv(x) + self.emb((timestep / 1000).to(x.dtype)[:, None])[:, :, None, None]
        return 2 * self.out(torch.nn.functional.silu(h))


@pytest.mark.parametrize("shift,steps", [(1.0, 10), (3.0, 28)])
def test_flow_euler_equals_diffusers_flow_match_euler(shift, steps):
    """pflow's euler on a VelocityModel is diffusers' FlowMatchEulerDiscreteScheduler (same
    noise, same random network, float32), with and without the timestep shift."""
    import diffusers

    torch.manual_seed(0)
    net = _TinyVelocity().eval().requires_grad_(False)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for timestep in scheduler.timesteps:
        v = net(x, timestep.expand(x.shape[0]))
        x = scheduler.step(v, timestep, x).prev_sample

    schedule = pflow.FlowSchedule(shift=shift, time_scale=1000)
    model = pflow.VelocityModel(net, schedule)
    res = pflow.sample(model, noise, "euler", steps=steps, spacing="uniform")
    assert res.nfe == steps and res.x.dtype == torch.float32
    # the same grid of t (diffusers' sigmas, rounded to float32), t = 1 is t_max
    t_grid = res.sigmas / (1 + res.sigmas)
    assert (t_grid.float() - scheduler.sigmas).abs().max() <= 6e-8
    scale = float(x.abs().max())
    assert float((res.x - x).abs().max()) <= 1e-6 * scale, float((res.x - x).abs().max())


def test_flow_grids():
    """``uniform`` on a FlowSchedule: evenly spaced in the unshifted time, then shifted;
    the top is ``t_max``; ``t_min`` defaults to diffusers' last grid point."""
    s = pflow.FlowSchedule(shift=3.0)
    u_min = 3 * 1e-3 / (1 + 2 * 1e-3)  # diffusers' sigma_min: its shifted table's end
    assert s.t_min == pytest.approx(3 * u_min / (1 + 2 * u_min), rel=1e-14)
    assert s.sigma_max == 2.0**26 - 1 and s.t_max == FLOW_T_MAX
    grid = pflow.get_sigmas(s, 5, "uniform")
    t = grid[:-1] / (1 + grid[:-1])
    u = torch.linspace(1.0, u_min, 5, dtype=F64)
    assert torch.allclose(t, 3 * u / (1 + 2 * u), rtol=0, atol=1e-7)
    assert float(grid[0]) == s.sigma_max and grid[-1] == 0.0
    # shift=1 is uniform in t; an explicit shift overrides the schedule's
    plain = pflow.get_sigmas(pflow.FlowSchedule(t_min=0.1), 3, "uniform", shift=1.0)
    assert torch.allclose(plain[1:-1] / (1 + plain[1:-1]), torch.tensor([0.55, 0.1], dtype=F64))
    # karras and logsnr are grids in sigma over [sigma_min, sigma_max]
    k = pflow.get_sigmas(s, 4, "karras", set_alpha_to_one=False)
    assert float(k[0]) == pytest.approx(s.sigma_max) and float(k[-1]) == pytest.approx(s.sigma_min)
    # the maps: t = sigma / (1 + sigma); sigma = inf is t = 1
    assert s.sigma_to_t(math.inf) == 1.0 and s.t_to_sigma(1.0) == math.inf
    assert s.sigma_to_t(3.0) == 0.75 and s.t_to_sigma(0.75) == 3.0
    assert torch.equal(
        s.sigma_to_t(torch.tensor([0.0, 1.0, math.inf], dtype=F64)),
        torch.tensor([0.0, 0.5, 1.0], dtype=F64),
    )
    assert pflow.FlowSchedule(time_scale=1000).sigma_to_t(1.0) == 500.0


# ----------------------------------------------------------------------------- bad input


def _net(x, t):
    return x


@pytest.mark.parametrize(
    "build,error,match",
    [
        (lambda: pflow.DenoiserModel(_net), TypeError, "sigma_min"),
        (lambda: pflow.DenoiserModel(_net, None, 80.0), TypeError, "sigma_min must be a number"),
        (lambda: pflow.DenoiserModel(_net, 0.002, None), TypeError, "sigma_max must be a number"),
        (
            lambda: pflow.DenoiserModel(_net, 80.0, 0.002),
            ValueError,
            "sigma_min must be < sigma_max",
        ),
        (lambda: pflow.DenoiserModel(_net, 0.0, 1.0), ValueError, "sigma_min must be > 0"),
        (lambda: pflow.DenoiserModel(3, 0.1, 1.0), TypeError, "D must be callable"),
        (
            lambda: pflow.DenoiserModel(_net, 0.1, 1.0, sigma_dtype=torch.long),
            TypeError,
            "sigma_dtype",
        ),
        (lambda: pflow.ContinuousVPSchedule(beta_min=0), ValueError, "beta_min must be > 0"),
        (lambda: pflow.ContinuousVPSchedule(20, 0.1), ValueError, "beta_min must be <= beta_max"),
        (lambda: pflow.ContinuousVPSchedule(t_min=0.0), ValueError, "t_min must be > 0"),
        (lambda: pflow.ContinuousVPSchedule(t_min=1.0), ValueError, "t_min must be < t_max"),
        (lambda: pflow.ContinuousVPSchedule(time_scale=-1), ValueError, "time_scale must be > 0"),
        (lambda: pflow.FlowSchedule(shift=0), ValueError, "shift must be > 0"),
        (lambda: pflow.FlowSchedule(shift=float("nan")), ValueError, "shift must be finite"),
        (lambda: pflow.FlowSchedule(t_max=1.0), ValueError, "t_max < 1"),
        (lambda: pflow.FlowSchedule(t_min=0.5, t_max=0.4), ValueError, "t_min < t_max"),
        (lambda: pflow.SigmaRange(1.0, math.inf), ValueError, "sigma_max must be finite"),
        (lambda: pflow.EpsModel(_net, pflow.SigmaRange(0.1, 1)), TypeError, "DenoiserModel"),
        (lambda: pflow.EpsModel(_net, pflow.FlowSchedule()), TypeError, "VelocityModel"),
        (
            lambda: pflow.VelocityModel(_net, pflow.NoiseSchedule.linear()),
            TypeError,
            "FlowSchedule",
        ),
    ],
)
def test_bad_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_grids_and_calls():
    denoiser = pflow.DenoiserModel(_net, 0.002, 80.0)
    noise = torch.randn(2, 3)
    # sample()'s default spacing selects from a table: a continuous model says what it takes
    with pytest.raises(ValueError, match="spacing='trailing' selects training steps .*'karras'"):
        pflow.sample(denoiser, noise, "euler", steps=4)
    for spacing in ("leading", "linspace", "quadratic"):
        with pytest.raises(ValueError, match=f"spacing='{spacing}' .* continuous"):
            pflow.get_sigmas(pflow.ContinuousVPSchedule(), 4, spacing)
    flow = pflow.FlowSchedule()
    with pytest.raises(ValueError, match="shift must be > 0"):
        pflow.get_sigmas(flow, 4, "uniform", shift=-1.0)
    with pytest.raises(ValueError, match="shift .* applies to spacing='uniform' on a FlowSchedule"):
        pflow.get_sigmas(flow, 4, "karras", shift=3.0)
    with pytest.raises(ValueError, match="shift .* applies to spacing='uniform' on a FlowSchedule"):
        pflow.get_sigmas(pflow.SigmaRange(0.1, 10), 4, "uniform", shift=3.0)
    with pytest.raises(ValueError, match="sigma_min and sigma_max set the range of karras"):
        pflow.get_sigmas(flow, 4, "uniform", sigma_max=10.0)
    with pytest.raises(TypeError, match="schedule must be a pflow schedule"):
        pflow.get_sigmas(object(), 4, "karras")  # type: ignore[arg-type]
    # grids may not leave the range
    with pytest.raises(ValueError, match="leaves the schedule's range"):
        pflow.sample(denoiser, noise, "euler", sigmas=[100.0, 1.0, 0.0])
    # the denoiser has no eps at sigma = 0
    with pytest.raises(ValueError, match=r"needs sigma > 0.*last_step='euler'"):
        denoiser.predict_xt(noise, 0.0)
    with pytest.raises(ValueError, match="needs sigma > 0"):
        pflow.sample(denoiser, noise, "heun", steps=2, spacing="karras", last_step="solver")
    # maps: a sigma or t out of range names itself
    with pytest.raises(ValueError, match="sigma must be a noise level"):
        pflow.ContinuousVPSchedule().sigma_to_t(math.inf)
    with pytest.raises(ValueError, match="sigma must be a noise level"):
        flow.sigma_to_t(torch.tensor([-1.0]))
    with pytest.raises(ValueError, match=r"t must be a time input: .*<= 1000"):
        pflow.FlowSchedule(time_scale=1000).t_to_sigma(1001.0)
