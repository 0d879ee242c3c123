"""torchdiffeq and scipy as backends (``solver="torchdiffeq:<method>"``, ``"scipy:<method>"``)
and ``pflow.reference``: agreement with pflow's own solvers and with an independent DOP853
reference, honest NFE counts, the grid and the last step, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import pflow
from pflow.solvers import get_solver

from .conftest import make_gmm
from .reference import rms, scipy_reference, x_of, xbar_of

SIGMA_HI, SIGMA_MID, SIGMA_LO = 20.0, 1.0, 0.1
GRID = torch.tensor([SIGMA_HI, SIGMA_MID, SIGMA_LO], dtype=torch.float64)


class Counting:
    """Counts calls of the model on its own, independently of pflow's PFODE; records the
    sigmas it was called at."""

    def __init__(self, model) -> None:
        self.model, self.schedule, self.calls, self.sigmas = model, model.schedule, 0, []

    def __call__(self, xbar, sigma):
        self.calls += 1
        self.sigmas.append(sigma)
        return self.model(xbar, sigma)


@pytest.fixture(scope="module")
def problem():
    gmm = make_gmm(dim=4, k=3, seed=3)
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mid = scipy_reference(gmm, xbar_of(noise, SIGMA_HI), SIGMA_HI, SIGMA_MID)
    lo = scipy_reference(gmm, mid, SIGMA_MID, SIGMA_LO)
    return gmm, noise, [noise, x_of(mid, SIGMA_MID), x_of(lo, SIGMA_LO)]


@pytest.mark.parametrize("solver", ["torchdiffeq:dopri5", "scipy:DOP853"])
def test_backend_agrees_with_rk45_and_reference(problem, solver):
    gmm, noise, ref = problem
    counting = Counting(gmm)
    tol = 1e-10
    res = pflow.sample(
        counting, noise, solver, sigmas=GRID, rtol=tol, atol=tol, return_trajectory=True
    )
    ours = pflow.sample(gmm, noise, "rk45", sigmas=GRID, rtol=tol, atol=tol)
    # Both converge to the same endpoint; 1e-10 tolerances leave errors of 1e-11 to 1e-10.
    assert rms(res.x - ours.x) < 1e-9
    assert rms(res.x - ref[-1]) < 1e-9
    # The grid points are passed through and recorded there.
    assert res.sigmas.tolist() == GRID.tolist()
    assert res.trajectory is not None and res.trajectory.shape == (3, *noise.shape)
    for row, want in zip(res.trajectory, ref):
        assert rms(row - want) < 1e-8
    assert torch.equal(res.trajectory[-1], res.x)
    # NFE is what the model saw, and every evaluation stays inside the grid's range.
    assert res.nfe == counting.calls > 0
    assert all(SIGMA_LO <= float(s) <= SIGMA_HI for s in counting.sigmas)
    assert res.x.dtype == torch.float64


@pytest.mark.parametrize("solver,stages", [("torchdiffeq:dopri5", 7), ("scipy:RK45", 7)])
def test_backend_step_counts_add_up(problem, solver, stages):
    """FSAL Dormand-Prince: eps at the start, one initial-step probe, then stages - 1
    evaluations per attempted step; so the accepted/rejected counts are the library's."""
    gmm, noise, _ = problem
    grid = torch.tensor([SIGMA_HI, SIGMA_LO], dtype=torch.float64)
    res = pflow.sample(gmm, noise, solver, sigmas=grid, rtol=1e-6, atol=1e-6)
    assert res.n_accepted > 5
    assert res.nfe == 2 + (stages - 1) * (res.n_accepted + res.n_rejected)


def test_fixed_grid_methods_are_pflows_own(problem):
    """The backends integrate the same ODE in xbar, so a fixed-grid method walks the same
    steps: torchdiffeq's Euler is DDIM (pflow's euler), its midpoint pflow's midpoint,
    its heun2 EDM's Heun with the Euler step into 0 (2N - 1 evaluations)."""
    gmm, noise, _ = problem
    schedule = gmm.schedule
    sigmas = pflow.get_sigmas(schedule, 12, "trailing")
    assert sigmas[-1] == 0.0
    for theirs, ours in [("euler", "euler"), ("midpoint", "midpoint"), ("heun2", "heun")]:
        a = pflow.sample(gmm, noise, f"torchdiffeq:{theirs}", sigmas=sigmas)
        b = pflow.sample(gmm, noise, ours, sigmas=sigmas)
        assert (a.x - b.x).abs().max() < 1e-12, theirs
        assert a.nfe == b.nfe and a.n_accepted == b.n_accepted == 12
    # Euler with the DDIM grid, in float32: still DDIM (to float32 round-off).
    a = pflow.sample(gmm, noise.float(), "torchdiffeq:euler", sigmas=sigmas)
    b = pflow.sample(gmm, noise.float(), "euler", sigmas=sigmas)
    assert a.x.dtype == torch.float32
    assert rms(a.x - b.x) < 1e-5 * rms(b.x)


@pytest.mark.parametrize("solver", ["torchdiffeq:dopri5", "scipy:RK45", "torchdiffeq:rk4"])
def test_last_step_into_zero_is_one_euler_step(problem, solver):
    gmm, noise, _ = problem
    grid = torch.tensor([SIGMA_HI, SIGMA_LO, 0.0], dtype=torch.float64)
    kw = {} if solver.endswith("rk4") else {"rtol": 1e-6, "atol": 1e-6}
    counting = Counting(gmm)
    res = pflow.sample(counting, noise, solver, sigmas=grid, return_trajectory=True, **kw)
    assert res.trajectory is not None and res.sigmas.tolist() == grid.tolist()
    # x0_hat of one evaluation at the last positive sigma, and the model never saw sigma < 0.1
    expected = pflow.sample(gmm, res.trajectory[-2], "euler", sigmas=grid[1:]).x
    assert (res.x - expected).abs().max() < 1e-13
    assert min(float(s) for s in counting.sigmas) == SIGMA_LO
    assert res.nfe == counting.calls
    if not kw:
        return
    # last_step="solver" integrates into 0 itself (the mixture is defined there).
    full = pflow.sample(gmm, noise, solver, sigmas=grid, last_step="solver", **kw)
    exact = x_of(scipy_reference(gmm, xbar_of(noise, SIGMA_HI), SIGMA_HI, 0.0), 0.0)
    assert rms(full.x - exact) < 1e-4


def test_float32_state_stays_float32(problem):
    gmm, noise, ref = problem
    for solver in ("torchdiffeq:dopri5", "scipy:DOP853"):
        res = pflow.sample(gmm, noise.float(), solver, sigmas=GRID, rtol=1e-6, atol=1e-6)
        assert res.x.dtype == torch.float32
        assert rms(res.x.double() - ref[-1]) < 1e-4


def test_options_pass_through(problem):
    gmm, noise, _ = problem
    grid = torch.tensor([SIGMA_HI, SIGMA_LO], dtype=torch.float64)
    tol = {"rtol": 1e-4, "atol": 1e-4}
    free = pflow.sample(gmm, noise, "torchdiffeq:dopri5", sigmas=grid, **tol)
    capped = pflow.sample(
        gmm, noise, "torchdiffeq:dopri5", sigmas=grid, options={"max_step": 0.5}, **tol
    )
    assert capped.n_accepted >= math.ceil((SIGMA_HI - SIGMA_LO) / 0.5) > free.n_accepted
    # torchdiffeq's fixed-grid methods take step_size: 4 rk4 steps of 5 between 20 and 0.1
    fixed = pflow.sample(gmm, noise, "torchdiffeq:rk4", sigmas=grid, options={"step_size": 5.0})
    assert fixed.n_accepted == 4 and fixed.nfe == 16
    free = pflow.sample(gmm, noise, "scipy:RK45", sigmas=grid, **tol)
    capped = pflow.sample(gmm, noise, "scipy:RK45", sigmas=grid, options={"max_step": 0.5}, **tol)
    assert capped.n_accepted >= 40 > free.n_accepted


def test_implicit_scipy_method_runs(problem):
    """Radau with the block-diagonal Jacobian sparsity (samples do not interact)."""
    gmm, noise, ref = problem
    res = pflow.sample(gmm, noise, "scipy:Radau", sigmas=GRID, rtol=1e-7, atol=1e-7)
    assert rms(res.x - ref[-1]) < 1e-5


def test_reference_is_exact_for_one_gaussian():
    g = make_gmm(dim=3, k=1, seed=5, full=True)
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))  # float32 in
    smax = g.schedule.sigma_max
    res = pflow.reference(g, noise, last_step="solver")
    assert res.x.dtype == torch.float64 and res.sigmas[0] == smax and res.sigmas[-1] == 0
    exact = g.flow(xbar_of(noise.double(), smax), smax, 0.0)
    assert rms(res.x - exact) < 1e-8
    # and down to a positive sigma
    grid = torch.tensor([SIGMA_HI, SIGMA_LO], dtype=torch.float64)
    res = pflow.reference(g, noise, sigmas=grid)
    exact = x_of(g.flow(xbar_of(noise.double(), SIGMA_HI), SIGMA_HI, SIGMA_LO), SIGMA_LO)
    assert rms(res.x - exact) < 1e-8


def test_reference_matches_dop853_on_a_mixture(problem):
    gmm, noise, ref = problem
    res = pflow.reference(gmm, noise, sigmas=GRID)
    assert rms(res.x - ref[-1]) < 1e-8
    # Full range into 0 on the 3-component mixture with full covariances
    g = make_gmm(dim=4, k=3, seed=2, full=True)
    smax = g.schedule.sigma_max
    want = x_of(scipy_reference(g, xbar_of(noise, smax), smax, 0.0), 0.0)
    assert rms(pflow.reference(g, noise, last_step="solver").x - want) < 1e-8


def test_backends_are_listed_and_resolved():
    names = pflow.available_solvers()
    for name in ("torchdiffeq:dopri5", "torchdiffeq:dopri8", "torchdiffeq:euler", "scipy:DOP853"):
        assert name in names
    assert get_solver("torchdiffeq:dopri5").adaptive
    assert get_solver("scipy:LSODA").adaptive
    spec = get_solver("torchdiffeq:rk4")
    assert not spec.adaptive and spec.order == 4 and spec.name == "torchdiffeq:rk4"


def test_bad_backend_input():
    gmm = make_gmm(dim=3, k=2)
    x = torch.randn(2, 3)
    with pytest.raises(
        ValueError, match="torchdiffeq has no method 'dopri6'; its methods: .*dopri5"
    ):
        pflow.sample(gmm, x, "torchdiffeq:dopri6")
    with pytest.raises(ValueError, match="scipy has no method 'rk45'; its methods: RK23, RK45"):
        pflow.sample(gmm, x, "scipy:rk45")
    with pytest.raises(ValueError, match="solver must be one of .*'torchdiffeq:<method>'"):
        pflow.sample(gmm, x, "diffrax:tsit5")
    with pytest.raises(TypeError, match="'dopri5' does not take option.*step_size.*max_step"):
        pflow.sample(gmm, x, "torchdiffeq:dopri5", options={"step_size": 0.1})
    with pytest.raises(TypeError, match="'rk4' does not take option.*max_step.*step_size"):
        pflow.sample(gmm, x, "torchdiffeq:rk4", steps=4, options={"max_step": 0.1})
    with pytest.raises(TypeError, match="scipy method 'RK45' does not take option.*jac"):
        pflow.sample(gmm, x, "scipy:RK45", options={"jac": None})
    with pytest.raises(TypeError, match="options must be a dict"):
        pflow.sample(gmm, x, "scipy:RK45", options=[("max_step", 1.0)])
    with pytest.raises(TypeError, match="'torchdiffeq:dopri5' does not take first_step"):
        pflow.sample(gmm, x, "torchdiffeq:dopri5", first_step=0.1)
    with pytest.raises(TypeError, match="'rk45' does not take options"):
        pflow.sample(gmm, x, "rk45", options={"max_step": 0.1})
    with pytest.raises(TypeError, match="does not take per_sample"):
        pflow.sample(gmm, x, "scipy:RK45", per_sample=True)
    with pytest.raises(ValueError, match="rtol/atol apply to adaptive solvers"):
        pflow.sample(gmm, x, "torchdiffeq:euler", steps=4, rtol=1e-3)
    with pytest.raises(ValueError, match="steps is required"):
        pflow.sample(gmm, x, "torchdiffeq:rk4")


@pytest.mark.parametrize("solver", ["torchdiffeq:dopri5", "scipy:RK45"])
def test_backend_nan_and_budget(solver):
    gmm = make_gmm(dim=3, k=2)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    class Broken:
        schedule = gmm.schedule

        def __call__(self, xbar, sigma):
            eps = gmm(xbar, sigma)
            return eps * float("nan") if float(sigma) < 3.0 else eps

    with pytest.raises(pflow.NonFiniteError, match="NaN or inf at sigma="):
        pflow.sample(Broken(), x, solver)
    with pytest.raises(pflow.MaxNFEExceeded, match="max_nfe=40"):
        pflow.sample(gmm, x, solver, rtol=1e-10, atol=1e-10, max_nfe=40)
    res = pflow.sample(gmm, x, solver, rtol=1e-10, atol=1e-10, max_nfe=40, return_partial=True)
    assert not res.finished and res.nfe <= 40 and "max_nfe" in res.message
    assert res.sigmas[-1] < res.sigmas[0] and torch.isfinite(res.x).all()
