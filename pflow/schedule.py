"""Discrete DDPM noise schedules and the continuous map between sigma and t.

A schedule is the table ``a_t`` (the cumulative product ᾱ_t of ``1 - beta``) over the
training steps ``t = 0 .. N-1``. pflow works in the variance-exploding view of it
(DDIM, arXiv 2010.02502, eq. 14):

    sigma_t = sqrt((1 - a_t) / a_t),        a_t = 1 / (1 + sigma_t^2).

Between table entries ``t(sigma)`` and ``sigma(t)`` are linear in ``log sigma``, so a
solver may ask for the network at any sigma inside ``[sigma_min, sigma_max]``; outside
that range ``t`` is clamped to ``[0, N-1]``. Everything is stored in float64.
"""

from __future__ import annotations

import bisect
import math
import operator
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor

__all__ = ["NoiseSchedule"]


def _as_float64_1d(values: Tensor | np.ndarray | list[float], name: str) -> Tensor:
    t = torch.as_tensor(
        np.asarray(values, dtype=np.float64)
        if not isinstance(values, Tensor)
        else values.detach().cpu().to(torch.float64)
    )
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(
            f"{name} must be a 1-D sequence of at least 2 values, got shape {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    return t


class NoiseSchedule:
    """A discrete noise schedule ``a_t`` (ᾱ_t) with its sigmas, in float64.

    Build one with :meth:`linear`, :meth:`scaled_linear`, :meth:`cosine`,
    :meth:`from_betas` or :meth:`from_alphas_cumprod`.

    Attributes:
        alphas_cumprod: ``a_t`` per training step, shape ``(N,)``, strictly decreasing in (0, 1].
        sigmas: ``sqrt((1 - a_t) / a_t)`` per training step, shape ``(N,)``, increasing.
    """

    def __init__(self, alphas_cumprod: Tensor | np.ndarray | list[float]) -> None:
        a = _as_float64_1d(alphas_cumprod, "alphas_cumprod")
        if not ((a > 0) & (a <= 1)).all():
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        if not (a[1:] < a[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod: Tensor = a
        self.sigmas: Tensor = ((1 - a) / a).sqrt()
        if self.sigmas[0] <= 0:
            raise ValueError("alphas_cumprod[0] must be < 1 so that sigma at t = 0 is positive")
        self._log_sigmas = self.sigmas.log()
        self._log_sigmas_np = self._log_sigmas.numpy()
        self._log_sigmas_list: list[float] = self._log_sigmas_np.tolist()
        self._table_cache: dict[torch.device, Tensor] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_alphas_cumprod(
        cls, alphas_cumprod: Tensor | np.ndarray | list[float]
    ) -> NoiseSchedule:
        """A schedule from its ``a_t`` table (a diffusers scheduler's ``alphas_cumprod``)."""
        return cls(alphas_cumprod)

    @classmethod
    def from_betas(cls, betas: Tensor | np.ndarray | list[float]) -> NoiseSchedule:
        """A schedule from per-step ``beta_t``: ``a_t = prod_{i<=t} (1 - beta_i)``."""
        b = _as_float64_1d(betas, "betas")
        if not ((b > 0) & (b < 1)).all():
            raise ValueError("betas must lie in (0, 1)")
        return cls(torch.cumprod(1 - b, dim=0))

    @classmethod
    def linear(
        cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        """DDPM's linear betas (Ho et al. 2020): ``beta_t`` evenly spaced from start to end
        (``0 < beta_start <= beta_end < 1``)."""
        n = _check_steps(num_train_timesteps)
        beta_start, beta_end = _check_beta_range(beta_start, beta_end)
        return cls.from_betas(np.linspace(beta_start, beta_end, n))

    @classmethod
    def scaled_linear(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
    ) -> NoiseSchedule:
        """Stable Diffusion's schedule: ``sqrt(beta_t)`` evenly spaced, then squared
        (``0 < beta_start <= beta_end < 1``)."""
        n = _check_steps(num_train_timesteps)
        beta_start, beta_end = _check_beta_range(beta_start, beta_end)
        return cls.from_betas(np.linspace(beta_start**0.5, beta_end**0.5, n) ** 2)

    @classmethod
    def cosine(
        cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999
    ) -> NoiseSchedule:
        """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17; diffusers'
        ``squaredcos_cap_v2``): ``abar(u) = cos((u + s) / (1 + s) * pi / 2)^2`` and
        ``beta_t = min(1 - abar((t+1)/N) / abar(t/N), max_beta)``, with the offset
        ``s >= 0`` and ``0 < max_beta < 1``."""
        n = _check_steps(num_train_timesteps)
        s = _number("s", s)
        if not s >= 0:
            raise ValueError(
                f"s (the cosine schedule's offset) must be >= 0 (0.008 in the paper), got {s!r}"
            )
        max_beta = _number("max_beta", max_beta)
        if not 0 < max_beta < 1:
            raise ValueError(f"max_beta must lie in (0, 1) (0.999 in the paper), got {max_beta!r}")

        def abar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
        return cls.from_betas(betas)

    # ------------------------------------------------------------------ properties
    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def sigma_min(self) -> float:
        """sigma at t = 0, the smallest noise level the network was trained on."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """sigma at t = N - 1, where sampling starts."""
        return float(self.sigmas[-1])

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(N={self.num_train_timesteps}, sigma_min={self.sigma_min:.4g}, "
            f"sigma_max={self.sigma_max:.4g})"
        )

    # ------------------------------------------------------------------ sigma <-> t
    @overload
    def sigma_to_t(self, sigma: float) -> float: ...
    @overload
    def sigma_to_t(self, sigma: np.ndarray) -> np.ndarray: ...
    @overload
    def sigma_to_t(self, sigma: Tensor) -> Tensor: ...

    def sigma_to_t(self, sigma: float | np.ndarray | Tensor) -> float | np.ndarray | Tensor:
        """Continuous timestep of a noise level: linear in ``log sigma`` between table
        entries, exact (integer) at them, clamped to ``[0, N-1]`` outside the table.
        ``sigma = 0`` maps to ``t = 0``.

        Raises:
            ValueError: a ``sigma`` that is NaN, infinite or negative.
        """
        if isinstance(sigma, Tensor):
            _check_range("sigma", sigma, 0.0, None, "a noise level: finite and >= 0")
            return self._sigma_to_t_torch(sigma)
        if isinstance(sigma, (float, int)) and not isinstance(sigma, bool):
            return self._sigma_to_t_float(float(sigma))
        arr = np.asarray(sigma, dtype=np.float64)
        _check_range("sigma", arr, 0.0, None, "a noise level: finite and >= 0")
        with np.errstate(divide="ignore"):
            log_sigma = np.log(arr)
        t = np.interp(
            log_sigma, self._log_sigmas_np, np.arange(self.num_train_timesteps, dtype=np.float64)
        )
        return float(t) if np.ndim(sigma) == 0 and not isinstance(sigma, np.ndarray) else t

    def _sigma_to_t_float(self, sigma: float) -> float:
        """``sigma_to_t`` for one Python float, without numpy (it runs once per network
        evaluation): the same arithmetic as ``np.interp``, so the same bits."""
        ls = self._log_sigmas_list
        if not 0 < sigma < math.inf:  # one comparison on the fast path
            if sigma == 0:
                return 0.0
            raise ValueError(f"sigma must be a noise level: finite and >= 0, got {sigma!r}")
        x = math.log(sigma)
        if x <= ls[0]:
            return 0.0
        if x >= ls[-1]:
            return float(len(ls) - 1)
        j = bisect.bisect_right(ls, x) - 1
        if x == ls[j]:
            return float(j)
        slope = 1.0 / (ls[j + 1] - ls[j])
        return slope * (x - ls[j]) + j

    @overload
    def t_to_sigma(self, t: float) -> float: ...
    @overload
    def t_to_sigma(self, t: np.ndarray) -> np.ndarray: ...
    @overload
    def t_to_sigma(self, t: Tensor) -> Tensor: ...

    def t_to_sigma(self, t: float | np.ndarray | Tensor) -> float | np.ndarray | Tensor:
        """Noise level at a (fractional) timestep: ``log sigma`` interpolated linearly.

        Raises:
            ValueError: a ``t`` that is NaN, infinite or outside ``[0, N-1]``.
        """
        n = self.num_train_timesteps
        expected = f"a (fractional) training step: finite and in [0, {n - 1}]"
        if isinstance(t, Tensor):
            _check_range("t", t, 0.0, n - 1, expected)
            table = self._table(t.device)
            tt = t.to(torch.float64).clamp(0, n - 1)
            lo = tt.floor().long().clamp(max=n - 2)
            w = tt - lo
            log_sigma = table[lo] * (1 - w) + table[lo + 1] * w
            return log_sigma.exp()
        arr = np.asarray(t, dtype=np.float64)
        _check_range("t", arr, 0.0, n - 1, expected)
        out = np.exp(np.interp(arr, np.arange(n, dtype=np.float64), self._log_sigmas_np))
        return float(out) if np.ndim(t) == 0 and not isinstance(t, np.ndarray) else out

    def _table(self, device: torch.device) -> Tensor:
        table = self._table_cache.get(device)
        if table is None:
            table = self._log_sigmas.to(device)
            self._table_cache[device] = table
        return table

    def _sigma_to_t_torch(self, sigma: Tensor) -> Tensor:
        table = self._table(sigma.device)
        n = self.num_train_timesteps
        log_sigma = sigma.to(torch.float64).log().clamp(table[0], table[-1])
        hi = torch.searchsorted(table, log_sigma).clamp(1, n - 1)
        lo = hi - 1
        w = (log_sigma - table[lo]) / (table[hi] - table[lo])
        return lo.to(torch.float64) + w


def _check_steps(num_train_timesteps: Any) -> int:
    """``num_train_timesteps`` as an int >= 2 (a Python or numpy integer)."""
    value = num_train_timesteps
    if isinstance(value, bool) or isinstance(value, Tensor):
        index = None
    else:
        try:
            index = operator.index(value)
        except TypeError:
            index = None
    if index is None:
        raise TypeError(f"num_train_timesteps must be an integer >= 2, got {value!r}")
    if index < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {value!r}")
    return index


def _number(name: str, value: Any) -> float:
    """``value`` as a finite float; TypeError for a non-number, ValueError for NaN/inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_beta_range(beta_start: Any, beta_end: Any) -> tuple[float, float]:
    """``0 < beta_start <= beta_end < 1``, each named when it is not."""
    start, end = _number("beta_start", beta_start), _number("beta_end", beta_end)
    for name, value in (("beta_start", start), ("beta_end", end)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    if start > end:
        raise ValueError(
            f"beta_start must be <= beta_end (the noise grows over the training steps), got "
            f"beta_start={start!r} > beta_end={end!r}; are they swapped?"
        )
    return start, end


def _check_range(
    name: str, values: Tensor | np.ndarray, low: float, high: float | None, expected: str
) -> None:
    """Every entry of ``values`` finite and in ``[low, high]`` (``high=None``: no upper
    bound); a ValueError naming ``name`` and the first offending entry otherwise."""
    if isinstance(values, Tensor):
        v = values.detach()
        ok = torch.isfinite(v) & (v >= low)
        if high is not None:
            ok &= v <= high
        if bool(ok.all()):
            return
        bad = v[~ok].reshape(-1)[0].item()
    else:
        ok = np.isfinite(values) & (values >= low)
        if high is not None:
            ok = ok & (values <= high)
        ok = np.asarray(ok)  # a 0-d input gives a numpy bool
        if bool(ok.all()):
            return
        bad = values[~ok].reshape(-1)[0].item()
    count, total = int((~ok).sum()), int(ok.numel() if isinstance(ok, Tensor) else np.size(ok))
    where = f" ({count} of {total} entries)" if count > 1 else ""
    raise ValueError(f"{name} must be {expected}, got {bad!r}{where}")
