"""Linear multistep methods on ``eps`` in ``sigma``: iPNDM and LMS (Adams–Bashforth).

The PF-ODE ``d xbar / d sigma = eps`` is integrated over a step ``sigma -> sigma + h`` by
replacing ``eps`` with the polynomial through its last ``k`` values and integrating that
polynomial exactly:

    xbar_next = xbar + sum_j w_j eps_j,        w_j = int_sigma^{sigma+h} L_j(s) ds,

with ``L_j`` the Lagrange basis over the sigmas where ``eps_j`` was evaluated. Every step
costs one evaluation; the first ``k - 1`` steps use the history there is (order 1, 2, ...),
and order 1 is Euler, i.e. DDIM. As in :mod:`pflow.solvers.runge_kutta`, the update is
written around the current denoised estimate in the network's scale,

    x_next = C(sigma_next) * (x0_hat + (sigma + w_0) eps_0 + sum_{j>0} w_j eps_j),

with the weights computed in float64 as Python floats.

- ``lms`` (k-diffusion's and diffusers' ``LMSDiscreteScheduler``): the weights integrate
  the Lagrange basis numerically, with Gauss–Legendre quadrature that is exact for it.
- ``ipndm`` (iPNDM, Zhang & Chen, arXiv 2204.13902, appendix): Adams–Bashforth of order up
  to 4 with lower orders at the start. By default the weights are those of the actual,
  non-uniform sigma grid (the variable-step Adams–Bashforth weights, found here from the
  moment equations ``sum_j w_j u_j^n = int_0^1 u^n du`` in closed form rather than by
  quadrature); ``variable_step=False`` uses the paper's fixed weights
  ``(1)``, ``(3, -1)/2``, ``(23, -16, 5)/12``, ``(55, -59, 37, -9)/24``, which are exact only
  on a grid uniform in sigma (this is diffusers' ``IPNDMScheduler``). With variable steps
  ``ipndm`` and ``lms`` with ``order=4`` are the same method computed two ways.

The step into ``sigma = 0`` follows ``last_step``: one Euler step (``x0_hat`` of the last
evaluation) by default; with ``"solver"`` it is a full multistep step, which needs no
evaluation at 0 (as diffusers' LMS and iPNDM schedulers take it).

This module also holds the bookkeeping shared by every fixed-grid walk with a history
(visited sigmas, trajectory, linear combinations with float64 weights), used by
:mod:`pflow.solvers.exponential` as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import numpy as np
from torch import Tensor

from ..errors import MaxNFEExceeded
from . import SolverSpec, register
from .ode import PFODE, Outcome, scale

__all__ = ["ipndm", "lms", "ab_weights", "ab_weights_quadrature", "IPNDM_FIXED"]


# ----------------------------------------------------------------------------------------
# Shared bookkeeping of a walk along a fixed grid.


def lincomb(terms: Sequence[tuple[float, Tensor]]) -> Tensor:
    """``sum_j c_j * t_j`` for Python-float (float64) coefficients, skipping zero ones
    after the first (which makes the new tensor)."""
    (c0, t0), rest = terms[0], terms[1:]
    out = t0 * c0
    for c, t in rest:
        if c != 0.0:
            out.add_(t, alpha=c)
    return out


class Walk:
    """Visited sigmas and, when asked for, the state at each of them."""

    def __init__(self, x: Tensor, sigma: float, record: bool) -> None:
        self.sigmas = [sigma]
        self.trajectory = [x.clone()] if record else None
        self.finished, self.message = True, ""

    def visit(self, x: Tensor, sigma: float) -> None:
        self.sigmas.append(sigma)
        if self.trajectory is not None:
            self.trajectory.append(x.clone())

    def stop(self, exc: MaxNFEExceeded, partial: bool) -> None:
        """``max_nfe`` ran out: re-raise, or keep the last completed state when partial."""
        if not partial:
            raise exc
        self.finished, self.message = False, str(exc)

    def outcome(self, ode: PFODE, x: Tensor) -> Outcome:
        ode.raise_if_nonfinite()
        return Outcome(
            x,
            self.sigmas,
            n_accepted=len(self.sigmas) - 1,
            trajectory=self.trajectory,
            finished=self.finished,
            message=self.message,
        )


# ----------------------------------------------------------------------------------------
# Adams–Bashforth weights.

#: iPNDM's fixed Adams–Bashforth weights (uniform steps), newest ``eps`` first.
IPNDM_FIXED: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _nodes(sigmas: Sequence[float], h: float) -> np.ndarray:
    """The evaluation sigmas (newest first) in units of the step, relative to the newest:
    ``u_j = (sigma_j - sigma_0) / h`` (0, about -1, -2, ... on a uniform grid)."""
    s = np.asarray(sigmas, dtype=np.float64)
    return (s - s[0]) / h


def ab_weights(sigmas: Sequence[float], h: float) -> list[float]:
    """Variable-step Adams–Bashforth weights ``w_j = int_{sigma_0}^{sigma_0+h} L_j``.

    ``sigmas`` are the evaluation points, newest (the current sigma) first. In the step's
    own unit ``u = (s - sigma_0) / h`` the weights solve the moment equations
    ``sum_j w_j u_j^n = h / (n + 1)``, ``n < k``: the interpolating polynomial of any
    degree-``< k`` function is itself, so its integral must be exact.
    """
    u = _nodes(sigmas, h)
    k = len(u)
    if k == 1:
        return [h]
    vander = np.vander(u, k, increasing=True)  # vander[j, n] = u_j ** n
    moments = h / np.arange(1, k + 1, dtype=np.float64)
    return [float(w) for w in np.linalg.solve(vander.T, moments)]


def ab_weights_quadrature(sigmas: Sequence[float], h: float) -> list[float]:
    """The same weights by integrating each Lagrange basis polynomial numerically
    (Gauss–Legendre with ``k`` points, exact for degree ``k - 1``), as k-diffusion's and
    diffusers' LMS do with ``scipy.integrate.quad``."""
    u = _nodes(sigmas, h)
    k = len(u)
    points, gauss = _gauss_legendre(k)
    weights = []
    for j in range(k):
        basis = np.ones_like(points)
        for m in range(k):
            if m != j:
                basis *= (points - u[m]) / (u[j] - u[m])
        weights.append(h * float(np.dot(gauss, basis)))
    return weights


@cache
def _gauss_legendre(k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k``-point Gauss–Legendre nodes and weights on ``[0, 1]``."""
    points, gauss = np.polynomial.legendre.leggauss(k)
    return (points + 1) / 2, gauss / 2


def _fixed_weights(sigmas: Sequence[float], h: float) -> list[float]:
    return [h * c for c in IPNDM_FIXED[len(sigmas)]]


# ----------------------------------------------------------------------------------------
# The walk.


def _adams_bashforth(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    order: int,
    weights: Callable[[Sequence[float], float], list[float]],
    last_step: str,
    record: bool,
    partial: bool,
) -> Outcome:
    """Walk ``grid`` with Adams–Bashforth of order ``order`` on ``eps`` (lower orders while
    the history fills up); the history is a local list of ``(sigma, eps)``."""
    walk = Walk(x, grid[0], record)
    history: list[tuple[float, Tensor]] = []  # newest last
    try:
        for sigma, sigma_next in zip(grid[:-1], grid[1:]):
            ev = ode.eval(x, sigma)
            history = [*history, (sigma, ev.eps)][-order:]
            c = scale(sigma_next)
            if sigma_next == 0.0 and last_step == "euler":
                x = ev.x0 * c  # Euler into 0: x0_hat (C(0) = 1), as DDIM
            else:
                newest_first = history[::-1]
                w = weights([s for s, _ in newest_first], sigma_next - sigma)
                terms = [(c, ev.x0), (c * (sigma + w[0]), ev.eps)]
                terms += [(c * wj, eps) for wj, (_, eps) in zip(w[1:], newest_first[1:])]
                x = lincomb(terms)
            walk.visit(x, sigma_next)
    except MaxNFEExceeded as exc:
        walk.stop(exc, partial)
    return walk.outcome(ode, x)


def _check_order(order: int, lo: int, hi: int, name: str) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not lo <= order <= hi:
        raise ValueError(f"{name}: order must be an integer in [{lo}, {hi}], got {order!r}")
    return int(order)


def ipndm(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    order: int = 4,
    variable_step: bool = True,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
) -> Outcome:
    """iPNDM (arXiv 2204.13902, appendix): Adams–Bashforth on ``eps`` of order up to
    ``order`` (at most 4), one evaluation per step, lower orders while the history fills
    up (no Runge–Kutta warm-up, unlike PNDM).

    ``variable_step=True`` (default) uses the Adams–Bashforth weights of the actual sigma
    grid, order ``order`` on any smooth grid; ``variable_step=False`` the paper's fixed
    weights, exact on a grid uniform in sigma (diffusers' ``IPNDMScheduler``). With
    ``order=1`` (or on the first step) it is Euler, i.e. DDIM.
    """
    order = _check_order(order, 1, 4, "ipndm")
    weights = ab_weights if variable_step else _fixed_weights
    return _adams_bashforth(
        ode,
        x,
        grid,
        order=order,
        weights=weights,
        last_step=last_step,
        record=record,
        partial=partial,
    )


def lms(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    order: int = 4,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
) -> Outcome:
    """Linear multistep (k-diffusion's and diffusers' LMS): the last ``order`` values of
    ``eps`` interpolated over the actual sigma grid and the polynomial integrated over the
    step exactly (Gauss–Legendre quadrature). Order ``order`` once the history is full;
    ``order=1`` is Euler, i.e. DDIM."""
    order = _check_order(order, 1, 6, "lms")
    return _adams_bashforth(
        ode,
        x,
        grid,
        order=order,
        weights=ab_weights_quadrature,
        last_step=last_step,
        record=record,
        partial=partial,
    )


register(
    SolverSpec(
        "ipndm",
        False,
        4,
        ipndm,
        options=("order", "variable_step"),
        summary="iPNDM: Adams-Bashforth on eps up to 4th order, variable-step, 1 NFE per step",
    )
)
register(
    SolverSpec(
        "lms",
        False,
        4,
        lms,
        options=("order",),
        summary="linear multistep on eps, exact weights on the actual grid, 1 NFE per step",
    )
)
