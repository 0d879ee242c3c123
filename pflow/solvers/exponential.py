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
``x0_hat`` of the last evaluation; ``last_step`` therefore makes no difference to them.
The history restarts after a step from ``sigma = 0`` (the start of an encoding grid).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from ..errors import MaxNFEExceeded
from . import SolverSpec, register
from .multistep import Walk, lincomb
from .ode import PFODE, Evaluation, Outcome, scale

__all__ = ["phi", "dpm_solver", "dpm_solver_pp", "unipc"]

# Diffusers' rule: grids shorter than this take lower orders in their last steps.
_LOWER_ORDER_FINAL_BELOW = 15


def phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_{m >= 0} z^m / (m + k)!`` (``phi_0 = e^z``,
    ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``), so that
    ``int_0^h e^-(h - tau) tau^n / n! dtau = h^(n+1) phi_(n+1)(-h)``.

    Summed as a series for ``|z| < 2`` (no cancellation at small steps), by the recurrence
    otherwise."""
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


def _ddim(ev: Evaluation, sigma_next: float) -> Tensor:
    """The first-order step of every method here: ``C(s) (x0_hat + s eps)``."""
    c = scale(sigma_next)
    return lincomb([(c, ev.x0), (c * sigma_next, ev.eps)])


def _max_order(order: int, steps: int, i: int, lower_order_final: bool) -> int:
    """DPM-Solver++ in diffusers: on grids of fewer than 15 steps the last step is first
    order and the one before at most second order (the instability at <= 10 steps)."""
    if lower_order_final and steps < _LOWER_ORDER_FINAL_BELOW:
        return min(order, steps - i)
    return order


def _check_order(order: int, allowed: Sequence[int], name: str) -> int:
    if isinstance(order, bool) or order not in allowed:
        raise ValueError(
            f"{name}: order must be one of {', '.join(map(str, allowed))}; got {order!r}"
        )
    return int(order)


# ----------------------------------------------------------------------------------------
# DPM-Solver++ (multistep, data prediction)


def _dpmpp_update(
    ev: Evaluation,
    sigma_next: float,
    history: list[tuple[float, Tensor]],
    order: int,
    variant: str = "exact",
) -> Tensor:
    """One DPM-Solver++ step of ``order`` from the newest evaluation ``ev``; ``history``
    holds ``(lambda, x0_hat)``, newest last (``history[-1]`` is ``ev``'s)."""
    if order == 1:
        return _ddim(ev, sigma_next)
    c = scale(sigma_next)
    lam0 = history[-1][0]
    h = -math.log(sigma_next) - lam0
    if order == 2:
        # Algorithm 2: D = (1 + 1/(2 r)) x0_0 - 1/(2 r) x0_1, r = h_prev / h, integrated as
        # a constant: xbar_next = x0_0 + s eps_0 + (1 - e^-h) / (2 r) (x0_0 - x0_1).
        lam1, x0_1 = history[-2]
        k = -0.5 * math.expm1(-h) * h / (lam0 - lam1)
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


def dpm_solver_pp(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    order: int,
    lower_order_final: bool = True,
    variant: str = "exact",
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
) -> Outcome:
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
    _check_order(order, (1, 2, 3), "dpm_solver_pp")
    if variant not in ("exact", "reference"):
        raise ValueError(f"variant must be 'exact' or 'reference', got {variant!r}")
    steps = len(grid) - 1
    walk = Walk(x, grid[0], record)
    history: list[tuple[float, Tensor]] = []  # (lambda, x0_hat), newest last
    try:
        for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:])):
            ev = ode.eval(x, sigma)
            if sigma == 0.0 or sigma_next == 0.0:
                x, history = _ddim(ev, sigma_next), []
            else:
                history = [*history, (-math.log(sigma), ev.x0)][-order:]
                k = min(len(history), _max_order(order, steps, i, lower_order_final))
                x = _dpmpp_update(ev, sigma_next, history, k, variant)
            walk.visit(x, sigma_next)
    except MaxNFEExceeded as exc:
        walk.stop(exc, partial)
    return walk.outcome(ode, x)


# ----------------------------------------------------------------------------------------
# DPM-Solver (singlestep, noise prediction)


def _dpm_solver_step(
    ode: PFODE, ev: Evaluation, sigma: float, sigma_next: float, order: int
) -> Tensor:
    """One step of DPM-Solver-``order`` (arXiv 2206.00927, as the paper writes it), in
    ``xbar`` (``sigma_s (e^h - 1) = sigma - sigma_s``) around ``x0_hat`` and ``eps``."""
    if order == 1:
        return _ddim(ev, sigma_next)
    h = math.log(sigma / sigma_next)
    c = scale(sigma_next)
    x0, eps0 = ev.x0, ev.eps
    if order == 2:
        r1 = 0.5
        s1 = sigma * math.exp(-r1 * h)
        c1 = scale(s1)
        # u = (alpha_s1 / alpha) x - sigma_s1 (e^{r1 h} - 1) eps_0: DDIM to s1.
        eps1 = ode.eval(lincomb([(c1, x0), (c1 * s1, eps0)]), s1).eps
        # x_next = ... - sigma_s (e^h - 1) eps_0 - sigma_s / (2 r1) (e^h - 1) (eps_1 - eps_0)
        k = (sigma - sigma_next) / (2 * r1)
        return lincomb([(c, x0), (c * (sigma_next + k), eps0), (-c * k, eps1)])
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    s1, s2 = sigma * math.exp(-r1 * h), sigma * math.exp(-r2 * h)
    c1, c2 = scale(s1), scale(s2)
    eps1 = ode.eval(lincomb([(c1, x0), (c1 * s1, eps0)]), s1).eps
    # u_2 = ... - sigma_s2 (r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) (eps_1 - eps_0)
    q = (r2 / r1) * s2 * (r2 * h) * phi(2, r2 * h)
    eps2 = ode.eval(lincomb([(c2, x0), (c2 * (s2 + q), eps0), (-c2 * q, eps1)]), s2).eps
    # x_next = ... - (sigma_s / r2) ((e^h - 1) / h - 1) (eps_2 - eps_0)
    k = sigma_next * h * phi(2, h) / r2
    return lincomb([(c, x0), (c * (sigma_next + k), eps0), (-c * k, eps2)])


def dpm_solver(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    order: int,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
) -> Outcome:
    """Singlestep DPM-Solver-``order`` (arXiv 2206.00927) on ``eps``: each step evaluates
    at ``lambda + r h`` inside the step (``r = 1/2`` for order 2; ``1/3, 2/3`` for order
    3), so ``N`` steps cost ``order * N`` evaluations, less ``order - 1`` when the last
    step goes into ``sigma = 0`` (first order there). ``order=1`` is DDIM."""
    _check_order(order, (1, 2, 3), "dpm_solver")
    walk = Walk(x, grid[0], record)
    try:
        for sigma, sigma_next in zip(grid[:-1], grid[1:]):
            ev = ode.eval(x, sigma)
            k = 1 if sigma == 0.0 or sigma_next == 0.0 else order
            x = _dpm_solver_step(ode, ev, sigma, sigma_next, k)
            walk.visit(x, sigma_next)
    except MaxNFEExceeded as exc:
        walk.stop(exc, partial)
    return walk.outcome(ode, x)


# ----------------------------------------------------------------------------------------
# UniPC (B(h) = e^h - 1, data prediction)


def _unipc_b(h: float, order: int) -> list[float]:
    """UniPC's right-hand side ``b_i = hh phi_(i+1)(hh) i! / B(hh)``, ``i = 1..order``,
    with ``hh = -h`` (data prediction) and ``B(hh) = e^hh - 1`` ("bh2")."""
    hh = -h
    big_b = math.expm1(hh)
    return [hh * phi(i + 1, hh) * math.factorial(i) / big_b for i in range(1, order + 1)]


def _unipc_rhos(rks: Sequence[float], h: float, order: int, corrector: bool) -> list[float]:
    """The weights ``rho`` of UniP-``order`` (on the ``order - 1`` past differences) or of
    UniC-``order`` (past differences and the new one, at ``r = 1``)."""
    if corrector:
        if order == 1:
            return [0.5]
        nodes = [*rks, 1.0]
    else:
        if order == 1:
            return []
        if order == 2:
            return [0.5]  # UniP-2 is DPM-Solver++(2M)
        nodes = list(rks)
    n = len(nodes)
    r_matrix = np.array([[r**i for r in nodes] for i in range(n)], dtype=np.float64)
    b = np.array(_unipc_b(h, n), dtype=np.float64)
    return [float(v) for v in np.linalg.solve(r_matrix, b)]


def _unipc_update(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    history: list[tuple[float, Tensor]],
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
    h = -math.log(sigma_next) - lam0
    c = scale(sigma_next)
    g = -math.expm1(-h)
    past = history[-order:-1][::-1] if order > 1 else []  # newest first, excluding x0_0
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


def unipc(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    order: int = 2,
    lower_order_final: bool = True,
    corrector: bool = True,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
) -> Outcome:
    """UniPC-``order`` (arXiv 2302.04867, ``B(h) = e^h - 1``, data prediction), multistep in
    ``lambda``: the predictor UniP-p (UniP-2 is DPM-Solver++(2M)) takes the step; the
    network is evaluated at its result; the corrector UniC-p re-does the step with that
    evaluation, and the next step starts from the corrected state. The corrector costs no
    evaluation and raises the order to ``p + 1``; there is none after the last step.

    ``order``: 1, 2 (default) or 3, order ``order + 1`` with the corrector. The first steps
    use the history there is; the first is UniP-1, i.e. DDIM, and ``order=1`` with
    ``corrector=False`` is DDIM throughout.
    ``lower_order_final`` (default True): as diffusers' ``UniPCMultistepScheduler``, the
    order of a step is at most the number of steps left (the last step is first order).
    """
    _check_order(order, (1, 2, 3), "unipc")
    steps = len(grid) - 1
    walk = Walk(x, grid[0], record)
    history: list[tuple[float, Tensor]] = []  # (lambda, x0_hat), newest last
    # the step the corrector will re-do: (state at its start, its sigma, its order);
    # ``pending`` is where its (uncorrected) result lies
    last: tuple[Tensor, float, int] | None = None
    pending: float | None = None
    try:
        for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:])):
            ev = ode.eval(x, sigma)
            if last is not None:
                x_last, sigma_last, p = last
                if corrector:
                    x = _unipc_update(x_last, sigma_last, sigma, history, p, x0_new=ev.x0)
                walk.visit(x, sigma)
                last = pending = None
            if sigma == 0.0 or sigma_next == 0.0:
                # the first-order limit: x0_hat into 0 (e^-h = 0, the state drops out);
                # out of 0 (where the state is the evaluated point) DDIM
                x, history = _ddim(ev, sigma_next), []
                walk.visit(x, sigma_next)
                continue
            history = [*history, (-math.log(sigma), ev.x0)][-order:]
            p = min(order, len(history), steps - i if lower_order_final else order)
            last, pending = (x, sigma, p), sigma_next
            x = _unipc_update(x, sigma, sigma_next, history, p)
    except MaxNFEExceeded as exc:
        walk.stop(exc, partial)
    if pending is not None:
        walk.visit(x, pending)  # the last predictor's result: no corrector after it
    return walk.outcome(ode, x)


# ----------------------------------------------------------------------------------------
# Registry

register(
    SolverSpec(
        "dpmpp_2m",
        False,
        2,
        functools.partial(dpm_solver_pp, order=2),
        options=("lower_order_final",),
        summary="DPM-Solver++(2M): multistep on x0_hat in log sigma, 1 NFE per step",
    )
)
register(
    SolverSpec(
        "dpmpp_3m",
        False,
        3,
        functools.partial(dpm_solver_pp, order=3),
        options=("lower_order_final", "variant"),
        summary="DPM-Solver++(3M): multistep on x0_hat in log sigma, 1 NFE per step",
    )
)
register(
    SolverSpec(
        "dpm_solver_2",
        False,
        2,
        functools.partial(dpm_solver, order=2),
        summary="DPM-Solver-2: singlestep on eps in log sigma, 2 NFE per step",
    )
)
register(
    SolverSpec(
        "dpm_solver_3",
        False,
        3,
        functools.partial(dpm_solver, order=3),
        summary="DPM-Solver-3: singlestep on eps in log sigma, 3 NFE per step",
    )
)
register(
    SolverSpec(
        "unipc",
        False,
        3,
        unipc,
        options=("order", "lower_order_final", "corrector"),
        summary="UniPC (bh2): predictor-corrector on x0_hat, order p+1 at 1 NFE per step",
    )
)
