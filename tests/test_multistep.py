"""Linear multistep methods on eps (iPNDM, LMS): orders measured on the exact Gaussian
mixture, the weights checked two independent ways, first order is DDIM, the step into
sigma = 0, partial results. Peers (diffusers' IPNDM and LMS schedulers) are in
test_peers.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pflow
from pflow.errors import MaxNFEExceeded
from pflow.solvers import PFODE, get_solver, resolve_options
from pflow.solvers.driver import integrate
from pflow.solvers.multistep import IPNDM_FIXED, ab_weights, ab_weights_quadrature

from .conftest import make_gmm
from .reference import SIGMA_HI, SIGMA_LO, order_problem, rms
from .reference import geometric as _geometric
from .reference import slope as _slope
from .reference import with_startup as _with_startup


def _uniform(n: int) -> torch.Tensor:
    return torch.linspace(SIGMA_HI, SIGMA_LO, n + 1, dtype=torch.float64)


@pytest.fixture(scope="module")
def problem():
    return order_problem()


# Measured slopes: lms order 2/3/4 1.92/2.91/3.88, ipndm 3.88, ipndm with fixed weights on
# a grid uniform in sigma 4.11. Without the fine start-up the first (Euler) step's O(h^2)
# local error shows: on the plain geometric grid the local slope of ipndm falls from 3.6
# back to 3.0 between 160 and 320 steps and would end at 2.
ORDER_CASES = [
    ("lms", {"order": 2}, 2, [40, 80, 160, 320], _with_startup),
    ("lms", {"order": 3}, 3, [80, 160, 320, 640], _with_startup),
    ("lms", {}, 4, [80, 160, 320, 640], _with_startup),
    ("ipndm", {}, 4, [80, 160, 320, 640], _with_startup),
    # the fixed weights are exact on a grid uniform in sigma, whose last steps from ~2 to
    # 0.1 are coarse for this problem: asymptotic from ~80 steps
    ("ipndm", {"variable_step": False}, 4, [80, 160, 320, 640], _uniform),
]


@pytest.mark.parametrize("solver,options,order,steps,grid", ORDER_CASES)
def test_order(problem, solver, options, order, steps, grid):
    gmm, noise, ref = problem
    errors = []
    for n in steps:
        sigmas = grid(n)
        res = pflow.sample(gmm, noise, solver, sigmas=sigmas, **options)
        assert res.nfe == len(sigmas) - 1
        errors.append(rms(res.x - ref))
    slope = _slope(steps, errors)
    assert abs(slope - order) <= 0.3, (solver, options, slope, errors)


def test_fixed_weights_lose_order_on_a_nonuniform_grid(problem):
    """On the geometric grid (step ratio e^-d != 1) the fixed weights are only consistent
    to second order (measured 1.93 here) while the variable-step ones keep fourth (3.78)."""
    gmm, noise, ref = problem
    steps = [40, 80, 160, 320]
    fixed, variable = [], []
    for n in steps:
        grid = _with_startup(n)
        fixed.append(
            rms(pflow.sample(gmm, noise, "ipndm", sigmas=grid, variable_step=False).x - ref)
        )
        variable.append(rms(pflow.sample(gmm, noise, "ipndm", sigmas=grid).x - ref))
    assert _slope(steps, fixed) < 2.5 < 3.5 < _slope(steps, variable), (fixed, variable)


# --- the weights ----------------------------------------------------------------------------


def test_weights_two_ways_and_exact_for_polynomials():
    """Closed form (moment equations) and quadrature of the Lagrange basis agree, and the
    weights integrate every polynomial of degree < k exactly over the step."""
    rng = np.random.default_rng(0)
    for k in range(1, 7):
        for _ in range(20):
            sigma = float(rng.uniform(1, 50))
            h = -float(rng.uniform(0.01, 0.5)) * sigma
            past = sigma + np.cumsum(rng.uniform(0.2, 2.0, size=k - 1)) * abs(h)
            nodes = [sigma, *past.tolist()]
            w = ab_weights(nodes, h)
            wq = ab_weights_quadrature(nodes, h)
            assert np.allclose(w, wq, rtol=1e-9, atol=1e-12 * abs(h))
            coefs = rng.normal(size=k)
            poly = np.polynomial.Polynomial(coefs)
            exact = poly.integ()(sigma + h) - poly.integ()(sigma)
            assert sum(wj * poly(s) for wj, s in zip(w, nodes)) == pytest.approx(
                exact, rel=1e-9, abs=1e-12 * abs(h)
            )


def test_fixed_weights_are_the_uniform_grid_ones():
    for k, fixed in IPNDM_FIXED.items():
        nodes = [10.0 + 0.5 * j for j in range(k)]  # uniform, step h = -0.5
        assert np.allclose(ab_weights(nodes, -0.5), [-0.5 * c for c in fixed], rtol=1e-13)


def test_ipndm_is_lms4_and_fixed_is_variable_on_uniform_grid(problem):
    gmm, noise, _ = problem
    grid = _geometric(30)
    a = pflow.sample(gmm, noise, "ipndm", sigmas=grid).x
    b = pflow.sample(gmm, noise, "lms", sigmas=grid, order=4).x
    assert (a - b).abs().max() <= 1e-12
    grid = _uniform(30)
    c = pflow.sample(gmm, noise, "ipndm", sigmas=grid, variable_step=False).x
    d = pflow.sample(gmm, noise, "ipndm", sigmas=grid).x
    assert (c - d).abs().max() <= 1e-12


# --- first order is DDIM --------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["ipndm", "lms"])
def test_first_order_is_ddim(problem, solver):
    gmm, noise, _ = problem
    for grid in (_geometric(9), pflow.get_sigmas(gmm.schedule, 10, "leading")):
        euler = pflow.sample(gmm, noise, "euler", sigmas=grid)
        for last_step in ("euler", "solver"):
            res = pflow.sample(gmm, noise, solver, sigmas=grid, order=1, last_step=last_step)
            assert res.nfe == euler.nfe
            assert (res.x - euler.x).abs().max() <= 1e-12
    # and the first step of the default order, without history, is Euler's
    grid = _geometric(6)
    a = pflow.sample(gmm, noise, solver, sigmas=grid, return_trajectory=True).trajectory
    b = pflow.sample(gmm, noise, "euler", sigmas=grid, return_trajectory=True).trajectory
    assert (a[1] - b[1]).abs().max() <= 1e-12 < (a[2] - b[2]).abs().max()


# --- the step into sigma = 0, bookkeeping ----------------------------------------------------


@pytest.mark.parametrize(
    "solver,options", [("ipndm", {}), ("ipndm", {"variable_step": False}), ("lms", {"order": 3})]
)
def test_step_into_zero(problem, solver, options):
    gmm, noise, _ = problem
    grid = pflow.get_sigmas(gmm.schedule, 8, "trailing")
    assert grid[-1] == 0
    res = pflow.sample(gmm, noise, solver, sigmas=grid, return_trajectory=True, **options)
    _, x0_hat = gmm.predict_xt(res.trajectory[-2], float(grid[-2]))
    assert (res.x - x0_hat).abs().max() <= 1e-12  # Euler into 0: x0_hat
    full = pflow.sample(gmm, noise, solver, sigmas=grid, last_step="solver", **options)
    assert full.nfe == res.nfe == 8  # no evaluation at sigma = 0 either way
    assert (full.x - res.x).abs().max() > 1e-4


@pytest.mark.parametrize("solver", ["ipndm", "lms"])
def test_trajectory_and_partial(problem, solver):
    gmm, noise, _ = problem
    grid = _geometric(12)
    full = pflow.sample(gmm, noise, solver, sigmas=grid, return_trajectory=True)
    assert full.trajectory.shape == (13, *noise.shape)
    assert torch.equal(full.trajectory[0], noise) and torch.equal(full.trajectory[-1], full.x)
    with pytest.raises(MaxNFEExceeded):
        pflow.sample(gmm, noise, solver, sigmas=grid, max_nfe=5)
    part = pflow.sample(
        gmm, noise, solver, sigmas=grid, max_nfe=5, return_partial=True, return_trajectory=True
    )
    assert not part.finished and part.nfe == 5 and part.n_accepted == 5
    assert torch.equal(part.sigmas, grid[:6])
    assert torch.equal(part.x, full.trajectory[5])
    assert torch.equal(part.trajectory, full.trajectory[:6])


def test_runner_direct_and_bad_order(problem):
    gmm, noise, _ = problem
    grid = _geometric(5).tolist()
    for name in ("ipndm", "lms"):
        ode = PFODE(gmm)
        solver = get_solver(name)
        out = integrate(ode, solver, noise, grid, resolve_options(solver, {}, {}))
        assert out.finished and out.sigmas == grid and ode.nfe == 5
    with pytest.raises(ValueError, match="order"):
        pflow.sample(gmm, noise, "ipndm", steps=3, order=5)
    with pytest.raises(ValueError, match="order"):
        pflow.sample(gmm, noise, "lms", steps=3, order=0)


def test_float32_within_roundoff_of_float64_on_cosine():
    from pflow.zoo import GaussianMixture

    g = make_gmm(dim=4, k=3, seed=3)
    gmm = GaussianMixture(g.means, g.covs, g.weights, schedule=pflow.NoiseSchedule.cosine())
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for solver in ("ipndm", "lms"):
        for spacing in ("trailing", "logsnr", "karras"):
            x64 = pflow.sample(gmm, noise, solver, steps=20, spacing=spacing).x
            x32 = pflow.sample(gmm, noise.float(), solver, steps=20, spacing=spacing).x
            assert x32.dtype == torch.float32
            assert rms(x32.double() - x64) <= 1e-6, (solver, spacing)


@pytest.mark.parametrize("solver", ["ipndm", "lms"])
def test_nonfinite_model_is_reported(solver):
    from pflow.errors import NonFiniteError

    def model(xbar, sigma):
        return xbar * (float("nan") if sigma < 3.0 else 0.1)

    with pytest.raises(NonFiniteError, match="sigma="):
        pflow.sample(model, torch.ones(2, 3), solver, sigmas=_geometric(10))
