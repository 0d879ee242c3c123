"""An algebraically reversible solver for exact inversion: the asynchronous leapfrog in the
data-prediction variables (``solver="alf"``).

Divide the PF-ODE ``d xbar / d sigma = eps`` by ``sigma`` and change time to
``tau = 1 / sigma``: with ``y = xbar / sigma`` it becomes

    dy / dtau = D(y, tau),        D = x0_hat = xbar - sigma * eps,                    (1)

the data-prediction form of DPM-Solver++ (arXiv 2211.01095, eq. 9), in which one Euler
step is again DDIM. The asynchronous leapfrog (ALF; Zhuang et al., MALI, arXiv
2102.10505, Algorithm 1) carries a companion ``v``, an estimate of ``dy/dtau = D`` (a
running data estimate), next to the state. One step from ``tau`` to ``tau'``, through
``tau_m`` (``sigma_m = sqrt(sigma sigma')``, the log-SNR midpoint DPM-Solver-2 uses):

    y_m = y + (tau_m - tau) v,   u = D(y_m, tau_m),   v' = 2u - v,   y' = y_m + (tau' - tau_m) v'.

One network evaluation. The first line is DDIM's step to ``sigma_m`` with ``v`` as
``x0_hat``, so the step is exact when ``D`` is constant, and second order in
``lambda = -log sigma`` when ``D`` is smooth in it. (ALF proper puts ``tau_m`` halfway,
second order in ``tau``; with the large ratios of diffusion grids, ``sigma_m = 2 sigma
sigma' / (sigma + sigma')`` sits next to the small end and was measured worse.) Each line
is a shear or the involution ``v' = 2u - v``, so the step is undone by the same four lines
read backwards: a solve from ``(y', v')`` on the reversed grid retraces the forward one,
and ``decode(encode(x))`` returns ``x``.

Why these variables. Any explicit scheme that can be inverted exactly needs a second
state, and such two-state maps have a parasitic root with ``|zeta_1 zeta_2| = 1`` on
``y' = lambda y``: where the flow contracts, the parasitic mode grows. In
``(xbar, sigma)`` (the form DDIM and BDIA, arXiv 2307.10829, step in) sampling is that
direction: ``d eps / d xbar = sigma / (v + sigma^2) > 0`` for a Gaussian of variance
``v``, up to ``1 / sigma`` in the data's flat directions. In (1)
``d D / d y = Cov[x0 | xbar] / sigma`` is positive semi-definite (Tweedie) and sampling
runs with ``tau`` increasing, so the parasitic root stays inside the unit circle when
decoding; encoding is the direction where it grows, for a Gaussian direction of variance
``v`` by at most ``sqrt(1 + v / sigma_min^2)`` over the whole solve. ``docs/inversion.md``
compares ALF with leapfrog/BDIA (gamma = 1) in both forms.

Precision. An eps-network's ``x0_hat`` at large sigma carries its float32 rounding times
``sigma``, so in float32 any change of the network's input by one unit in the last place
changes ``u`` by ~1e-5 there, and the companion keeps it (flat directions are neutral).
The shears are therefore done in float64 (the network still runs in the state's dtype on
the float64 state rounded to it), which makes the decode feed the network the same inputs
as the encode did. The companion is a float64 tensor of shape ``(2, *x.shape)``: ``v`` and
the residual ``x64 - x`` of rounding the float64 state to the returned one. (On devices
without float64 the state's dtype is used throughout.)

The data enter as the state at the grid's first sigma, which must be positive (``tau``
is finite). Without a companion, ``v = D(x, sigma_0)`` costs one evaluation, so ``N``
steps cost ``N + 1``; with the companion of a previous solve they cost ``N``. A grid
ending at ``sigma = 0`` (sampling) ends with one Euler step into 0, the network's
``x0_hat`` at the last positive sigma, as every pflow solver does; that step is not
reversible and leaves no companion.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Option, Solver, State, StepInfo, scale
from .ode import PFODE, Evaluation

__all__ = ["ALF", "DDIMInverse", "companion_shape", "SOLVERS"]


def companion_shape(x: Tensor) -> tuple[int, ...]:
    """The shape of ``alf``'s companion for the state ``x``: ``(2, *x.shape)``."""
    return (2, *x.shape)


def _work_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.device.type == "mps" else torch.float64


def _y_per_x(sigma: float) -> float:
    """``y / x = sqrt(1 + sigma^2) / sigma``: from the network's scale ``x = C(sigma) xbar``
    to ``y = xbar / sigma``."""
    return math.sqrt(1.0 + sigma * sigma) / sigma


def _check_companion(companion: Any) -> Any:
    """A floating-point tensor with finite values (one host sync per solve, before any
    network call: a NaN there would be reported as the model's)."""
    if not isinstance(companion, Tensor) or not companion.is_floating_point():
        raise TypeError(f"must be a floating-point torch.Tensor, got {type(companion).__name__}")
    c = companion.detach()
    if not bool(torch.isfinite(torch.sum(c, dtype=torch.float64))):  # no state-sized temporary
        if not bool(torch.isfinite(c).all()):  # not merely a float64 overflow of the sum
            raise ValueError("must be finite: it has NaN or inf values")
    return companion


class ALF(Solver):
    """Walk the grid (increasing to encode, decreasing to decode) with one ALF step of (1)
    per interval. The state's ``aux`` is ``(y, v, x_w)`` in the working dtype (float64):
    ``y = xbar / sigma``, the companion ``v`` (``None`` until started) and the unrounded
    state. Option ``companion``: the companion at the grid's first sigma returned by a
    previous solve that ended there (shape ``(2, *x.shape)``); ``None`` starts it at
    ``D(x, grid[0])`` for one evaluation. The result's ``companion`` is the one at the last
    sigma (``None`` after the Euler step into ``sigma = 0``)."""

    name = "alf"
    order = 2
    reversible = True
    summary = (
        "asynchronous leapfrog in y = xbar/sigma, tau = 1/sigma: algebraically "
        "reversible (exact encode/decode), 2nd order, N steps cost N + 1 NFE"
    )
    last_step_note = "tau = 1 / sigma cannot be stepped to at sigma = 0"
    options = (
        Option(
            "companion",
            object,
            None,
            "the companion (2, *x.shape) of a previous alf solve ending at the first sigma",
            allow_none=True,
            batch_dim=1,
            check=_check_companion,
        ),
    )

    def init(self, ode: PFODE, x: Tensor, sigma: Any, options: dict[str, Any]) -> State:
        sigma = float(sigma)
        if sigma <= 0.0:
            raise ValueError(
                "alf needs a positive first sigma (its time is tau = 1 / sigma); the data "
                f"enter as the state at the grid's first sigma, got {sigma}"
            )
        companion = options.get("companion")
        if companion is not None and tuple(companion.shape) != companion_shape(x):
            raise ValueError(
                f"companion has shape {tuple(companion.shape)}, expected "
                f"{companion_shape(x)} for a state of shape {tuple(x.shape)}"
            )
        work = _work_dtype(x)
        x_w, v = x.to(work), None
        if companion is not None:
            x_w = x_w + companion[1].to(work)
            v = companion[0].to(work)
        return State(x, sigma, aux=(x_w * _y_per_x(sigma), v, x_w))

    def step(
        self, ode: PFODE, state: State, sigma_next: Any, options: dict[str, Any], info: StepInfo
    ) -> State:
        sigma, sigma_next = float(state.sigma), float(sigma_next)
        y, v, _ = state.aux
        x, dtype = state.x, state.x.dtype
        if v is None:
            v = ode.eval(x, sigma).x0.to(y.dtype)  # start the companion: one NFE
        sigma_m = math.sqrt(sigma * sigma_next)
        y_m = y + v * (1.0 / sigma_m - 1.0 / sigma)
        u = ode.eval((y_m / _y_per_x(sigma_m)).to(dtype), sigma_m).x0.to(y.dtype)
        v = 2.0 * u - v
        y = y_m + v * (1.0 / sigma_next - 1.0 / sigma_m)
        x_w = y / _y_per_x(sigma_next)
        return State(x_w.to(dtype), sigma_next, aux=(y, v, x_w))

    def extras(self, state: State) -> dict[str, Any]:
        if state.aux is None or state.aux[1] is None:
            return {"companion": None}
        _, v, x_w = state.aux
        return {"companion": torch.stack([v, x_w - state.x.to(x_w.dtype)])}


def _reconvert(
    ev: Evaluation, x: Tensor, sigma_eval: float, sigma_src: float, prediction: str
) -> tuple[Tensor, Tensor]:
    """``(eps, x0_hat)`` from the network's output at ``sigma_eval`` on the state ``x``,
    converted with the source level's coefficients, as ``DDIMInverseScheduler.step`` does
    (its ``alpha_prod_t`` is the source's). ``ev`` is the :class:`Evaluation` at
    ``sigma_eval``, from which the raw output is recovered exactly."""
    c_src = scale(sigma_src)
    sqrt_a, sqrt_1ma = c_src, sigma_src * c_src  # the source's sqrt(a), sqrt(1 - a)
    if prediction == "sample":
        if sigma_src == 0.0:
            raise ValueError(
                "ddim_inverse with an x0-predicting network cannot start at sigma = 0 (the "
                "noise estimate divides by sqrt(1 - a) = 0, as in diffusers); use "
                "set_alpha_to_one=False or start the grid at a positive sigma"
            )
        raw = ev.x0
        return (x - sqrt_a * raw) / sqrt_1ma, raw
    if prediction == "v_prediction":
        c_e = scale(sigma_eval)
        raw = ev.eps * c_e - ev.x0 * (sigma_eval * c_e)  # v = sqrt(a) eps - sqrt(1 - a) x0
        return sqrt_a * raw + sqrt_1ma * x, sqrt_a * x - sqrt_1ma * raw
    eps = ev.eps
    return eps, (x - sqrt_1ma * eps) / sqrt_a


class DDIMInverse(Solver):
    """diffusers' ``DDIMInverseScheduler`` (encode only): from ``sigma`` to ``sigma_next``,

        eps = eps_theta(x, t(sigma_next)),   x0_hat = (x - sqrt(1 - a) eps) / sqrt(a),
        x_next = sqrt(a_next) x0_hat + sqrt(1 - a_next) eps,

    with ``a`` the source's and the network evaluated at the destination's timestep on the
    source's state. In ``xbar`` this is ``xbar_next = xbar + (sigma_next - sigma) eps``
    with ``eps`` taken at the wrong point: a first-order approximation of the step that
    would undo DDIM's (which needs ``eps`` at ``(x_next, sigma_next)``, an implicit
    equation). It never evaluates at its first sigma, so it may start at 0. Decode its
    latents with ``euler`` on the mirrored grid, which is ``DDIMScheduler``."""

    name = "ddim_inverse"
    summary = "diffusers' DDIMInverseScheduler (encode only): eps at the destination's t"
    directions = ("up",)
    starts_at_zero = True
    last_step_note = "it only encodes"

    def step(
        self, ode: PFODE, state: State, sigma_next: Any, options: dict[str, Any], info: StepInfo
    ) -> State:
        sigma, sigma_next = float(state.sigma), float(sigma_next)
        prediction = getattr(ode.model, "prediction", "epsilon")
        ev = ode.eval(state.x, sigma_next)
        eps, x0_hat = _reconvert(ev, state.x, sigma_next, sigma, prediction)
        c_next = scale(sigma_next)
        return State(x0_hat * c_next + eps * (sigma_next * c_next), sigma_next)


SOLVERS = (ALF(), DDIMInverse())
