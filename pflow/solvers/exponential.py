"""Exponential integrators in ``lambda = -log sigma``: DPM-Solver, DPM-Solver++ and UniPC.

With the denoised estimate ``x0_hat = xbar - sigma eps`` the PF-ODE reads
``d xbar / d sigma = (xbar - x0_hat) / sigma``. In ``lambda = -log sigma`` (half the
log-SNR; ``sigma = e^-lambda``) its linear part is solved exactly, and a step of length
``h = lambda_next - lambda`` is (variation of constants)

    xbar_next = e^-h xbar + int_0^h e^-(h - tau) x0_hat(lambda + tau) dtau    (data prediction)
              = xbar - sigma int_0^h e^-tau eps(lambda + tau) dtau              (noise prediction)

(DPM-Solver++, arXiv 2211.01095, eq. 8, and DPM-Solver, arXiv 2206.00927, eq. 3.4, divided
by ``alpha_next``). The methods differ in how they approximate the integrand:

- ``dpm_solver_2``, ``dpm_solver_3`` (DPM-Solver, singlestep, noise prediction): ``eps`` at
  intermediate points ``lambda + r h`` of the same step (``r = 1/2``; ``r = 1/3, 2/3``),
  the paper's ``DPM-Solver-2`` and ``DPM-Solver-3``; ``k`` evaluations per step.
- ``dpmpp_2m``, ``dpmpp_3m`` (DPM-Solver++, multistep, data prediction): ``x0_hat`` from the
  previous steps, one evaluation per step. 2M is the paper's Algorithm 2 (the "midpoint"
  form, diffusers' default). 3M integrates the quadratic through the last three
  ``x0_hat`` exactly (the reference code's and diffusers' 3M halve one of its weights,
  which costs them an order: ``variant="reference"``).
- ``unipc`` (UniPC, arXiv 2302.04867, ``B(h) = e^h - 1``, "bh2", data prediction): the
  predictor UniP-p and the corrector UniC-p, which reuses the next step's evaluation, so
  order ``p + 1`` at one evaluation per step.

Each starts with a first-order step, and at first order each is DDIM: with ``x0_hat``
constant over the step, ``xbar_next = e^-h xbar + (1 - e^-h) x0_hat = x0_hat +
sigma_next eps`` (and ``eps`` constant gives the same). Updates are written around
``x0_hat`` and ``eps`` in the network's scale, ``x_next = C(sigma_next) (x0_hat +
sigma_next eps + ...)``, with float64 coefficients built from ``phi`` functions.

Steps into (or out of) ``sigma = 0``: there ``lambda`` is infinite and the only step these
methods can take is their first-order limit, which is exactly DDIM's last step,
``x0_hat`` of the last evaluation, the driver's Euler step: they support
``last_step="euler"`` only, and ``"solver"`` is an error that says so.

Each method is a :class:`~pflow.solvers.base.Solver` whose state carries the history
``(lambda, x0_hat)``, newest last; the coefficients take float sigmas, per-sample tensors
or 0-d tensors in a graph alike (``phi`` included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import Option, Sigma, Solver, State, StepInfo, exp, expm1, is_zero, lincomb, log, scale
from .ode import PFODE, Evaluation

__all__ = ["phi", "ddim_step", "ExponentialSolver", "DPMSolverPP", "DPMSolver", "UniPC", "SOLVERS"]

# Diffusers' rule: grids shorter than this take lower orders in their last steps.
_LOWER_ORDER_FINAL_BELOW = 15
_NOTE = (
    "its steps are in lambda = -log sigma, infinite at sigma = 0: the only step into 0 it "
    "can take is its first-order limit, x0_hat of the last evaluation (the driver's Euler step)"
)


def phi(k: int, z: Sigma) -> Sigma:
    """``phi_k(z) = sum_{m >= 0} z^m / (m + k)!`` (``phi_0 = e^z``,
    ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``), so that
    ``int_0^h e^-(h - tau) tau^n / n! dtau = h^(n+1) phi_(n+1)(-h)``.

    Summed as a series for ``|z| < 2`` (no cancellation at small steps), by the recurrence
    otherwise; a tensor ``z`` gets the same two branches elementwise."""
    if isinstance(z, Tensor):
        small = z.abs() < 2.0
        zs = torch.where(small, z, torch.zeros_like(z))
        t_term = torch.full_like(z, 1.0 / math.factorial(k))
        series = t_term
        for m in range(1, 40):
            t_term = t_term * zs / (m + k)
            series = series + t_term
        zr = torch.where(small, torch.full_like(z, 2.0), z)
        t_value = torch.exp(zr)
        for j in range(k):
            t_value = (t_value - 1.0 / math.factorial(j)) / zr
        return torch.where(small, series, t_value)
    if abs(z) < 2.0:
        term = 1.0 / math.factorial(k)
        total, m = term, 0
        while abs(term) > 1e-17 * abs(total):
            m += 1
            term *= z / (m + k)
            total += term
        return total
    value = math.exp(z)
    for j in range(k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def ddim_step(ev: Evaluation, sigma_next: Sigma) -> Tensor:
    """The first-order step of every method here: ``C(s) (x0_hat + s eps)``."""
    c = scale(sigma_next)
    return lincomb([(c, ev.x0), (c * sigma_next, ev.eps)])


def _max_order(order: int, info: StepInfo, lower_order_final: bool) -> int:
    """DPM-Solver++ in diffusers: on grids of fewer than 15 steps the last step is first
    order and the one before at most second order (the instability at <= 10 steps)."""
    if lower_order_final and info.n < _LOWER_ORDER_FINAL_BELOW:
        return min(order, info.n - info.i)
    return order


def _order_option(top: int, low: int = 1) -> Option:
    return Option("order", int, top, "order of the method", low=low, high=top)


_LOF = Option(
    "lower_order_final",
    bool,
    True,
    "on grids of fewer than 15 steps, lower orders in the last steps (diffusers' rule)",
)


class ExponentialSolver(Solver):
    """Shared capabilities: steps in lambda, Euler's step into 0 only."""

    last_steps = ("euler",)
    last_step_note = _NOTE
    differentiable = True
    ddim_options: dict[str, Any] | None = {"order": 1}


# ----------------------------------------------------------------------------------------
# DPM-Solver++ (multistep, data prediction)


def _dpmpp_update(
    ev: Evaluation,
    sigma_next: Sigma,
    history: Sequence[tuple[Sigma, Tensor]],
    order: int,
    variant: str = "exact",
) -> Tensor:
    """One DPM-Solver++ step of ``order`` from the newest evaluation ``ev``; ``history``
    holds ``(lambda, x0_hat)``, newest last (``history[-1]`` is ``ev``'s)."""
    if order == 1:
        return ddim_step(ev, sigma_next)
    c = scale(sigma_next)
    lam0 = history[-1][0]
    h = -log(sigma_next) - lam0
    if order == 2:
        # Algorithm 2: D = (1 + 1/(2 r)) x0_0 - 1/(2 r) x0_1, r = h_prev / h, integrated as
        # a constant: xbar_next = x0_0 + s eps_0 + (1 - e^-h) / (2 r) (x0_0 - x0_1).
        lam1, x0_1 = history[-2]
        k = -0.5 * expm1(-h) * h / (lam0 - lam1)
        return lincomb([(c * (1.0 + k), ev.x0), (c * sigma_next, ev.eps), (-c * k, x0_1)])
    # Order 3: x0_hat(lambda0 + tau) ~ x0_0 + tau x0' + tau^2 x0''/2 through the last three
    # values, with D1 = h x0' = D1_0 + r0 D2 and D2 = h^2 x0''/2 = (D1_0 - D1_1) / (r0 + r1),
    # D1_0 = (x0_0 - x0_1) / r0, D1_1 = (x0_1 - x0_2) / r1, r = h_prev / h; integrated against
    # e^-(h - tau): xbar_next = x0_0 + s eps_0 + h phi_2(-h) D1 + 2 h phi_3(-h) D2.
    (lam2, x0_2), (lam1, x0_1) = history[-3], history[-2]
    r0, r1 = (lam0 - lam1) / h, (lam1 - lam2) / h
    c1 = h * phi(2, -h)
    c2 = (2.0 if variant == "exact" else 1.0) * h * phi(3, -h)
    k = (c1 * r0 + c2) / (r0 + r1)  # weight of D1_0 - D1_1 once D1 is written out
    w1, w2 = -(c1 + k) / r0 - k / r1, k / r1
    terms = [(c * (1.0 + (c1 + k) / r0), ev.x0), (c * sigma_next, ev.eps)]
    return lincomb([*terms, (c * w1, x0_1), (c * w2, x0_2)])


class DPMSolverPP(ExponentialSolver):
    """DPM-Solver++(kM) (arXiv 2211.01095), multistep in ``lambda`` on ``x0_hat``: one
    evaluation per step, order ``k`` once ``k`` evaluations are known (first and second
    order steps at the start).

    - ``order=2``: Algorithm 2 of the paper (diffusers' ``solver_type="midpoint"``),
      ``xbar_next = x0_0 + s eps_0 + (1 - e^-h) / (2 r) (x0_0 - x0_1)``, ``r = h_prev / h``.
    - ``order=3``: ``x0_hat`` interpolated by the quadratic in ``lambda`` through the last
      three values, integrated exactly against ``e^-(h - tau)``:
      ``xbar_next = x0_0 + s eps_0 + h phi_2(-h) D1 + 2 h phi_3(-h) D2`` with
      ``D1 ~ h x0'`` and ``D2 ~ h^2 x0''/2`` the divided differences of the reference code.
      ``variant="reference"`` weights ``D2`` with ``-(phi_2(-h) - 1/2) = h phi_3(-h)``, as
      the DPM-Solver reference code and diffusers' ``DPMSolverMultistepScheduler`` do: half
      the exact weight, so the local error is O(h^3) and the observed order about 2.3 on
      the exact Gaussian mixture (for peer comparisons; it is also the more damped of the
      two at very few steps).
    - ``order=1``: DDIM.

    ``lower_order_final`` (default True): on grids of fewer than 15 steps the last step is
    first order and the one before at most second order, as diffusers'
    ``DPMSolverMultistepScheduler`` does against the instability at <= 10 steps.
    """

    def __init__(self, order: int) -> None:
        self.name = f"dpmpp_{order}m"
        self.order = self.history = order
        self.summary = f"DPM-Solver++({order}M): multistep on x0_hat in log sigma, 1 NFE per step"
        self.options: tuple[Option, ...] = (_order_option(order), _LOF)
        if order == 3:
            self.options += (
                Option(
                    "variant",
                    str,
                    "exact",
                    "exact 3rd-order weights, or the reference code's (diffusers')",
                    choices=("exact", "reference"),
                ),
            )

    def step(
        self, ode: PFODE, state: State, sigma_next: Sigma, options: dict[str, Any], info: StepInfo
    ) -> State:
        sigma = state.sigma
        ev = state.ev if state.ev is not None else ode.eval(state.x, sigma)
        if is_zero(sigma) or is_zero(sigma_next):
            return State(ddim_step(ev, sigma_next), sigma_next)
        order = options["order"]
        history = (*state.history, (-log(sigma), ev.x0))[-order:]
        k = min(len(history), _max_order(order, info, options["lower_order_final"]))
        x = _dpmpp_update(ev, sigma_next, history, k, options.get("variant", "exact"))
        return State(x, sigma_next, history=history)


# ----------------------------------------------------------------------------------------
# DPM-Solver (singlestep, noise prediction)


def _dpm_solver_step(
    ode: PFODE, ev: Evaluation, sigma: Sigma, sigma_next: Sigma, order: int
) -> Tensor:
    """One step of DPM-Solver-``order`` (arXiv 2206.00927, as the paper writes it), in
    ``xbar`` (``sigma_s (e^h - 1) = sigma - sigma_s``) around ``x0_hat`` and ``eps``."""
    if order == 1:
        return ddim_step(ev, sigma_next)
    h = log(sigma / sigma_next)
    c = scale(sigma_next)
    x0, eps0 = ev.x0, ev.eps
    if order == 2:
        r1 = 0.5
        s1 = sigma * exp(-r1 * h)
        c1 = scale(s1)
        # u = (alpha_s1 / alpha) x - sigma_s1 (e^{r1 h} - 1) eps_0: DDIM to s1.
        eps1 = ode.eval(lincomb([(c1, x0), (c1 * s1, eps0)]), s1).eps
        # x_next = ... - sigma_s (e^h - 1) eps_0 - sigma_s / (2 r1) (e^h - 1) (eps_1 - eps_0)
        k = (sigma - sigma_next) / (2 * r1)
        return lincomb([(c, x0), (c * (sigma_next + k), eps0), (-c * k, eps1)])
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    s1, s2 = sigma * exp(-r1 * h), sigma * exp(-r2 * h)
    c1, c2 = scale(s1), scale(s2)
    eps1 = ode.eval(lincomb([(c1, x0), (c1 * s1, eps0)]), s1).eps
    # u_2 = ... - sigma_s2 (r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) (eps_1 - eps_0)
    q = (r2 / r1) * s2 * (r2 * h) * phi(2, r2 * h)
    eps2 = ode.eval(lincomb([(c2, x0), (c2 * (s2 + q), eps0), (-c2 * q, eps1)]), s2).eps
    # x_next = ... - (sigma_s / r2) ((e^h - 1) / h - 1) (eps_2 - eps_0)
    k = sigma_next * h * phi(2, h) / r2
    return lincomb([(c, x0), (c * (sigma_next + k), eps0), (-c * k, eps2)])


class DPMSolver(ExponentialSolver):
    """Singlestep DPM-Solver-``order`` (arXiv 2206.00927) on ``eps``: each step evaluates
    at ``lambda + r h`` inside the step (``r = 1/2`` for order 2; ``1/3, 2/3`` for order
    3), so ``N`` steps cost ``order * N`` evaluations, less ``order - 1`` when the last
    step goes into ``sigma = 0`` (first order there). ``order=1`` is DDIM."""

    def __init__(self, order: int) -> None:
        self.name = f"dpm_solver_{order}"
        self.order = self.nfe_per_step = order
        self.summary = f"DPM-Solver-{order}: singlestep on eps in log sigma, {order} NFE per step"
        self.options = (_order_option(order),)

    def step(
        self, ode: PFODE, state: State, sigma_next: Sigma, options: dict[str, Any], info: StepInfo
    ) -> State:
        sigma = state.sigma
        ev = state.ev if state.ev is not None else ode.eval(state.x, sigma)
        k = 1 if is_zero(sigma) or is_zero(sigma_next) else options["order"]
        return State(_dpm_solver_step(ode, ev, sigma, sigma_next, k), sigma_next)


# ----------------------------------------------------------------------------------------
# UniPC (B(h) = e^h - 1, data prediction)


def _unipc_b(h: Sigma, order: int) -> list[Sigma]:
    """UniPC's right-hand side ``b_i = hh phi_(i+1)(hh) i! / B(hh)``, ``i = 1..order``,
    with ``hh = -h`` (data prediction) and ``B(hh) = e^hh - 1`` ("bh2")."""
    hh = -h
    big_b = expm1(hh)
    return [hh * phi(i + 1, hh) * math.factorial(i) / big_b for i in range(1, order + 1)]


def _unipc_rhos(rks: Sequence[Sigma], h: Sigma, order: int, corrector: bool) -> list[Sigma]:
    """The weights ``rho`` of UniP-``order`` (on the ``order - 1`` past differences) or of
    UniC-``order`` (past differences and the new one, at ``r = 1``)."""
    if corrector:
        if order == 1:
            return [0.5]
        nodes: list[Sigma] = [*rks, 1.0]
    else:
        if order == 1:
            return []
        if order == 2:
            return [0.5]  # UniP-2 is DPM-Solver++(2M)
        nodes = list(rks)
    n = len(nodes)
    b = _unipc_b(h, n)
    if any(isinstance(v, Tensor) for v in (*nodes, h)):
        nodes_t = torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in nodes])
        r_matrix = torch.stack([nodes_t**i for i in range(n)])
        b_t = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in b])
        return list(torch.linalg.solve(r_matrix, b_t).unbind())
    r_np = np.array([[r**i for r in nodes] for i in range(n)], dtype=np.float64)
    return [float(v) for v in np.linalg.solve(r_np, np.array(b, dtype=np.float64))]


def _unipc_update(
    x: Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    history: Sequence[tuple[Sigma, Tensor]],
    order: int,
    x0_new: Tensor | None = None,
) -> Tensor:
    """UniP-``order`` from the state ``x`` at ``sigma`` (``x0_new is None``), or UniC-``order``
    re-doing that step with ``x0_new``, the evaluation at its (predicted) end.

    ``history`` holds ``(lambda, x0_hat)``, newest last; ``history[-1]`` belongs to ``sigma``.
    With ``g = 1 - e^-h`` and ``D_k = (x0_k - x0_0) / r_k``, ``r_k = (lambda_k - lambda_0) / h``,

        xbar_next = e^-h xbar + g (x0_0 + sum_k rho_k D_k)

    (the state ``x`` need not be the point ``x0_0`` was evaluated at: after a correction
    it is not), kept in the network's scale: ``e^-h C(s) / C(sigma)`` multiplies ``x``."""
    lam0, x0_0 = history[-1]
    h = -log(sigma_next) - lam0
    c = scale(sigma_next)
    g = -expm1(-h)
    past = list(history[-order:-1])[::-1] if order > 1 else []  # newest first, without x0_0
    rks = [(lam - lam0) / h for lam, _ in past]
    rhos = _unipc_rhos(rks, h, order, corrector=x0_new is not None)
    coefs = [rho / r for rho, r in zip(rhos, rks)]
    if x0_new is not None:
        coefs.append(rhos[-1])  # r = 1 for the new point
    others = [x0_k for _, x0_k in past] + ([x0_new] if x0_new is not None else [])
    ratio = c * (sigma_next / sigma) / scale(sigma)  # e^-h C(s) / C(sigma)
    terms = [(c * g * (1.0 - sum(coefs)), x0_0), (ratio, x)]
    terms += [(c * g * w, t) for w, t in zip(coefs, others)]
    return lincomb(terms)


class UniPC(ExponentialSolver):
    """UniPC-``order`` (arXiv 2302.04867, ``B(h) = e^h - 1``, data prediction), multistep in
    ``lambda``: the predictor UniP-p (UniP-2 is DPM-Solver++(2M)) takes the step; the
    network is evaluated at its result; the corrector UniC-p re-does the step with that
    evaluation, and the next step starts from the corrected state with that evaluation
    (so a step's end state is final once the step returns). The corrector costs no
    evaluation and raises the order to ``p + 1``; there is none after the grid's last step
    (no evaluation is made there).

    ``order``: 1, 2 (default) or 3, order ``order + 1`` with the corrector. The first steps
    use the history there is; the first is UniP-1, i.e. DDIM, and ``order=1`` with
    ``corrector=False`` is DDIM throughout.
    ``lower_order_final`` (default True): as diffusers' ``UniPCMultistepScheduler``, the
    order of a step is at most the number of steps left (the last step is first order).
    """

    name = "unipc"
    # p + 1 = 3 with lower_order_final=False (measured 3.0 in tests/test_exponential.py); the
    # default takes the grid's last step at first order, which caps the global order at 2.
    order = 2
    history = 3
    summary = "UniPC (bh2): predictor-corrector on x0_hat, order p+1 at 1 NFE per step"
    ddim_options = {"order": 1, "corrector": False}
    options = (
        Option(
            "order", int, 2, "order p of the predictor (p + 1 with the corrector)", low=1, high=3
        ),
        Option("lower_order_final", bool, True, "the order of a step is at most the steps left"),
        Option("corrector", bool, True, "apply UniC after each step but the last"),
    )

    def step(
        self, ode: PFODE, state: State, sigma_next: Sigma, options: dict[str, Any], info: StepInfo
    ) -> State:
        sigma, x = state.sigma, state.x
        ev = state.ev if state.ev is not None else ode.eval(x, sigma)
        if is_zero(sigma) or is_zero(sigma_next):
            return State(ddim_step(ev, sigma_next), sigma_next)
        order = options["order"]
        history = (*state.history, (-log(sigma), ev.x0))[-order:]
        p = min(order, len(history), info.n - info.i if options["lower_order_final"] else order)
        x_next = _unipc_update(x, sigma, sigma_next, history, p)
        if info.final:
            return State(x_next, sigma_next, history=history)
        ev_next = ode.eval(x_next, sigma_next)
        if options["corrector"]:
            x_next = _unipc_update(x, sigma, sigma_next, history, p, x0_new=ev_next.x0)
        return State(x_next, sigma_next, ev=ev_next, history=history)


SOLVERS = (DPMSolverPP(2), DPMSolverPP(3), DPMSolver(2), DPMSolver(3), UniPC())
