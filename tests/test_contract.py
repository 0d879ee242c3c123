"""The solver contract: every registered solver against what it declares.

Each test is parametrised over the registry (``pflow.available_solvers()``), so a solver is
tested the moment it is registered, and each check is applied where the solver's declared
capabilities say it applies (``order``, ``nfe_per_step``, ``adaptive``, ``stochastic`` and
``draws_noise``, ``reversible``, ``history``, ``last_steps``, ``directions``,
``starts_at_zero``, ``per_sample``, ``ddim_options``, ``options``), never from its name.

1. first order is DDIM (``ddim_options``);
2. the measured order is the declared one (fixed grids), or tightening the tolerance
   helps (adaptive);
3. ``return_partial`` and ``max_nfe``;
4. ``return_trajectory``;
5. ``last_step`` modes;
6. dtype and device kept;
7. a sample does not depend on the batch, nor on ``batch_size``;
8. ``nfe`` is the number of network calls, and ``nfe_per_step`` bounds it;
9. options are typed;
10. directions, ``starts_at_zero`` and reversibility.

The problem is the exact Gaussian mixture (``make_gmm(dim=4, k=3)``, defined down to
``sigma = 0``) in float64 with batches of 3 to 6.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import pytest
import torch

import pflow
from pflow.solvers import Solver, get_solver, parse_solver

from .conftest import make_gmm
from .reference import SIGMA_HI, SIGMA_LO, rms, scipy_reference, slope, with_startup, x_of, xbar_of
from .reference import geometric as _geometric

# ------------------------------------------------------------------------------ solvers

# Backends: torchdiffeq and scipy bring some 20 methods, all run by two functions of
# pflow/solvers/backends.py (one per library), so one representative per code path keeps
# the runtime small: torchdiffeq's fixed-grid path at first order (euler: the DDIM
# equivalence of the xbar formulation) and at high order with several evaluations per
# step (rk4), torchdiffeq's adaptive path (dopri5, step_t onto the grid points) and
# scipy's interval-by-interval adaptive path (RK45). pflow's own solvers are all tested.
BACKEND_SUBSET = ("torchdiffeq:euler", "torchdiffeq:rk4", "torchdiffeq:dopri5", "scipy:RK45")


def _registered() -> list[str]:
    own = pflow.available_solvers(backends=False)
    backends = [n for n in pflow.available_solvers() if n not in own]
    return own + [n for n in backends if n in BACKEND_SUBSET]


SOLVERS = _registered()


def _where(predicate: Any) -> list[str]:
    """The solvers whose declared capabilities satisfy ``predicate``."""
    return [n for n in SOLVERS if predicate(get_solver(n))]


def _downward(spec: Solver) -> bool:
    return "down" in spec.directions


def _deterministic(spec: Solver) -> bool:
    """Its endpoint is the ODE's under its default options."""
    return not spec.draws_noise(spec.defaults())


# ------------------------------------------------------------------------------ problem

GMM = make_gmm(dim=4, k=3)
SEED = 11
FLOAT64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems here are 4-dimensional, where torch's intra-op threads only contend:
    on 2 shared cores a step took 8 ms with 2 threads and 0.2 ms with 1. Restored after
    this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _noise(n: int = 4, dtype: torch.dtype = FLOAT64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, GMM.dim, generator=g, dtype=FLOAT64).to(dtype)


def _grid(spec: Solver, n: int, zero: bool = False) -> torch.Tensor:
    """``n`` steps, geometric from ``SIGMA_HI`` to ``SIGMA_LO`` (then into 0 with ``zero``),
    in the solver's direction: decreasing when it samples, else the mirrored increasing
    grid (from 0 with ``zero`` only where it ``starts_at_zero``)."""
    if zero:
        grid = torch.cat([_geometric(n - 1), torch.zeros(1, dtype=FLOAT64)])
    else:
        grid = _geometric(n)
    if _downward(spec):
        return grid
    if zero and not spec.starts_at_zero:
        grid = _geometric(n)
    return grid.flip(0)


def _solve(name: str, x: torch.Tensor, sigmas: torch.Tensor, model: Any = GMM, **kw: Any):
    """``pflow.sample`` down a decreasing grid, ``pflow.encode`` up an increasing one."""
    if float(sigmas[-1]) < float(sigmas[0]):
        return pflow.sample(model, x, name, sigmas=sigmas, **kw)
    return pflow.encode(model, x, name, sigmas=sigmas, **kw)


def _noisy(spec: Solver) -> dict[str, Any]:
    """Options under which a stochastic solver draws reproducible noise: a per-sample
    ``seed``, and (where its defaults draw none, e.g. an ``eta`` of 0) the first numeric
    option that, set to 1, makes ``draws_noise`` true. Empty for an ODE solver."""
    if not spec.stochastic:
        return {}
    kw: dict[str, Any] = {"seed": SEED}
    defaults = spec.defaults()
    if not spec.draws_noise({**defaults, **kw}):
        for opt in spec.options:
            if opt.kind not in (int, float):
                continue
            try:
                value = opt.parse(opt.kind(1), spec.name)
            except (TypeError, ValueError):
                continue
            if spec.draws_noise({**defaults, **kw, opt.name: value}):
                kw[opt.name] = value
                break
    assert spec.draws_noise({**defaults, **kw}), f"{spec.name}: stochastic but draws no noise"
    return kw


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


class Counted:
    """The Gaussian mixture behind a counter, exposing what the solve reads from a model
    as the mixture does (``schedule``, ``dim``, and the three ways
    :class:`~pflow.solvers.PFODE` may call it: ``predict_xt``, else ``eps_from_xt``, else
    ``__call__``). Every call through any of them is one network call; the denoised
    estimate of each ``predict_xt`` call is recorded with its sigma."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.schedule = model.schedule
        self.dim = model.dim
        self.calls = 0
        self.evals: list[tuple[Any, torch.Tensor]] = []

    def __call__(self, xbar: torch.Tensor, sigma: Any) -> torch.Tensor:
        self.calls += 1
        return self.model(xbar, sigma)

    def predict_xt(self, x_t: torch.Tensor, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        eps, x0 = self.model.predict_xt(x_t, sigma)
        self.evals.append((sigma, x0.clone()))
        return eps, x0

    def eps_from_xt(self, x_t: torch.Tensor, sigma: Any) -> torch.Tensor:
        self.calls += 1
        return self.model.eps_from_xt(x_t, sigma)


def _at(sigma: Any, value: float) -> bool:
    if isinstance(sigma, torch.Tensor):
        return bool((sigma == value).all())
    return float(sigma) == value


# ----------------------------------------------------------------------- the registry


def test_backend_subset_is_registered():
    every = pflow.available_solvers()
    assert [n for n in BACKEND_SUBSET if n not in every] == []
    assert set(pflow.available_solvers(backends=False)) <= set(SOLVERS)


@pytest.mark.parametrize("name", SOLVERS)
def test_declared_capabilities_are_coherent(name):
    spec = get_solver(name)
    assert spec.name == name
    assert spec.order >= 1 and spec.nfe_per_step >= 1 and spec.history >= 0
    assert "euler" in spec.last_steps and set(spec.last_steps) <= {"euler", "solver"}
    assert spec.directions and set(spec.directions) <= {"down", "up"}
    names = [o.name for o in spec.options]
    assert len(set(names)) == len(names)
    for opt in spec.options:  # every default is a value of its own type
        assert opt.parse(opt.default, name) == opt.default, opt
    if spec.adaptive:
        assert {"rtol", "atol"} <= set(names)
        assert spec.external or type(spec).attempt is not Solver.attempt
    if spec.per_sample:
        assert spec.adaptive and spec.option("per_sample").kind is bool
    if spec.stochastic:
        assert not spec.reversible and "up" not in spec.directions
        assert spec.option("seed") is not None and spec.option("seed").batch_dim == 0
    if spec.reversible:
        assert any(o.batch_dim is not None for o in spec.options)  # the companion
    if spec.ddim_options is not None:
        assert spec.order >= 1 and set(spec.ddim_options) <= set(names)
        for key, value in spec.ddim_options.items():
            assert spec.option(key).parse(value, name) == value
    if spec.external:
        assert callable(getattr(spec, "solve", None))


# ------------------------------------------------------------ 1. first order is DDIM


@pytest.mark.parametrize("zero", [False, True], ids=["geometric", "into_zero"])
@pytest.mark.parametrize("name", _where(lambda s: s.ddim_options is not None))
def test_first_order_is_ddim(name, zero):
    spec = get_solver(name)
    x = _noise(5)
    grid = _grid(spec, 7, zero)
    got = _solve(name, x, grid, **spec.ddim_options)
    ddim = _solve("euler", x, grid)
    assert _max_diff(got.x, ddim.x) <= 1e-12, (name, spec.ddim_options)
    assert got.nfe == ddim.nfe


# ----------------------------------------------------------------- 2. measured order

# Step counts in the asymptotic range, by declared order (measured on this problem, 20 to
# 0.1: the local slopes over the doublings used are within ~0.1 of the order, and the
# finest error stays far above the reference's ~1e-12). Single-step methods on the
# geometric grid: from 40 steps at orders 1 to 3 (midpoint's local slope reads 1.71 from
# 10 to 20 steps, 1.85, then 1.93 from 40 to 80; dpm_solver_3's 3.19 from 20 to 40, then
# 3.09, 3.04); fourth order from 20 (rk4: 4.04, 4.02).
SINGLESTEP_STEPS = {1: (40, 80, 160), 2: (40, 80, 160), 3: (40, 80, 160), 4: (20, 40, 80)}
# Multistep methods (``history > 0``) take their first steps at lower order. Those steps
# are made short (``with_startup``: log-steps of d^2/2 at the top of the grid) so that
# their local error does not set the global order; 2 * history of them are needed, as
# the first full-length step extrapolates the history by a factor ~1/d and amplifies any
# jump in its error: with only 3 start-up steps ipndm's local slope falls from 3.8 to 2.0
# between 160 and 1280 steps, with 8 it stays at 3.8 to 4.0. The third- and fourth-order
# ones are asymptotic from 80 steps: dpmpp_3m's local slopes read 3.57, 3.36, 3.19, 3.09
# from 20 to 320 steps (a fit over 40..160 gives 3.28), ipndm's and lms's 3.66, 3.84,
# 3.93 from 40 to 320.
MULTISTEP_STEPS = {1: (40, 80, 160), 2: (40, 80, 160), 3: (80, 160, 320), 4: (80, 160, 320)}
ORDER_FALLBACK = (10, 20, 40)  # higher orders: errors must stay above round-off
ORDER_BATCH = 4


def _order_steps(spec: Solver) -> tuple[int, ...]:
    table = MULTISTEP_STEPS if spec.history else SINGLESTEP_STEPS
    return table.get(spec.order, ORDER_FALLBACK)


def _order_grid(spec: Solver, n: int) -> torch.Tensor:
    """``n`` geometric steps between ``SIGMA_HI`` and ``SIGMA_LO`` in the solver's direction
    (plus short start-up steps at its start for a multistep method)."""
    down = with_startup(n, 2 * spec.history) if spec.history else _geometric(n)
    if _downward(spec):
        return down
    return (SIGMA_HI * SIGMA_LO / down).clamp(SIGMA_LO, SIGMA_HI)  # mirrored in log sigma


@cache
def _order_problem(direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, reference endpoint)``: from ``SIGMA_HI`` to ``SIGMA_LO`` (down) or the other
    way (up), by scipy's DOP853 at 1e-12 in float64 (about 1e-13 from its 1e-13 answer)."""
    x = _noise(ORDER_BATCH, seed=1)
    a, b = (SIGMA_HI, SIGMA_LO) if direction == "down" else (SIGMA_LO, SIGMA_HI)
    ref = scipy_reference(GMM, xbar_of(x, a), a, b, rtol=1e-12, atol=1e-12)
    return x, x_of(ref, b)


@pytest.mark.parametrize("name", _where(lambda s: not s.adaptive and _deterministic(s)))
def test_measured_order(name):
    spec = get_solver(name)
    x, ref = _order_problem("down" if _downward(spec) else "up")
    steps = _order_steps(spec)
    errors = [rms(_solve(name, x, _order_grid(spec, n)).x - ref) for n in steps]
    assert errors[-1] > 1e-11, ("the finest grid reaches round-off: fewer steps", errors)
    measured = slope(steps, errors)
    assert abs(measured - spec.order) <= 0.3, (name, spec.order, measured, errors)


ADAPTIVE_TOLS = (1e-3, 1e-5, 1e-7)


@pytest.mark.parametrize("name", _where(lambda s: s.adaptive))
def test_tighter_tolerance_is_more_accurate_and_costs_more(name):
    spec = get_solver(name)
    direction = "down" if _downward(spec) else "up"
    x, ref = _order_problem(direction)
    grid = torch.tensor([SIGMA_HI, SIGMA_LO], dtype=FLOAT64)
    grid = grid if direction == "down" else grid.flip(0)
    errors, nfes = [], []
    for tol in ADAPTIVE_TOLS:
        res = _solve(name, x, grid, rtol=tol, atol=tol)
        errors.append(rms(res.x - ref))
        nfes.append(res.nfe)
    assert errors[0] > errors[1] > errors[2], (name, errors)
    assert nfes[0] < nfes[1] < nfes[2], (name, nfes)


# ------------------------------------------------------------------ 3. return_partial


@pytest.mark.parametrize("name", SOLVERS)
def test_return_partial(name):
    spec = get_solver(name)
    x = _noise(4)
    grid = _grid(spec, 6)
    kw = _noisy(spec)
    full = _solve(name, x, grid, return_trajectory=True, **kw)
    budget = full.nfe // 2
    assert budget >= 1, full.nfe
    res = _solve(name, x, grid, max_nfe=budget, return_partial=True, **kw)
    assert res.finished is False
    assert res.nfe <= budget
    assert "max_nfe" in res.message and str(budget) in res.message, res.message
    assert res.x.shape == x.shape and bool(torch.isfinite(res.x).all())
    if not spec.adaptive:
        # A fixed grid (stochastic solvers too: their noise is keyed by sample and step)
        # stops at a grid point, at the state the full solve had there.
        k = len(res.sigmas)
        assert 1 <= k < len(grid)
        assert torch.equal(res.sigmas, grid[:k]), (res.sigmas, grid)
        assert _max_diff(res.x, full.trajectory[k - 1]) <= 1e-12
    else:
        assert float(res.sigmas[0]) == float(grid[0])
    with pytest.raises(pflow.MaxNFEExceeded, match="max_nfe"):
        _solve(name, x, grid, max_nfe=budget, **kw)


# --------------------------------------------------------------- 4. return_trajectory


@pytest.mark.parametrize("name", SOLVERS)
def test_return_trajectory(name):
    spec = get_solver(name)
    x = _noise(3)
    grid = _grid(spec, 5, zero=True)
    kw = _noisy(spec)
    assert _solve(name, x, grid, **kw).trajectory is None
    res = _solve(name, x, grid, return_trajectory=True, **kw)
    traj = res.trajectory
    assert traj is not None
    assert traj.shape == (len(res.sigmas), *x.shape)
    assert torch.equal(traj[0], x)
    assert torch.equal(traj[-1], res.x)
    assert float(res.sigmas[0]) == float(grid[0]) and float(res.sigmas[-1]) == float(grid[-1])
    if not spec.adaptive:
        assert torch.equal(res.sigmas, grid)
        assert res.n_accepted == len(grid) - 1
    else:
        visited = res.sigmas.tolist()
        assert set(grid.tolist()) <= set(visited)
        steps = torch.tensor(visited).diff()
        assert bool((steps < 0).all() if _downward(spec) else (steps > 0).all()), visited
        # every accepted step's end is a visited sigma, not only the grid points
        assert res.n_accepted == len(visited) - 1, (name, res.n_accepted, visited)


# ----------------------------------------------------------------------- 5. last_step


@pytest.mark.parametrize("name", _where(_downward))
def test_last_step_modes(name):
    spec = get_solver(name)
    x = _noise(4)
    grid = _grid(spec, 6, zero=True)
    last_positive = float(grid[-2])
    kw = _noisy(spec)
    results = {}
    for mode in spec.last_steps:
        res = pflow.sample(GMM, x, name, sigmas=grid, last_step=mode, **kw)
        assert res.finished and bool(torch.isfinite(res.x).all()), mode
        results[mode] = res.x
    # "euler": the result is x0_hat of the (last) evaluation at the last positive sigma,
    # and the network is never called at 0.
    counted = Counted(GMM)
    res = pflow.sample(counted, x, name, sigmas=grid, last_step="euler", **kw)
    assert not any(_at(s, 0.0) for s, _ in counted.evals)
    there = [x0 for s, x0 in counted.evals if _at(s, last_positive)]
    assert there, f"{name}: no evaluation at the last positive sigma {last_positive}"
    assert _max_diff(res.x, there[-1]) <= 1e-14
    assert _max_diff(res.x, results["euler"]) == 0.0
    # "solver": the method's own step into 0. At first order that step is x0_hat itself,
    # so only a higher-order method must land elsewhere (the mixture is defined at 0).
    if "solver" in spec.last_steps and spec.order > 1:
        assert _max_diff(results["solver"], results["euler"]) > 1e-8


@pytest.mark.parametrize("name", _where(lambda s: "solver" not in s.last_steps))
def test_unsupported_last_step_is_an_error_naming_the_solver(name):
    spec = get_solver(name)
    grid = torch.cat([_geometric(3), torch.zeros(1, dtype=FLOAT64)])  # checked before direction
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        pflow.sample(GMM, _noise(3), name, sigmas=grid, last_step="solver", **_noisy(spec))


# -------------------------------------------------------------- 6. dtype and device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", SOLVERS)
def test_dtype_and_device_kept(name, dtype, device):
    spec = get_solver(name)
    x = _noise(3, dtype).to(device)
    res = _solve(name, x, _grid(spec, 5, zero=True), return_trajectory=True, **_noisy(spec))
    assert res.x.dtype == dtype and res.x.device == x.device and res.x.shape == x.shape
    assert res.trajectory.dtype == dtype and res.trajectory.device == x.device
    assert bool(torch.isfinite(res.x).all())


# ------------------------------------------------------------- 7. batch independence


@pytest.mark.parametrize("name", _where(lambda s: not s.adaptive or s.per_sample))
def test_sample_does_not_depend_on_the_batch(name):
    """Fixed grids, per-sample adaptive steps and keyed per-sample noise: sample ``i`` of a
    batch is the sample solved alone (its noise keys are ``noise_keys(seed, n)[i]``), and
    the same with ``batch_size=2``."""
    spec = get_solver(name)
    n = 5
    x = _noise(n)
    grid = _grid(spec, 6, zero=True)
    kw = _noisy(spec)
    if spec.adaptive:
        kw["per_sample"] = True
    together = _solve(name, x, grid, **kw).x
    for i in range(n):
        alone_kw = dict(kw)
        if "seed" in kw:
            alone_kw["seed"] = pflow.noise_keys(kw["seed"], n)[i : i + 1]
        alone = _solve(name, x[i : i + 1], grid, **alone_kw).x
        assert _max_diff(alone[0], together[i]) <= 1e-10, (name, i)
    split = _solve(name, x, grid, batch_size=2, **kw).x
    assert _max_diff(split, together) <= 1e-10


# --------------------------------------------------------------------- 8. NFE counted


@pytest.mark.parametrize("zero", [False, True], ids=["geometric", "into_zero"])
@pytest.mark.parametrize("name", SOLVERS)
def test_nfe_is_the_number_of_network_calls(name, zero):
    spec = get_solver(name)
    x = _noise(3)
    grid = _grid(spec, 6, zero)
    kw = _noisy(spec)
    counted = Counted(GMM)
    res = _solve(name, x, grid, model=counted, **kw)
    assert res.nfe == counted.calls
    assert _max_diff(res.x, _solve(name, x, grid, **kw).x) == 0.0  # the counter is faithful
    if not spec.adaptive:
        # nfe_per_step per step, up to the documented adjustments at the ends: one
        # evaluation to start (alf's companion), nfe_per_step - 1 saved by the Euler step
        # into 0, an evaluation carried over from the step before (FSAL, UniPC).
        steps = len(grid) - 1
        assert spec.nfe_per_step * (steps - 1) <= res.nfe <= spec.nfe_per_step * steps + 1, (
            name,
            spec.nfe_per_step,
            steps,
            res.nfe,
        )


# ------------------------------------------------------------------- 9. typed options


def _label_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("name", SOLVERS)
def test_options_are_typed(name):
    spec = get_solver(name)
    for opt in spec.options:
        if opt.kind is not bool:
            continue
        for text, value in (("true", True), ("False", False), ("0", False), ("1", True)):
            solver, options = parse_solver(f"{name}[{opt.name}={text}]")
            assert solver is spec and options == {opt.name: value}
            assert type(options[opt.name]) is bool
        with pytest.raises((TypeError, ValueError), match=re.escape(name)):
            parse_solver(f"{name}[{opt.name}=maybe]")
    with pytest.raises(TypeError, match=re.escape(name)):
        parse_solver(f"{name}[no_such_option=1]")
    x, grid = _noise(3), _grid(spec, 3)
    with pytest.raises(TypeError, match=re.escape(name)):
        _solve(name, x, grid, no_such_option=1)
    writable = [
        o for o in spec.options if o.kind in (bool, int, float, str) and o.default is not None
    ]
    if writable:
        opt = writable[0]
        label = f"{name}[{opt.name}={_label_text(opt.default)}]"
        with pytest.raises(ValueError) as info:
            _solve(label, x, grid, **{opt.name: opt.default})
        message = str(info.value)
        assert label in message and "keyword" in message and opt.name in message, message


# ------------------------------------------------------------------- 10. directions


@pytest.mark.parametrize("name", _where(lambda s: "up" not in s.directions))
def test_encode_needs_up(name):
    spec = get_solver(name)
    up = _geometric(4).flip(0)
    with pytest.raises(ValueError, match=re.escape(repr(name))) as info:
        pflow.encode(GMM, _noise(3), name, sigmas=up, **_noisy(spec))
    assert "encode" in str(info.value)


@pytest.mark.parametrize("name", _where(lambda s: not _downward(s)))
def test_sample_needs_down(name):
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        pflow.sample(GMM, _noise(3), name, sigmas=_geometric(4))


@pytest.mark.parametrize("name", _where(lambda s: "up" in s.directions))
def test_encoding_from_zero_needs_starts_at_zero(name):
    spec = get_solver(name)
    up = torch.cat([torch.zeros(1, dtype=FLOAT64), _geometric(4).flip(0)])
    if spec.starts_at_zero:
        res = pflow.encode(GMM, _noise(3), name, sigmas=up)
        assert res.finished and bool(torch.isfinite(res.x).all())
    else:
        with pytest.raises(ValueError, match="sigma"):
            pflow.encode(GMM, _noise(3), name, sigmas=up)


@pytest.mark.parametrize("name", _where(lambda s: s.reversible))
def test_reversible_solver_comes_home(name):
    x0 = GMM.sample(5, generator=torch.Generator().manual_seed(2))
    up = _geometric(8).flip(0)
    enc = pflow.encode(GMM, x0, name, sigmas=up)
    assert enc.companion is not None
    dec = pflow.decode(GMM, enc.x, name, sigmas=up.flip(0), companion=enc.companion)
    assert _max_diff(dec.x, x0) <= 1e-10
    assert dec.nfe == enc.nfe - 1 == len(up) - 1  # the companion saves the start
    assert bool(torch.isfinite(enc.x).all())


@pytest.mark.parametrize(
    "name", _where(lambda s: not s.reversible and "down" in s.directions and "up" in s.directions)
)
def test_companion_is_for_reversible_solvers_only(name):
    x = _noise(3)
    companion = torch.zeros(2, *x.shape, dtype=FLOAT64)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        pflow.decode(GMM, x, name, sigmas=_geometric(4), companion=companion)


# ----------------------------------------------------------------- 11. differentiable grids
@pytest.mark.parametrize("name", _where(lambda s: s.differentiable))
def test_grid_gradient_matches_finite_differences(name):
    """A solver that declares ``differentiable`` takes a grid that requires grad and
    returns d(loss)/d(sigmas) equal to a central difference of the same float64 solve
    (the GMM's eps is smooth in sigma, so the network's own t(sigma) is differentiated
    too). The step h = 1e-6 sigma makes the difference's own error ~1e-9 relative."""
    x = _noise(3)
    grid = _grid(get_solver(name), 6)
    weights = torch.linspace(-1.0, 1.0, x.numel(), dtype=FLOAT64).reshape(x.shape)

    def loss(sigmas: torch.Tensor) -> torch.Tensor:
        return (pflow.sample(GMM, x, name, sigmas=sigmas).x * weights).sum()

    sigmas = grid.clone().requires_grad_(True)
    loss(sigmas).backward()
    assert sigmas.grad is not None
    for i in range(len(grid) - 1):  # the last point may be 0, where the step is Euler's
        h = 1e-6 * float(grid[i])
        up, down = grid.clone(), grid.clone()
        up[i] += h
        down[i] -= h
        with torch.no_grad():
            fd = (loss(up) - loss(down)) / (2 * h)
        assert float(sigmas.grad[i]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9), i
