"""Log-likelihood through the PF-ODE, checked against the exact Gaussian mixture, whose
density is known in closed form at every sigma."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pflow import EpsModel, NoiseSchedule
from pflow.cli import main
from pflow.likelihood import bits_per_dim, log_likelihood
from pflow.zoo import GaussianMixture

from .conftest import make_gmm
from .reference import scipy_reference


def _data(gmm: GaussianMixture, n: int, seed: int = 1) -> torch.Tensor:
    return gmm.sample(n, torch.Generator().manual_seed(seed))


def _exact_prior(gmm: GaussianMixture, sigma_max: float):
    return lambda xbar: gmm.log_prob(xbar, sigma_max)


class CountingModel:
    """The mixture's eps through ``model(xbar, sigma)`` only, counting forward calls."""

    def __init__(self, gmm: GaussianMixture) -> None:
        self.gmm, self.schedule, self.calls = gmm, gmm.schedule, 0

    def __call__(self, xbar, sigma):
        self.calls += 1
        return self.gmm(xbar, sigma)


@pytest.mark.parametrize("dim,full", [(2, False), (10, True)])
def test_exact_divergence_matches_the_mixture_density(dim, full):
    gmm = make_gmm(dim=dim, k=3, seed=0, full=full)
    x = _data(gmm, 24)
    s = gmm.schedule
    res = log_likelihood(
        gmm, x, rtol=1e-8, atol=1e-8, prior=_exact_prior(gmm, s.sigma_max), divergence="exact"
    )
    exact = gmm.log_prob(x, s.sigma_min)
    assert res.log_p.dtype == torch.float64 and res.log_p.shape == (24,)
    assert (res.log_p - exact).abs().max() < 1e-3
    # The latent is the end of the PF-ODE path: compare with scipy's DOP853 in xbar.
    xbar_T = scipy_reference(gmm, x, s.sigma_min, s.sigma_max, rtol=1e-11, atol=1e-11)
    latent = res.latent * math.sqrt(1 + s.sigma_max**2)
    assert (latent - xbar_T).abs().max() < 1e-5 * xbar_T.abs().max()
    # The integral is not negligible: dropping it (or flipping its sign) would fail.
    assert (res.delta_log_p.squeeze(1)).abs().min() > 1.0


def test_data_density_at_sigma_zero_for_a_model_defined_there():
    gmm = make_gmm(dim=2, k=3, seed=3)
    x = _data(gmm, 16)
    smax = gmm.schedule.sigma_max
    res = log_likelihood(gmm, x, sigma_min=0.0, rtol=1e-8, atol=1e-8, prior=_exact_prior(gmm, smax))
    assert (res.log_p - gmm.log_prob(x, 0.0)).abs().max() < 1e-3


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_within_three_standard_errors(noise):
    gmm = make_gmm(dim=10, k=3, seed=0, full=True)
    x = _data(gmm, 16)
    s = gmm.schedule
    exact = gmm.log_prob(x, s.sigma_min)
    res = log_likelihood(
        gmm,
        x,
        rtol=1e-6,
        atol=1e-6,
        divergence="hutchinson",
        probes=24,
        noise=noise,
        seed=5,
        prior=_exact_prior(gmm, s.sigma_max),
    )
    assert res.log_p_stderr is not None and res.log_p_probes.shape == (16, 24)
    assert (res.log_p_stderr > 1e-3).all()  # a real estimate, not the exact trace
    z = (res.log_p - exact) / res.log_p_stderr
    assert (z.abs() < 3).float().mean() >= 0.9  # per sample, allowing the odd t-tail
    # Over the batch: the mean error against the combined standard error.
    batch_se = res.log_p_stderr.pow(2).sum().sqrt() / len(x)
    assert abs(float((res.log_p - exact).mean())) < 3 * float(batch_se)


def test_rademacher_probe_is_exact_for_an_isotropic_gaussian():
    # d eps / d x is a multiple of I, so v^T J v = |v|^2 c = D c for every +-1 probe.
    gmm = GaussianMixture(torch.tensor([[0.5, -1.0, 2.0]]), torch.full((1, 3), 0.2))
    x = _data(gmm, 8)
    s = gmm.schedule
    res = log_likelihood(
        gmm, x, rtol=1e-8, atol=1e-8, divergence="hutchinson", probes=2, seed=0,
        prior=_exact_prior(gmm, s.sigma_max),
    )  # fmt: skip
    assert (res.log_p - gmm.log_prob(x, s.sigma_min)).abs().max() < 1e-3
    assert res.log_p_stderr is not None and res.log_p_stderr.max() < 1e-6


def test_default_prior_error_is_the_prior_mismatch():
    # A low sigma_max makes the mismatch between the mixture's marginal and the Gaussian
    # prior large enough to see.
    gmm = make_gmm(dim=10, k=3, seed=0, full=True)
    x = _data(gmm, 16)
    smin, smax = gmm.schedule.sigma_min, 5.0
    res = log_likelihood(gmm, x, sigma_max=smax, rtol=1e-8, atol=1e-8)
    error = res.log_p - gmm.log_prob(x, smin)
    xbar_T = res.latent * math.sqrt(1 + smax**2)
    gauss = torch.distributions.Normal(0.0, math.sqrt(1 + smax**2)).log_prob(xbar_T).sum(-1)
    predicted = gauss - gmm.log_prob(xbar_T, smax)
    assert predicted.abs().mean() > 0.05
    assert (error - predicted).abs().max() < 1e-3
    # At the schedule's sigma_max (~157) the mismatch is small but still what is predicted.
    top = gmm.schedule.sigma_max
    res = log_likelihood(gmm, x, rtol=1e-8, atol=1e-8)
    xbar_T = res.latent * math.sqrt(1 + top**2)
    gauss = torch.distributions.Normal(0.0, math.sqrt(1 + top**2)).log_prob(xbar_T).sum(-1)
    predicted = gauss - gmm.log_prob(xbar_T, top)
    assert ((res.log_p - gmm.log_prob(x, smin)) - predicted).abs().max() < 1e-5


def test_tighter_tolerance_is_closer_and_costs_more():
    gmm = make_gmm(dim=10, k=3, seed=0, full=True)
    x = _data(gmm, 16)
    s = gmm.schedule
    exact = gmm.log_prob(x, s.sigma_min)
    errors, nfes = [], []
    for tol in (1e-3, 1e-5, 1e-7):
        res = log_likelihood(gmm, x, rtol=tol, atol=tol, prior=_exact_prior(gmm, s.sigma_max))
        errors.append(float((res.log_p - exact).abs().max()))
        nfes.append(res.nfe)
    assert errors[0] > 10 * errors[1] > 100 * errors[2]
    assert nfes[0] < nfes[1] < nfes[2]


@pytest.mark.parametrize("divergence,probes", [("exact", 1), ("hutchinson", 3)])
def test_nfe_and_vjp_are_counted(divergence, probes):
    gmm = make_gmm(dim=4, k=2, seed=2)
    model = CountingModel(gmm)
    x = _data(gmm, 8)
    res = log_likelihood(model, x, rtol=1e-4, atol=1e-4, divergence=divergence, probes=probes)
    assert res.nfe == model.calls
    per_eval = 4 if divergence == "exact" else probes
    # Every forward but the one that picks the first step also takes the divergence.
    assert res.n_vjp == per_eval * (res.nfe - 1)
    assert res.passes == res.nfe + res.n_vjp
    ref = gmm.log_prob(x, gmm.schedule.sigma_min)
    assert res.log_p.shape == ref.shape


def test_bits_per_dim_by_hand():
    # Uniform density on [-1, 1]^3: p = 2^-3; 256 bins of width 2/256: P(bin) = 256^-3.
    assert float(bits_per_dim(-3 * math.log(2), 3, 2 / 256)) == pytest.approx(8.0, abs=1e-12)
    # Digits: 17 levels pixel/8 - 1, bins of width 1/8; uniform on [-1.0625, 1.0625]^64.
    log_p = -64 * math.log(2.125)
    assert float(bits_per_dim(log_p, 64, 0.125)) == pytest.approx(math.log2(17), abs=1e-12)
    # No bin: standard normal at 0 in 1-D, -log2 p = log2(2 pi) / 2 = 1.32574806...
    log_p = -0.5 * math.log(2 * math.pi)
    assert float(bits_per_dim(log_p, 1)) == pytest.approx(1.3257480647361593, abs=1e-12)


def test_dequantisation_stays_in_the_bin_and_enters_bits_per_dim():
    gmm = make_gmm(dim=2, k=3, seed=0)
    levels = torch.round(_data(gmm, 16) * 8) / 8  # data on a grid of width 1/8
    s = gmm.schedule
    res = log_likelihood(
        gmm, levels, dequantize=True, bin_width=0.125, rtol=1e-7, atol=1e-7,
        prior=_exact_prior(gmm, s.sigma_max),
    )  # fmt: skip
    shift = res.x - levels
    assert shift.abs().max() <= 0.0625 and shift.abs().min() > 0
    assert (res.log_p - gmm.log_prob(res.x, s.sigma_min)).abs().max() < 1e-3
    expected = -(res.log_p + 2 * math.log(0.125)) / (2 * math.log(2))
    assert torch.allclose(res.bpd, expected)


def test_a_network_in_float32_through_eps_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def eps_net(x_t, t):
        return net(torch.cat([x_t, (t / 1000.0)[:, None].to(x_t.dtype)], dim=1))

    model = EpsModel(eps_net, NoiseSchedule.linear())
    x = torch.randn(8, 2)
    ex = log_likelihood(model, x, rtol=1e-5, atol=1e-5)
    hu = log_likelihood(model, x, rtol=1e-5, atol=1e-5, divergence="hutchinson", probes=32)
    assert ex.latent.dtype == torch.float32 and torch.isfinite(ex.log_p).all()
    assert hu.log_p_stderr is not None
    assert ((hu.log_p - ex.log_p).abs() < 4 * hu.log_p_stderr + 1e-3).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"solver": "euler"}, "solver must be one of rk45, bosh3"),
        ({"divergence": "trace"}, "divergence must be"),
        ({"probes": 4}, "probes applies to divergence='hutchinson'"),
        ({"divergence": "hutchinson", "probes": 0}, "probes must be a positive integer"),
        ({"dequantize": True}, "needs bin_width"),
        ({"sigma_max": 1e6}, "leaves the schedule's range"),
        ({"rtol": 0.0}, "rtol must be > 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    gmm = make_gmm(dim=2, k=2)
    with pytest.raises((ValueError, TypeError), match=match):
        log_likelihood(gmm, _data(gmm, 2), **kwargs)


def test_nll_command_on_the_bundled_mixture(tmp_path, capsys):
    out_file = tmp_path / "nll.json"
    args = ["nll", "--model", "gmm", "--n", "8", "--rtol", "1e-4", "--atol", "1e-4"]
    assert main([*args, "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "NFE" in out and "+-" in out
    record = json.loads(out_file.read_text())
    assert record["complete"] and record["samples"] == 8 and record["divergence"] == "exact"
    assert len(record["per_sample_bits_per_dim"]) == 8
    per_sample = sum(record["per_sample_bits_per_dim"]) / 8
    assert abs(per_sample - record["bits_per_dim"]) < 1e-9
    assert f"bits/dim: {record['bits_per_dim']:.4f}" in out
    # --probes and --noise belong to the Hutchinson estimate: a usage error without it.
    assert main(["nll", "--model", "gmm", "--n", "2", "--noise", "gaussian"]) == 2
    err = capsys.readouterr().err
    assert "argument --noise" in err and "--hutchinson" in err and err.count("\n") == 1
