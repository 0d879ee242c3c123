"""How good a solve was: distance to the reference endpoint, and distribution quality."""

from __future__ import annotations

from torch import Tensor

from .zoo.gmm import GaussianMixture

__all__ = ["trajectory_rmse", "gmm_nll"]


def trajectory_rmse(x: Tensor, reference: Tensor) -> float:
    """RMS per dimension of ``x - reference``, over the whole batch (float64): the error of
    a solver's endpoint against the ODE's true endpoint from the same noise."""
    if x.shape != reference.shape:
        raise ValueError(f"x {tuple(x.shape)} and reference {tuple(reference.shape)} differ")
    return float((x.double() - reference.double()).pow(2).mean().sqrt())


def gmm_nll(gmm: GaussianMixture, x: Tensor) -> float:
    """Mean negative log-likelihood (nats per sample) of samples under the exact mixture."""
    return float(-gmm.log_prob(x.double()).mean())
