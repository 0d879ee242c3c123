"""Step-size control, separate from stepping (diffrax's ``PIDController``).

The local error estimate of an embedded pair is measured in the network's scale (the
scale the solver's state lives in), per sample, as an RMS over the sample's elements:

    ratio_b = sqrt(mean_i (err_bi / (atol + rtol * max(|x_bi|, |x_next_bi|)))^2).

:func:`pi_control` is the one controller: a pure function of the error ratios, the
previous accepted ratio and the step, vectorised over whatever shares a decision. The
driver calls it with one ratio for a batch that shares its steps (the largest over the
batch and over every rank), with one per sample for per-sample steps, and the likelihood's
augmented ODE calls it through the same driver.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import column
from .ode import PFODE

__all__ = ["PIGains", "pi_control", "error_ratio", "rms_per_sample", "initial_step"]


def rms_per_sample(v: Tensor) -> Tensor:
    """Root mean square over every dimension but the first (float64)."""
    return v.reshape(v.shape[0], -1).to(torch.float64).pow(2).mean(dim=1).sqrt()


def error_ratio(err: Tensor, x: Tensor, x_next: Tensor, rtol: float, atol: float) -> Tensor:
    """Per-sample ratio of the error estimate to its tolerance, shape ``(batch,)``."""
    tol = atol + rtol * torch.maximum(x.abs(), x_next.abs())
    return rms_per_sample(err / tol)


@dataclass(frozen=True)
class PIGains:
    """The gains of a PI controller (Gustafsson; Hairer & Wanner, Solving ODEs II, IV.2).

    Args:
        order: ``1 + min(order, error_order)`` of the pair: the power of ``h`` in its local
            error estimate.
        safety, beta1, beta2: ``h_next = h * safety * ratio^(-beta1) * prev^(beta2)``;
            ``beta1 = 0.7 / order``, ``beta2 = 0.4 / order`` by default.
        factor_min, factor_max: bounds on the change of step per proposal.
    """

    order: int
    safety: float = 0.9
    beta1: float | None = None
    beta2: float | None = None
    factor_min: float = 0.2
    factor_max: float = 10.0

    @property
    def b1(self) -> float:
        return 0.7 / self.order if self.beta1 is None else self.beta1

    @property
    def b2(self) -> float:
        return 0.4 / self.order if self.beta2 is None else self.beta2


class _Scalar:
    """Python-float arithmetic for one shared decision (no tensor per step)."""

    isfinite = staticmethod(math.isfinite)

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    @staticmethod
    def clamp(v: Any, lo: float, hi: float) -> Any:
        return min(max(v, lo), hi)


class _Vector:
    """The same operations elementwise on float64 tensors (per-sample decisions)."""

    isfinite = staticmethod(torch.isfinite)
    where = staticmethod(torch.where)

    @staticmethod
    def clamp(v: Tensor, lo: float, hi: float) -> Tensor:
        return v.clamp(lo, hi)


def pi_control(gains: PIGains, ratio: Any, prev_ratio: Any, h: Any) -> tuple[Any, Any, Any]:
    """One decision: ``(accepted, h_next, prev_next)`` from the error ``ratio`` of a step of
    size ``|h|``: Python floats for one decision, or float64 tensors of one shape for one
    decision per element (the formula is written once, for both).

    Accepted where ``ratio <= 1``: the step grows by the PI factor (bounded by
    ``factor_min``/``factor_max``) and the ratio is remembered. Rejected: it shrinks by
    ``safety * ratio^(-1/order)`` (at most 1, at least ``factor_min``) and the memory is
    kept. A NaN or infinite ratio is a rejection with the hardest cut."""
    ops: Any = _Vector if isinstance(ratio, Tensor) else _Scalar
    finite = ops.isfinite(ratio)
    accepted = (ratio <= 1.0) & finite
    r = ops.clamp(ops.where(finite, ratio, 1.0), 1e-10, math.inf)
    grow = ops.clamp(
        gains.safety * r ** (-gains.b1) * prev_ratio**gains.b2, gains.factor_min, gains.factor_max
    )
    shrink = ops.clamp(gains.safety * r ** (-1.0 / gains.order), gains.factor_min, 1.0)
    factor = ops.where(finite, ops.where(accepted, grow, shrink), gains.factor_min)
    prev_next = ops.where(accepted, ops.clamp(r, 1e-4, math.inf), prev_ratio)
    return accepted, abs(h) * factor, prev_next


def initial_step(
    ode: PFODE,
    order: int,
    x: Tensor,
    sigma: Tensor,
    eps: Tensor,
    direction: float,
    span: Tensor,
    rtol: float,
    atol: float,
    reduce: Callable[[Tensor], Tensor],
) -> Tensor:
    """Hairer, Norsett & Wanner's starting step (Solving ODEs I, II.4), measured in the
    network's scale; one evaluation. ``sigma`` and ``span`` are float64 tensors, 0-d for a
    shared step or ``(batch,)`` per sample; ``reduce`` turns per-sample norms into what
    shares the decision (the batch maximum, over ranks too, for a shared step)."""
    sc = atol + rtol * x.abs()
    c0 = (1.0 + sigma * sigma).rsqrt()  # C(sigma)
    # d x / d sigma in the network's scale: -sigma / (1 + sigma^2) * x + C(sigma) * eps.
    f0 = x * column(-sigma * c0 * c0, x) + eps * column(c0, x)
    d0 = reduce(rms_per_sample(x / sc)).cpu()
    d1 = reduce(rms_per_sample(f0 / sc)).cpu()
    h0 = torch.where((d0 > 1e-5) & (d1 > 1e-5), 0.01 * d0 / d1, torch.full_like(d0, 1e-6))
    h0 = torch.minimum(h0, span)
    s1 = sigma + direction * h0
    c1 = (1.0 + s1 * s1).rsqrt()
    x1 = x + f0 * column(direction * h0, x)
    k1 = ode.eps(x1, float(s1) if s1.ndim == 0 else s1)
    f1 = x1 * column(-s1 * c1 * c1, x) + k1 * column(c1, x)
    d2 = reduce(rms_per_sample((f1 - f0) / sc)).cpu() / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(
        dmax > 1e-15,
        (0.01 / dmax.clamp(min=1e-300)) ** (1.0 / (order + 1)),
        torch.clamp(h0 * 1e-3, min=1e-6),
    )
    return torch.minimum(torch.minimum(100 * h0, h1), span)


def underflow(h_abs: float, sigma: float) -> bool:
    """The step has shrunk below what the sigma's float64 can resolve."""
    return h_abs < 1e-14 * max(1.0, abs(sigma)) or not math.isfinite(h_abs)
