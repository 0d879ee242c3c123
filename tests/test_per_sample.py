"""Per-sample adaptive steps (``rk45`` / ``bosh3`` with ``per_sample=True``): each sample
takes the steps it would take alone, the network is called once per stage on the samples
still running, and finished samples stop costing."""

from __future__ import annotations

import pytest
import torch

import pflow
from pflow.zoo import GaussianMixture

from .conftest import make_gmm
from .reference import rms, scipy_reference, x_of, xbar_of

# A thin mode (variance 1e-3) and a broad one: a sample pulled into the thin mode needs
# many more steps at small sigma than one going to the broad mode.
THIN = GaussianMixture(
    torch.tensor([[2.0, 0.0], [-2.0, 0.0]], dtype=torch.float64),
    torch.tensor([[1e-3, 1e-3], [1.0, 1.0]], dtype=torch.float64),
)
PAIR = torch.tensor([[0.3, 0.0], [-0.5, 0.2]], dtype=torch.float64)  # thin mode, broad mode
GRID = torch.tensor([80.0, 1.0, 0.02], dtype=torch.float64)


class Recording:
    """Records the batch size and the sigma of every call (independently of PFODE)."""

    def __init__(self, model) -> None:
        self.model, self.schedule = model, model.schedule
        self.batches: list[int] = []
        self.sigmas: list[torch.Tensor] = []

    def predict_xt(self, x, sigma):
        self.batches.append(x.shape[0])
        self.sigmas.append(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).clone())
        return self.model.predict_xt(x, sigma)


def _solve(model, noise, tol, solver="rk45", **kw):
    return pflow.sample(model, noise, solver, sigmas=GRID, rtol=tol, atol=tol, **kw)


@pytest.fixture(scope="module")
def pair_reference():
    """The pair's exact states at sigma = 1 and at the end of GRID."""
    mid = scipy_reference(THIN, xbar_of(PAIR, 80.0), 80.0, 1.0)
    end = scipy_reference(THIN, mid, 1.0, 0.02)
    return x_of(mid, 1.0), x_of(end, 0.02)


@pytest.fixture(scope="module")
def batch_problem():
    gmm = make_gmm(dim=4, k=3, seed=3)
    noise = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = x_of(scipy_reference(gmm, xbar_of(noise, 80.0), 80.0, 0.02), 0.02)
    return gmm, noise, exact


@pytest.mark.parametrize("tol", [1e-3, 1e-4])
def test_two_different_samples_take_their_own_steps(tol, pair_reference):
    mid, exact = pair_reference
    rec = Recording(THIN)
    both = _solve(rec, PAIR, tol, per_sample=True, return_trajectory=True)
    alone = [_solve(THIN, PAIR[i : i + 1], tol, per_sample=True) for i in range(2)]
    # Each sample gets what it gets alone in a batch of one.
    for i, a in enumerate(alone):
        assert (both.x[i] - a.x[0]).abs().max() < 1e-12
    # ... so it takes its own steps: different numbers of them, the totals add up, and
    # calls see two different sigmas at once.
    assert alone[0].n_accepted != alone[1].n_accepted
    assert both.n_accepted == sum(a.n_accepted for a in alone)
    assert both.n_rejected == sum(a.n_rejected for a in alone)
    assert any(len(s) == 2 and s[0] != s[1] for s in rec.sigmas)
    # One batched call per stage: the NFE is the slower sample's, the work (samples
    # evaluated) the sum of both, and the faster sample drops out once it is done.
    assert both.nfe == max(a.nfe for a in alone) == len(rec.batches)
    assert sum(rec.batches) == sum(a.nfe for a in alone)
    assert rec.batches[-1] == 1 and all(b in (1, 2) for b in rec.batches)
    assert rec.batches == sorted(rec.batches, reverse=True)
    # Here, with one easy sample, cheaper than one step for the pair, and still accurate.
    # (Not a theorem: the NFE is the hardest sample's own, which the controller's
    # rejections can make exceed a shared solve's when samples are alike.)
    shared = _solve(THIN, PAIR, tol)
    assert both.nfe <= shared.nfe
    assert sum(rec.batches) < 2 * shared.nfe
    assert rms(both.x - exact) <= 100 * tol
    # The grid points are hit exactly by every sample and recorded there.
    assert both.sigmas.tolist() == GRID.tolist()
    assert both.trajectory is not None and both.trajectory.shape == (3, 2, 2)
    assert torch.equal(both.trajectory[0], PAIR) and torch.equal(both.trajectory[-1], both.x)
    assert rms(both.trajectory[1] - mid) <= 100 * tol


@pytest.mark.parametrize("solver", ["rk45", "bosh3"])
def test_batch_of_one_is_the_shared_solver(solver):
    """With one sample, per-sample stepping is the shared-step solver: the same steps.
    The states agree to ~1e-9, not to round-off: where the local error is at round-off
    level (the first steps from sigma = 80) the error ratio is round-off noise, summed in a
    different order by the two implementations, and the controller turns its relative
    difference into a ~1e-7 relative difference of the next step size."""
    gmm = make_gmm(dim=4, k=3, seed=3)
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for i in range(3):
        a = _solve(gmm, noise[i : i + 1], 1e-4, solver)
        b = _solve(gmm, noise[i : i + 1], 1e-4, solver, per_sample=True)
        assert (a.nfe, a.n_accepted, a.n_rejected) == (b.nfe, b.n_accepted, b.n_rejected)
        assert (a.x - b.x).abs().max() < 1e-7


def test_non_fsal_pair_batch_of_one_is_the_shared_solver():
    """An embedded pair without FSAL (Heun-Euler 2(1)) evaluates at each accepted point."""
    from pflow.solvers import PFODE, ButcherTableau
    from pflow.solvers.driver import integrate
    from pflow.solvers.runge_kutta import EmbeddedRungeKutta

    heun_euler = ButcherTableau(
        "heun_euler",
        2,
        c=(0.0, 1.0),
        a=((), (1.0,)),
        b=(0.5, 0.5),
        b_hat=(1.0, 0.0),
        error_order=1,
    )
    gmm = make_gmm(dim=4, k=3, seed=3)
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grid = GRID.tolist()
    solver = EmbeddedRungeKutta("heun_euler", heun_euler, "Heun-Euler 2(1)")
    shared = {**solver.defaults(), "rtol": 1e-3, "atol": 1e-3}
    own = {**shared, "per_sample": True}

    def solve_adaptive(ode, x, grid):
        return integrate(ode, solver, x, grid, shared)

    def solve_per_sample(ode, x, grid):
        return integrate(ode, solver, x, grid, own)

    outs = []
    for i in range(2):
        a_ode, b_ode = PFODE(gmm), PFODE(gmm)
        a = solve_adaptive(a_ode, noise[i : i + 1], grid)
        b = solve_per_sample(b_ode, noise[i : i + 1], grid)
        assert (a_ode.nfe, a.n_accepted, a.n_rejected) == (b_ode.nfe, b.n_accepted, b.n_rejected)
        assert (a.x - b.x).abs().max() < 1e-7
        outs.append(b.x)
    ode = PFODE(gmm)
    both = solve_per_sample(ode, noise, grid)
    assert (both.x - torch.cat(outs)).abs().max() < 1e-12


@pytest.mark.parametrize("solver,tols", [("rk45", [1e-4, 1e-6]), ("bosh3", [1e-3, 1e-4])])
def test_batch_error_and_cost(solver, tols, batch_problem):
    gmm, noise, exact = batch_problem
    errors = []
    for tol in tols:
        rec = Recording(gmm)
        res = _solve(rec, noise, tol, solver, per_sample=True)
        shared = _solve(gmm, noise, tol, solver)
        errors.append(rms(res.x - exact))
        per = (res.x - exact).reshape(16, -1).pow(2).mean(1).sqrt()
        assert per.max() <= 100 * tol, (tol, per.max())
        assert res.nfe == len(rec.batches) and res.finished
        assert sum(rec.batches) < 16 * shared.nfe  # work: samples evaluated
        assert res.n_accepted >= 16 * 2  # totals over samples
    assert errors[0] > errors[1]


def test_eps_model_in_float32_with_per_sample_sigma():
    """A network behind EpsModel gets one timestep per sample; float32 is kept, and a
    sample's result does not depend on its batch."""
    schedule = pflow.NoiseSchedule.linear()
    seen: list[torch.Tensor] = []

    def net(x_t, t):
        seen.append(t)
        return torch.tanh(x_t) * (0.2 + t.reshape(-1, 1, 1) / 1000.0)

    model = pflow.EpsModel(net, schedule)
    noise = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    noise[0] *= 3.0
    res = pflow.sample(model, noise, "rk45", rtol=1e-4, atol=1e-4, per_sample=True)
    assert res.x.dtype == torch.float32 and res.finished
    assert res.sigmas.tolist() == [schedule.sigma_max, schedule.sigma_min, 0.0]
    assert any(t.unique().numel() > 1 for t in seen) and all(t.ndim == 1 for t in seen)
    for i in range(3):
        alone = pflow.sample(model, noise[i : i + 1], "rk45", rtol=1e-4, atol=1e-4, per_sample=True)
        assert (alone.x[0] - res.x[i]).abs().max() <= 1e-6
    # The step into 0 is one Euler step from the last positive sigma: x0_hat there.
    traj = pflow.sample(
        model, noise, "rk45", rtol=1e-4, atol=1e-4, per_sample=True, return_trajectory=True
    ).trajectory
    assert traj is not None
    end = pflow.sample(model, traj[-2], "euler", sigmas=[schedule.sigma_min, 0.0]).x
    assert (end - res.x).abs().max() <= 1e-6
    # float64 of the same: float32 is within its round-off
    res64 = pflow.sample(model, noise.double(), "rk45", rtol=1e-4, atol=1e-4, per_sample=True)
    assert rms(res.x.double() - res64.x) < 1e-3 * rms(res64.x)


def test_budget_and_bad_input():
    gmm = make_gmm(dim=3, k=2)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(pflow.MaxNFEExceeded, match="max_nfe=30"):
        pflow.sample(gmm, x, "rk45", rtol=1e-8, atol=1e-8, max_nfe=30, per_sample=True)
    res = pflow.sample(
        gmm, x, "rk45", rtol=1e-8, atol=1e-8, max_nfe=30, per_sample=True, return_partial=True
    )
    assert not res.finished and res.nfe <= 30 and "per-sample" in res.message
    assert torch.isfinite(res.x).all() and res.sigmas[0] == gmm.schedule.sigma_max
    with pytest.raises(TypeError, match="per_sample must be True or False"):
        pflow.sample(gmm, x, "rk45", per_sample="yes")
    with pytest.raises(TypeError, match="'heun' does not take per_sample"):
        pflow.sample(gmm, x, "heun", steps=4, per_sample=True)

    class Broken:
        schedule = gmm.schedule

        def __call__(self, xbar, sigma):
            eps = gmm(xbar, sigma)
            return torch.where(sigma.reshape(-1, 1) < 3.0, eps * float("nan"), eps)

    with pytest.raises(pflow.NonFiniteError, match="NaN or inf at sigma="):
        pflow.sample(Broken(), x, "rk45", per_sample=True)
