"""The DDIM family (arXiv 2010.02502, eq. 12): stochastic ``eta`` and DDPM ancestral steps.

Between two levels with ``a = a_t`` and ``a' = a_prev`` (``a = 1 / (1 + sigma^2)``):

    ddim:  x' = sqrt(a') x0_hat + sqrt(1 - a' - s^2) eps + s z,
           s  = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a')              (eq. 16)

eta = 0 is the ODE's Euler step (DDIM); eta = 1 draws from DDPM's posterior
``q(x' | x_t, x0_hat)``. ``ddpm`` takes DDPM's posterior mean

    mu = sqrt(a') b / (1 - a) x0_hat + sqrt(a / a') (1 - a') / (1 - a) x_t,   b = 1 - a / a',

with the posterior variance ``(1 - a') / (1 - a) b`` (``variance="posterior"``, the same
law as eta = 1) or the paper's larger ``sigma_hat^2 = b`` (``variance="sigma_hat"``, the
DDPM variant of the paper's Table 1). No noise is added on the step into ``sigma = 0``:
the result there is ``x0_hat``, as for every other solver.

Randomness is per sample: with ``seed=s`` sample ``i`` of the batch draws its ``z`` at
step ``k`` from the counter-based stream ``(noise_keys(s, i), k + 1)`` of
:mod:`pflow.noise` (or pass one key per sample), so a sample does not depend on the batch,
the batch size or the rank it is drawn on. ``generator=`` draws batch-wide ``torch.randn``
instead (faster to set up, but tied to the batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..noise import KeyedNormal, noise_keys
from . import SolverSpec, register
from .ode import PFODE, Outcome, walk

__all__ = ["solve_ddim", "solve_ddpm", "PerSampleNoise"]


class PerSampleNoise:
    """Standard normal draws keyed per sample, one stream per draw.

    Args:
        seed: an integer (sample ``i`` of the batch has key ``noise_keys(seed, i)``) or one
            64-bit key per sample (an int64 tensor or a sequence of ints), as made by
            :func:`pflow.noise_keys` for the samples' indices in the whole run.
        batch: the batch size.

    The ``k``-th call of :meth:`draw` uses stream ``k`` (stream 0 is reserved for
    ``x_T``), so step ``k``'s noise is the same however the batch is split.
    """

    def __init__(self, seed: int | Sequence[int] | Tensor, batch: int) -> None:
        if isinstance(seed, bool):
            raise TypeError("seed must be an integer or per-sample keys, got a bool")
        keys = noise_keys(seed, batch) if isinstance(seed, int) else seed
        self.normal = KeyedNormal(keys)
        if len(self.normal) != batch:
            raise ValueError(
                f"seed must be an int or {batch} per-sample keys, got {len(self.normal)}"
            )
        self.stream = 0

    def draw(self, like: Tensor) -> Tensor:
        self.stream += 1
        return self.normal.randn(
            like.shape[1:], stream=self.stream, dtype=like.dtype, device=like.device
        )


def _noise_source(
    seed: int | Sequence[int] | Tensor | None, generator: torch.Generator | None, x: Tensor
):  # type: ignore[no-untyped-def]
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None:
        return PerSampleNoise(seed, x.shape[0]).draw
    return lambda like: torch.randn(
        like.shape, generator=generator, dtype=like.dtype, device=like.device
    )


def _walk(ode: PFODE, x: Tensor, grid: list[float], record: bool, partial: bool, update) -> Outcome:  # type: ignore[no-untyped-def]
    if grid[-1] > grid[0]:
        raise ValueError("a stochastic sampler only runs downward (decreasing sigmas)")

    def step(x: Tensor, sigma: float, sigma_next: float) -> Tensor:
        return update(ode.eval(x, sigma), sigma, sigma_next)

    return walk(ode, x, grid, step, record=record, partial=partial)


def solve_ddim(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
    eta: float = 0.0,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> Outcome:
    """DDIM with ``eta`` (eq. 12 and 16 of the DDIM paper); ``eta = 0`` is ``euler``."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    draw = _noise_source(seed, generator, x)

    def update(ev, sigma: float, sigma_next: float) -> Tensor:  # type: ignore[no-untyped-def]
        a, a_next = 1 / (1 + sigma * sigma), 1 / (1 + sigma_next * sigma_next)
        s = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        direction = math.sqrt(max(1 - a_next - s * s, 0.0))
        out = ev.x0 * math.sqrt(a_next)
        out.add_(ev.eps, alpha=direction)
        if s > 0:
            out.add_(draw(out), alpha=s)
        return out

    return _walk(ode, x, grid, record, partial, update)


def solve_ddpm(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
    variance: str = "posterior",
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> Outcome:
    """DDPM ancestral sampling on any grid: the posterior mean given ``x0_hat`` plus noise
    of the posterior variance or the larger ``sigma_hat^2 = 1 - a / a'``."""
    if variance not in ("posterior", "sigma_hat"):
        raise ValueError(f"variance must be 'posterior' or 'sigma_hat', got {variance!r}")
    draw = _noise_source(seed, generator, x)

    def update(ev, sigma: float, sigma_next: float) -> Tensor:  # type: ignore[no-untyped-def]
        a, a_next = 1 / (1 + sigma * sigma), 1 / (1 + sigma_next * sigma_next)
        b = 1 - a / a_next
        c_x0 = math.sqrt(a_next) * b / (1 - a)
        c_xt = math.sqrt(a / a_next) * (1 - a_next) / (1 - a)
        out = ev.x0 * c_x0
        out.add_(ev.x, alpha=c_xt)
        if sigma_next > 0:
            var = (1 - a_next) / (1 - a) * b if variance == "posterior" else b
            out.add_(draw(out), alpha=math.sqrt(var))
        return out

    return _walk(ode, x, grid, record, partial, update)


register(
    SolverSpec(
        "ddim",
        False,
        1,
        solve_ddim,
        options=("eta", "seed", "generator"),
        summary="DDIM with eta (0: the ODE's Euler step; 1: DDPM posterior)",
        stochastic=True,
    )
)
register(
    SolverSpec(
        "ddpm",
        False,
        1,
        solve_ddpm,
        options=("variance", "seed", "generator"),
        summary="DDPM ancestral sampling (posterior or sigma_hat variance)",
        stochastic=True,
    )
)
