"""Orders of accuracy, measured: the slope of log(error) against log(steps) on the exact
Gaussian mixture, against a float64 DOP853 reference (diffrax's way of testing solvers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pflow

from .conftest import make_gmm
from .reference import SIGMA_HI, SIGMA_LO, order_problem, rms, scipy_reference, xbar_of
from .reference import geometric as _geometric


@pytest.fixture(scope="module")
def problem():
    return order_problem()


# Step counts sit in the asymptotic range: below ~10 steps across this factor-200 range
# of sigma (a log-step of about 0.5), rk4's local order reads 3.6 and midpoint's 1.6,
# rising to 3.98 and 1.94 by 160 steps.
@pytest.mark.parametrize(
    "solver,order,steps",
    [
        ("euler", 1, [40, 80, 160, 320]),
        ("heun", 2, [20, 40, 80, 160]),
        ("midpoint", 2, [20, 40, 80, 160]),
        ("rk4", 4, [20, 40, 80, 160]),
    ],
)
def test_fixed_step_order(problem, solver, order, steps):
    gmm, noise, ref = problem
    errors = []
    for n in steps:
        res = pflow.sample(gmm, noise, solver, sigmas=_geometric(n))
        errors.append(rms(res.x - ref))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) <= 0.3, (solver, slope, errors)


def test_reference_is_exact_for_one_gaussian():
    """The reference integrator against the closed-form flow of a single Gaussian."""
    g = make_gmm(dim=3, k=1, seed=5, full=True)
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xbar = xbar_of(noise, SIGMA_HI)
    exact = g.flow(xbar, SIGMA_HI, SIGMA_LO)
    assert rms(scipy_reference(g, xbar, SIGMA_HI, SIGMA_LO) - exact) < 1e-11


@pytest.mark.parametrize("solver", ["rk45", "bosh3"])
def test_adaptive_error_shrinks_with_tolerance(problem, solver):
    gmm, noise, ref = problem
    grid = torch.tensor([SIGMA_HI, SIGMA_LO], dtype=torch.float64)
    errors, nfes = [], []
    tols = [1e-3, 1e-5, 1e-7] if solver == "rk45" else [1e-3, 1e-4, 1e-5]
    for tol in tols:
        res = pflow.sample(gmm, noise, solver, sigmas=grid, rtol=tol, atol=tol)
        err = rms(res.x - ref)
        errors.append(err)
        nfes.append(res.nfe)
        assert err <= 100 * tol, (tol, err)
        # every step of an FSAL pair costs stages - 1 evaluations, plus eps at the start
        # and one probe for the initial step size
        stages = 7 if solver == "rk45" else 4
        assert res.nfe == 2 + (stages - 1) * (res.n_accepted + res.n_rejected)
        assert res.sigmas[0] == SIGMA_HI and res.sigmas[-1] == SIGMA_LO
        assert len(res.sigmas) == res.n_accepted + 1
    assert errors[0] > errors[1] > errors[2]
    assert nfes[0] < nfes[1] < nfes[2]


def test_rk45_full_range_to_zero_against_exact_flow():
    """From sigma_max all the way to 0 (the Gaussian mixture is defined there), for a
    single Gaussian whose flow is known in closed form."""
    g = make_gmm(dim=4, k=1, seed=7, full=True)
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    smax = g.schedule.sigma_max
    exact = g.flow(xbar_of(noise, smax), smax, 0.0)
    for tol in (1e-5, 1e-7):
        res = pflow.sample(
            g,
            noise,
            "rk45",
            sigmas=torch.tensor([smax, 0.0]),
            rtol=tol,
            atol=tol,
            last_step="solver",
        )
        assert rms(res.x - exact) <= 100 * tol
