"""The DDIM family: eta = 0 is Euler, eta > 0 is diffusers' DDIM with the same noise, and
DDIM(eta=1) / DDPM sample the right distribution."""

from __future__ import annotations

import math

import pytest
import torch

import pflow
from pflow.solvers.stochastic import PerSampleNoise

from .conftest import make_gmm, tiny_unet

GMM = make_gmm(dim=3, k=3, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
def test_ddim_eta_zero_is_euler(dtype, spacing):
    x = torch.randn(6, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    a = pflow.sample(GMM, x, "ddim", steps=12, spacing=spacing, eta=0.0, seed=0)
    b = pflow.sample(GMM, x, "euler", steps=12, spacing=spacing)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert (a.x - b.x).abs().max() <= tol
    assert a.nfe == b.nfe


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_matches_diffusers_with_the_same_noise(eta):
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet()
    sched = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(10)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    draws = PerSampleNoise(7, 3)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(x, t).sample
            x = sched.step(out, t, x, eta=eta, variance_noise=draws.draw(x)).prev_sample
    schedule = pflow.NoiseSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    model = pflow.EpsModel(lambda v, t: unet(v, t).sample, schedule)
    res = pflow.sample(model, noise, "ddim", steps=10, spacing="trailing", eta=eta, seed=7)
    scale = max(1.0, x.abs().max().item())
    assert (res.x - x).abs().max().item() <= 2e-5 * scale


@pytest.mark.parametrize("solver,kw", [("ddim", {"eta": 0.5}), ("ddpm", {"variance": "sigma_hat"})])
def test_same_seed_same_samples_whatever_the_batch(solver, kw):
    x = torch.randn(5, 3, dtype=torch.float64)
    full = pflow.sample(GMM, x, solver, steps=8, seed=11, **kw).x
    head = pflow.sample(GMM, x[:2], solver, steps=8, seed=11, **kw).x
    tail = pflow.sample(GMM, x[2:], solver, steps=8, seed=pflow.noise_keys(11, range(2, 5)), **kw).x
    assert torch.equal(full[:2], head) and torch.equal(full[2:], tail)
    other = pflow.sample(GMM, x, solver, steps=8, seed=12, **kw).x
    assert not torch.allclose(full, other)


@pytest.mark.parametrize(
    "solver,kw",
    [
        ("ddim", {"eta": 1.0}),
        ("ddpm", {"variance": "posterior"}),
        ("ddpm", {"variance": "sigma_hat"}),
    ],
)
def test_stochastic_samplers_draw_the_mixture(solver, kw):
    """Mean and covariance of 6000 samples (250 ancestral steps) against the mixture's
    exact moments, within 5 standard errors estimated from exact draws."""
    n = 6000
    noise = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = pflow.sample(GMM, noise, solver, steps=250, seed=0, **kw).x
    truth = GMM.sample(200_000, torch.Generator().manual_seed(6))
    mu = truth.mean(0)
    centred = truth - mu
    cov = centred.T @ centred / len(truth)
    se_mu = truth.std(0) / math.sqrt(n)
    prods = centred[:, :, None] * centred[:, None, :]
    se_cov = prods.reshape(len(truth), -1).std(0).reshape(3, 3) / math.sqrt(n)
    assert ((x.mean(0) - mu).abs() <= 5 * se_mu).all(), (x.mean(0), mu)
    xc = x - x.mean(0)
    assert ((xc.T @ xc / n - cov).abs() <= 5 * se_cov + 1e-3).all()


def test_stochastic_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        pflow.sample(GMM, x, "ddim", steps=4, eta=-1.0)
    with pytest.raises(ValueError, match="variance must be"):
        pflow.sample(GMM, x, "ddpm", steps=4, variance="large")
    with pytest.raises(ValueError, match="per-sample keys"):
        pflow.sample(GMM, x, "ddpm", steps=4, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="seed or generator"):
        pflow.sample(GMM, x, "ddim", steps=4, eta=1.0, seed=1, generator=torch.Generator())
