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

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .model import ODEModel
from .solve import LastStep, SolveResult, plan_args, run
from .solvers import get_solver, parse_solver
from .solvers.reversible import companion_shape

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


def _check_companion(companion: Tensor | None, x: Tensor, name: str, solver: Any) -> None:
    if companion is None or not isinstance(x, Tensor):
        return
    try:
        spec = parse_solver(solver)[0]
    except (ValueError, TypeError):
        return  # the plan reports the solver
    if not spec.reversible:
        reversible = ", ".join(_reversible())
        raise ValueError(
            f"companion is the second state of a reversible solver ({reversible}); "
            f"solver {spec.name!r} does not take one"
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


def _reversible() -> list[str]:
    from .solvers import available_solvers

    return [n for n in available_solvers(backends=False) if get_solver(n).reversible]


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
    batch_size: int | None = None,
    process_group: Any = None,
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
        rtol, atol, max_nfe, return_trajectory, return_partial, check_finite, batch_size,
            process_group: as for :func:`pflow.sample` (a companion is split with its
            samples).
        companion: for ``solver="alf"``, the companion at ``sigmas[0]`` (from a
            :func:`decode` that ended there); by default it is started from the model.
        solver_options: options of the solver.

    Returns:
        An :class:`InversionResult`: ``x`` is the latent in the network's scale at the last
        sigma (``x_T`` when that is ``sigma_max``); ``companion`` is set for ``alf``.
    """
    _check_companion(companion, x0, "x0", solver)
    if companion is not None:
        solver_options["companion"] = companion
    res = run(
        model,
        x0,
        solver,
        direction="up",
        name="x0",
        caller="encode",
        solver_options=solver_options,
        result=InversionResult,
        **plan_args(locals()),
    )
    assert isinstance(res, InversionResult)
    return res


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
    batch_size: int | None = None,
    process_group: Any = None,
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
    _check_companion(companion, z, "z", solver)
    if companion is not None:
        solver_options["companion"] = companion
    res = run(
        model,
        z,
        solver,
        direction="down",
        name="z",
        caller="decode",
        solver_options=solver_options,
        result=InversionResult,
        **plan_args(locals()),
    )
    assert isinstance(res, InversionResult)
    return res
