"""Reference solutions independent of pflow's own solvers: scipy's DOP853 in float64."""

from __future__ import annotations

import math

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


# The order problem shared by the convergence tests: an exact 4-D, 3-component mixture,
# 16 noises, integrated from sigma = 20 to 0.1 (a grid that stops at a positive sigma).
SIGMA_HI, SIGMA_LO = 20.0, 0.1


def geometric(n: int, hi: float = SIGMA_HI, lo: float = SIGMA_LO) -> torch.Tensor:
    """``n`` steps evenly spaced in log sigma from ``hi`` to ``lo``."""
    return torch.exp(torch.linspace(math.log(hi), math.log(lo), n + 1, dtype=torch.float64))


def with_startup(n: int, k: int = 3) -> torch.Tensor:
    """The geometric grid of ``n`` steps (log-step ``d``) with ``k`` extra start-up steps of
    ``d^2 / 2`` at its top, so that the lower-order steps a multistep method starts with
    (local error O(d^2) for the first, first-order one) do not show in the global error:
    the order then measured is the warmed-up method's."""
    d = math.log(SIGMA_HI / SIGMA_LO) / n
    logs = [math.log(SIGMA_HI) - j * d * d / 2 for j in range(k + 1)]
    logs += [math.log(SIGMA_HI) - d * j for j in range(1, n + 1)]
    return torch.exp(torch.tensor(logs, dtype=torch.float64))


def slope(steps, errors) -> float:
    """Minus the slope of log(error) against log(steps): the measured order."""
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def order_problem():
    """``(gmm, noise, reference endpoint at SIGMA_LO)`` for the convergence tests."""
    from .conftest import make_gmm

    gmm = make_gmm(dim=4, k=3, seed=3)
    noise = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = scipy_reference(gmm, xbar_of(noise, SIGMA_HI), SIGMA_HI, SIGMA_LO)
    return gmm, noise, x_of(ref, SIGMA_LO)
