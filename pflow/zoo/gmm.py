"""An exact model: data from a Gaussian mixture, so every noised marginal is known.

If ``x0 ~ sum_k w_k N(mu_k, S_k)`` then ``xbar = x0 + sigma * eps`` is distributed as
``sum_k w_k N(mu_k, S_k + sigma^2 I)``, and the optimal noise prediction is

    eps(xbar, sigma) = E[eps | xbar] = -sigma * grad log p_sigma(xbar)
                     = sigma * sum_k r_k(xbar) (S_k + sigma^2 I)^{-1} (xbar - mu_k),

with ``r_k`` the posterior responsibilities. This is the ground truth for convergence
orders, round trips and likelihoods. All arithmetic is float64; results come back in
the input's dtype. Samples may have any shape ``(batch, ...)`` whose trailing size is
the mixture's dimension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..model import sigma_column
from ..schedule import NoiseSchedule

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """A Gaussian mixture data distribution and its exact probability-flow ODE model.

    Args:
        means: ``(K, D)`` component means.
        covs: ``(K, D)`` diagonal variances or ``(K, D, D)`` full covariances
            (symmetric positive definite).
        weights: ``(K,)`` mixture weights (normalised here); uniform by default.
        schedule: the schedule whose sigma range grids are built from; DDPM's linear
            schedule by default. The model itself is defined at every ``sigma >= 0``.
    """

    def __init__(
        self,
        means: Tensor,
        covs: Tensor,
        weights: Tensor | None = None,
        schedule: NoiseSchedule | None = None,
    ) -> None:
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(mu.shape)}")
        k, d = mu.shape
        cov = torch.as_tensor(covs, dtype=torch.float64)
        if cov.shape == (k, d):
            if not (cov > 0).all():
                raise ValueError("diagonal covs must be positive")
            self._eigvecs: Tensor | None = None
            self._eigvals = cov
        elif cov.shape == (k, d, d):
            if not torch.allclose(cov, cov.transpose(1, 2)):
                raise ValueError("full covs must be symmetric")
            vals, vecs = torch.linalg.eigh(cov)
            if not (vals > 0).all():
                raise ValueError("full covs must be positive definite")
            self._eigvecs, self._eigvals = vecs, vals
        else:
            raise ValueError(
                f"covs must have shape (K, D) or (K, D, D) = ({k}, {d}[, {d}]), got "
                f"{tuple(cov.shape)}"
            )
        w = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        if w.shape != (k,) or not (w > 0).all():
            raise ValueError(f"weights must be {k} positive numbers")
        self.means = mu
        self.covs = cov
        self.weights = w / w.sum()
        self.dim = d
        self.schedule = schedule if schedule is not None else NoiseSchedule.linear()

    def __repr__(self) -> str:
        return f"GaussianMixture(K={len(self.weights)}, D={self.dim})"

    # ------------------------------------------------------------------ internals
    def _flat(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x[0].numel() != self.dim:
            raise ValueError(
                f"x must have shape (batch, ...) with {self.dim} values per sample, got "
                f"{tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    def _components(self, xbar: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per component: eigen-coordinates ``z`` of ``xbar - mu``, variances ``lam + s^2``
        and log densities. ``xbar``: (B, D) float64; ``sigma``: () or (B, 1)."""
        dev = xbar.device
        mu = self.means.to(dev)
        diff = xbar[:, None, :] - mu[None]  # (B, K, D)
        vecs = None if self._eigvecs is None else self._eigvecs.to(dev)
        z = diff if vecs is None else torch.einsum("bkd,kde->bke", diff, vecs)
        s2 = sigma.reshape(-1, 1, 1) ** 2 if sigma.ndim else sigma**2
        var = self._eigvals.to(dev)[None] + s2  # (B or 1, K, D)
        log_n = -0.5 * ((z**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return z, var, log_n

    # ------------------------------------------------------------------ public maths
    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """``log p_sigma(x)`` of the noised marginal (the data density at ``sigma = 0``), per
        sample, float64."""
        xb = self._flat(x)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=xb.device)
        _, _, log_n = self._components(xb, s)
        return torch.logsumexp(log_n + self.weights.to(xb.device).log(), dim=-1)

    def score(self, xbar: Tensor, sigma: float | Tensor) -> Tensor:
        """``grad log p_sigma(xbar)`` in float64, shaped like ``xbar``."""
        xb = self._flat(xbar)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=xb.device)
        if s.ndim:
            s = s.reshape(-1)
        z, var, log_n = self._components(xb, s)
        r = torch.softmax(log_n + self.weights.to(xb.device).log(), dim=-1)  # (B, K)
        pz = r[..., None] * z / var  # responsibility-weighted precision times z
        if self._eigvecs is None:
            grad = -pz.sum(1)
        else:
            grad = -torch.einsum("bke,kde->bd", pz, self._eigvecs.to(xb.device))
        return grad.reshape(xbar.shape)

    def __call__(self, xbar: Tensor, sigma: float | Tensor) -> Tensor:
        """The exact ``eps(xbar, sigma) = -sigma * grad log p_sigma(xbar)``."""
        s = sigma_column(sigma, xbar)
        return (-s * self.score(xbar, sigma)).to(xbar.dtype)

    def predict_xt(self, x_t: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
        """The exact ``(eps, x0_hat)`` given the state in the network's scale ``x_t``, where
        ``x0_hat = E[x0 | xbar] = xbar - sigma * eps`` (computed in float64)."""
        s = sigma_column(sigma, x_t)
        xbar = x_t.to(torch.float64) * (1 + s**2).sqrt()
        eps = -s * self.score(xbar, sigma)
        return eps.to(x_t.dtype), (xbar - s * eps).to(x_t.dtype)

    def eps_from_xt(self, x_t: Tensor, sigma: float | Tensor) -> Tensor:
        """The exact ``eps`` given the state in the network's scale ``x_t``."""
        return self.predict_xt(x_t, sigma)[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws from the data distribution, ``(n, D)`` float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        scaled = z * self._eigvals[comp].sqrt()
        if self._eigvecs is not None:
            scaled = torch.einsum("nkd,nd->nk", self._eigvecs[comp], scaled)
        return self.means[comp] + scaled

    def flow(self, xbar: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        """The exact solution of the PF-ODE from ``sigma_from`` to ``sigma_to``, available for a
        single component: in the covariance's eigenbasis each coordinate of ``xbar - mu``
        scales by ``sqrt((lam + sigma_to^2) / (lam + sigma_from^2))``."""
        if len(self.weights) != 1:
            raise ValueError("flow() has a closed form only for a single Gaussian (K = 1)")
        xb = self._flat(xbar)
        mu = self.means[0].to(xb.device)
        lam = self._eigvals[0].to(xb.device)
        ratio = ((lam + sigma_to**2) / (lam + sigma_from**2)).sqrt()
        vecs = None if self._eigvecs is None else self._eigvecs[0].to(xb.device)
        z = xb - mu if vecs is None else (xb - mu) @ vecs
        z = z * ratio
        out = mu + (z if vecs is None else z @ vecs.T)
        return out.reshape(xbar.shape).to(xbar.dtype)
