"""Reference solutions independent of pflow's own solvers: scipy's DOP853 in float64."""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp


def scipy_reference(
    model,
    xbar0: torch.Tensor,
    sigma_from: float,
    sigma_to: float,
    rtol: float = 1e-13,
    atol: float = 1e-13,
) -> torch.Tensor:
    """Integrate d xbar / d sigma = model(xbar, sigma) with DOP853, float64, flattened."""
    shape = xbar0.shape

    def f(sigma, y):
        xbar = torch.from_numpy(y).reshape(shape)
        return model(xbar, float(sigma)).reshape(-1).numpy()

    sol = solve_ivp(
        f,
        (sigma_from, sigma_to),
        xbar0.double().reshape(-1).numpy(),
        method="DOP853",
        rtol=rtol,
        atol=atol,
    )
    assert sol.success, sol.message
    return torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(shape)


def xbar_of(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x * (1 + sigma**2) ** 0.5


def x_of(xbar: torch.Tensor, sigma: float) -> torch.Tensor:
    return xbar / (1 + sigma**2) ** 0.5


def rms(v: torch.Tensor) -> float:
    return float(v.double().pow(2).mean().sqrt())
