"""The one loop: walks a grid with any solver's step and owns the bookkeeping.

:func:`integrate` takes a validated grid and a solver (:class:`~pflow.solvers.base.Solver`)
and does, once for every solver:

- the walk: one ``solver.step`` per interval of a fixed grid, or for an adaptive solver
  trial steps between the grid points under :func:`~pflow.solvers.controller.pi_control`,
  shared by the batch (and by every rank of a process group) or per sample;
- ``last_step``: with ``"euler"`` the step into ``sigma = 0`` is one Euler step, the
  denoised estimate ``x0_hat`` of the evaluation at the last positive sigma (DDIM's and
  EDM's last step), taken here and not by the solver; with ``"solver"`` the solver steps
  into 0 itself, if it declares it can;
- the NFE budget: when :class:`~pflow.MaxNFEExceeded` interrupts a step, the last
  completed state is returned with ``finished=False`` (``partial``) or the error raised;
- the trajectory (the state at every visited sigma) and the visited sigmas;
- the NaN/inf watch: :meth:`PFODE.raise_if_nonfinite` before anything is returned.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import MaxNFEExceeded
from .base import Outcome, Solver, State, StepInfo, as_float, is_zero, lincomb
from .controller import PIGains, initial_step, pi_control, underflow
from .ode import PFODE, Evaluation

__all__ = ["integrate", "euler_into_zero"]

_F64 = torch.float64


def euler_into_zero(ode: PFODE, state: State) -> State:
    """The step into ``sigma = 0`` as one Euler step: ``x0_hat`` of the evaluation at the
    state (the cached one when the solver left it, e.g. FSAL), ``C(0) = 1``."""
    ev = state.ev if state.ev is not None else ode.eval(state.x, state.sigma)
    return State(lincomb([(1.0, ev.x0)]), 0.0)


def integrate(
    ode: PFODE,
    solver: Solver,
    x: Tensor,
    grid: list[Any],
    options: dict[str, Any],
    *,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
) -> Outcome:
    """Integrate from the state ``x`` (network scale) at ``grid[0]`` through every point of
    ``grid`` (Python floats, or 0-d float64 tensors for a differentiable solve) with
    ``solver`` and its resolved ``options``."""
    if solver.adaptive and options.get("per_sample"):
        return _per_sample(
            ode, solver, x, [float(s) for s in grid], options, last_step, record, partial
        )
    walk = Walk(solver.init(ode, x, grid[0], options), record)
    try:
        if solver.external:
            _external(ode, solver, walk, [float(s) for s in grid], options, last_step)
        elif solver.adaptive:
            _shared(ode, solver, walk, grid, options, last_step)
        else:
            _fixed(ode, solver, walk, grid, options, last_step)
    except MaxNFEExceeded as exc:
        if not partial:
            raise
        walk.finished, walk.message = False, str(exc)
    ode.raise_if_nonfinite()
    return walk.outcome(solver.extras(walk.last))


class Walk:
    """Visited sigmas, rejected steps, the trajectory and the last complete state: what
    a solve has done so far (a partial result is ``last``)."""

    def __init__(self, state: State, record: bool) -> None:
        self.sigmas = [as_float(state.sigma)]
        self.trajectory = [state.x.clone()] if record else None
        self.last = state
        self.n_rejected = 0
        self.finished, self.message = True, ""

    def visit(self, state: State) -> None:
        """``state`` is complete: a step (or an accepted adaptive step) ended there."""
        self.last = state
        sigma = state.sigma
        self.sigmas.append(sigma if type(sigma) is float else as_float(sigma))
        if self.trajectory is not None:
            self.trajectory.append(state.x.clone())

    def outcome(self, extras: dict[str, Any]) -> Outcome:
        return Outcome(
            self.last.x,
            self.sigmas,
            n_accepted=len(self.sigmas) - 1,
            n_rejected=self.n_rejected,
            trajectory=self.trajectory,
            finished=self.finished,
            message=self.message,
            extras=extras,
        )


def _fixed(
    ode: PFODE,
    solver: Solver,
    walk: Walk,
    grid: list[Any],
    options: dict[str, Any],
    last_step: str,
) -> None:
    """One step per interval of ``grid``."""
    n = len(grid) - 1
    euler_end = last_step == "euler" and is_zero(grid[-1])
    for i, sigma_next in enumerate(grid[1:]):
        if euler_end and i == n - 1:
            walk.visit(euler_into_zero(ode, walk.last))
        else:
            walk.visit(solver.step(ode, walk.last, sigma_next, options, StepInfo(i, n)))


def _external(
    ode: PFODE,
    solver: Solver,
    walk: Walk,
    grid: list[float],
    options: dict[str, Any],
    last_step: str,
) -> None:
    """Another library's loop through ``grid``, visiting as it goes (``solver.solve``),
    then the Euler step into 0 when asked for."""
    euler_end = last_step == "euler" and grid[-1] == 0.0
    points = grid[:-1] if euler_end else grid
    if len(points) > 1:
        solver.solve(ode, walk.last.x, points, options, walk)  # type: ignore[attr-defined]
    if euler_end:
        walk.visit(euler_into_zero(ode, walk.last))


def _gains(solver: Solver) -> PIGains:
    error_order = getattr(solver, "error_order", None) or 1
    return PIGains(order=1 + min(solver.order, error_order))


def _shared(
    ode: PFODE,
    solver: Solver,
    walk: Walk,
    grid: list[Any],
    options: dict[str, Any],
    last_step: str,
) -> None:
    """Adaptive steps shared by the batch, through every point of ``grid``. Accepted
    steps are visited; ``walk.n_rejected`` counts the rest."""
    rtol, atol = options["rtol"], options["atol"]
    gains = _gains(solver)
    prev = 1.0
    h_abs: float | None = options.get("first_step")
    state = walk.last
    sigma = float(state.sigma)
    for target in grid[1:]:
        target = float(target)
        direction = 1.0 if target > sigma else -1.0
        if last_step == "euler" and target == 0.0:
            state = euler_into_zero(ode, state)
            sigma = 0.0
            walk.visit(state)
            continue
        while sigma != target:
            if state.ev is None:
                state.ev = ode.eval(state.x, sigma)
            remaining = abs(target - sigma)
            if h_abs is None:
                h_abs = float(
                    initial_step(
                        ode,
                        solver.order,
                        state.x,
                        torch.tensor(sigma, dtype=_F64),
                        state.ev.eps,
                        direction,
                        torch.tensor(remaining, dtype=_F64),
                        rtol,
                        atol,
                        lambda v: torch.tensor(ode.batch_max(v), dtype=_F64),
                    )
                )
            clipped = h_abs >= remaining * (1 - 1e-12)
            h = direction * (remaining if clipped else h_abs)
            sigma_next = target if clipped else sigma + h
            new, ratios = solver.attempt(ode, state, sigma_next, options)
            ratio = ode.batch_max(ratios)
            if not math.isfinite(ratio):
                ode.raise_if_nonfinite()
            ode.forget_finite()
            accepted, h_new, prev = pi_control(gains, ratio, prev, h)
            if accepted:
                state, sigma = new, sigma_next
                walk.visit(state)
                # A step cut short to land on a grid point says nothing about the step size
                # the error allows: keep the longer proposal.
                h_abs = max(float(h_new), h_abs) if clipped else float(h_new)
            else:
                walk.n_rejected += 1
                h_abs = float(h_new)
            if underflow(h_abs, sigma):
                raise FloatingPointError(
                    f"step size underflow at sigma={sigma:.6g}: the error estimate does not "
                    f"fall as the step shrinks (rtol={rtol}, atol={atol} may be below the "
                    "dtype's round-off)"
                )


def _per_sample(
    ode: PFODE,
    solver: Solver,
    x: Tensor,
    grid: list[float],
    options: dict[str, Any],
    last_step: str,
    record: bool,
    partial: bool,
) -> Outcome:
    """Each sample through every point of ``grid`` with its own steps (Gotta Go Fast,
    arXiv 2105.14080): its own sigma, step size, controller memory and cached evaluation.
    Each trial step is one batched ``solver.attempt`` on the samples still running, with a
    float64 sigma per sample; accept/reject is per sample; finished samples leave the
    batch. A sample takes exactly the steps it would take alone.

    With ``partial`` and ``max_nfe`` exhausted, ``x`` holds each sample at the sigma it had
    reached (the message gives their range) and ``sigmas`` the grid points every sample
    had passed."""
    rtol, atol = options["rtol"], options["atol"]
    first_step = options.get("first_step")
    gains = _gains(solver)
    n, dev = x.shape[0], x.device
    direction = 1.0 if grid[-1] > grid[0] else -1.0
    points = torch.tensor(grid, dtype=_F64)
    euler_end = last_step == "euler" and grid[-1] == 0.0
    end = len(grid)

    # Per-sample control state on the host (the accept/reject decision syncs once a step).
    sigma = torch.full((n,), grid[0], dtype=_F64)
    nxt = torch.ones(n, dtype=torch.long)  # index of each sample's next grid point
    h_abs = torch.zeros(n, dtype=_F64)
    prev_ratio = torch.ones(n, dtype=_F64)
    n_acc = torch.zeros(n, dtype=torch.long)
    n_rej = torch.zeros(n, dtype=torch.long)
    x = x.clone()
    traj = [x.clone()] + [torch.full_like(x, float("nan")) for _ in grid[1:]] if record else None
    finished, message = True, ""
    eps_k = x0_k = x  # the cached evaluation per sample, set below

    def land(ids: Tensor) -> None:
        """``ids`` have just reached ``grid[nxt]``: record them and aim at the next point."""
        if traj is not None:
            for j in nxt[ids].unique().tolist():
                at = ids[nxt[ids] == j].to(dev)
                traj[j].index_copy_(0, at, x[at])
        nxt[ids] += 1

    def into_zero(ids: Tensor) -> None:
        """Those of ``ids`` whose next point is the final 0 take it as one Euler step: the
        cached evaluation's ``x0_hat``, no new NFE."""
        if not euler_end:
            return
        due = ids[nxt[ids] == end - 1]
        if due.numel():
            dd = due.to(dev)
            x.index_copy_(0, dd, x0_k[dd])
            sigma[due] = 0.0
            n_acc[due] += 1
            nxt[due] += 1
            if traj is not None:
                traj[-1].index_copy_(0, dd, x[dd])

    try:
        first = ode.eval(x, sigma.to(dev))
        eps_k, x0_k = first.eps.clone(), first.x0.clone()
        into_zero(torch.arange(n))  # a grid that is one step into 0
        active = (nxt < end).nonzero().squeeze(1)
        if active.numel():
            span = (points[nxt[active]] - sigma[active]).abs()
            if first_step is not None:
                h_abs[active] = torch.minimum(torch.full_like(span, float(first_step)), span)
            else:
                ad = active.to(dev)
                ode.select(None if active.numel() == n else ad)
                h_abs[active] = initial_step(
                    ode,
                    solver.order,
                    x[ad],
                    sigma[active],
                    eps_k[ad],
                    direction,
                    span,
                    rtol,
                    atol,
                    lambda v: v,
                )
        while active.numel():
            ad = active.to(dev)
            s = sigma[active]
            target = points[nxt[active]]
            remaining = (target - s).abs()
            ha = h_abs[active]
            clipped = ha >= remaining * (1 - 1e-12)
            h = torch.where(clipped, target - s, direction * ha)
            s_next = torch.where(clipped, target, s + h)
            xa = x[ad]
            start = State(xa, s, ev=Evaluation(xa, s, eps_k[ad], x0_k[ad]))
            ode.select(None if active.numel() == n else ad)  # conditioning rows follow
            new, ratio = solver.attempt(ode, start, s_next, options)
            ratio = ratio.cpu()
            if not bool(torch.isfinite(ratio).all()):
                ode.raise_if_nonfinite()
            ode.forget_finite()
            acc, h_new, prev_ratio[active] = pi_control(gains, ratio, prev_ratio[active], h)
            n_acc[active] += acc.long()
            n_rej[active] += (~acc).long()
            h_abs[active] = torch.where(acc & clipped, torch.maximum(h_new, ha), h_new)
            if bool(acc.any()):
                pos = acc.nonzero().squeeze(1)
                ids, posd = active[pos], pos.to(dev)
                idd = ids.to(dev)
                x.index_copy_(0, idd, new.x[posd])
                if new.ev is not None:
                    eps_k.index_copy_(0, idd, new.ev.eps[posd])
                    x0_k.index_copy_(0, idd, new.ev.x0[posd])
                sigma[ids] = s_next[pos]
                landed = ids[clipped[pos]]
                if landed.numel():
                    land(landed)
                if new.ev is None:  # not FSAL: evaluate where the samples still running are
                    going = ids[nxt[ids] < end]
                    if going.numel():
                        gd = going.to(dev)
                        ode.select(None if going.numel() == n else gd)
                        ev = ode.eval(x[gd], sigma[going].to(dev))
                        eps_k.index_copy_(0, gd, ev.eps)
                        x0_k.index_copy_(0, gd, ev.x0)
                if landed.numel():
                    into_zero(landed)
            active = (nxt < end).nonzero().squeeze(1)
            tiny = h_abs[active] < 1e-14 * sigma[active].abs().clamp(min=1.0)
            if bool(tiny.any()):
                i = int(active[tiny.nonzero()[0, 0]])
                raise FloatingPointError(
                    f"step size underflow for sample {i} at sigma={float(sigma[i]):.6g}: the "
                    f"error estimate does not fall as the step shrinks (rtol={rtol}, "
                    f"atol={atol} may be below the dtype's round-off)"
                )
    except MaxNFEExceeded as exc:
        if not partial:
            raise
        reached = sigma.tolist()
        finished = False
        message = (
            f"{exc} (per-sample steps: res.x holds each sample at the sigma it reached, "
            f"from {min(reached):.6g} to {max(reached):.6g})"
        )
    ode.raise_if_nonfinite()
    passed = end if finished else int(nxt.min())
    return Outcome(
        x,
        list(grid[:passed]),
        n_accepted=int(n_acc.sum()),
        n_rejected=int(n_rej.sum()),
        trajectory=traj[:passed] if traj is not None else None,
        finished=finished,
        message=message,
    )
