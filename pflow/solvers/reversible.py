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
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MaxNFEExceeded
from . import SolverSpec, register
from .ode import PFODE, Outcome

__all__ = ["REVERSIBLE_SOLVERS", "ReversibleOutcome", "companion_shape", "solve_alf"]


@dataclass
class ReversibleOutcome(Outcome):
    """An :class:`Outcome` that also carries the companion at the last sigma (``None``
    after a final step into ``sigma = 0``)."""

    companion: Tensor | None = None


def companion_shape(x: Tensor) -> tuple[int, ...]:
    """The shape of ``alf``'s companion for the state ``x``: ``(2, *x.shape)``."""
    return (2, *x.shape)


def _work_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.device.type == "mps" else torch.float64


def _y_per_x(sigma: float) -> float:
    """``y / x = sqrt(1 + sigma^2) / sigma``: from the network's scale ``x = C(sigma) xbar``
    to ``y = xbar / sigma``."""
    return math.sqrt(1.0 + sigma * sigma) / sigma


def solve_alf(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
    companion: Tensor | None = None,
) -> ReversibleOutcome:
    """Walk ``grid`` (increasing to encode, decreasing to decode) with one ALF step of (1)
    per interval, from the state ``x`` (network scale) at ``grid[0]``.

    Args:
        companion: the companion at ``grid[0]`` returned by a previous solve that ended
            there (shape ``(2, *x.shape)``); ``None`` starts it at ``D(x, grid[0])``.
        last_step: the step into ``sigma = 0`` is always Euler's (``x0_hat``): ``tau = 1 / 0``
            cannot be stepped to. Accepted for the common solver interface.

    Returns:
        A :class:`ReversibleOutcome` with the state at the last sigma reached, in ``x``'s
        dtype, and its companion.
    """
    if grid[0] <= 0.0:
        raise ValueError(
            "alf needs a positive first sigma (its time is tau = 1 / sigma); the data enter "
            f"as the state at the grid's first sigma, got {grid[0]}"
        )
    if companion is not None and tuple(companion.shape) != companion_shape(x):
        raise ValueError(
            f"companion has shape {tuple(companion.shape)}, expected {companion_shape(x)} for "
            f"a state of shape {tuple(x.shape)}"
        )
    dtype, work = x.dtype, _work_dtype(x)
    sigma = grid[0]
    x_w = x.to(work)
    v: Tensor | None = None
    if companion is not None:
        x_w = x_w + companion[1].to(work)
        v = companion[0].to(work)
    y = x_w * _y_per_x(sigma)
    visited = [sigma]
    traj = [x.clone()] if record else None
    finished, message = True, ""
    try:
        for sigma_next in grid[1:]:
            if sigma_next == 0.0:
                # Euler into 0: the denoised estimate at the last positive sigma.
                x = ode.eval(x, sigma).x0
                v = None
            else:
                if v is None:
                    v = ode.eval(x, sigma).x0.to(work)  # start the companion: one NFE
                sigma_m = math.sqrt(sigma * sigma_next)
                y_m = y + v * (1.0 / sigma_m - 1.0 / sigma)
                u = ode.eval((y_m / _y_per_x(sigma_m)).to(dtype), sigma_m).x0.to(work)
                v = 2.0 * u - v
                y = y_m + v * (1.0 / sigma_next - 1.0 / sigma_m)
                x_w = y / _y_per_x(sigma_next)
                x = x_w.to(dtype)
            sigma = sigma_next
            visited.append(sigma)
            if traj is not None:
                traj.append(x.clone())
    except MaxNFEExceeded as exc:
        if not partial:
            raise
        finished, message = False, str(exc)
    ode.raise_if_nonfinite()
    out_companion = None if v is None else torch.stack([v, x_w - x.to(work)])
    return ReversibleOutcome(
        x,
        visited,
        n_accepted=len(visited) - 1,
        trajectory=traj,
        finished=finished,
        message=message,
        companion=out_companion,
    )


REVERSIBLE_SOLVERS = ("alf",)

register(
    SolverSpec(
        "alf",
        False,
        2,
        solve_alf,
        summary="asynchronous leapfrog in y = xbar/sigma, tau = 1/sigma: algebraically "
        "reversible (exact encode/decode), 2nd order, N steps cost N + 1 NFE",
    )
)
