"""DPM-Solver++(2S): the singlestep second-order data-prediction solver.

DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095) writes a step of length ``h = lambda_next -
lambda`` in ``lambda = -log sigma`` as the exact solution of the linear part plus an
integral of the denoised estimate (eq. 8 there, divided by ``alpha_next``):

    xbar_next = e^-h xbar + int_0^h e^-(h - tau) x0_hat(lambda + tau) dtau.

Algorithm 1 of the paper (DPM-Solver++(2S)) approximates ``x0_hat`` over the step from two
evaluations made inside it: ``x0_0`` at the start and ``x0_s`` at the intermediate point
``lambda_s = lambda + r h`` (``sigma_s = sigma e^{-r h}``), reached by a first-order (DDIM)
step. With

    D = (1 - 1/(2r)) x0_0 + 1/(2r) x0_s

taken as constant over the step, ``int_0^h e^-(h - tau) dtau = 1 - e^-h``, and since
``xbar = x0_0 + sigma eps_0``,

    xbar_next = e^-h xbar + (1 - e^-h) D
              = x0_0 + sigma_next eps_0 + (1 - e^-h) / (2r) (x0_s - x0_0),

which is what a step computes, in the network's scale (``x = C(sigma) xbar``) with float64
coefficients. It is diffusers' ``DPMSolverSinglestepScheduler(solver_order=2,
algorithm_type="dpmsolver++", solver_type="midpoint")``, whose pairs of scheduler steps
(first order to the middle timestep, then second order over both) are one step here.
"""

from __future__ import annotations

from typing import Any

from .base import Option, Sigma, State, StepInfo, exp, expm1, is_zero, lincomb, log, scale
from .exponential import ExponentialSolver, ddim_step
from .ode import PFODE

__all__ = ["DPMSolverPP2S", "SOLVERS"]


class DPMSolverPP2S(ExponentialSolver):
    """DPM-Solver++(2S) (arXiv 2211.01095, Algorithm 1): singlestep, second order, on
    ``x0_hat`` in ``lambda = -log sigma``. Each step makes a DDIM step to the intermediate
    ``sigma_s = sigma e^{-r h}``, evaluates there, and takes the step with
    ``D = (1 - 1/(2r)) x0_0 + 1/(2r) x0_s`` integrated against ``e^-(h - tau)``:
    ``xbar_next = x0_0 + sigma_next eps_0 + (1 - e^-h) / (2r) (x0_s - x0_0)``.

    ``N`` steps cost ``2N`` evaluations, less one when the last step goes into ``sigma = 0``
    (that step, like a step out of 0, is first order: ``x0_hat``, the driver's Euler step).

    Options:
        order: 2 (default), or 1 for DDIM (one evaluation per step).
        r: the intermediate point as a fraction of the step in ``lambda``, ``0 < r < 1``
            (default 1/2, the paper's and diffusers' midpoint).
    """

    name = "dpmpp_2s"
    summary = "DPM-Solver++(2S): singlestep on x0_hat in log sigma, 2 NFE per step"
    order = 2
    nfe_per_step = 2
    ddim_options = {"order": 1}
    options = (
        Option("order", int, 2, "order of the method (1: DDIM)", low=1, high=2),
        Option(
            "r",
            float,
            0.5,
            "the intermediate evaluation at lambda + r h, as a fraction of the step",
            low=0.0,
            low_open=True,
            high=1.0,
            high_open=True,
        ),
    )

    def step(
        self, ode: PFODE, state: State, sigma_next: Sigma, options: dict[str, Any], info: StepInfo
    ) -> State:
        sigma = state.sigma
        ev = state.ev if state.ev is not None else ode.eval(state.x, sigma)
        if options["order"] == 1 or is_zero(sigma) or is_zero(sigma_next):
            return State(ddim_step(ev, sigma_next), sigma_next)
        r = options["r"]
        h = log(sigma / sigma_next)
        sigma_s = sigma * exp(-r * h)
        ev_s = ode.eval(ddim_step(ev, sigma_s), sigma_s)
        # xbar_next = x0_0 + sigma_next eps_0 + k (x0_s - x0_0), k = (1 - e^-h) / (2 r)
        k = -expm1(-h) / (2.0 * r)
        c = scale(sigma_next)
        x = lincomb([(c * (1.0 - k), ev.x0), (c * sigma_next, ev.eps), (c * k, ev_s.x0)])
        return State(x, sigma_next)


SOLVERS = (DPMSolverPP2S(),)
