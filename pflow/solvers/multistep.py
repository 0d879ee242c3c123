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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np

from .base import Option, Solver, State, StepInfo, lincomb, scale
from .ode import PFODE

__all__ = ["AdamsBashforth", "ab_weights", "ab_weights_quadrature", "IPNDM_FIXED", "SOLVERS"]


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
# The step.

Weights = Callable[[Sequence[float], float], list[float]]


class AdamsBashforth(Solver):
    """Adams–Bashforth of order up to ``order`` on ``eps`` in ``sigma``, lower orders while
    the history ``(sigma, eps)`` fills up; one evaluation per step. ``order=1`` is Euler,
    i.e. DDIM. With ``last_step="solver"`` the step into 0 is a full multistep step, which
    needs no evaluation at 0 (as diffusers' LMS and iPNDM schedulers take it)."""

    last_steps = ("euler", "solver")
    ddim_options = {"order": 1}

    def __init__(
        self,
        name: str,
        top: int,
        default: int,
        summary: str,
        weights: Weights,
        fixed: Weights | None = None,
    ) -> None:
        self.name, self.summary = name, summary
        self.order = self.history = default
        self._weights, self._fixed = weights, fixed
        self.options: tuple[Option, ...] = (
            Option("order", int, default, "order once the history is full", low=1, high=top),
        )
        if fixed is not None:
            self.options += (
                Option(
                    "variable_step",
                    bool,
                    True,
                    "weights of the actual grid (False: the paper's, exact on uniform grids)",
                ),
            )

    def step(
        self, ode: PFODE, state: State, sigma_next: Any, options: dict[str, Any], info: StepInfo
    ) -> State:
        sigma = float(state.sigma)
        sigma_next = float(sigma_next)
        ev = state.ev if state.ev is not None else ode.eval(state.x, sigma)
        history = (*state.history, (sigma, ev.eps))[-options["order"] :]
        weights = self._weights
        if self._fixed is not None and not options["variable_step"]:
            weights = self._fixed
        newest_first = history[::-1]
        w = weights([s for s, _ in newest_first], sigma_next - sigma)
        c = scale(sigma_next)
        terms = [(c, ev.x0), (c * (sigma + w[0]), ev.eps)]
        terms += [(c * wj, eps) for wj, (_, eps) in zip(w[1:], newest_first[1:])]
        return State(lincomb(terms), sigma_next, history=history)


SOLVERS = (
    AdamsBashforth(
        "ipndm",
        4,
        4,
        "iPNDM: Adams-Bashforth on eps up to 4th order, variable-step, 1 NFE per step",
        ab_weights,
        fixed=_fixed_weights,
    ),
    AdamsBashforth(
        "lms",
        6,
        4,
        "linear multistep on eps, exact weights on the actual grid, 1 NFE per step",
        ab_weights_quadrature,
    ),
)
