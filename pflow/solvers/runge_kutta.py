"""Explicit Runge–Kutta methods: one generic step driven by a :class:`ButcherTableau`.

A step from ``sigma`` to ``sigma + h`` of ``d xbar / d sigma = eps`` computes the stages

    xbar_i = xbar + h * sum_{j<i} a_ij k_j,        k_i = eps(xbar_i, sigma + c_i h),

and ``xbar_next = xbar + h * sum_i b_i k_i``, all written in the network's scale (see
:mod:`pflow.solvers.base`). With the Euler tableau and a DDIM grid this *is* DDIM
(arXiv 2010.02502, eq. 13 and 14). An embedded pair (``b_hat``) also returns its error
estimate, and the driver steps it under the PI controller, shared by the batch or per
sample (``per_sample=True``).

The step into ``sigma = 0``: a network trained on ``t = 0 .. N-1`` is not defined below
the schedule's ``sigma_min``, so by default (``last_step="euler"``) the driver takes it as
one Euler step, the network's own denoised estimate ``x0_hat = xbar - sigma * eps``: EDM's
Algorithm 1 does this for Heun, so ``N`` Heun steps cost ``2N - 1`` evaluations; DDIM does
it too. With ``last_step="solver"`` the method integrates all the way to 0 (right for
models defined at ``sigma = 0``, such as the exact Gaussian mixture).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import Option, Sigma, Solver, State, StepInfo, lincomb, scale
from .controller import error_ratio
from .ode import PFODE, Evaluation
from .tableau import BOSH3, DOPRI5, EULER, HEUN, MIDPOINT, RK4, ButcherTableau

__all__ = ["rk_step", "RungeKutta", "EmbeddedRungeKutta"]


def _stage(
    first: Evaluation,
    ks: list[Tensor],
    weights: tuple[float, ...],
    sigma: Sigma,
    h: Sigma,
    sigma_i: Sigma,
) -> Tensor:
    """``C(sigma_i) * (xbar + h * sum_j weights[j] * ks[j])`` with ``xbar`` written as
    ``x0_hat + sigma * eps`` of the first stage: the well-conditioned form."""
    c_i = scale(sigma_i)
    terms: list[tuple[Sigma, Tensor]] = [(c_i, first.x0), (c_i * (sigma + h * weights[0]), ks[0])]
    if len(weights) > 1:
        terms += [(c_i * h * w, k) for w, k in zip(weights[1:], ks[1:]) if w != 0.0]
    return lincomb(terms)


def rk_step(
    ode: PFODE,
    tab: ButcherTableau,
    x: Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    first: Evaluation | None = None,
) -> tuple[Tensor, Tensor | None, list[Evaluation]]:
    """One step of ``tab`` from ``(x, sigma)`` to ``sigma_next``.

    Every stage state is written around the first stage's denoised estimate,
    ``xbar_i = x0_hat + (sigma + h a_i1) eps_1 + h sum_{j>1} a_ij eps_j``, and kept in the
    network's scale: for Euler this is DDIM's own ``x0_hat + sigma_next * eps``. Sigmas are
    floats, per-sample float64 tensors or 0-d tensors in a graph.

    Args:
        x: state in the network's scale at ``sigma``.
        first: the evaluation at ``(x, sigma)`` if already known (FSAL), saving one NFE.

    Returns:
        ``(x_next, err, evals)``: the new state, the embedded error estimate in the
        network's scale (``None`` for a method without one) and the stage evaluations.
    """
    h = sigma_next - sigma
    evals = [first if first is not None else ode.eval(x, sigma)]
    ks = [evals[0].eps]
    x_next: Tensor | None = None
    for i in range(1, tab.stages):
        s_i = sigma_next if tab.c[i] == 1.0 else sigma + tab.c[i] * h
        x_i = _stage(evals[0], ks, tab.a[i], sigma, h, s_i)
        if tab.fsal and i == tab.stages - 1:
            x_next = x_i
        evals.append(ode.eval(x_i, s_i))
        ks.append(evals[-1].eps)
    if x_next is None:
        x_next = _stage(evals[0], ks, tab.b, sigma, h, sigma_next)
    err = None
    if tab.adaptive:
        c_next = scale(sigma_next)
        err = lincomb([(c_next * h * e, k) for e, k in zip(tab.e, ks) if e != 0.0])
    return x_next, err, evals


class RungeKutta(Solver):
    """A fixed-step explicit Runge–Kutta method given by its tableau."""

    last_steps = ("euler", "solver")
    differentiable = True

    def __init__(self, tableau: ButcherTableau, summary: str, name: str | None = None) -> None:
        self.tableau = tableau
        self.name = name or tableau.name
        self.summary = summary
        self.order = tableau.order
        self.nfe_per_step = tableau.stages - (1 if tableau.fsal else 0)
        self.ddim_options = {} if tableau.stages == 1 else None

    def step(
        self, ode: PFODE, state: State, sigma_next: Sigma, options: dict[str, Any], info: StepInfo
    ) -> State:
        x_next, _, evals = rk_step(ode, self.tableau, state.x, state.sigma, sigma_next, state.ev)
        return State(x_next, sigma_next, ev=evals[-1] if self.tableau.fsal else None)


_TOLERANCE = dict(kind=float, default=1e-5, low=0.0, low_open=True)


class EmbeddedRungeKutta(RungeKutta):
    """An embedded pair under the PI controller: the driver proposes each step, this
    attempts it and reports the per-sample error ratio (pflow's RMS norm in the network's
    scale, :func:`~pflow.solvers.controller.error_ratio`)."""

    adaptive = True
    per_sample = True
    differentiable = False
    options: tuple[Option, ...] = (
        Option("rtol", doc="relative tolerance", **_TOLERANCE),  # type: ignore[arg-type]
        Option("atol", doc="absolute tolerance", **_TOLERANCE),  # type: ignore[arg-type]
        Option(
            "first_step",
            float,
            None,
            "first step size (default: Hairer's rule, one NFE)",
            low=0.0,
            low_open=True,
            allow_none=True,
        ),
        Option("per_sample", bool, False, "each sample takes its own steps"),
    )

    def __init__(self, name: str, tableau: ButcherTableau, summary: str) -> None:
        if not tableau.adaptive:
            raise ValueError(f"{tableau.name} has no embedded error estimate")
        super().__init__(tableau, summary, name=name)
        self.error_order = tableau.error_order
        self.ddim_options = None

    def attempt(
        self, ode: PFODE, state: State, sigma_next: Sigma, options: dict[str, Any]
    ) -> tuple[State, Tensor]:
        x_next, err, evals = rk_step(ode, self.tableau, state.x, state.sigma, sigma_next, state.ev)
        assert err is not None
        ratio = error_ratio(err, state.x, x_next, options["rtol"], options["atol"])
        return State(x_next, sigma_next, ev=evals[-1] if self.tableau.fsal else None), ratio


SOLVERS = (
    RungeKutta(EULER, "Euler; on a DDIM grid this is DDIM (eta = 0)"),
    RungeKutta(HEUN, "Heun's 2nd order (EDM Algorithm 1), 2 NFE per step, Euler into 0"),
    RungeKutta(MIDPOINT, "explicit midpoint, 2nd order, 2 NFE per step"),
    RungeKutta(RK4, "classical Runge-Kutta, 4th order, 4 NFE per step"),
    EmbeddedRungeKutta("rk45", DOPRI5, "Dormand-Prince 5(4), FSAL, PI step control"),
    EmbeddedRungeKutta("bosh3", BOSH3, "Bogacki-Shampine 3(2), FSAL, PI step control"),
)
