"""The ODE's true endpoint from given noise: a float64 high-order adaptive solve at tight
tolerance, the yardstick a solver's error is measured against (DESIGN.md, section 4)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from .errors import MaxNFEExceeded
from .model import EpsModel, ODEModel
from .solve import SolveResult, sample

__all__ = ["reference", "REFERENCE_SOLVER"]

# Measured (OMP_NUM_THREADS=1, CPU) at equal accuracy against a DOP853 solve at 1e-13:
# see reference()'s docstring.
REFERENCE_SOLVER = "rk45"


def reference(
    model: ODEModel,
    noise: Tensor,
    *,
    sigmas: Tensor | None = None,
    rtol: float = 1e-9,
    atol: float = 1e-9,
    last_step: Literal["euler", "solver"] = "euler",
    solver: str = REFERENCE_SOLVER,
    max_nfe: int | None = None,
    return_partial: bool = False,
    batch_size: int | None = None,
    process_group: Any = None,
) -> SolveResult:
    """Integrate the PF-ODE from ``noise`` in float64 at tight tolerance.

    The solve runs on ``noise`` cast to float64, so the model must accept float64 input
    (for a network, ``net.double()``); the result stays float64. It passes through every
    point of ``sigmas`` (by default ``sigma_max``, ``sigma_min`` and 0, as
    :func:`pflow.sample` does for adaptive solvers) and takes the step into 0 as
    ``last_step`` says: keep it equal to the ``last_step`` of the solves being judged, since
    the default Euler step into 0 is part of what they compute.

    The default solver is pflow's own ``rk45`` (Dormand-Prince 5(4), error measured per
    sample in the network's scale), the fastest at equal accuracy of the four candidates,
    measured on CPU (one thread) against a much tighter solve:

    - built-in 8-D Gaussian mixture, 256 samples, error ~2e-10: ``rk45`` 830 NFE / 1.1 s,
      ``scipy:DOP853`` 1072 NFE / 2.1 s, ``torchdiffeq:dopri5`` 1088 NFE / 3.5 s,
      ``torchdiffeq:dopri8`` ~1000 NFE / 3.8 s (the 8th-order pairs need fewer NFE only
      below ~1e-11; torchdiffeq and scipy also cost more per step);
    - the tests' random ``UNet2DModel`` (``EpsModel``, 4 samples, float64), where the
      network dominates: error 1e-4 costs ``rk45`` ~1000 NFE and ``scipy:DOP853`` 1563;
      error 4e-5 ``rk45`` ~1300 and ``torchdiffeq:dopri8`` 2395. A network's right-hand
      side is only piecewise smooth in sigma (``t(sigma)`` is interpolated linearly in
      ``log sigma`` between training steps), which takes the edge off 8th-order methods.

    Any other adaptive name of :func:`pflow.available_solvers` may be passed as ``solver``.

    Args:
        model: ``eps = model(xbar, sigma)``.
        noise: ``x_T`` of shape ``(batch, ...)``.
        sigmas: the grid to pass through (decreasing); default from the model's schedule.
        rtol, atol: tolerances of the solve.
        last_step: ``"euler"`` or ``"solver"``, see :func:`pflow.sample`.
        solver: an adaptive solver name.
        max_nfe: budget of network evaluations (default 100000).
        return_partial, batch_size, process_group: as for :func:`pflow.sample`.

    Returns:
        A float64 :class:`~pflow.SolveResult`.

    Raises:
        TypeError: the model's network is not float64 (its parameters are checked when it
            is an ``nn.Module`` or an :class:`~pflow.EpsModel` of one; for another callable
            the dtype error of its first call is explained). The model is never cast
            behind your back: pass ``model.to(torch.float64)`` (an ``EpsModel``) or a
            network made float64 with ``net.double()``.
    """
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point torch.Tensor")
    low = _low_precision_parameters(model)
    if low is not None:
        raise TypeError(_float64_needed(model, f"its network's parameters are {low}"))
    try:
        return sample(
            model,
            noise.to(torch.float64),
            solver,
            sigmas=sigmas,
            rtol=rtol,
            atol=atol,
            max_nfe=max_nfe,
            last_step=last_step,
            return_partial=return_partial,
            batch_size=batch_size,
            process_group=process_group,
        )
    except RuntimeError as exc:  # a callable whose parameters could not be inspected
        if isinstance(exc, MaxNFEExceeded) or not _is_dtype_error(exc):
            raise
        raise TypeError(_float64_needed(model, f"calling it failed: {exc}")) from exc


def _low_precision_parameters(model: ODEModel) -> torch.dtype | None:
    """The dtype of the first floating parameter or buffer that is not float64, of the
    ``nn.Module`` behind ``model`` (itself, or an EpsModel's network); ``None`` when all
    are float64 or there is no module to look at. An EpsModel with ``net_dtype`` runs its
    network in that dtype by design and is not flagged."""
    net: object = model
    if isinstance(model, EpsModel):
        if model.net_dtype is not None:
            return None
        net = model.eager_net
    if not isinstance(net, torch.nn.Module):
        return None
    for t in (*net.parameters(), *net.buffers()):
        if t.is_floating_point() and t.dtype != torch.float64:
            return t.dtype
    return None


def _is_dtype_error(exc: RuntimeError) -> bool:
    text = str(exc)
    return any(s in text for s in ("dtype", "Double and Float", "scalar type", "Half", "BFloat"))


def _float64_needed(model: ODEModel, why: str) -> str:
    how = (
        "pass model.to(torch.float64)"
        if isinstance(model, EpsModel)
        else "pass a float64 model (net.double(), or EpsModel(...).to(torch.float64))"
    )
    return f"reference() solves in float64 and needs a float64 model, but {why}; {how}"
