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
    # Every accepted step's end is visited and recorded, the grid points among them.
    visited = res.sigmas.tolist()
    assert set(GRID.tolist()) <= set(visited) and res.n_accepted == len(visited) - 1 > 2
    assert res.trajectory is not None and res.trajectory.shape == (len(visited), *noise.shape)
    for sigma, want in zip(GRID.tolist(), ref):
        assert rms(res.trajectory[visited.index(sigma)] - want) < 1e-8
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
    assert res.trajectory is not None and res.sigmas[-2:].tolist() == grid[-2:].tolist()
    assert set(grid.tolist()) <= set(res.sigmas.tolist())
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
    assert fixed.sigmas.tolist() == [SIGMA_HI, 15.0, 10.0, 5.0, SIGMA_LO]  # the steps taken
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


# Every accepted step visited; partial results at the last visited point; nfe_per_step.

VISIT_GRID = torch.exp(torch.linspace(3.0, -2.3, 7, dtype=torch.float64))  # 20.1 to 0.1


@pytest.mark.parametrize(
    "solver", ["torchdiffeq:dopri5", "torchdiffeq:bosh3", "scipy:RK45", "scipy:Radau"]
)
def test_adaptive_backend_visits_every_accepted_step(problem, solver):
    """``sigmas`` are every accepted step's end (the grid points among them), as for pflow's
    own adaptive solvers; the trajectory holds the state at each, only when asked for."""
    gmm, noise, _ = problem
    grid = torch.cat([VISIT_GRID, torch.zeros(1, dtype=torch.float64)])
    res = pflow.sample(
        gmm, noise, solver, sigmas=grid, rtol=1e-5, atol=1e-5, return_trajectory=True
    )
    visited = res.sigmas.tolist()
    assert set(grid.tolist()) <= set(visited) and len(visited) > len(grid)
    assert bool((res.sigmas.diff() < 0).all()), visited
    assert res.n_accepted == len(visited) - 1  # the Euler step into 0 included
    assert res.trajectory.shape == (len(visited), *noise.shape)
    assert torch.equal(res.trajectory[0], noise) and torch.equal(res.trajectory[-1], res.x)
    # The state at each visited sigma: the next step from it (to the next visited sigma, by
    # the reference) lands near the next recorded state, within the tolerance.
    for i in (1, len(visited) // 2, len(visited) - 3):
        a, b = visited[i], visited[i + 1]
        want = x_of(scipy_reference(gmm, xbar_of(res.trajectory[i], a), a, b), b)
        assert rms(res.trajectory[i + 1] - want) < 1e-4, (i, a, b)
    bare = pflow.sample(gmm, noise, solver, sigmas=grid, rtol=1e-5, atol=1e-5)
    assert bare.trajectory is None and torch.equal(bare.sigmas, res.sigmas)
    assert torch.equal(bare.x, res.x) and bare.n_accepted == res.n_accepted


@pytest.mark.parametrize(
    "solver", ["torchdiffeq:euler", "torchdiffeq:rk4", "torchdiffeq:dopri5", "scipy:RK45"]
)
def test_partial_backend_result_is_the_last_visited_point(problem, solver):
    """With ``max_nfe`` used up inside the library, the result is the last point the solve
    visited, and ``sigmas``/``trajectory`` the points visited so far: a prefix of the full
    solve's (the grid's, for a fixed-grid method)."""
    gmm, noise, _ = problem
    kw = {"rtol": 1e-5, "atol": 1e-5} if get_solver(solver).adaptive else {}
    full = pflow.sample(gmm, noise, solver, sigmas=VISIT_GRID, return_trajectory=True, **kw)
    for budget in (1, full.nfe // 3, full.nfe // 2, full.nfe - 1):
        res = pflow.sample(
            gmm,
            noise,
            solver,
            sigmas=VISIT_GRID,
            max_nfe=budget,
            return_partial=True,
            return_trajectory=True,
            **kw,
        )
        assert not res.finished and res.nfe <= budget and "max_nfe" in res.message
        k = len(res.sigmas)
        assert 1 <= k < len(full.sigmas) and res.n_accepted == k - 1
        assert torch.equal(res.sigmas, full.sigmas[:k]), (budget, res.sigmas)
        if not kw:
            assert torch.equal(res.sigmas, VISIT_GRID[:k])
        assert torch.equal(res.x, full.trajectory[k - 1]), budget
        assert torch.equal(res.trajectory, full.trajectory[:k])
    # the repro of the bug: Euler with 3 evaluations reaches the fourth grid point
    res = pflow.sample(
        gmm, noise, "torchdiffeq:euler", sigmas=VISIT_GRID, max_nfe=3, return_partial=True
    )
    assert torch.equal(res.sigmas, VISIT_GRID[:4]) and res.trajectory is None


NFE_PER_STEP = {
    "torchdiffeq:euler": 1,
    "torchdiffeq:midpoint": 2,
    "torchdiffeq:heun2": 2,
    "torchdiffeq:heun3": 3,
    "torchdiffeq:rk4": 4,
    "torchdiffeq:explicit_adams": 1,
    "torchdiffeq:implicit_adams": 2,
    "torchdiffeq:adaptive_heun": 1,
    "torchdiffeq:fehlberg2": 2,
    "torchdiffeq:bosh3": 3,
    "torchdiffeq:dopri5": 6,
    "torchdiffeq:dopri8": 13,
    "scipy:RK23": 3,
    "scipy:RK45": 6,
    "scipy:DOP853": 12,
    "scipy:Radau": 3,
    "scipy:BDF": 1,
    "scipy:LSODA": 1,
}


def test_nfe_per_step_is_declared_for_every_backend_method():
    backends = [n for n in pflow.available_solvers() if ":" in n]
    assert sorted(backends) == sorted(NFE_PER_STEP)
    for name, nfe in NFE_PER_STEP.items():
        assert get_solver(name).nfe_per_step == nfe, name


@pytest.mark.parametrize(
    "solver", [n for n in NFE_PER_STEP if n.startswith("torchdiffeq:") and "adams" not in n]
)
def test_nfe_per_step_is_what_torchdiffeq_spends(problem, solver):
    """Fixed grid: ``nfe_per_step`` per step. Adaptive: one evaluation at the start, one for
    the initial-step probe, then ``nfe_per_step`` per attempt."""
    gmm, noise, _ = problem
    spec = get_solver(solver)
    if spec.adaptive:
        res = pflow.sample(gmm, noise[:2], solver, sigmas=VISIT_GRID, rtol=1e-3, atol=1e-3)
        assert res.nfe == 2 + spec.nfe_per_step * (res.n_accepted + res.n_rejected)
    else:
        res = pflow.sample(gmm, noise[:2], solver, sigmas=VISIT_GRID)
        assert res.nfe == spec.nfe_per_step * (len(VISIT_GRID) - 1)
