"""How good a solve was: distance to the reference endpoint, and distribution quality.

- :func:`trajectory_rmse`: RMS per dimension between a solver's endpoint and the ODE's
  true endpoint from the same noise (what a solver controls).
- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two feature
  sets (FID's formula, Heusel et al. 2017), here in the feature space of the bundled
  digits classifier (:func:`digits_fd`).
- :func:`gmm_nll`: mean negative log-likelihood under an exact Gaussian mixture.
- :func:`sliced_wasserstein`: the sliced 2-Wasserstein distance between point clouds.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .zoo.gmm import GaussianMixture

__all__ = [
    "trajectory_rmse",
    "frechet_distance",
    "gmm_nll",
    "sliced_wasserstein",
    "digits_fd",
    "digits_confident_fraction",
]


def trajectory_rmse(x: Tensor, reference: Tensor) -> float:
    """RMS per dimension of ``x - reference``, over the whole batch (float64): the error of
    a solver's endpoint against the ODE's true endpoint from the same noise."""
    if x.shape != reference.shape:
        raise ValueError(f"x {tuple(x.shape)} and reference {tuple(reference.shape)} differ")
    return float((x.double() - reference.double()).pow(2).mean().sqrt())


def gmm_nll(gmm: GaussianMixture, x: Tensor) -> float:
    """Mean negative log-likelihood (nats per sample) of samples under the exact mixture."""
    return float(-gmm.log_prob(x.double()).mean())


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(c)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(features_a: Tensor | np.ndarray, features_b: Tensor | np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^{1/2} C_b C_a^{1/2})^{1/2})`` in float64.

    The matrix square root is taken through symmetric eigendecompositions, so the result
    is 0 (to round-off) for identical feature sets and never complex.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (n, d) with equal d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples in each feature set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    c_a, c_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s_a = _psd_sqrt(c_a)
    cross = np.linalg.eigvalsh(s_a @ c_b @ s_a)
    trace_sqrt = float(np.sqrt(np.clip(cross, 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(c_a) + np.trace(c_b) - 2 * trace_sqrt)


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two point clouds ``(n, d)`` and ``(m, d)``:
    the root mean square, over random unit directions, of the 1-D W2 distance between the
    projected samples (compared at common quantile levels when ``n != m``)."""
    a64 = torch.as_tensor(a, dtype=torch.float64).reshape(len(a), -1)
    b64 = torch.as_tensor(b, dtype=torch.float64).reshape(len(b), -1)
    if a64.shape[1] != b64.shape[1]:
        raise ValueError(f"point clouds differ in dimension: {a64.shape[1]} vs {b64.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a64.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = (a64 @ dirs).sort(dim=0).values
    pb = (b64 @ dirs).sort(dim=0).values
    if len(pa) != len(pb):
        levels = torch.linspace(0, 1, max(len(pa), len(pb)), dtype=torch.float64)
        pa = torch.quantile(pa, levels, dim=0)
        pb = torch.quantile(pb, levels, dim=0)
    return float((pa - pb).pow(2).mean().sqrt())


@lru_cache(maxsize=1)
def _classifier():  # type: ignore[no-untyped-def]
    from .zoo.networks_load import load_digits_classifier

    return load_digits_classifier()


@lru_cache(maxsize=1)
def _test_features() -> np.ndarray:
    from .zoo.data import digits_data

    return _digit_features(digits_data("test"))


def _digit_features(x: Tensor) -> np.ndarray:
    net = _classifier()
    with torch.no_grad():
        return net.features(x.float().reshape(-1, 1, 8, 8)).double().numpy()


def digits_fd(samples: Tensor, reference: Tensor | None = None) -> float:
    """Fréchet distance, in the bundled digits classifier's 128-d feature space, between
    ``samples`` (``(n, 1, 8, 8)`` in ``[-1, 1]``) and the 300 held-out real test digits
    (or ``reference``)."""
    ref = _test_features() if reference is None else _digit_features(reference)
    return frechet_distance(_digit_features(samples.clamp(-1, 1)), ref)


def digits_confident_fraction(samples: Tensor, threshold: float = 0.9) -> float:
    """Fraction of samples the bundled classifier labels with probability > ``threshold``."""
    net = _classifier()
    with torch.no_grad():
        probs = net(samples.float().clamp(-1, 1).reshape(-1, 1, 8, 8)).softmax(-1)
    return float((probs.max(-1).values > threshold).double().mean())
