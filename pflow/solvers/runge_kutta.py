"""One generic explicit Runge–Kutta stepper, driven by a :class:`ButcherTableau`, on a
fixed grid or under a PI step-size controller.

A step from ``sigma`` to ``sigma + h`` of ``d xbar / d sigma = eps`` computes the stages

    xbar_i = xbar + h * sum_{j<i} a_ij k_j,        k_i = eps(xbar_i, sigma + c_i h),

and ``xbar_next = xbar + h * sum_i b_i k_i``, all written in the network's scale (see
:mod:`pflow.solvers.ode`). With the Euler tableau and a DDIM grid this *is* DDIM
(arXiv 2010.02502, eq. 13 and 14).

The step into ``sigma = 0``: a network trained on ``t = 0 .. N-1`` is not defined below
the schedule's ``sigma_min``, so by default (``last_step="euler"``) every method takes
its final step into ``sigma = 0`` as one Euler step, which returns the network's own
denoised estimate ``x0_hat = xbar - sigma * eps``: EDM's Algorithm 1 does this for Heun,
so ``N`` Heun steps cost ``2N - 1`` evaluations; DDIM does it too. With
``last_step="solver"`` the method integrates all the way to 0 (right for models
defined at ``sigma = 0``, such as the exact Gaussian mixture).
"""

from __future__ import annotations

import math

from torch import Tensor

from ..errors import MaxNFEExceeded
from .controller import PIController, error_ratio, rms_per_sample
from .ode import PFODE, Evaluation, Outcome, scale, walk
from .tableau import EULER, ButcherTableau

__all__ = ["rk_step", "solve_fixed", "solve_adaptive"]


def _combine(base: Tensor, base_coef: float, ks: list[Tensor], coefs: list[float]) -> Tensor:
    """``base * base_coef + sum_j coefs[j] * ks[j]``, skipping zero weights."""
    out = base * base_coef if base_coef != 1.0 else base.clone()
    for k, w in zip(ks, coefs):
        if w != 0.0:
            out.add_(k, alpha=w)
    return out


def _stage(
    first: Evaluation,
    ks: list[Tensor],
    weights: tuple[float, ...],
    sigma: float,
    h: float,
    sigma_i: float,
) -> Tensor:
    """``C(sigma_i) * (xbar + h * sum_j weights[j] * ks[j])`` with ``xbar`` written as
    ``x0_hat + sigma * eps`` of the first stage: the well-conditioned form."""
    c_i = scale(sigma_i)
    coefs = [c_i * (sigma + h * weights[0])] + [c_i * h * w for w in weights[1:]]
    return _combine(first.x0, c_i, ks, coefs)


def rk_step(
    ode: PFODE,
    tab: ButcherTableau,
    x: Tensor,
    sigma: float,
    h: float,
    first: Evaluation | None = None,
) -> tuple[Tensor, Tensor | None, list[Evaluation]]:
    """One step of ``tab`` from ``(x, sigma)`` to ``sigma + h``.

    Every stage state is written around the first stage's denoised estimate,
    ``xbar_i = x0_hat + (sigma + h a_i1) eps_1 + h sum_{j>1} a_ij eps_j``, and kept in the
    network's scale: for Euler this is DDIM's own ``x0_hat + sigma_next * eps``.

    Args:
        x: state in the network's scale at ``sigma``.
        first: the evaluation at ``(x, sigma)`` if already known (FSAL), saving one NFE.

    Returns:
        ``(x_next, err, evals)``: the new state, the embedded error estimate in the
        network's scale (``None`` for a method without one) and the stage evaluations.
    """
    sigma_next = sigma + h
    evals = [first if first is not None else ode.eval(x, sigma)]
    ks = [evals[0].eps]
    x_next: Tensor | None = None
    for i in range(1, tab.stages):
        s_i = sigma + tab.c[i] * h if tab.c[i] != 1.0 else sigma_next
        x_i = _stage(evals[0], ks, tab.a[i], sigma, h, s_i)
        if tab.fsal and i == tab.stages - 1:
            x_next = x_i
        evals.append(ode.eval(x_i, s_i))
        ks.append(evals[-1].eps)
    if x_next is None:
        x_next = _stage(evals[0], ks, tab.b, sigma, h, sigma_next)
    c_next = scale(sigma_next)
    err = _combine(x, 0.0, ks, [c_next * h * e for e in tab.e]) if tab.adaptive else None
    return x_next, err, evals


def _euler_into(
    ode: PFODE, x: Tensor, sigma: float, sigma_next: float, first: Evaluation | None = None
) -> Tensor:
    return rk_step(ode, EULER, x, sigma, sigma_next - sigma, first=first)[0]


def solve_fixed(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    tableau: ButcherTableau,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
) -> Outcome:
    """Walk ``grid`` with one step of ``tableau`` per interval."""

    def step(x: Tensor, sigma: float, sigma_next: float) -> Tensor:
        if sigma_next == 0.0 and last_step == "euler":
            return _euler_into(ode, x, sigma, sigma_next)
        return rk_step(ode, tableau, x, sigma, sigma_next - sigma)[0]

    return walk(ode, x, grid, step, record=record, partial=partial)


def _initial_step(
    ode: PFODE,
    tab: ButcherTableau,
    x: Tensor,
    sigma: float,
    k0: Tensor,
    direction: float,
    span: float,
    rtol: float,
    atol: float,
) -> float:
    """Hairer, Norsett & Wanner's starting step (Solving ODEs I, II.4), measured in the
    network's scale. Costs one evaluation."""
    sc = atol + rtol * x.abs()
    c0 = scale(sigma)
    # d x / d sigma in the network's scale: -sigma / (1 + sigma^2) * x + C(sigma) * eps.
    f0 = x * (-sigma * c0 * c0) + k0 * c0
    d0 = ode.batch_max(rms_per_sample(x / sc))
    d1 = ode.batch_max(rms_per_sample(f0 / sc))
    h0 = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6
    h0 = min(h0, span)
    s1 = sigma + direction * h0
    c1 = scale(s1)
    x1 = x + f0 * (direction * h0)
    k1 = ode.eps(x1, s1)
    f1 = x1 * (-s1 * c1 * c1) + k1 * c1
    d2 = ode.batch_max(rms_per_sample((f1 - f0) / sc)) / h0
    dmax = max(d1, d2)
    h1 = (0.01 / dmax) ** (1.0 / (tab.order + 1)) if dmax > 1e-15 else max(1e-6, h0 * 1e-3)
    return min(100 * h0, h1, span)


def solve_adaptive(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    tableau: ButcherTableau,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
) -> Outcome:
    """Integrate through every point of ``grid`` with an embedded pair and PI control.

    The points of ``grid`` are hit exactly (they are where the trajectory is recorded);
    between them the controller chooses the steps. The step is shared by the whole batch:
    it is accepted when every sample's error ratio is at most 1 (every sample on every
    rank, when the :class:`PFODE` has a process group).
    """
    controller = PIController(order=1 + min(tableau.order, tableau.error_order or 1))
    visited = [grid[0]]
    traj = [x.clone()] if record else None
    n_acc = n_rej = 0
    k: Evaluation | None = None  # the evaluation at (x, sigma) when known (FSAL)
    h_abs: float | None = first_step
    sigma = grid[0]
    finished, message = True, ""
    try:
        for target in grid[1:]:
            direction = 1.0 if target > sigma else -1.0
            if target == 0.0 and last_step == "euler":
                x = _euler_into(ode, x, sigma, target, first=k)
                k, sigma = None, target
                n_acc += 1
                visited.append(sigma)
                if traj is not None:
                    traj.append(x.clone())
                continue
            while sigma != target:
                if k is None:
                    k = ode.eval(x, sigma)
                remaining = abs(target - sigma)
                if h_abs is None:
                    h_abs = _initial_step(
                        ode, tableau, x, sigma, k.eps, direction, remaining, rtol, atol
                    )
                clipped = h_abs >= remaining * (1 - 1e-12)
                h = direction * (remaining if clipped else h_abs)
                x_next, err, evals = rk_step(ode, tableau, x, sigma, h, first=k)
                assert err is not None
                ratio = ode.batch_max(error_ratio(err, x, x_next, rtol, atol))
                if not math.isfinite(ratio):
                    ode.raise_if_nonfinite()
                ode.forget_finite()
                accepted = ratio <= 1.0
                h_new = abs(controller.propose(h, ratio, accepted))
                if accepted:
                    n_acc += 1
                    x = x_next
                    sigma = target if clipped else sigma + h
                    k = evals[-1] if tableau.fsal else None
                    visited.append(sigma)
                    if traj is not None:
                        traj.append(x.clone())
                    # A step cut short to land on a grid point says nothing about the
                    # step size the error allows: keep the longer proposal.
                    h_abs = max(h_new, h_abs) if clipped else h_new
                else:
                    n_rej += 1
                    h_abs = h_new
                if h_abs < 1e-14 * max(1.0, abs(sigma)):
                    raise FloatingPointError(
                        f"step size underflow at sigma={sigma:.6g}: the error estimate does not "
                        f"fall as the step shrinks (rtol={rtol}, atol={atol} may be below the "
                        f"dtype's round-off)"
                    )
    except MaxNFEExceeded as exc:
        if not partial:
            raise
        finished, message = False, str(exc)
    ode.raise_if_nonfinite()
    return Outcome(
        x,
        visited,
        n_accepted=n_acc,
        n_rejected=n_rej,
        trajectory=traj,
        finished=finished,
        message=message,
    )
