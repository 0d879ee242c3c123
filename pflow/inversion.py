"""Encode data into the latent noise and decode it back: the PF-ODE run both ways.

``encode`` integrates the PF-ODE upward, from the grid's first sigma (positive) to its
last (``sigma_max`` by default), and returns the latent in the network's scale: ``x_T``,
the same space :func:`pflow.sample` starts from. ``decode`` is :func:`pflow.sample` on the
mirrored grid. The data enter where the grid starts: ``x0`` is taken as the state in the
network's scale at ``sigmas[0] > 0`` (by default the schedule's ``sigma_min``, the first
training step), the convention of diffusers' DDIM inversion with ``set_alpha_to_one=False``
and of :func:`pflow.sample`, whose result on a grid ending at a positive sigma is the state
there. ``decode`` ends at the same sigma by default (``set_alpha_to_one=False``), so a
round trip is exact in the limit of small steps; ``docs/inversion.md`` measures what
starting at ``sigma_min`` rather than 0 costs.

Three ways to invert:

* any registered solver, run upward (``euler`` is the DDIM paper's encoding, eq. 14 taken
  toward larger sigma; ``rk45`` at tolerance ``tol`` comes home to about ``tol``);
* ``solver="alf"``: algebraically reversible (:mod:`pflow.solvers.reversible`). Its
  latent comes with a companion state (``result.companion``); ``decode`` given it retraces
  the encode to round-off, at one NFE fewer than the encode;
* ``solver="ddim_inverse"`` (encode only): diffusers' ``DDIMInverseScheduler``, which
  evaluates the network at the destination timestep on the source latent, an explicit
  approximation of the implicit step that DDIM's own step would need to be undone. Decode
  its latents with ``solver="euler"`` on the mirrored grid, which is ``DDIMScheduler``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import MaxNFEExceeded
from .grids import validate_sigmas
from .model import ODEModel
from .solve import (
    LastStep,
    SolveResult,
    _check_state,
    _positive,
    _resolve_grid,
    _run,
    _schedule_of,
    sample,
)
from .solvers import PFODE, Outcome, SolverSpec, available_solvers, get_solver
from .solvers import _options as _solver_options
from .solvers.ode import scale
from .solvers.reversible import REVERSIBLE_SOLVERS, companion_shape

__all__ = ["DDIM_INVERSE", "InversionResult", "decode", "encode"]

DDIM_INVERSE = "ddim_inverse"


@dataclass
class InversionResult(SolveResult):
    """A :class:`~pflow.SolveResult` with the companion state of a reversible solver.

    Attributes:
        companion: for ``solver="alf"``, the companion at the last sigma, a float64 tensor of
            shape ``(2, *x.shape)`` (pass it to :func:`decode` / :func:`encode` with ``x`` to
            retrace the solve exactly); ``None`` for other solvers.
    """

    companion: Tensor | None = None


def _check_size(model: ODEModel, x: Tensor, name: str) -> None:
    """Catch a state that cannot be the model's before any network call, when the model
    says how many values a sample has (``model.dim``, e.g. the exact Gaussian mixture)."""
    dim = getattr(model, "dim", None)
    if isinstance(dim, int) and x[0].numel() != dim:
        raise ValueError(
            f"{name} has {x[0].numel()} values per sample (shape {tuple(x.shape)}); the model "
            f"expects {dim}"
        )


def _spec(solver: str, allow_inverse: bool) -> SolverSpec | None:
    if solver == DDIM_INVERSE:
        if not allow_inverse:
            raise ValueError(
                "solver='ddim_inverse' only encodes; decode its latents with solver='euler' "
                "on the mirrored grid (that is diffusers' DDIMScheduler)"
            )
        return None
    try:
        return get_solver(solver)
    except ValueError:
        names = ", ".join(available_solvers() + ([DDIM_INVERSE] if allow_inverse else []))
        raise ValueError(f"solver must be one of {names}; got {solver!r}") from None


def _tolerances(
    spec: SolverSpec | None,
    solver: str,
    rtol: float | None,
    atol: float | None,
    max_nfe: int | None,
    solver_options: dict[str, Any],
) -> tuple[dict[str, Any], int | None]:
    """The same option rules as :func:`pflow.sample`."""
    options = dict(solver_options)
    if spec is not None and spec.adaptive:
        options["rtol"] = 1e-5 if rtol is None else _positive("rtol", rtol)
        options["atol"] = 1e-5 if atol is None else _positive("atol", atol)
        if max_nfe is None:
            max_nfe = 100_000
    elif rtol is not None or atol is not None:
        raise ValueError(f"rtol/atol apply to adaptive solvers; {solver!r} walks a fixed grid")
    if max_nfe is not None and (
        isinstance(max_nfe, bool) or int(max_nfe) != max_nfe or max_nfe < 1
    ):
        raise ValueError(f"max_nfe must be a positive integer, got {max_nfe!r}")
    if spec is not None:
        _solver_options(spec, solver_options)
    elif solver_options:
        raise TypeError(
            f"solver {solver!r} does not take {', '.join(sorted(solver_options))} "
            "(its options: none)"
        )
    return options, max_nfe


def _grid_options(steps_offset: int, set_alpha_to_one: bool, spacing: str, rho: float) -> dict:
    options: dict[str, Any] = {"steps_offset": steps_offset, "set_alpha_to_one": set_alpha_to_one}
    if spacing == "karras":
        options["rho"] = rho
    return options


def _check_companion(companion: Tensor | None, x: Tensor, name: str, solver: str) -> None:
    if companion is None:
        return
    if solver not in REVERSIBLE_SOLVERS:
        raise ValueError(
            f"companion is the second state of a reversible solver "
            f"({', '.join(REVERSIBLE_SOLVERS)}); solver {solver!r} does not take one"
        )
    if not isinstance(companion, Tensor) or not companion.is_floating_point():
        raise TypeError(f"companion must be a floating-point torch.Tensor, got {companion!r:.60}")
    if tuple(companion.shape) != companion_shape(x):
        raise ValueError(
            f"companion has shape {tuple(companion.shape)} but {name} has {tuple(x.shape)} "
            f"(a companion is {companion_shape(x)}); pass the one returned together with it"
        )
    if companion.device != x.device:
        raise ValueError(f"companion is on {companion.device} but {name} is on {x.device}")


def _result(out: Outcome, ode: PFODE) -> InversionResult:
    traj = torch.stack(out.trajectory) if out.trajectory is not None else None
    return InversionResult(
        x=out.x,
        nfe=ode.nfe,
        sigmas=torch.tensor(out.sigmas, dtype=torch.float64),
        n_accepted=out.n_accepted,
        n_rejected=out.n_rejected,
        trajectory=traj,
        finished=out.finished,
        message=out.message,
        companion=getattr(out, "companion", None),
    )


def _as_inversion(res: SolveResult) -> InversionResult:
    return InversionResult(**{f.name: getattr(res, f.name) for f in dataclasses.fields(res)})


def encode(
    model: ODEModel,
    x0: Tensor,
    solver: str = "euler",
    *,
    steps: int | None = None,
    spacing: str = "trailing",
    sigmas: Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_nfe: int | None = None,
    companion: Tensor | None = None,
    return_trajectory: bool = False,
    return_partial: bool = False,
    check_finite: bool = True,
    steps_offset: int = 0,
    set_alpha_to_one: bool = False,
    rho: float = 7.0,
    **solver_options: Any,
) -> InversionResult:
    """Integrate the PF-ODE upward from data ``x0`` to the latent noise.

    Args:
        model: ``eps = model(xbar, sigma)``, for example an :class:`~pflow.EpsModel`.
        x0: data of shape ``(batch, ...)``, taken as the state in the network's scale at
            the grid's first sigma; dtype and device are kept.
        solver: a name from :func:`pflow.available_solvers`, or ``"ddim_inverse"``
            (diffusers' ``DDIMInverseScheduler``, see the module docstring).
        steps, spacing, steps_offset, set_alpha_to_one, rho: build the grid as
            :func:`pflow.get_sigmas` does and reverse it, so that :func:`decode` with the
            same arguments walks the same sigmas back. ``set_alpha_to_one=False`` (the
            default) starts at the first training step's sigma; ``True`` would start at 0
            and is only meaningful for ``ddim_inverse``.
        sigmas: an explicit increasing grid instead; ``sigmas[0]`` must be positive
            (``ddim_inverse`` alone may start at 0: it never evaluates the network there).
            Adaptive solvers pass through every point; by default they run from
            ``sigma_min`` to ``sigma_max``.
        rtol, atol, max_nfe, return_trajectory, return_partial, check_finite: as for
            :func:`pflow.sample`.
        companion: for ``solver="alf"``, the companion at ``sigmas[0]`` (from a
            :func:`decode` that ended there); by default it is started from the model.
        solver_options: options of the solver.

    Returns:
        An :class:`InversionResult`: ``x`` is the latent in the network's scale at the last
        sigma (``x_T`` when that is ``sigma_max``); ``companion`` is set for ``alf``.
    """
    x0 = _check_state("x0", x0)
    _check_size(model, x0, "x0")
    spec = _spec(solver, allow_inverse=True)
    _check_companion(companion, x0, "x0", solver)
    options, max_nfe = _tolerances(spec, solver, rtol, atol, max_nfe, solver_options)
    adaptive = spec is not None and spec.adaptive
    if sigmas is not None:
        if steps is not None:
            raise ValueError("give either steps or sigmas, not both")
        grid = validate_sigmas(sigmas, schedule=_schedule_of(model), name="sigmas")
        if grid[-1] < grid[0]:
            raise ValueError(
                "sigmas must increase for encode() (from the data's sigma up to sigma_max); "
                "a decreasing grid decodes"
            )
    else:
        options_g = _grid_options(steps_offset, set_alpha_to_one, spacing, rho)
        grid = _resolve_grid(model, adaptive, steps, spacing, None, options_g).flip(0)
    if grid[0] == 0 and spec is not None:
        raise ValueError(
            "encoding starts at a positive sigma, but sigmas[0] is 0: the data enter as the "
            "state at the grid's first sigma and the network is not defined at 0 (with "
            "steps=, keep set_alpha_to_one=False; only solver='ddim_inverse' starts at 0)"
        )
    if spec is None:
        return _run_own(
            _ddim_inverse,
            model,
            x0,
            grid,
            max_nfe=max_nfe,
            record=return_trajectory,
            partial=return_partial,
            check_finite=check_finite,
            options={"prediction": getattr(model, "prediction", "epsilon")},
        )
    return _dispatch(
        spec,
        model,
        x0,
        grid,
        companion=companion,
        max_nfe=max_nfe,
        last_step="euler",
        record=return_trajectory,
        partial=return_partial,
        check_finite=check_finite,
        options=options,
    )


def decode(
    model: ODEModel,
    z: Tensor,
    solver: str = "euler",
    *,
    steps: int | None = None,
    spacing: str = "trailing",
    sigmas: Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_nfe: int | None = None,
    companion: Tensor | None = None,
    last_step: LastStep = "euler",
    return_trajectory: bool = False,
    return_partial: bool = False,
    check_finite: bool = True,
    steps_offset: int = 0,
    set_alpha_to_one: bool = False,
    rho: float = 7.0,
    **solver_options: Any,
) -> InversionResult:
    """Integrate the PF-ODE down from the latent ``z`` to data: :func:`pflow.sample` on the
    grid that :func:`encode` walks up.

    The arguments are :func:`pflow.sample`'s, with one default changed:
    ``set_alpha_to_one=False``, so the grid ends where :func:`encode` starts (the first
    training step's sigma) and the result is the state there. With
    ``set_alpha_to_one=True`` (or a grid ending at 0) this is exactly :func:`pflow.sample`,
    ending with the step into ``sigma = 0``.

    Args:
        z: the latent ``x_T`` of shape ``(batch, ...)`` (for example ``encode(...).x``).
        companion: for ``solver="alf"``, the companion returned by :func:`encode` with ``z``;
            with it the decode retraces the encode to round-off. Without it ``alf`` starts
            its companion from the model and is an ordinary (second-order) sampler.

    Returns:
        An :class:`InversionResult` (``companion`` set for ``alf`` when the grid ends at a
        positive sigma).
    """
    z = _check_state("z", z)
    _check_size(model, z, "z")
    spec = _spec(solver, allow_inverse=False)
    assert spec is not None
    _check_companion(companion, z, "z", solver)
    if last_step not in ("euler", "solver"):
        raise ValueError(f"last_step must be 'euler' or 'solver', got {last_step!r}")
    options, max_nfe = _tolerances(spec, solver, rtol, atol, max_nfe, solver_options)
    options_g = _grid_options(steps_offset, set_alpha_to_one, spacing, rho)
    grid = _resolve_grid(model, spec.adaptive, steps, spacing, sigmas, options_g)
    if grid[-1] > grid[0]:
        raise ValueError("sigmas must decrease for decode(); an increasing grid encodes")
    if spec.name not in REVERSIBLE_SOLVERS:
        res = sample(
            model,
            z,
            solver,
            sigmas=grid,
            rtol=rtol,
            atol=atol,
            max_nfe=max_nfe,
            last_step=last_step,
            return_trajectory=return_trajectory,
            return_partial=return_partial,
            check_finite=check_finite,
            **solver_options,
        )
        return _as_inversion(res)
    return _dispatch(
        spec,
        model,
        z,
        grid,
        companion=companion,
        max_nfe=max_nfe,
        last_step=last_step,
        record=return_trajectory,
        partial=return_partial,
        check_finite=check_finite,
        options=options,
    )


def _dispatch(
    spec: SolverSpec,
    model: ODEModel,
    x: Tensor,
    grid: Tensor,
    *,
    companion: Tensor | None,
    max_nfe: int | None,
    last_step: str,
    record: bool,
    partial: bool,
    check_finite: bool,
    options: dict[str, Any],
) -> InversionResult:
    """Run a registered solver on a validated grid, through the shared loop
    (:func:`pflow.solve._run`); reversible ones also take and return their companion."""
    if spec.name not in REVERSIBLE_SOLVERS:
        res = _run(
            model,
            x,
            spec.name,
            grid,
            max_nfe=max_nfe,
            last_step=last_step,
            record=record,
            partial=partial,
            check_finite=check_finite,
            options=options,
        )
        return _as_inversion(res)
    return _run_own(
        spec.run,
        model,
        x,
        grid,
        max_nfe=max_nfe,
        last_step=last_step,
        record=record,
        partial=partial,
        check_finite=check_finite,
        options={**options, "companion": companion},
    )


def _run_own(
    run: Any,
    model: ODEModel,
    x: Tensor,
    grid: Tensor,
    *,
    max_nfe: int | None,
    record: bool,
    partial: bool,
    check_finite: bool,
    options: dict[str, Any],
    last_step: str = "euler",
) -> InversionResult:
    """:func:`pflow.solve._run`, keeping what a solver returns beyond the state."""
    ode = PFODE(model, max_nfe=max_nfe, check_finite=check_finite)
    with torch.no_grad():
        out = run(
            ode, x, grid.tolist(), last_step=last_step, record=record, partial=partial, **options
        )
    return _result(out, ode)


def _reconvert(
    ev: Any, x: Tensor, sigma_eval: float, sigma_src: float, prediction: str
) -> tuple[Tensor, Tensor]:
    """``(eps, x0_hat)`` from the network's output at ``sigma_eval`` on the state ``x``,
    converted with the source level's coefficients, as ``DDIMInverseScheduler.step`` does
    (its ``alpha_prod_t`` is the source's). ``ev`` is the :class:`Evaluation` at
    ``sigma_eval``, from which the raw output is recovered exactly."""
    c_src = scale(sigma_src)
    sqrt_a, sqrt_1ma = c_src, sigma_src * c_src  # the source's sqrt(a), sqrt(1 - a)
    if prediction == "sample":
        if sigma_src == 0.0:
            raise ValueError(
                "ddim_inverse with an x0-predicting network cannot start at sigma = 0 (the "
                "noise estimate divides by sqrt(1 - a) = 0, as in diffusers); use "
                "set_alpha_to_one=False or start the grid at a positive sigma"
            )
        raw = ev.x0
        return (x - sqrt_a * raw) / sqrt_1ma, raw
    if prediction == "v_prediction":
        c_e = scale(sigma_eval)
        raw = ev.eps * c_e - ev.x0 * (sigma_eval * c_e)  # v = sqrt(a) eps - sqrt(1 - a) x0
        return sqrt_a * raw + sqrt_1ma * x, sqrt_a * x - sqrt_1ma * raw
    eps = ev.eps
    return eps, (x - sqrt_1ma * eps) / sqrt_a


def _ddim_inverse(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    prediction: str,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
) -> Outcome:
    """diffusers' ``DDIMInverseScheduler``: from ``sigma`` to ``sigma_next``,

        eps = eps_theta(x, t(sigma_next)),   x0_hat = (x - sqrt(1 - a) eps) / sqrt(a),
        x_next = sqrt(a_next) x0_hat + sqrt(1 - a_next) eps,

    with ``a`` the source's and the network evaluated at the destination's timestep on the
    source's state. In ``xbar`` this is ``xbar_next = xbar + (sigma_next - sigma) eps``
    with ``eps`` taken at the wrong point: a first-order approximation of the step that
    would undo DDIM's (which needs ``eps`` at ``(x_next, sigma_next)``, an implicit
    equation)."""
    visited = [grid[0]]
    traj = [x.clone()] if record else None
    finished, message = True, ""
    try:
        for sigma, sigma_next in zip(grid[:-1], grid[1:]):
            ev = ode.eval(x, sigma_next)
            eps, x0_hat = _reconvert(ev, x, sigma_next, sigma, prediction)
            c_next = scale(sigma_next)
            x = x0_hat * c_next + eps * (sigma_next * c_next)
            visited.append(sigma_next)
            if traj is not None:
                traj.append(x.clone())
    except MaxNFEExceeded as exc:
        if not partial:
            raise
        finished, message = False, str(exc)
    ode.raise_if_nonfinite()
    return Outcome(
        x, visited, n_accepted=len(visited) - 1, trajectory=traj, finished=finished, message=message
    )
