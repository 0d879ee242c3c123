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
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..noise import KeyedNormal, noise_keys
from .base import Option, Solver, State, StepInfo
from .ode import PFODE, Evaluation

__all__ = ["DDIM", "DDPM", "PerSampleNoise", "SOLVERS"]


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
) -> Callable[[Tensor], Tensor]:
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None:
        return PerSampleNoise(seed, x.shape[0]).draw
    return lambda like: torch.randn(
        like.shape, generator=generator, dtype=like.dtype, device=like.device
    )


def _check_seed(seed: Any) -> Any:
    """An int seed in ``[0, 2**31)`` (a numpy integer becomes an int), or per-sample keys:
    a 1-D int64 tensor or a sequence of ints (their number is checked against the batch
    later, as every per-sample option's is)."""
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.ndim != 1:
            error = TypeError if seed.dtype != torch.int64 else ValueError
            raise error(
                "per-sample keys must be a 1-D int64 tensor (pflow.noise_keys), got dtype "
                f"{seed.dtype} and shape {tuple(seed.shape)}"
            )
        return seed
    if not isinstance(seed, bool) and hasattr(seed, "__index__"):
        seed = operator.index(seed)
        if not 0 <= seed < 2**31:
            raise ValueError(f"an int seed must lie in [0, 2**31), got {seed!r}")
        return seed
    if isinstance(seed, (list, tuple, range)):
        for key in seed:
            if isinstance(key, bool) or not hasattr(key, "__index__"):
                raise TypeError(
                    f"per-sample keys must be ints (pflow.noise_keys), got {key!r} in {seed!r}"
                )
        return seed
    raise TypeError()  # the option's own message: what it accepts, and the value


def _check_generator(generator: Any) -> Any:
    if not isinstance(generator, torch.Generator):
        raise TypeError()
    return generator


_SEED = Option(
    "seed",
    object,
    None,
    "an int in [0, 2**31) or one 64-bit key per sample (an int64 tensor or a sequence of "
    "ints, see pflow.noise_keys)",
    allow_none=True,
    batch_dim=0,
    expand=lambda seed, batch: noise_keys(seed, batch) if isinstance(seed, int) else seed,
    check=_check_seed,
)
_GENERATOR = Option(
    "generator",
    object,
    None,
    "a torch.Generator (batch-wide noise)",
    allow_none=True,
    check=_check_generator,
)


class _Ancestral(Solver):
    """A stochastic step of the DDIM family: one evaluation, then noise. The noise source
    lives in the state (``aux``), made once from ``seed`` or ``generator``."""

    stochastic = True
    directions = ("down",)
    last_step_note = (
        "into sigma = 0 its update adds no noise and is x0_hat, the driver's Euler step"
    )

    def init(self, ode: PFODE, x: Tensor, sigma: Any, options: dict[str, Any]) -> State:
        return State(x, sigma, aux=_noise_source(options["seed"], options["generator"], x))

    def step(
        self, ode: PFODE, state: State, sigma_next: Any, options: dict[str, Any], info: StepInfo
    ) -> State:
        sigma = float(state.sigma)
        ev = state.ev if state.ev is not None else ode.eval(state.x, sigma)
        x = self.update(ev, sigma, float(sigma_next), options, state.aux)
        return State(x, sigma_next, aux=state.aux)

    def update(
        self,
        ev: Evaluation,
        sigma: float,
        sigma_next: float,
        options: dict[str, Any],
        draw: Callable[[Tensor], Tensor],
    ) -> Tensor:
        raise NotImplementedError


class DDIM(_Ancestral):
    """DDIM with ``eta`` (eq. 12 and 16 of the DDIM paper); ``eta = 0`` is ``euler``."""

    name = "ddim"
    summary = "DDIM with eta (0: the ODE's Euler step; 1: DDPM posterior)"
    ddim_options = {"eta": 0.0}
    options = (
        Option("eta", float, 0.0, "0: DDIM (the ODE); 1: DDPM's posterior noise", low=0.0),
        _SEED,
        _GENERATOR,
    )

    def draws_noise(self, options: dict[str, Any]) -> bool:
        return options.get("eta", 0.0) > 0

    def update(self, ev, sigma, sigma_next, options, draw):  # type: ignore[no-untyped-def]
        eta = options["eta"]
        a, a_next = 1 / (1 + sigma * sigma), 1 / (1 + sigma_next * sigma_next)
        s = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        direction = math.sqrt(max(1 - a_next - s * s, 0.0))
        out = ev.x0 * math.sqrt(a_next)
        out.add_(ev.eps, alpha=direction)
        if s > 0:
            out.add_(draw(out), alpha=s)
        return out


class DDPM(_Ancestral):
    """DDPM ancestral sampling on any grid: the posterior mean given ``x0_hat`` plus noise
    of the posterior variance or the larger ``sigma_hat^2 = 1 - a / a'``."""

    name = "ddpm"
    summary = "DDPM ancestral sampling (posterior or sigma_hat variance)"
    options = (
        Option(
            "variance",
            str,
            "posterior",
            "posterior variance, or the paper's larger sigma_hat^2",
            choices=("posterior", "sigma_hat"),
        ),
        _SEED,
        _GENERATOR,
    )

    def update(self, ev, sigma, sigma_next, options, draw):  # type: ignore[no-untyped-def]
        a, a_next = 1 / (1 + sigma * sigma), 1 / (1 + sigma_next * sigma_next)
        b = 1 - a / a_next
        c_x0 = math.sqrt(a_next) * b / (1 - a)
        c_xt = math.sqrt(a / a_next) * (1 - a_next) / (1 - a)
        out = ev.x0 * c_x0
        out.add_(ev.x, alpha=c_xt)
        if sigma_next > 0:
            var = (1 - a_next) / (1 - a) * b if options["variance"] == "posterior" else b
            out.add_(draw(out), alpha=math.sqrt(var))
        return out


SOLVERS = (DDIM(), DDPM())
