"""Exponential integrators (DPM-Solver, DPM-Solver++, UniPC): orders measured on the exact
Gaussian mixture, first order is DDIM, the step into sigma = 0, NFE, partial results,
float32 conditioning. Peers (diffusers) are in test_peers.py."""

from __future__ import annotations

import math

import pytest
import torch

import pflow
from pflow.errors import MaxNFEExceeded, NonFiniteError
from pflow.solvers import PFODE, get_solver, resolve_options
from pflow.solvers.driver import integrate
from pflow.solvers.exponential import phi
from pflow.zoo import GaussianMixture

from .conftest import make_gmm
from .reference import SIGMA_HI, order_problem, rms
from .reference import geometric as _geometric
from .reference import slope as _slope
from .reference import with_startup as _with_startup


@pytest.fixture(scope="module")
def problem():
    return order_problem()


# Measured slopes (this problem, these step counts): dpm_solver_2 1.98, dpm_solver_3 2.92,
# dpmpp_2m 1.94, dpmpp_3m 3.13, unipc order 1/2/3 with corrector 1.95/3.00/3.79.
# Singlestep methods start at full order, so the plain geometric grid is used. The
# multistep ones start with a first-order step whose O(h^2) local error would, on fine
# enough grids, take the global order down to 2; the start-up steps are therefore taken
# h^2/2 apart (`_with_startup`). UniPC-3 is pre-asymptotic up to ~200 steps here: the h^4
# and h^5 error terms have opposite signs and cancel near 60-80 steps (local slopes
# 5.6, 3.0, 3.2, 3.5 between 40 and 320 steps, then 3.83, 3.92, 3.97 up to 2560), so its
# slope is fitted further out (the fit over 160..1280 reads 3.79).
ORDER_CASES = [
    ("dpm_solver_2", {}, 2, [20, 40, 80, 160], False),
    ("dpm_solver_3", {}, 3, [20, 40, 80, 160], False),
    ("dpmpp_2m", {"lower_order_final": False}, 2, [40, 80, 160, 320], True),
    ("dpmpp_3m", {"lower_order_final": False}, 3, [40, 80, 160, 320], True),
    ("unipc", {"order": 1, "lower_order_final": False}, 2, [40, 80, 160, 320], True),
    ("unipc", {"order": 2, "lower_order_final": False}, 3, [40, 80, 160, 320], True),
    ("unipc", {"order": 3, "lower_order_final": False}, 4, [160, 320, 640, 1280], True),
]


@pytest.mark.parametrize("solver,options,order,steps,startup", ORDER_CASES)
def test_order(problem, solver, options, order, steps, startup):
    gmm, noise, ref = problem
    errors = []
    for n in steps:
        grid = _with_startup(n) if startup else _geometric(n)
        res = pflow.sample(gmm, noise, solver, sigmas=grid, **options)
        assert res.nfe == (n + (3 if startup else 0)) * (
            int(solver[-1]) if "solver" in solver else 1
        )
        errors.append(rms(res.x - ref))
    slope = _slope(steps, errors)
    assert abs(slope - order) <= 0.3, (solver, options, slope, errors)


def test_reference_3m_loses_an_order(problem):
    """The third-order update of the DPM-Solver reference code and of diffusers
    (``variant="reference"``) weights the second difference with half the exact weight:
    measured slope 2.27 against 3.13 for the exact one, on the same grids."""
    gmm, noise, ref = problem
    steps = [40, 80, 160, 320]
    errors = {"exact": [], "reference": []}
    for n in steps:
        for variant, errs in errors.items():
            x = pflow.sample(
                gmm,
                noise,
                "dpmpp_3m",
                sigmas=_with_startup(n),
                lower_order_final=False,
                variant=variant,
            ).x
            errs.append(rms(x - ref))
    assert _slope(steps, errors["reference"]) < 2.6 < 2.8 < _slope(steps, errors["exact"])
    with pytest.raises(ValueError, match="variant"):
        pflow.sample(gmm, noise, "dpmpp_3m", steps=3, variant="diffusers")


def test_unip_is_exponential_adams_bashforth(problem):
    """Two derivations of the same update: UniPC's predictor (weights from its order
    conditions with B(h) = e^h - 1) and DPM-Solver++'s multistep step (the Lagrange
    interpolant of x0_hat in lambda integrated exactly). Without the corrector UniP-2 is
    DPM-Solver++(2M) and UniP-3 is the exactly integrated quadratic of dpmpp_3m."""
    gmm, noise, _ = problem
    grid = _geometric(12)
    for order in (2, 3):
        a = pflow.sample(gmm, noise, f"dpmpp_{order}m", sigmas=grid, lower_order_final=False).x
        b = pflow.sample(
            gmm, noise, "unipc", sigmas=grid, order=order, corrector=False, lower_order_final=False
        ).x
        assert (a - b).abs().max() <= 1e-12


def test_phi_series_and_recurrence_agree():
    for k in range(5):
        for z in (-1.999, -0.5, 1e-9, 0.3, 1.999):
            # the closed forms phi_1 = (e^z - 1)/z, phi_2 = (e^z - 1 - z)/z^2, ...
            closed = math.exp(z)
            for j in range(k):
                closed = (closed - 1 / math.factorial(j)) / z
            if abs(z) > 0.1:
                assert phi(k, z) == pytest.approx(closed, rel=1e-12)
        assert phi(k, 0.0) == pytest.approx(1 / math.factorial(k), rel=1e-15)
        assert phi(k, 2.5) == pytest.approx(phi(k, 2.5 - 1e-12), rel=1e-9)  # recurrence side
    assert phi(1, -1e-8) == pytest.approx(1 - 0.5e-8, rel=1e-15)  # no cancellation


# --- first order is DDIM --------------------------------------------------------------------


def _run(name, gmm, noise, grid, **options):
    """The solver through the driver directly (any grid, sigma = 0 at the start too)."""
    ode = PFODE(gmm)
    solver = get_solver(name)
    out = integrate(
        ode, solver, noise, [float(s) for s in grid], resolve_options(solver, {}, options)
    )
    return out.x, ode.nfe


@pytest.mark.parametrize(
    "runner,options",
    [
        ("dpm_solver_3", {"order": 1}),
        ("dpmpp_3m", {"order": 1}),
        ("unipc", {"order": 1, "corrector": False}),
    ],
)
def test_first_order_is_ddim(problem, runner, options):
    gmm, noise, _ = problem
    for grid in (_geometric(7), pflow.get_sigmas(gmm.schedule, 10, "trailing")):
        euler = pflow.sample(gmm, noise, "euler", sigmas=grid)
        x, nfe = _run(runner, gmm, noise, grid, **options)
        assert nfe == euler.nfe
        assert (x - euler.x).abs().max() <= 1e-12


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_multistep_starts_with_ddim(problem, solver):
    """Without history the first step is first order: a one-step grid is one DDIM step,
    and so is the first step of any grid (the corrector of UniPC only changes it once
    the next evaluation is known, so a one-step grid shows the predictor alone)."""
    gmm, noise, _ = problem
    for grid in ([SIGMA_HI, 3.0], [SIGMA_HI, 0.0], [5.0, 4.0]):
        grid = torch.tensor(grid, dtype=torch.float64)
        a = pflow.sample(gmm, noise, solver, sigmas=grid)
        b = pflow.sample(gmm, noise, "euler", sigmas=grid)
        assert a.nfe == b.nfe == 1
        assert (a.x - b.x).abs().max() <= 1e-12
    if solver != "unipc":
        grid = _geometric(6)
        a = pflow.sample(gmm, noise, solver, sigmas=grid, return_trajectory=True)
        b = pflow.sample(gmm, noise, "euler", sigmas=grid, return_trajectory=True)
        assert (a.trajectory[1] - b.trajectory[1]).abs().max() <= 1e-12
        assert (a.trajectory[2] - b.trajectory[2]).abs().max() > 1e-6


# --- the step into sigma = 0, NFE ------------------------------------------------------------


@pytest.mark.parametrize(
    "solver,options",
    [
        ("dpmpp_2m", {"lower_order_final": False}),
        ("dpmpp_3m", {"lower_order_final": False}),
        ("dpm_solver_2", {}),
        ("dpm_solver_3", {}),
        ("unipc", {"lower_order_final": False}),
        ("unipc", {"order": 3, "lower_order_final": False}),
    ],
)
def test_step_into_zero_is_x0_hat_of_the_last_evaluation(problem, solver, options):
    gmm, noise, _ = problem
    positive = _geometric(5, hi=SIGMA_HI, lo=0.5)
    to_zero = torch.cat([positive, torch.zeros(1, dtype=torch.float64)])
    # Ending at 0.5 the state is where the last evaluation of the longer solve is made
    # (for UniPC: the predictor's result, before the corrector that needs that evaluation).
    before = pflow.sample(gmm, noise, solver, sigmas=positive, **options)
    res = pflow.sample(gmm, noise, solver, sigmas=to_zero, **options)
    _, x0_hat = gmm.predict_xt(before.x, 0.5)
    assert res.nfe == before.nfe + 1
    assert (res.x - x0_hat).abs().max() <= 1e-12
    # lambda = -log(0) is infinite: the methods have no other step into 0 to take, and
    # asking for one is an error that says so (it used to be silently ignored)
    with pytest.raises(ValueError, match=f"solver '{solver}' supports last_step='euler' only"):
        pflow.sample(gmm, noise, solver, sigmas=to_zero, last_step="solver", **options)


@pytest.mark.parametrize("order", [2, 3])
def test_singlestep_cost(problem, order):
    gmm, noise, _ = problem
    steps = 6
    res = pflow.sample(gmm, noise, f"dpm_solver_{order}", steps=steps, spacing="logsnr")
    assert res.sigmas[-1] == 0
    assert res.nfe == order * (steps - 1) + 1  # Euler into 0
    res = pflow.sample(gmm, noise, f"dpm_solver_{order}", sigmas=_geometric(steps))
    assert res.nfe == order * steps and res.n_accepted == steps


def test_lower_order_final(problem):
    """Below 15 steps DPM-Solver++ ends with a first-order step, the one before at most
    second order (diffusers' rule); UniPC's last step is first order on any grid."""
    gmm, noise, _ = problem
    grid = _geometric(8)
    on = pflow.sample(gmm, noise, "dpmpp_3m", sigmas=grid, return_trajectory=True)
    off = pflow.sample(
        gmm, noise, "dpmpp_3m", sigmas=grid, lower_order_final=False, return_trajectory=True
    )
    assert torch.equal(on.trajectory[:-2], off.trajectory[:-2])
    assert (on.x - off.x).abs().max() > 1e-6
    # the last step from the same state is DDIM's
    ddim = pflow.sample(gmm, on.trajectory[-2], "euler", sigmas=grid[-2:])
    assert (on.x - ddim.x).abs().max() <= 1e-12
    long_grid = _geometric(15)
    a = pflow.sample(gmm, noise, "dpmpp_3m", sigmas=long_grid).x
    b = pflow.sample(gmm, noise, "dpmpp_3m", sigmas=long_grid, lower_order_final=False).x
    assert torch.equal(a, b)
    a = pflow.sample(gmm, noise, "unipc", sigmas=long_grid).x
    b = pflow.sample(gmm, noise, "unipc", sigmas=long_grid, lower_order_final=False).x
    assert (a - b).abs().max() > 1e-6


# --- bookkeeping: trajectory, partial results, errors ---------------------------------------

ALL = ["dpmpp_2m", "dpmpp_3m", "dpm_solver_2", "dpm_solver_3", "unipc"]


@pytest.mark.parametrize("solver", ALL)
def test_trajectory_and_partial(problem, solver):
    gmm, noise, _ = problem
    grid = _geometric(20)  # >= 15 steps: no lower-order final steps
    opts = {"lower_order_final": False} if solver == "unipc" else {}
    full = pflow.sample(gmm, noise, solver, sigmas=grid, return_trajectory=True, **opts)
    assert full.trajectory.shape == (21, *noise.shape)
    assert torch.equal(full.trajectory[0], noise) and torch.equal(full.trajectory[-1], full.x)
    assert torch.equal(full.sigmas, grid)
    per_step = full.nfe // 20
    # budget for 7 steps (and, for the singlestep methods, the first stage of the 8th)
    budget = 7 * per_step + (1 if per_step > 1 else 0)
    with pytest.raises(MaxNFEExceeded):
        pflow.sample(gmm, noise, solver, sigmas=grid, max_nfe=budget, **opts)
    part = pflow.sample(
        gmm,
        noise,
        solver,
        sigmas=grid,
        max_nfe=budget,
        return_partial=True,
        return_trajectory=True,
        **opts,
    )
    assert not part.finished and "max_nfe" in part.message
    assert part.nfe == budget
    # A partial result is the last completed step, a point of the full trajectory. UniPC's
    # step ends with the evaluation at its result (for its corrector and the next step),
    # so 7 evaluations complete 6 steps; the other methods complete 7.
    done = 6 if solver == "unipc" else 7
    assert torch.equal(part.sigmas, grid[: done + 1]) and part.n_accepted == done
    assert torch.equal(part.x, full.trajectory[done])
    assert torch.equal(part.trajectory, full.trajectory[: done + 1])


@pytest.mark.parametrize("solver", ALL)
def test_nonfinite_model_is_reported(solver):
    def model(xbar, sigma):
        return xbar * (float("nan") if sigma < 3.0 else 0.1)

    with pytest.raises(NonFiniteError, match="sigma="):
        pflow.sample(model, torch.ones(2, 3), solver, sigmas=_geometric(10))


@pytest.mark.parametrize("solver,bad", [("unipc", 4), ("unipc", 0)])
def test_bad_order(solver, bad):
    with pytest.raises(ValueError, match="order"):
        pflow.sample(make_gmm(), torch.ones(1, 4), solver, steps=3, order=bad)


# --- precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ALL + ["unipc3"])
def test_float32_within_roundoff_of_float64_on_cosine(solver):
    """sigma_max is 2e4 on the cosine schedule: a float32 solve, written around x0_hat and
    eps with float64 coefficients, stays within ~1e-6 RMS of the float64 one. (Trailing
    spacing is left out for DPM-Solver: its first step spans h = 6.5 in lambda, and the
    noise-prediction update multiplies eps differences by about sigma e^-h ... sigma, so
    the network's own eps rounding is amplified ~1e3 times, as for Heun; the data
    prediction methods do not do that.)"""
    g = make_gmm(dim=4, k=3, seed=3)
    gmm = GaussianMixture(g.means, g.covs, g.weights, schedule=pflow.NoiseSchedule.cosine())
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    opts = {"order": 3} if solver == "unipc3" else {}
    name = solver.rstrip("3") if solver == "unipc3" else solver
    spacings = ["logsnr", "karras"] if "solver" in name else ["trailing", "logsnr", "karras"]
    for spacing in spacings:
        x64 = pflow.sample(gmm, noise, name, steps=20, spacing=spacing, **opts).x
        x32 = pflow.sample(gmm, noise.float(), name, steps=20, spacing=spacing, **opts).x
        assert x32.dtype == torch.float32
        assert rms(x32.double() - x64) <= 2e-6, (spacing, rms(x32.double() - x64))


def test_encode_decode_round_trip():
    """The runners take increasing grids too (h < 0): up from sigma = 0.1 to 20 and back
    comes home, and closer with more steps (measured at 25 / 50 steps: 2e-3 .. 3e-4 /
    6e-4 .. 3e-5)."""
    gmm = make_gmm(dim=4, k=3, seed=3)
    x0 = gmm.sample(8, generator=torch.Generator().manual_seed(5))
    start = pflow.sample(
        gmm, x0, "rk45", sigmas=torch.tensor([0.1, 0.0]), rtol=1e-10, atol=1e-10, last_step="solver"
    ).x  # any state at sigma = 0.1
    for runner, options in [
        ("dpmpp_3m", {"order": 2}),
        ("dpmpp_3m", {"order": 3}),
        ("dpm_solver_3", {"order": 2}),
        ("dpm_solver_3", {"order": 3}),
        ("unipc", {"order": 2}),
        ("unipc", {"order": 3}),
    ]:
        errors = []
        for n in (25, 50):
            down = _geometric(n)
            z, _ = _run(runner, gmm, start, down.flip(0), **options)
            x, _ = _run(runner, gmm, z, down, **options)
            errors.append(rms(x - start))
        assert errors[1] <= 1e-3 and errors[0] >= 3 * errors[1], (runner, options, errors)


@pytest.mark.parametrize("runner", ["dpmpp_3m", "dpm_solver_3", "unipc"])
def test_step_out_of_zero_is_ddim(runner):
    gmm = make_gmm(dim=4, k=3, seed=3)
    x0 = gmm.sample(8, generator=torch.Generator().manual_seed(5))
    x, nfe = _run(runner, gmm, x0, [0.0, 0.05], order=2)
    eps = gmm(x0, 0.0)
    assert nfe == 1
    assert (x - (x0 + 0.05 * eps) / math.sqrt(1 + 0.05**2)).abs().max() <= 1e-14
