"""Step grids: the sigmas a solver walks through.

A grid is a 1-D float64 tensor, strictly monotone. A sampling grid decreases from its
start (usually ``sigma_max``) to its end: ``0`` by default, which is diffusers'
``set_alpha_to_one=True`` (the last DDIM step returns ``x0_hat``), or the schedule's
``sigma_min`` (for a table, the first training step's sigma) with
``set_alpha_to_one=False``.

Spacings that select training timesteps (``leading``, ``trailing``, ``linspace``) pick
exactly the timesteps that diffusers' ``DDIMScheduler.set_timesteps`` picks; ``uniform``
and ``quadratic`` are the DDIM paper's (section 4.2 and appendix D.2); ``karras`` is EDM's
(arXiv 2206.00364, eq. 5); ``logsnr`` is uniform in ``log sigma`` (half the log-SNR),
the grid DPM-Solver uses.

A continuous schedule (:class:`~pflow.schedule.ContinuousVPSchedule`,
:class:`~pflow.schedule.SigmaRange`, :class:`~pflow.schedule.FlowSchedule`) has no table:
its grids need only ``sigma_min`` and ``sigma_max``. It takes ``karras``, ``logsnr`` and
``uniform``, which there is evenly spaced in the schedule's own time (``t`` of the VP SDE,
sigma itself for an EDM denoiser, flow matching's ``t`` through SD3's ``shift``); the
table spacings are an error that names the ones it takes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .schedule import ContinuousSchedule, FlowSchedule, NoiseSchedule, Schedule, check_shift

__all__ = [
    "CONTINUOUS_SPACINGS",
    "SPACINGS",
    "TABLE_SPACINGS",
    "check_grid_options",
    "get_sigmas",
    "validate_sigmas",
]

SPACINGS = ("leading", "trailing", "linspace", "uniform", "quadratic", "karras", "logsnr")
#: Spacings that select entries of a discrete schedule's table of training steps.
TABLE_SPACINGS = ("leading", "trailing", "linspace", "quadratic")
#: Spacings a continuous schedule takes (``uniform``: evenly spaced in its own time).
CONTINUOUS_SPACINGS = ("uniform", "karras", "logsnr")

# Relative slack when checking a grid against the schedule's range: a sigma that went
# through float32 (a user's grid tensor) may differ in its last bits. Entries within the
# slack are snapped onto the range's end.
_RANGE_RTOL = 1e-6


def check_grid_options(*, steps_offset: Any = 0, rho: Any = 7.0) -> tuple[int, float]:
    """``steps_offset`` as a non-negative int and ``rho`` as a finite float > 0; a
    TypeError (wrong type) or ValueError (bad value) naming the argument otherwise."""
    offset = None
    if not isinstance(steps_offset, (bool, float, Tensor)):
        try:
            offset = operator.index(steps_offset)
        except TypeError:
            pass
    if offset is None:
        raise TypeError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
    if offset < 0:
        raise ValueError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float, np.integer, np.floating)):
        raise TypeError(f"rho (the karras grid's exponent) must be a number > 0, got {rho!r}")
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(
            f"rho (the karras grid's exponent) must be a finite number > 0 (7 in EDM), got {rho!r}"
        )
    return offset, float(rho)


def _timesteps(spacing: str, n_train: int, steps: int, steps_offset: int) -> np.ndarray:
    """Training timesteps, descending, for the spacings that select table entries."""
    if spacing == "leading":
        # diffusers: (arange(steps) * (N // steps)).round()[::-1] + steps_offset
        ratio = n_train // steps
        ts = np.arange(steps, dtype=np.int64)[::-1] * ratio + steps_offset
    elif spacing == "trailing":
        # diffusers: round(arange(N, 0, -N / steps)) - 1
        ts = np.round(np.arange(n_train, 0, -n_train / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        # diffusers: linspace(0, N - 1, steps).round()[::-1]
        ts = np.linspace(0, n_train - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "uniform":
        # DDIM paper, "linear" selection: tau_i = floor(c * i), c = N / steps.
        ts = np.floor(np.arange(steps) * (n_train / steps)).astype(np.int64)[::-1]
    elif spacing == "quadratic":
        # DDIM paper, "quadratic" selection: tau_i = floor(c * i^2), the largest at 0.8 N.
        # At many steps the first few collide; they are pushed apart by one step each.
        ts = np.floor(np.linspace(0, np.sqrt(0.8 * n_train), steps) ** 2).astype(np.int64)
        for i in range(1, steps):
            ts[i] = max(ts[i], ts[i - 1] + 1)
        ts = ts[::-1]
    else:  # pragma: no cover - guarded by the caller
        raise AssertionError(spacing)
    if ts.min() < 0 or ts.max() > n_train - 1:
        raise ValueError(
            f"spacing={spacing!r} with steps={steps} and steps_offset={steps_offset} selects "
            f"timesteps outside [0, {n_train - 1}]"
        )
    return ts.copy()


def get_sigmas(
    schedule: Schedule,
    steps: int,
    spacing: str = "trailing",
    *,
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    shift: float | None = None,
) -> Tensor:
    """A grid of ``steps + 1`` decreasing sigmas for a sampler taking ``steps`` steps.

    Args:
        schedule: the noise schedule the network was trained with: a
            :class:`~pflow.NoiseSchedule` (a table) or a continuous one
            (:class:`~pflow.ContinuousVPSchedule`, :class:`~pflow.SigmaRange`,
            :class:`~pflow.FlowSchedule`).
        steps: number of solver steps (intervals), at least 1.
        spacing: one of ``leading``, ``trailing``, ``linspace`` (diffusers' DDIM choices),
            ``uniform``, ``quadratic`` (DDIM paper), ``karras`` (EDM), ``logsnr``. A
            continuous schedule takes ``uniform`` (evenly spaced in its own time),
            ``karras`` and ``logsnr`` only.
        steps_offset: added to every timestep of ``leading`` (diffusers' ``steps_offset``),
            a non-negative integer.
        set_alpha_to_one: end the grid at ``sigma = 0`` (``a = 1``) when true, else at the
            schedule's ``sigma_min`` (a table's first training step). A final step of zero
            length is dropped, so the grid may then have one entry fewer than ``steps + 1``.
        sigma_min, sigma_max: range of ``karras`` and ``logsnr`` grids; the schedule's by
            default.
        rho: EDM's exponent for ``karras`` (7 in the paper), a number > 0.
        shift: SD3's timestep shift for the ``uniform`` grid of a
            :class:`~pflow.FlowSchedule` (the schedule's own ``shift`` by default), a
            number > 0.

    Returns:
        float64 tensor of sigmas, strictly decreasing.

    Raises:
        TypeError, ValueError: an argument of the wrong type or value, named; a table
            spacing on a continuous schedule; ``shift`` with anything but a
            :class:`~pflow.FlowSchedule`'s ``uniform`` grid.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    steps_offset, rho = check_grid_options(steps_offset=steps_offset, rho=rho)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    if not isinstance(schedule, Schedule):
        raise TypeError(
            "schedule must be a pflow schedule (NoiseSchedule, ContinuousVPSchedule, "
            f"SigmaRange or FlowSchedule), got {type(schedule).__name__}"
        )
    if shift is not None:
        shift = check_shift(shift)
        if not (isinstance(schedule, FlowSchedule) and spacing == "uniform"):
            raise ValueError(
                "shift is flow matching's timestep shift: it applies to spacing='uniform' on "
                f"a FlowSchedule only, got shift={shift!r} with spacing={spacing!r} on "
                f"{type(schedule).__name__}"
            )
    # Ending at 0 spends one step on the final denoising hop, so the positive part
    # has `steps` points; ending at sigma_min it has `steps + 1`.
    n_points = steps if set_alpha_to_one else steps + 1
    if not schedule.discrete:
        if spacing not in CONTINUOUS_SPACINGS:
            raise ValueError(
                f"spacing={spacing!r} selects training steps from a table, but the schedule "
                f"{type(schedule).__name__} is continuous (it has only sigma_min and "
                f"sigma_max): use spacing='uniform', 'karras' or 'logsnr'"
            )
        if spacing == "uniform":
            if sigma_min is not None or sigma_max is not None:
                raise ValueError(
                    "sigma_min and sigma_max set the range of karras and logsnr grids; a "
                    "uniform grid spans the schedule's own range (build the schedule with "
                    "the range you want)"
                )
            assert isinstance(schedule, ContinuousSchedule)
            sig = schedule.uniform_sigmas(n_points, shift)
            return _finish(sig, schedule, set_alpha_to_one)
    if spacing in ("karras", "logsnr"):
        lo = schedule.sigma_min if sigma_min is None else float(sigma_min)
        hi = schedule.sigma_max if sigma_max is None else float(sigma_max)
        if not 0 < lo < hi < math.inf:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max < inf, got sigma_min={lo}, sigma_max={hi}"
            )
        ramp = np.linspace(0.0, 1.0, n_points)
        if spacing == "karras":
            sig = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        else:
            sig = np.exp(np.log(hi) + ramp * (np.log(lo) - np.log(hi)))
        if n_points == 1:
            sig = np.array([hi])
    else:
        assert isinstance(schedule, NoiseSchedule)
        n_train = schedule.num_train_timesteps
        if steps > n_train:
            raise ValueError(f"steps must be <= num_train_timesteps ({n_train}), got {steps}")
        ts = _timesteps(spacing, n_train, steps, steps_offset)
        sig = schedule.sigmas.numpy()[ts]
    return _finish(sig, schedule, set_alpha_to_one)


def _finish(sig: np.ndarray, schedule: Schedule, set_alpha_to_one: bool) -> Tensor:
    """The positive part ``sig`` with its end appended (0, or ``sigma_min``), checked."""
    end = 0.0 if set_alpha_to_one else schedule.sigma_min
    if sig[-1] > end * (1 + 1e-12):
        sig = np.append(sig, end)
    else:  # a ramp that ends at sigma_min, up to the round-off of its formula
        sig = sig.copy()
        sig[-1] = end
    grid = torch.as_tensor(sig, dtype=torch.float64)
    return validate_sigmas(grid, schedule=schedule, name="sigmas")


def validate_sigmas(
    sigmas: Tensor | Sequence[float] | np.ndarray,
    *,
    schedule: Schedule | None = None,
    name: str = "sigmas",
) -> Tensor:
    """Check a user grid and return it as a 1-D float64 CPU tensor.

    The grid must have at least two entries, be finite, non-negative and strictly
    monotone (decreasing to sample, increasing to encode); with a schedule, no entry may
    exceed ``schedule.sigma_max`` and no positive entry may fall below ``sigma_min``.
    """
    if isinstance(sigmas, Tensor):
        grid = sigmas.detach().to("cpu", torch.float64)
    else:
        grid = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(
            f"{name} must be a 1-D grid with at least 2 entries, got shape {tuple(grid.shape)}"
        )
    if not torch.isfinite(grid).all():
        raise ValueError(f"{name} must be finite, got {grid.tolist()}")
    if (grid < 0).any():
        raise ValueError(f"{name} must be >= 0, got min {float(grid.min())}")
    diff = grid[1:] - grid[:-1]
    if not ((diff < 0).all() or (diff > 0).all()):
        bad = int(torch.nonzero((diff >= 0) if diff[0] < 0 else (diff <= 0))[0])
        raise ValueError(
            f"{name} must be strictly monotone (decreasing to sample, increasing to encode); "
            f"entries {bad} and {bad + 1} are {float(grid[bad])} and {float(grid[bad + 1])}"
        )
    if schedule is not None:
        top = schedule.sigma_max * (1 + _RANGE_RTOL)
        bottom = schedule.sigma_min * (1 - _RANGE_RTOL)
        if float(grid.max()) > top:
            raise ValueError(
                f"{name} leaves the schedule's range: max {float(grid.max()):.6g} > "
                f"sigma_max {schedule.sigma_max:.6g}"
            )
        positive = grid[grid > 0]
        if positive.numel() and float(positive.min()) < bottom:
            raise ValueError(
                f"{name} leaves the schedule's range: positive entry {float(positive.min()):.6g} "
                f"< sigma_min {schedule.sigma_min:.6g} (use 0 for the final denoising step)"
            )
        snapped = grid.clone()
        snapped[snapped > schedule.sigma_max] = schedule.sigma_max
        snapped[(snapped > 0) & (snapped < schedule.sigma_min)] = schedule.sigma_min
        diff = snapped[1:] - snapped[:-1]
        if not ((diff < 0).all() or (diff > 0).all()):
            bad = int(torch.nonzero(diff == 0)[0])
            raise ValueError(
                f"{name} entries {bad} and {bad + 1} ({float(grid[bad])!r} and "
                f"{float(grid[bad + 1])!r}) both lie within {_RANGE_RTOL:g} (relative) of the "
                "schedule's end and are snapped onto the same sigma; drop one of them"
            )
        grid = snapped
    return grid
