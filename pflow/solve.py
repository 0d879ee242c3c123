"""The solve loop's front door: ``pflow.sample`` and its result.

Sampling integrates the PF-ODE from the top of the grid down. ``noise`` is ``x_T``, a
draw from N(0, I) in the network's own space, exactly what a DDIM sampler starts from:
the state at ``sigmas[0]`` is ``xbar = noise * sqrt(1 + sigmas[0]^2)``, and the result
is ``x = xbar / sqrt(1 + sigmas[-1]^2)`` (the data itself when the grid ends at 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .grids import get_sigmas, validate_sigmas
from .model import ODEModel
from .noise import noise_keys
from .schedule import NoiseSchedule
from .solvers import PFODE, get_solver
from .solvers import _options as _solver_options

__all__ = ["SolveResult", "sample"]

LastStep = Literal["euler", "solver"]


@dataclass
class SolveResult:
    """What a solve returns.

    Attributes:
        x: the final state in the network's scale (data space when the grid ends at 0).
        nfe: network evaluations made, counted by wrapping the model.
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


def _schedule_of(model: ODEModel) -> NoiseSchedule | None:
    schedule = getattr(model, "schedule", None)
    return schedule if isinstance(schedule, NoiseSchedule) else None


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


def _resolve_grid(
    model: ODEModel,
    adaptive: bool,
    steps: int | None,
    spacing: str,
    sigmas: Tensor | None,
    grid_options: dict[str, Any],
) -> Tensor:
    schedule = _schedule_of(model)
    if sigmas is not None:
        if steps is not None:
            raise ValueError("give either steps or sigmas, not both")
        return validate_sigmas(sigmas, schedule=schedule, name="sigmas")
    if schedule is None:
        raise ValueError("the model has no NoiseSchedule (model.schedule); pass sigmas=")
    if adaptive:
        if steps is not None:
            raise ValueError(
                "steps is for fixed-step solvers; an adaptive solver chooses its own steps "
                "from rtol and atol (pass sigmas= to fix the points it must pass through)"
            )
        end = [0.0] if grid_options.get("set_alpha_to_one", True) else []
        return validate_sigmas([schedule.sigma_max, schedule.sigma_min, *end], schedule=schedule)
    if steps is None:
        raise ValueError("steps is required for a fixed-step solver (or pass sigmas=)")
    return get_sigmas(schedule, steps, spacing, **grid_options)


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
        solver: a name from :func:`pflow.available_solvers`.
        steps: number of steps for a fixed-step solver (grid from ``spacing``).
        spacing: grid spacing for ``steps`` (see :func:`pflow.get_sigmas`).
        sigmas: an explicit decreasing grid instead of ``steps``. Adaptive solvers pass
            through every point of it and choose their own steps in between; by default
            they run from ``sigma_max`` to ``sigma_min`` and then into 0.
        rtol, atol: tolerances of adaptive solvers (default ``1e-5`` each), measured in
            the network's scale per sample (RMS over the sample's elements).
        max_nfe: budget of network evaluations (default 100000 for adaptive solvers, none
            for fixed-step ones); exceeding it raises :class:`~pflow.MaxNFEExceeded`, or
            returns the last completed state with ``finished=False`` when
            ``return_partial`` is set.
        last_step: ``"euler"`` takes the step into ``sigma = 0`` as one Euler step (the
            network's ``x0_hat``, as DDIM and EDM do); ``"solver"`` integrates into 0 with
            the solver itself (for models defined at ``sigma = 0``).
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
        solver_options: options of the solver (for adaptive ones: ``first_step``; for
            stochastic ones: ``seed``, an int or one key per sample from
            :func:`pflow.noise_keys`, or ``generator``).

    Returns:
        A :class:`SolveResult`.
    """
    noise = _check_state("noise", noise)
    spec = get_solver(solver)
    if last_step not in ("euler", "solver"):
        raise ValueError(f"last_step must be 'euler' or 'solver', got {last_step!r}")
    grid_options: dict[str, Any] = {
        "steps_offset": steps_offset,
        "set_alpha_to_one": set_alpha_to_one,
    }
    if spacing == "karras":
        grid_options["rho"] = rho
    grid = _resolve_grid(model, spec.adaptive, steps, spacing, sigmas, grid_options)
    if grid[-1] > grid[0]:
        raise ValueError("sigmas must decrease for sample(); an increasing grid encodes")
    options = dict(solver_options)
    if spec.adaptive:
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
    _solver_options(spec, solver_options)
    if process_group is not None and ":" in spec.name:
        raise ValueError(
            f"process_group: {spec.name!r} runs its own step control; use a native solver"
        )
    batch = noise.shape[0]
    if batch_size is None:
        batch_size = batch
    elif isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < batch:
        if process_group is not None and spec.adaptive:
            raise ValueError(
                "batch_size with process_group: ranks must solve their whole shard at once "
                "for an adaptive solver to take the same steps everywhere"
            )
        seed: Any = options.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            options["seed"] = noise_keys(seed, batch)  # the keys follow the samples
        elif seed is not None and len(seed) != batch:
            raise ValueError(f"seed must be an int or {batch} per-sample keys, got {len(seed)}")
    parts = []
    for start in range(0, batch, int(batch_size)):
        stop = start + int(batch_size)
        split = batch_size < batch and options.get("seed") is not None
        chunk = {k: v[start:stop] if k == "seed" and split else v for k, v in options.items()}
        parts.append(
            _run(
                model,
                noise[start:stop],
                spec.name,
                grid,
                max_nfe=max_nfe,
                last_step=last_step,
                record=return_trajectory,
                partial=return_partial,
                check_finite=check_finite,
                options=chunk,
                process_group=process_group,
            )
        )
    return parts[0] if len(parts) == 1 else _merge(parts)


def _merge(parts: list[SolveResult]) -> SolveResult:
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
    return SolveResult(
        x=torch.cat([r.x for r in parts]),
        nfe=worst.nfe,
        sigmas=worst.sigmas,
        n_accepted=worst.n_accepted,
        n_rejected=worst.n_rejected,
        trajectory=traj,
        finished=all(r.finished for r in parts),
        message=next((r.message for r in parts if r.message), ""),
    )


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _run(
    model: ODEModel,
    x: Tensor,
    solver: str,
    grid: Tensor,
    *,
    max_nfe: int | None,
    last_step: str,
    record: bool,
    partial: bool,
    check_finite: bool,
    options: dict[str, Any],
    process_group: Any = None,
) -> SolveResult:
    """Run a solver on a validated grid from the state ``x`` (network scale) at grid[0]."""
    spec = get_solver(solver)
    ode = PFODE(model, max_nfe=max_nfe, check_finite=check_finite, process_group=process_group)
    with torch.no_grad():
        out = spec.run(
            ode, x, grid.tolist(), last_step=last_step, record=record, partial=partial, **options
        )
    traj = torch.stack(out.trajectory) if out.trajectory is not None else None
    return SolveResult(
        x=out.x,
        nfe=ode.nfe,
        sigmas=torch.tensor(out.sigmas, dtype=torch.float64),
        n_accepted=out.n_accepted,
        n_rejected=out.n_rejected,
        trajectory=traj,
        finished=out.finished,
        message=out.message,
    )
