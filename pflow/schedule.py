"""Noise schedules: the range of sigma a model is defined on and the map between sigma and
the network's time input.

Every schedule is a :class:`Schedule`: ``sigma_min``, ``sigma_max`` (where grids start
and end) and ``sigma_to_t`` / ``t_to_sigma`` (the network's time input at a noise level,
and back). Grids need nothing else, except that the spacings which select training steps
(``leading``, ``trailing``, ``linspace``, ``quadratic``) need a table (``discrete``).

:class:`NoiseSchedule` is a discrete DDPM schedule: the table ``a_t`` (the cumulative
product ᾱ_t of ``1 - beta``) over the training steps ``t = 0 .. N-1``. pflow works in
the variance-exploding view of it (DDIM, arXiv 2010.02502, eq. 14):

    sigma_t = sqrt((1 - a_t) / a_t),        a_t = 1 / (1 + sigma_t^2).

Between table entries ``t(sigma)`` and ``sigma(t)`` are linear in ``log sigma``, so a
solver may ask for the network at any sigma inside ``[sigma_min, sigma_max]``; outside
that range ``t`` is clamped to ``[0, N-1]``. Everything is stored in float64.

The continuous schedules have closed-form maps:

- :class:`ContinuousVPSchedule`: score-SDE's VP SDE (arXiv 2011.13456, eq. 33),
  ``a(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2)`` on ``t in [t_min, t_max]``;
- :class:`SigmaRange`: an EDM / k-diffusion denoiser's ``[sigma_min, sigma_max]``, whose
  time is sigma itself (EDM, arXiv 2206.00364, ``sigma(t) = t``);
- :class:`FlowSchedule`: flow matching / rectified flow, ``x_t = (1 - t) x0 + t eps``,
  ``sigma = t / (1 - t)``, with SD3's timestep ``shift`` for its grids.
"""

from __future__ import annotations

import bisect
import math
import operator
from types import ModuleType
from typing import Any, ClassVar, overload

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ContinuousSchedule",
    "ContinuousVPSchedule",
    "FlowSchedule",
    "NoiseSchedule",
    "Schedule",
    "SigmaRange",
]


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


class Schedule:
    """What grids, solvers and models need of a noise schedule.

    Attributes:
        sigma_min: the smallest positive noise level the model is defined at (grids that
            stop short of 0 end here, and no positive grid entry may fall below it).
        sigma_max: where sampling starts (no grid entry may exceed it).
        discrete: True for a table of training steps (:class:`NoiseSchedule`), from which
            the spacings ``leading``, ``trailing``, ``linspace`` and ``quadratic`` select;
            False for the continuous schedules, whose grids are ``uniform`` (in the
            schedule's time), ``karras`` or ``logsnr``.

    ``sigma_to_t(sigma)`` is the time input the network gets at ``sigma`` (a training step
    for a table, ``time_scale * t`` for a continuous schedule) and ``t_to_sigma`` its
    inverse; both take Python floats, numpy arrays and tensors, check their input and
    compute in float64. ``_sigma_to_t_torch(tensor)`` is the unchecked tensor map a
    network call uses (no host sync).
    """

    discrete: ClassVar[bool] = False

    @property
    def sigma_min(self) -> float:
        raise NotImplementedError

    @property
    def sigma_max(self) -> float:
        raise NotImplementedError

    def sigma_to_t(self, sigma: Any) -> Any:
        raise NotImplementedError

    def t_to_sigma(self, t: Any) -> Any:
        raise NotImplementedError

    def _sigma_to_t_torch(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError


class NoiseSchedule(Schedule):
    """A discrete noise schedule ``a_t`` (ᾱ_t) with its sigmas, in float64.

    Build one with :meth:`linear`, :meth:`scaled_linear`, :meth:`cosine`,
    :meth:`from_betas` or :meth:`from_alphas_cumprod`.

    Attributes:
        alphas_cumprod: ``a_t`` per training step, shape ``(N,)``, strictly decreasing in (0, 1].
        sigmas: ``sqrt((1 - a_t) / a_t)`` per training step, shape ``(N,)``, increasing.
    """

    discrete: ClassVar[bool] = True

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

    @staticmethod
    def continuous_vp(
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        *,
        t_min: float = 1e-3,
        t_max: float = 1.0,
        time_scale: float = 1.0,
    ) -> ContinuousVPSchedule:
        """Score-SDE's continuous VP schedule with analytic ``sigma <-> t``: a
        :class:`ContinuousVPSchedule` (see there for the arguments)."""
        return ContinuousVPSchedule(
            beta_min, beta_max, t_min=t_min, t_max=t_max, time_scale=time_scale
        )

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


# ---------------------------------------------------------------------------------- continuous


class ContinuousSchedule(Schedule):
    """A schedule with closed-form maps between sigma and a continuous time ``t``.

    Subclasses give the two maps, ``_time(sigma, xp)`` and ``_sigma(t, xp)``, written once
    for ``xp`` = :mod:`math` (floats), :mod:`numpy` and :mod:`torch` (float64 tensors).
    The network's time input is ``time_scale * t``: :meth:`sigma_to_t` and
    :meth:`t_to_sigma` take and return it.
    """

    #: whether ``sigma = inf`` (``t_to_sigma`` of the schedule's terminal time) is a point of
    #: the schedule (flow matching's ``t = 1``).
    _inf_sigma: ClassVar[bool] = False
    #: the largest time the maps are defined at (``None``: no bound).
    _t_limit: ClassVar[float | None] = None

    time_scale: float
    _sigma_min: float
    _sigma_max: float

    @property
    def sigma_min(self) -> float:
        return self._sigma_min

    @property
    def sigma_max(self) -> float:
        return self._sigma_max

    def _time(self, sigma: Any, xp: ModuleType) -> Any:
        raise NotImplementedError

    def _sigma(self, t: Any, xp: ModuleType) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ sigma <-> t
    def _expected_sigma(self) -> str:
        return "a noise level: >= 0" + ("" if self._inf_sigma else " and finite")

    def _check_sigma(self, sigma: Tensor | np.ndarray) -> None:
        if self._inf_sigma:
            finite = sigma if isinstance(sigma, np.ndarray) else sigma.detach()
            clipped = (
                np.where(np.isposinf(finite), 0.0, finite)
                if isinstance(finite, np.ndarray)
                else torch.where(torch.isposinf(finite), torch.zeros_like(finite), finite)
            )
            _check_range("sigma", clipped, 0.0, None, self._expected_sigma())
        else:
            _check_range("sigma", sigma, 0.0, None, self._expected_sigma())

    @overload
    def sigma_to_t(self, sigma: float) -> float: ...
    @overload
    def sigma_to_t(self, sigma: np.ndarray) -> np.ndarray: ...
    @overload
    def sigma_to_t(self, sigma: Tensor) -> Tensor: ...

    def sigma_to_t(self, sigma: float | np.ndarray | Tensor) -> float | np.ndarray | Tensor:
        """The network's time input ``time_scale * t(sigma)``, float64.

        Raises:
            ValueError: a ``sigma`` that is NaN, negative or (except for a
                :class:`FlowSchedule`, where it is ``t = 1``) infinite.
        """
        if isinstance(sigma, Tensor):
            self._check_sigma(sigma)
            return self._sigma_to_t_torch(sigma)
        if isinstance(sigma, (float, int)) and not isinstance(sigma, bool):
            value = float(sigma)
            if not (value >= 0 and (value < math.inf or self._inf_sigma)):
                raise ValueError(f"sigma must be {self._expected_sigma()}, got {sigma!r}")
            return self.time_scale * self._time(value, math)
        arr = np.asarray(sigma, dtype=np.float64)
        self._check_sigma(arr)
        out = self.time_scale * self._time(arr, np)
        return float(out) if np.ndim(sigma) == 0 and not isinstance(sigma, np.ndarray) else out

    def _sigma_to_t_torch(self, sigma: Tensor) -> Tensor:
        return self.time_scale * self._time(sigma.to(torch.float64), torch)

    @overload
    def t_to_sigma(self, t: float) -> float: ...
    @overload
    def t_to_sigma(self, t: np.ndarray) -> np.ndarray: ...
    @overload
    def t_to_sigma(self, t: Tensor) -> Tensor: ...

    def t_to_sigma(self, t: float | np.ndarray | Tensor) -> float | np.ndarray | Tensor:
        """The noise level at the network's time input ``t`` (``time_scale`` times the
        schedule's time), float64.

        Raises:
            ValueError: a ``t`` that is NaN, infinite, negative or past the schedule's
                terminal time.
        """
        high = None if self._t_limit is None else self._t_limit * self.time_scale
        expected = "a time input: finite and >= 0" + (
            "" if high is None else f" and <= {high:g} (time_scale * {self._t_limit:g})"
        )
        if isinstance(t, Tensor):
            _check_range("t", t, 0.0, high, expected)
            return self._sigma(t.to(torch.float64) / self.time_scale, torch)
        arr = np.asarray(t, dtype=np.float64)
        _check_range("t", arr, 0.0, high, expected)
        if np.ndim(t) == 0 and not isinstance(t, np.ndarray):
            return float(self._sigma(float(arr) / self.time_scale, math))
        return self._sigma(arr / self.time_scale, np)

    # ------------------------------------------------------------------ grids
    def uniform_sigmas(self, n: int, shift: float | None = None) -> np.ndarray:
        """``n`` sigmas evenly spaced in the schedule's time, from ``sigma_max`` down to
        ``sigma_min`` (just ``[sigma_max]`` for ``n = 1``): the ``uniform`` spacing.

        Raises:
            ValueError: a ``shift`` (only :class:`FlowSchedule` grids take one).
        """
        if shift is not None:
            raise ValueError(
                f"shift is flow matching's timestep shift (a FlowSchedule's grids); "
                f"{type(self).__name__} takes none, got shift={shift!r}"
            )
        hi, lo = self._time(self.sigma_max, math), self._time(self.sigma_min, math)
        sig = np.asarray(self._sigma(np.linspace(hi, lo, n), np), dtype=np.float64)
        return _pin_ends(sig, self.sigma_max, self.sigma_min)


def _pin_ends(sig: np.ndarray, top: float, bottom: float) -> np.ndarray:
    """A ramp from ``top`` to ``bottom`` with its ends set exactly (the maps' round trip
    may move them by an ulp, which would step out of the schedule's range)."""
    sig = sig.copy()
    sig[0] = top
    if len(sig) > 1:
        sig[-1] = bottom
    return sig


def _positive(name: str, value: Any, hint: str = "") -> float:
    value = _number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0{hint}, got {value!r}")
    return value


class ContinuousVPSchedule(ContinuousSchedule):
    """Score-SDE's continuous variance-preserving schedule (Song et al., arXiv 2011.13456,
    eq. 33; DDPM's linear betas in the limit of infinitely many steps).

    With ``beta(t) = beta_min + t (beta_max - beta_min)`` on ``t in [0, 1]``,

        a(t) = exp(-B(t)),   B(t) = beta_min t + (beta_max - beta_min) t^2 / 2,
        sigma(t) = sqrt(1 / a(t) - 1) = sqrt(expm1(B(t))),

    and the inverse in closed form, the positive root of the quadratic ``B(t) =
    log(1 + sigma^2)``:

        t(sigma) = 2 L / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) L)),
        L = log1p(sigma^2)

    (the root written without cancellation; ``beta_min = beta_max`` gives ``L / beta_min``).

    Args:
        beta_min, beta_max: ``0 < beta_min <= beta_max`` (0.1 and 20 in score-SDE; EDM's VP
            uses ``beta_d = beta_max - beta_min = 19.9`` and ``beta_min = 0.1``).
        t_min: the smallest time the network is asked at, score-SDE's ``eps``: 1e-3 for
            sampling, 1e-5 for likelihoods (EDM's VP: 1e-5). ``sigma_min = sigma(t_min)``.
        t_max: where sampling starts, 1 by default; ``sigma_max = sigma(t_max)`` (about 152
            for the defaults).
        time_scale: the network's time input is ``time_scale * t``: 1 for score-SDE's
            networks, 999 for the ``(M - 1) t`` convention of DDPM-style networks
            (EDM's VP preconditioning with ``M = 1000``).

    Use it with :class:`pflow.EpsModel` exactly as a table: ``EpsModel(net, schedule,
    prediction=...)`` feeds ``net(x_t, time_scale * t(sigma))``.
    """

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        *,
        t_min: float = 1e-3,
        t_max: float = 1.0,
        time_scale: float = 1.0,
    ) -> None:
        b0 = _positive("beta_min", beta_min, " (0.1 in score-SDE)")
        b1 = _positive("beta_max", beta_max, " (20 in score-SDE)")
        if b0 > b1:
            raise ValueError(
                f"beta_min must be <= beta_max, got beta_min={b0!r} > beta_max={b1!r}; "
                "are they swapped?"
            )
        lo = _positive("t_min", t_min, " (score-SDE: 1e-3 to sample, 1e-5 for likelihoods)")
        hi = _positive("t_max", t_max)
        if not lo < hi:
            raise ValueError(f"t_min must be < t_max, got t_min={lo!r}, t_max={hi!r}")
        self.beta_min, self.beta_max = b0, b1
        self.t_min, self.t_max = lo, hi
        self.time_scale = _positive("time_scale", time_scale, " (1, or 999 for t * 999)")
        self._sigma_min = float(self._sigma(lo, math))
        self._sigma_max = float(self._sigma(hi, math))

    def __repr__(self) -> str:
        return (
            f"ContinuousVPSchedule(beta_min={self.beta_min:g}, beta_max={self.beta_max:g}, "
            f"t_min={self.t_min:g}, t_max={self.t_max:g}, time_scale={self.time_scale:g}, "
            f"sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"
        )

    def alpha_bar(self, t: Any) -> Any:
        """``a(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2)`` at the schedule's time
        ``t`` (not scaled by ``time_scale``)."""
        xp = torch if isinstance(t, Tensor) else np if isinstance(t, np.ndarray) else math
        return xp.exp(-self._b(t))

    def _b(self, t: Any) -> Any:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def _sigma(self, t: Any, xp: ModuleType) -> Any:
        return xp.sqrt(xp.expm1(self._b(t)))

    def _time(self, sigma: Any, xp: ModuleType) -> Any:
        log_snr_inv = xp.log1p(sigma * sigma)  # L = B(t)
        d = self.beta_max - self.beta_min
        return 2 * log_snr_inv / (self.beta_min + xp.sqrt(self.beta_min**2 + 2 * d * log_snr_inv))


class SigmaRange(ContinuousSchedule):
    """The noise range of an EDM / k-diffusion denoiser ``D(x; sigma)`` (Karras et al.,
    arXiv 2206.00364): the model is defined for ``sigma`` in ``[sigma_min, sigma_max]``
    (0.002 and 80 in EDM), and its time is sigma itself (EDM's ``sigma(t) = t``), so the
    ``uniform`` spacing is uniform in sigma.

    Args:
        sigma_min, sigma_max: ``0 < sigma_min < sigma_max < inf``.
    """

    def __init__(self, sigma_min: float, sigma_max: float) -> None:
        lo = _positive("sigma_min", sigma_min, " (EDM: 0.002)")
        hi = _positive("sigma_max", sigma_max, " (EDM: 80)")
        if not lo < hi:
            raise ValueError(
                f"sigma_min must be < sigma_max, got sigma_min={lo!r}, sigma_max={hi!r}"
            )
        self._sigma_min, self._sigma_max = lo, hi
        self.time_scale = 1.0

    def __repr__(self) -> str:
        return f"SigmaRange(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g})"

    def _time(self, sigma: Any, xp: ModuleType) -> Any:
        return sigma * 1.0

    def _sigma(self, t: Any, xp: ModuleType) -> Any:
        return t * 1.0


#: Flow matching's default top, ``t_max = 1 - 2^-26`` (``sigma_max = 2^26 - 1``): see
#: :class:`FlowSchedule`.
FLOW_T_MAX = 1.0 - 2.0**-26


class FlowSchedule(ContinuousSchedule):
    """Flow matching / rectified flow: ``x_t = (1 - t) x0 + t eps`` on ``t in [0, 1]``
    (Lipman et al., arXiv 2210.02747; Liu et al., arXiv 2209.03003; SD3, arXiv 2403.03206).

    Dividing by ``1 - t`` gives pflow's variables exactly:

        sigma = t / (1 - t),     xbar = x_t / (1 - t) = x0 + sigma eps,     t = sigma / (1 + sigma).

    **The top.** ``t = 1`` is ``sigma = inf``, where ``x_1 = eps`` is pure noise. pflow's
    solvers step in sigma, so sampling starts just below: at ``t_max``, by default
    ``1 - 2^-26`` (``sigma_max = 2^26 - 1 ~ 6.7e7``). There the state is the flow's noise
    ``x_1`` to ``1.5e-8`` relative (the noise enters in the VP scale, ``x_t = noise *
    sqrt(1 + sigma^2) / (1 + sigma)``), and the network's ``t`` is 1 in float32: one Euler
    (DDIM) step from ``t_max`` is diffusers' ``FlowMatchEulerDiscreteScheduler`` step from
    ``t = 1`` to float32 round-off. A larger ``t_max`` would not help in float64 either:
    the first step's coefficient ``sigma + h`` then loses ``ulp(sigma_max)``.

    **Grids.** The ``uniform`` spacing is diffusers': evenly spaced in the unshifted time
    ``u`` and mapped through SD3's timestep shift (arXiv 2403.03206, eq. 23),

        t = shift u / (1 + (shift - 1) u),       u = t / (shift - (shift - 1) t),

    with ``u`` from ``u(t_max)`` down to ``u(t_min)``. ``karras`` and ``logsnr`` are grids
    in sigma between ``sigma_min`` and ``sigma_max`` and ignore the shift.

    Args:
        shift: SD3's timestep shift, a number > 0 (1: none; 3 for SD3; Flux's dynamic
            shifting is ``shift = exp(mu)``).
        num_train_timesteps: ``N`` of diffusers' scheduler; only sets the default
            ``t_min``.
        t_min: the smallest positive time of a grid. By default that of diffusers'
            ``FlowMatchEulerDiscreteScheduler.set_timesteps`` with a static shift, whose
            table is shifted once when built and its grid once more:
            ``shift(shift(1 / N))``. (With ``use_dynamic_shifting``, as for Flux, pass
            ``t_min = shift(1 / N)``.)
        t_max: where sampling starts, ``t_min < t_max < 1``; see above.
        time_scale: the network's time input is ``time_scale * t``: 1 (the default) for
            networks trained on ``t in [0, 1]``; ``num_train_timesteps`` (1000) for diffusers'
            SD3 and Flux transformers, which get ``timestep = sigma * 1000`` (diffusers' sigma
            is this ``t``).
    """

    _inf_sigma: ClassVar[bool] = True
    _t_limit: ClassVar[float | None] = 1.0

    def __init__(
        self,
        shift: float = 1.0,
        *,
        num_train_timesteps: int = 1000,
        t_min: float | None = None,
        t_max: float = FLOW_T_MAX,
        time_scale: float = 1.0,
    ) -> None:
        self.shift = check_shift(shift)
        self.num_train_timesteps = _check_steps(num_train_timesteps)
        if t_min is None:
            t_min = _shift_time(_shift_time(1.0 / self.num_train_timesteps, self.shift), self.shift)
        lo, hi = _number("t_min", t_min), _number("t_max", t_max)
        if not 0 < lo < hi < 1:
            raise ValueError(
                f"need 0 < t_min < t_max < 1 (t = 1 is sigma = inf, pure noise; the default "
                f"t_max is 1 - 2**-26), got t_min={lo!r}, t_max={hi!r}"
            )
        self.t_min, self.t_max = lo, hi
        self.time_scale = _positive("time_scale", time_scale, " (1, or 1000 for t * 1000)")
        self._sigma_min = lo / (1.0 - lo)
        self._sigma_max = hi / (1.0 - hi)

    def __repr__(self) -> str:
        return (
            f"FlowSchedule(shift={self.shift:g}, t_min={self.t_min:.6g}, "
            f"t_max={self.t_max!r}, time_scale={self.time_scale:g}, "
            f"sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"
        )

    def _time(self, sigma: Any, xp: ModuleType) -> Any:
        if xp is math:
            return 1.0 if sigma == math.inf else sigma / (1.0 + sigma)
        top = xp.isposinf(sigma)
        safe = xp.where(top, 0.0 if xp is np else torch.zeros_like(sigma), sigma)
        return xp.where(top, 1.0 if xp is np else torch.ones_like(sigma), safe / (1.0 + safe))

    def _sigma(self, t: Any, xp: ModuleType) -> Any:
        if xp is math:
            return math.inf if t == 1.0 else t / (1.0 - t)
        one = t == 1.0
        safe = xp.where(one, 0.0 if xp is np else torch.zeros_like(t), t)
        inf = math.inf if xp is np else torch.full_like(t, math.inf)
        return xp.where(one, inf, safe / (1.0 - safe))

    def uniform_sigmas(self, n: int, shift: float | None = None) -> np.ndarray:
        """``n`` sigmas evenly spaced in the unshifted time ``u`` from ``u(t_max)`` down to
        ``u(t_min)``, mapped through the timestep shift (this schedule's, or ``shift``):
        diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` grid."""
        s = self.shift if shift is None else check_shift(shift)
        u = np.linspace(_unshift_time(self.t_max, s), _unshift_time(self.t_min, s), n)
        t = _shift_time(u, s)
        return _pin_ends(t / (1.0 - t), self.sigma_max, self.sigma_min)


def check_shift(shift: Any) -> float:
    """Flow matching's timestep ``shift`` as a finite float > 0, else an error naming it."""
    return _positive("shift", shift, " (SD3's timestep shift: 1 is none, SD3 uses 3)")


def _shift_time(u: Any, shift: float) -> Any:
    """SD3's timestep shift, ``t = shift u / (1 + (shift - 1) u)`` (1 -> 1, 0 -> 0)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def _unshift_time(t: Any, shift: float) -> Any:
    """The inverse of :func:`_shift_time`, ``u = t / (shift - (shift - 1) t)``."""
    return t / (shift - (shift - 1.0) * t)


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
