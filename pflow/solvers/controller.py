"""Step-size control, separate from stepping (diffrax's ``PIDController``).

The local error estimate of an embedded pair is measured in the network's scale (the
scale the solver's state lives in), per sample, as an RMS over the sample's elements:

    ratio_b = sqrt(mean_i (err_bi / (atol + rtol * max(|x_bi|, |x_next_bi|)))^2).

The batch shares one step, so a step is accepted when every sample passes
(``max_b ratio_b <= 1``). A PI controller (Gustafsson; Hairer & Wanner, Solving ODEs II,
IV.2) proposes the next step from this ratio and the previous accepted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PIController", "error_ratio", "rms_per_sample"]


def rms_per_sample(v: Tensor) -> Tensor:
    """Root mean square over every dimension but the first (float64)."""
    return v.reshape(v.shape[0], -1).to(torch.float64).pow(2).mean(dim=1).sqrt()


def error_ratio(err: Tensor, x: Tensor, x_next: Tensor, rtol: float, atol: float) -> Tensor:
    """Per-sample ratio of the error estimate to its tolerance, shape ``(batch,)``."""
    tol = atol + rtol * torch.maximum(x.abs(), x_next.abs())
    return rms_per_sample(err / tol)


@dataclass
class PIController:
    """Proposes ``h_next = h * safety * ratio^(-beta1) * prev_ratio^(beta2)``.

    Args:
        order: ``1 + min(order, error_order)`` of the pair: the power of ``h`` in its
            local error estimate.
        safety, beta1, beta2: PI gains, ``beta1 = 0.7 / order``, ``beta2 = 0.4 / order`` by
            default (Hairer & Wanner's choice).
        factor_min, factor_max: bounds on the change of step per proposal.
    """

    order: int
    safety: float = 0.9
    beta1: float | None = None
    beta2: float | None = None
    factor_min: float = 0.2
    factor_max: float = 10.0

    def __post_init__(self) -> None:
        if self.beta1 is None:
            self.beta1 = 0.7 / self.order
        if self.beta2 is None:
            self.beta2 = 0.4 / self.order
        self._prev_ratio = 1.0

    def propose(self, h: float, ratio: float, accepted: bool) -> float:
        """The next step (same sign as ``h``) after a step of size ``h`` with error ``ratio``."""
        assert self.beta1 is not None and self.beta2 is not None
        if not ratio < float("inf"):  # NaN or inf: cut hard
            return h * self.factor_min
        ratio = max(ratio, 1e-10)
        if accepted:
            factor = self.safety * ratio ** (-self.beta1) * self._prev_ratio**self.beta2
            self._prev_ratio = max(ratio, 1e-4)
            factor = min(self.factor_max, max(self.factor_min, factor))
        else:
            factor = max(self.factor_min, min(1.0, self.safety * ratio ** (-1.0 / self.order)))
        return h * factor
