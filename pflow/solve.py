"""The front door: ``pflow.sample`` and the one plan every use of the ODE goes through.

Sampling integrates the PF-ODE from the top of the grid down. ``noise`` is ``x_T``, a
draw from N(0, I) in the network's own space, exactly what a DDIM sampler starts from:
the state at ``sigmas[0]`` is ``xbar = noise * sqrt(1 + sigmas[0]^2)``, and the result
is ``x = xbar / sqrt(1 + sigmas[-1]^2)`` (the data itself when the grid ends at 0).

:func:`run` is the plan that ``sample``, ``encode``, ``decode`` and ``reference`` are
thin settings of: it validates the input, the solver and its options, builds or checks
the grid, splits the batch into chunks (``batch_size``) and hands each to the driver
(:func:`pflow.solvers.driver.integrate`), with the same messages for every caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .grids import check_grid_options, get_sigmas, validate_sigmas
from .model import ODEModel
from .schedule import Schedule
from .solvers import PFODE, Solver, available_solvers, get_solver, parse_solver, resolve_options
from .solvers.driver import integrate

__all__ = ["SolveResult", "sample", "run", "plan_args"]

LastStep = Literal["euler", "solver"]
Direction = Literal["down", "up"]


@dataclass
class SolveResult:
    """What a solve returns.

    Attributes:
        x: the final state in the network's scale (data space when the grid ends at 0).
        nfe: evaluations of the ODE's right-hand side, counted by wrapping the model (one
            per evaluation whatever the batch; a guided evaluation is one NFE).
        rows: network rows evaluated, summed over the batch and its chunks: ``nfe * batch``
            for a fixed-grid solve of a plain model, twice that under classifier-free
            guidance (:mod:`pflow.guidance`).
        sigmas: float64 tensor of the sigmas the state visited, start and end included.
        n_accepted: steps taken (accepted steps for adaptive solvers).
        n_rejected: steps rejected by the step-size controller (0 for fixed grids).
        trajectory: states at ``sigmas``, shape ``(len(sigmas), *x.shape)``, when asked for.
        finished: False when ``max_nfe`` ran out and a partial result was asked for.
        message: why the solve stopped early, if it did.
    """

    x: Tensor
    nfe: int
    sigmas: Tensor
    n_accepted: int
    n_rejected: int = 0
    trajectory: Tensor | None = None
    finished: bool = True
    message: str = ""
    rows: int = 0


def _schedule_of(model: ODEModel) -> Schedule | None:
    """The model's schedule (a table or a continuous one: grids need only its sigma range,
    and its table for the table spacings), or ``None``."""
    schedule = getattr(model, "schedule", None)
    return schedule if isinstance(schedule, Schedule) else None


def _check_state(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape (batch, ...) with batch >= 1, got {tuple(x.shape)}"
        )
    return x


def _check_finite(name: str, x: Tensor) -> None:
    """A non-finite input state is the caller's, not the model's: say so before any network
    call. One reduction and one host sync per solve (a float64 sum is finite exactly when
    every entry is, unless float64 values overflow it: the exact test settles that case)."""
    x = x.detach()
    if bool(torch.isfinite(torch.sum(x, dtype=torch.float64))):
        return
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return  # finite entries whose float64 sum overflowed
    count = int(bad.sum())
    first = tuple(int(i) for i in bad.nonzero()[0])
    value = float(x[first])
    raise ValueError(
        f"{name} must be finite: it has {count} NaN/inf value(s) of {x.numel()} "
        f"(the first, {value}, at index {first}); the input state is checked before the "
        "model is called"
    )


def _check_size(model: ODEModel, x: Tensor, name: str) -> None:
    """Catch a state that cannot be the model's before any network call, when the model
    says how many values a sample has (``model.dim``, e.g. the exact Gaussian mixture)."""
    dim = getattr(model, "dim", None)
    if isinstance(dim, int) and x[0].numel() != dim:
        raise ValueError(
            f"{name} has {x[0].numel()} values per sample (shape {tuple(x.shape)}); the model "
            f"expects {dim}"
        )


def _check_rows(model: ODEModel, x: Tensor, name: str) -> int | None:
    """The conditioning's rows must be the batch's (checked before any network call)."""
    rows = getattr(model, "cond_rows", None)
    if rows is not None and rows != x.shape[0]:
        raise ValueError(
            f"the model's conditioning has {rows} rows but {name} has {x.shape[0]} samples: "
            "give one row per sample (or one row shared by all); for a shard or chunk of a "
            "larger batch, use model.take(indices)"
        )
    return rows


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _grid(
    model: ODEModel,
    solver: Solver,
    direction: Direction,
    steps: int | None,
    spacing: str,
    sigmas: Any,
    grid_options: dict[str, Any],
    caller: str,
) -> Tensor:
    """The validated grid, decreasing to sample/decode and increasing to encode."""
    schedule = _schedule_of(model)
    if sigmas is not None:
        if steps is not None:
            raise ValueError("give either steps or sigmas, not both")
        grid = validate_sigmas(sigmas, schedule=schedule, name="sigmas")
        if len(grid) > 1 and (grid[-1] > grid[0]) != (direction == "up"):
            if direction == "up":
                raise ValueError(
                    "sigmas must increase for encode() (from the data's sigma up to "
                    "sigma_max); a decreasing grid decodes"
                )
            raise ValueError(f"sigmas must decrease for {caller}(); an increasing grid encodes")
        return grid
    if schedule is None:
        raise ValueError(
            "the model has no NoiseSchedule or other pflow schedule (model.schedule); pass sigmas="
        )
    options = grid_options
    if solver.adaptive:
        if steps is not None:
            raise ValueError(
                "steps is for fixed-step solvers; an adaptive solver chooses its own steps "
                "from rtol and atol (pass sigmas= to fix the points it must pass through)"
            )
        end = [0.0] if options.get("set_alpha_to_one", True) else []
        grid = validate_sigmas([schedule.sigma_max, schedule.sigma_min, *end], schedule=schedule)
    else:
        if steps is None:
            raise ValueError("steps is required for a fixed-step solver (or pass sigmas=)")
        grid = get_sigmas(schedule, steps, spacing, **options)
    return grid.flip(0) if direction == "up" else grid


def _with_breakpoints(grid: Tensor, model: ODEModel) -> Tensor:
    """The default grid of an adaptive solve with the sigmas where the model's field jumps
    (``model.breakpoints``, e.g. the ends of a guidance interval) added as points to pass
    through: a step then never straddles a jump, so whether it is accepted does not hinge
    on round-off (which side of the jump a stage lands on)."""
    points = getattr(model, "breakpoints", None)
    if not points:
        return grid
    positive = [v for v in grid.tolist() if v > 0]
    lo, hi = min(positive), max(positive)  # never between sigma_min and the step into 0
    inner = [float(p) for p in points if lo < float(p) < hi and float(p) not in positive]
    if not inner:
        return grid
    merged = torch.tensor(sorted({*grid.tolist(), *inner}), dtype=grid.dtype)
    return merged if grid[-1] > grid[0] else merged.flip(0)


def _check_capabilities(
    solver: Solver, label: str, direction: Direction, last_step: str, grid: Tensor, caller: str
) -> None:
    if last_step not in ("euler", "solver"):
        raise ValueError(f"last_step must be 'euler' or 'solver', got {last_step!r}")
    if last_step not in solver.last_steps:
        why = f": {solver.last_step_note}" if solver.last_step_note else ""
        modes = " or ".join(map(repr, solver.last_steps))
        raise ValueError(
            f"solver {solver.name!r} supports last_step={modes} only, got "
            f"last_step={last_step!r}{why}"
        )
    if direction not in solver.directions:
        if direction == "down":
            raise ValueError(
                f"solver {label!r} only encodes (runs upward); decode its latents with "
                "solver='euler' on the mirrored grid (that is diffusers' DDIMScheduler)"
                if solver.directions == ("up",)
                else f"solver {label!r} cannot run downward"
            )
        raise ValueError(
            f"solver {label!r} only runs downward (decreasing sigmas): it cannot {caller}"
        )
    if caller == "encode" and float(grid[0]) == 0.0 and not solver.starts_at_zero:
        raise ValueError(
            "encoding starts at a positive sigma, but sigmas[0] is 0: the data enter as the "
            "state at the grid's first sigma and the network is not defined at 0 (with "
            "steps=, keep set_alpha_to_one=False; only solver='ddim_inverse' starts at 0)"
        )


def run(
    model: ODEModel,
    x: Tensor,
    solver: str | Solver,
    *,
    direction: Direction = "down",
    name: str = "noise",
    caller: str = "sample",
    steps: int | None = None,
    spacing: str = "trailing",
    sigmas: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_nfe: int | None = None,
    last_step: str = "euler",
    return_trajectory: bool = False,
    return_partial: bool = False,
    check_finite: bool = True,
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    rho: float = 7.0,
    batch_size: int | None = None,
    process_group: Any = None,
    solver_options: dict[str, Any] | None = None,
    result: Callable[..., SolveResult] = SolveResult,
    ode_factory: Callable[..., PFODE] = PFODE,
) -> SolveResult:
    """The plan behind :func:`sample`, :func:`pflow.encode`, :func:`pflow.decode` and
    :func:`pflow.reference`: validate, build the grid, chunk, integrate, merge. Every
    check happens before the first network call."""
    x = _check_state(name, x)
    _check_size(model, x, name)
    _check_finite(name, x)
    per_sample_model = _check_rows(model, x, name) is not None
    label = solver if isinstance(solver, str) else getattr(solver, "name", repr(solver))
    spec, from_label = parse_solver(solver)  # type: ignore[arg-type]
    given = dict(solver_options or {})
    if spec.adaptive:
        if rtol is not None:
            given["rtol"] = _positive("rtol", rtol)
        if atol is not None:
            given["atol"] = _positive("atol", atol)
        if max_nfe is None:
            max_nfe = 100_000
    elif rtol is not None or atol is not None:
        raise ValueError(f"rtol/atol apply to adaptive solvers; {label!r} walks a fixed grid")
    options = resolve_options(spec, from_label, given, label)
    if max_nfe is not None:
        max_nfe = _positive_int("max_nfe", max_nfe)
    steps_offset, rho = check_grid_options(steps_offset=steps_offset, rho=rho)
    grid_options: dict[str, Any] = {
        "steps_offset": steps_offset,
        "set_alpha_to_one": set_alpha_to_one,
    }
    if spacing == "karras":
        grid_options["rho"] = rho
    differentiable = isinstance(sigmas, Tensor) and sigmas.requires_grad
    grid = _grid(model, spec, direction, steps, spacing, sigmas, grid_options, caller)
    if spec.adaptive and sigmas is None:
        grid = _with_breakpoints(grid, model)
    _check_capabilities(spec, label, direction, last_step, grid, caller)
    points: list[Any] = grid.tolist()
    if differentiable:
        if not spec.differentiable:
            raise ValueError(
                f"sigmas requires grad, but solver {spec.name!r} does not differentiate "
                "through its grid (differentiable solvers: "
                + ", ".join(s for s in _differentiable())
                + ")"
            )
        points = [s.reshape(()) for s in sigmas.to(torch.float64).reshape(-1).unbind()]
    if process_group is not None and spec.external:
        raise ValueError(
            f"process_group: {spec.name!r} runs its own step control; use a native solver"
        )
    batch = x.shape[0]
    size = batch if batch_size is None else _positive_int("batch_size", batch_size)
    per_sample = [
        o for o in spec.options if o.batch_dim is not None and options.get(o.name) is not None
    ]
    if size < batch:
        if process_group is not None and spec.adaptive:
            raise ValueError(
                "batch_size with process_group: ranks must solve their whole shard at once "
                "for an adaptive solver to take the same steps everywhere"
            )
    for o in per_sample:
        if o.expand is not None:  # e.g. an int seed into one key per sample
            options[o.name] = o.expand(options[o.name], batch)
        value = options[o.name]
        n = len(value) if o.batch_dim == 0 else value.shape[o.batch_dim]
        if n != batch:
            raise ValueError(
                f"{o.name} must hold one entry per sample: {batch} per-sample keys or values "
                f"along dimension {o.batch_dim}, got {n}"
            )
    fields = {f.name for f in dataclasses.fields(result)}  # type: ignore[arg-type]
    parts = []
    for start in range(0, batch, size):
        stop = start + size
        chunk = dict(options)
        if size < batch:
            for o in per_sample:
                value = options[o.name]
                chunk[o.name] = value[start:stop] if o.batch_dim == 0 else value[:, start:stop]
        part = model
        if per_sample_model and size < batch:
            part = model.take(slice(start, stop))  # type: ignore[attr-defined]
        ode = ode_factory(
            part, max_nfe=max_nfe, check_finite=check_finite, process_group=process_group
        )
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            out = integrate(
                ode,
                spec,
                x[start:stop],
                points,
                chunk,
                last_step=last_step,
                record=return_trajectory,
                partial=return_partial,
            )
        traj = torch.stack(out.trajectory) if out.trajectory is not None else None
        parts.append(
            result(
                x=out.x,
                nfe=ode.nfe,
                sigmas=torch.tensor(out.sigmas, dtype=torch.float64),
                n_accepted=out.n_accepted,
                n_rejected=out.n_rejected,
                trajectory=traj,
                finished=out.finished,
                message=out.message,
                rows=ode.rows,
                **{k: v for k, v in {**out.extras, **ode.extras()}.items() if k in fields},
            )
        )
    return parts[0] if len(parts) == 1 else _merge(parts, result)


#: The keywords every entry point passes to :func:`run` unchanged.
PLAN_ARGS = (
    "steps", "spacing", "sigmas", "rtol", "atol", "max_nfe", "last_step", "return_trajectory",
    "return_partial", "check_finite", "steps_offset", "set_alpha_to_one", "rho", "batch_size",
    "process_group",
)  # fmt: skip


def plan_args(arguments: dict[str, Any]) -> dict[str, Any]:
    """The entry point's own arguments (``locals()``) that :func:`run` takes."""
    return {k: arguments[k] for k in PLAN_ARGS if k in arguments}


def _differentiable() -> list[str]:
    return [n for n in available_solvers(backends=False) if get_solver(n).differentiable]


def _merge(parts: list[SolveResult], result: Callable[..., SolveResult]) -> SolveResult:
    """One result from the chunks of a split batch (samples in order)."""
    worst = max(parts, key=lambda r: r.nfe)
    traj = None
    if parts[0].trajectory is not None:
        if any(not torch.equal(r.sigmas, parts[0].sigmas) for r in parts):
            raise ValueError(
                "return_trajectory with batch_size: the chunks visited different sigmas "
                "(an adaptive solver); pass sigmas= or solve without batch_size"
            )
        traj = torch.cat([r.trajectory for r in parts if r.trajectory is not None], dim=1)
    # Fields a result adds (a companion, the likelihood's delta, n_vjp): tensors hold the
    # batch along dimension 1 (``(2, batch, ...)``, ``(probes, batch)``), counts take the
    # costliest chunk's, as nfe does.
    extras: dict[str, Any] = {}
    base = {f.name for f in dataclasses.fields(SolveResult)}
    for f in dataclasses.fields(parts[0]):  # type: ignore[arg-type]
        if f.name in base:
            continue
        values = [getattr(r, f.name) for r in parts]
        if any(v is None for v in values):
            extras[f.name] = None
        elif isinstance(values[0], Tensor):
            extras[f.name] = torch.cat(values, dim=1)
        else:
            extras[f.name] = max(values)
    return result(
        x=torch.cat([r.x for r in parts]),
        nfe=worst.nfe,
        sigmas=worst.sigmas,
        n_accepted=worst.n_accepted,
        n_rejected=worst.n_rejected,
        trajectory=traj,
        finished=all(r.finished for r in parts),
        message=next((r.message for r in parts if r.message), ""),
        rows=sum(r.rows for r in parts),
        **extras,
    )


def sample(
    model: ODEModel,
    noise: Tensor,
    solver: str = "euler",
    *,
    steps: int | None = None,
    spacing: str = "trailing",
    sigmas: Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_nfe: int | None = None,
    last_step: LastStep = "euler",
    return_trajectory: bool = False,
    return_partial: bool = False,
    check_finite: bool = True,
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    rho: float = 7.0,
    batch_size: int | None = None,
    process_group: Any = None,
    **solver_options: Any,
) -> SolveResult:
    """Integrate the PF-ODE from ``noise`` (``x_T``) down a grid of sigmas to data.

    Args:
        model: ``eps = model(xbar, sigma)``, for example an :class:`~pflow.EpsModel`.
        noise: ``x_T ~ N(0, I)`` of shape ``(batch, ...)``; its dtype and device are kept.
        solver: a name from :func:`pflow.available_solvers`, optionally with options in
            brackets: ``"unipc[order=3,corrector=false]"`` (an option given both there and
            as a keyword is an error).
        steps: number of steps for a fixed-step solver (grid from ``spacing``).
        spacing: grid spacing for ``steps`` (see :func:`pflow.get_sigmas`).
        sigmas: an explicit decreasing grid instead of ``steps``. Adaptive solvers pass
            through every point of it and choose their own steps in between; by default
            they run from ``sigma_max`` to ``sigma_min`` and then into 0. A float64 tensor
            that requires grad makes the solve differentiable in the grid (for solvers
            that declare ``differentiable``: the Runge-Kutta tableaux and the exponential
            integrators).
        rtol, atol: tolerances of adaptive solvers (default ``1e-5`` each), measured in
            the network's scale per sample (RMS over the sample's elements).
        max_nfe: budget of network evaluations (default 100000 for adaptive solvers, none
            for fixed-step ones); exceeding it raises :class:`~pflow.MaxNFEExceeded`, or
            returns the last completed state with ``finished=False`` when
            ``return_partial`` is set.
        last_step: ``"euler"`` takes the step into ``sigma = 0`` as one Euler step (the
            network's ``x0_hat``, as DDIM and EDM do); ``"solver"`` integrates into 0 with
            the solver itself (for models defined at ``sigma = 0``), where the solver
            supports it (a clear error otherwise).
        return_trajectory: keep the state at every visited sigma.
        check_finite: raise :class:`~pflow.NonFiniteError` if the model returns NaN/inf.
        steps_offset, set_alpha_to_one, rho: grid options, see :func:`pflow.get_sigmas`.
        batch_size: solve at most this many samples at a time (peak memory is that of
            one chunk). Fixed-grid and stochastic solvers give the same samples whatever
            the split (stochastic ones draw per-sample keyed noise, see ``seed``); a
            shared-step adaptive solver chooses its steps per chunk. With chunks, ``nfe``,
            ``sigmas`` and the step counts are those of the chunk that cost the most.
        process_group: a ``torch.distributed`` group whose ranks each hold one shard of
            the batch: adaptive solvers then take the same steps on every rank, the
            steps one process with the whole batch would take (see
            :mod:`pflow.distributed`).
        solver_options: options of the solver (for adaptive ones: ``first_step``,
            ``per_sample``; for stochastic ones: ``seed``, an int or one key per sample
            from :func:`pflow.noise_keys`, or ``generator``).

    Returns:
        A :class:`SolveResult`.
    """
    if "companion" in solver_options:
        raise TypeError(
            "sample() does not take companion: a reversible solve that starts from one is "
            "pflow.decode(), which also returns the companion at its end"
        )
    return run(model, noise, solver, solver_options=solver_options, **plan_args(locals()))
