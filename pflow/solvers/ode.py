"""The PF-ODE as every solver sees it: one counted, budgeted, NaN-watched evaluation.

The ODE is ``d xbar / d sigma = eps(xbar, sigma)``. Solvers keep the state in the
network's own scale, ``x = xbar * C(sigma)`` with ``C(sigma) = 1 / sqrt(1 + sigma^2)``:
a step ``xbar_next = xbar + h * sum_j w_j k_j`` is then written

    x_next = (C(sigma_next) / C(sigma)) * x + C(sigma_next) * h * sum_j w_j k_j,

with the coefficients computed in float64. It is the same arithmetic as in ``xbar``,
without adding small updates to a number of size ``sigma_max`` in float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import MaxNFEExceeded, NonFiniteError
from ..model import ODEModel, sigma_column

__all__ = ["PFODE", "Evaluation", "scale"]


_FOLD = 256


def scale(sigma: float) -> float:
    """``C(sigma) = 1 / sqrt(1 + sigma^2) = sqrt(a)``: from ``xbar`` to the network's scale."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


class PFODE:
    """The right-hand side ``eps`` of the PF-ODE, with NFE counting, a budget and a
    NaN/inf watch.

    ``eps(x, sigma)`` takes the state in the network's scale. Each call is one network
    evaluation (NFE) whatever the batch size. With a ``process_group`` (torch.distributed)
    the batch is one shard of a larger one, and :meth:`batch_max` reduces over all ranks.
    Finite-ness is recorded without a host sync; :meth:`raise_if_nonfinite` checks the
    record. The first evaluation checks that the model returned a tensor of the state's
    shape (a TypeError or ValueError naming the model otherwise).
    """

    def __init__(
        self,
        model: ODEModel,
        *,
        max_nfe: int | None = None,
        check_finite: bool = True,
        process_group: Any = None,
    ) -> None:
        self.model = model
        self.process_group = process_group
        self.max_nfe = max_nfe
        self.check_finite = check_finite
        self.nfe = 0
        self.rows = 0  # network rows evaluated (a guided evaluation costs two per sample)
        self._base = model
        self._bind(model)
        self._sums: Tensor | None = None  # float64 sums of eps, one slot per evaluation
        self._n_sums = 0
        self._finite_sigmas: list[float | Tensor] = []

    def _bind(self, model: ODEModel) -> None:
        self.model = model
        self._predict = getattr(model, "predict_xt", None)
        self._direct = getattr(model, "eps_from_xt", None)
        self._rows_of = getattr(model, "network_rows", None)

    def select(self, index: Tensor | None) -> None:
        """Evaluate the samples ``index`` of the batch from now on (``None``: all of them):
        a model bound to per-sample conditioning (``cond_rows``/``take``) gets those rows.
        The per-sample adaptive driver calls it before each batched trial step on the
        samples still running."""
        base = self._base
        if getattr(base, "cond_rows", None) is None:
            return
        self._bind(base if index is None else base.take(index))  # type: ignore[attr-defined]

    def eval(self, x: Tensor, sigma: float | Tensor) -> Evaluation:
        """One network evaluation at the state ``x`` (network scale) and ``sigma``."""
        if isinstance(sigma, Tensor) and sigma.ndim and sigma.device != x.device:
            sigma = sigma.to(x.device)
        if self.max_nfe is not None and self.nfe >= self.max_nfe:
            raise MaxNFEExceeded(
                f"max_nfe={self.max_nfe} network evaluations used up before sigma="
                f"{_fmt(sigma)} was reached; raise max_nfe or loosen rtol/atol"
            )
        self.nfe += 1
        self.rows += x.shape[0] if self._rows_of is None else self._rows_of(sigma, x.shape[0])
        x0: Tensor | None = None
        if self._predict is not None:
            eps, x0 = self._predict(x, sigma)
        elif self._direct is not None:
            eps = self._direct(x, sigma)
        else:
            if isinstance(sigma, Tensor):
                xbar = x * (1 + sigma_column(sigma, x) ** 2).sqrt().to(x.dtype)
            else:
                xbar = x * math.sqrt(1.0 + sigma * sigma)
            eps = self.model(xbar, sigma)
        if self.nfe == 1 and (not isinstance(eps, Tensor) or eps.shape != x.shape):
            # Once per solve (a model's output shape does not change from call to call):
            # a wrong shape would broadcast into the state and be solved silently.
            self._bad_eps(eps, x)
        if self.check_finite:
            # One reduction into a preallocated slot, no host sync and no allocation
            # that outlives the step: a float64 sum of eps is finite exactly when every
            # element is (float32 values cannot overflow it). The slots are checked
            # every _FOLD evaluations (one host sync) and at the end of the solve.
            if self._sums is None or self._sums.device != eps.device:
                self.raise_if_nonfinite()
                self._sums = torch.empty(_FOLD, dtype=torch.float64, device=eps.device)
            flat = eps.detach().reshape(-1)  # detached: likelihood solves run under autograd
            torch.sum(flat, 0, dtype=torch.float64, out=self._sums[self._n_sums])
            self._n_sums += 1
            self._finite_sigmas.append(sigma)
            if self._n_sums == _FOLD:
                self.raise_if_nonfinite()
        return Evaluation(x, sigma, eps, x0)

    def _bad_eps(self, eps: Any, x: Tensor) -> None:
        """A TypeError (not a tensor) or ValueError (not the state's shape) naming the model:
        a wrong shape would otherwise broadcast into the state and be solved silently."""
        what = _name(self.model)
        if not isinstance(eps, Tensor):
            hint = (
                " (return eps alone; a model that also predicts x0 offers "
                "predict_xt(x_t, sigma) -> (eps, x0))"
                if isinstance(eps, (tuple, list))
                else ""
            )
            raise TypeError(
                f"the model {what} must return eps as a torch.Tensor of the state's shape "
                f"{tuple(x.shape)}, got {type(eps).__name__}{hint}"
            )
        raise ValueError(
            f"the model {what} returned eps of shape {tuple(eps.shape)} for a state of shape "
            f"{tuple(x.shape)}; eps must have the state's shape (one value per entry of "
            "every sample, nothing broadcast)"
        )

    def eps(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """``eps`` at ``(x, sigma)``: one network evaluation."""
        return self.eval(x, sigma).eps

    def extras(self) -> dict[str, Any]:
        """Counts beyond ``nfe`` that a result reports (e.g. the likelihood's ``n_vjp``)."""
        return {}

    def batch_max(self, values: Tensor) -> float:
        """The largest of per-sample ``values`` over the batch, and over every rank of
        ``process_group`` when there is one (so all ranks take the same adaptive steps,
        exactly as one process holding the whole batch would). One host sync."""
        m = values.max()
        if self.process_group is not None:
            from ..distributed import all_max

            m = all_max(m, self.process_group)
        return float(m)

    def forget_finite(self) -> None:
        """Drop the finite-ness record (once something else has shown it was all finite)."""
        self._n_sums = 0
        self._finite_sigmas.clear()

    def raise_if_nonfinite(self) -> None:
        """Raise :class:`NonFiniteError` naming the first sigma whose ``eps`` was not finite."""
        if self._sums is None or self._n_sums == 0:
            return
        ok = torch.isfinite(self._sums[: self._n_sums])
        if bool(ok.all()):
            self.forget_finite()
            return
        first = int((~ok).nonzero()[0])
        number = self.nfe - self._n_sums + first + 1
        raise NonFiniteError(
            f"the model returned NaN or inf at sigma={_fmt(self._finite_sigmas[first])} "
            f"(network evaluation {number})"
        )


class Evaluation:
    """The network's answer at ``(x, sigma)``: ``eps`` and the denoised ``x0_hat``.

    ``x0_hat = xbar - sigma * eps`` is taken from the model when it offers a better
    conditioned one (:meth:`pflow.EpsModel.predict_xt`), else computed on first use.
    """

    __slots__ = ("x", "sigma", "eps", "_x0")

    def __init__(self, x: Tensor, sigma: float | Tensor, eps: Tensor, x0: Tensor | None) -> None:
        self.x, self.sigma, self.eps, self._x0 = x, sigma, eps, x0

    @property
    def x0(self) -> Tensor:
        if self._x0 is None:
            if isinstance(self.sigma, Tensor):
                s = sigma_column(self.sigma, self.x)
                self._x0 = (
                    self.x * (1 + s**2).sqrt().to(self.x.dtype) - s.to(self.x.dtype) * self.eps
                )
            else:
                self._x0 = self.x * math.sqrt(1.0 + self.sigma**2) - self.sigma * self.eps
        return self._x0


def _name(model: Any) -> str:
    """How an error names a model: a function's qualified name, else its class."""
    name = getattr(model, "__qualname__", None)
    if not isinstance(name, str):
        name = type(model).__name__
    return repr(name)


def _fmt(sigma: float | Tensor) -> str:
    if isinstance(sigma, Tensor):
        return f"{sigma.detach().cpu().tolist()}"
    return f"{sigma:.6g}"
