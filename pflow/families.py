"""Model families beyond the DDPM table, each an exact map to the PF-ODE's ``eps(xbar, sigma)``.

pflow integrates ``d xbar / d sigma = eps(xbar, sigma)`` in the variance-exploding
variables ``xbar = x0 + sigma eps``. Every family below is that ODE; it only needs its own
exact map from the network's output to ``eps`` (and to the denoised ``x0_hat``):

- :class:`DenoiserModel`, an EDM / k-diffusion denoiser ``D(x; sigma) ~ E[x0 | x]``
  (Karras et al., arXiv 2206.00364). EDM's ``x`` *is* pflow's ``xbar`` (EDM's
  ``sigma(t) = t``, ``s(t) = 1``; its VP and VE preconditionings, Table 1, take ``x`` in
  that same space), so

      x0_hat = D(xbar, sigma),        eps = (xbar - D(xbar, sigma)) / sigma.

- :class:`VelocityModel`, a flow-matching / rectified-flow velocity ``v(x_t, t)`` with
  ``x_t = (1 - t) x0 + t eps`` (Lipman et al., arXiv 2210.02747; Liu et al.,
  arXiv 2209.03003; SD3, arXiv 2403.03206), trained on ``v = eps - x0``. With
  ``sigma = t / (1 - t)`` and ``xbar = x_t / (1 - t)``,

      x0_hat = x_t - t v,        eps = x_t + (1 - t) v.

- A continuous-time VP network (score-SDE, arXiv 2011.13456) is an ordinary
  :class:`pflow.EpsModel` on a :class:`pflow.ContinuousVPSchedule`.

**The network's scale.** pflow's solvers keep their state in ``x = C(sigma) xbar`` with
``C(sigma) = 1 / sqrt(1 + sigma^2)`` (the VP scale, :mod:`pflow.solvers.ode`) and call
``model.predict_xt(x, sigma) -> (eps, x0_hat)``. Each family converts that state to its
network's own input exactly, with float64 coefficients:

- denoiser: ``xbar = x * sqrt(1 + sigma^2)``;
- flow: ``x_t = xbar / (1 + sigma) = x * sqrt(1 + sigma^2) / (1 + sigma)`` (not
  ``x`` itself: flow matching's scale is ``1 - t = 1 / (1 + sigma)``, the VP scale is
  ``1 / sqrt(1 + sigma^2)``).

Both return ``x0_hat`` straight from the network (``D`` itself; ``x_t - t v``), never as
``xbar - sigma eps``, which loses digits in float32 where ``xbar`` is large.

Both models carry a schedule with the sigma range grids are built from
(:class:`pflow.SigmaRange`, :class:`pflow.FlowSchedule`), take per-sample sigma tensors,
and bind conditioning that travels with its samples like :class:`pflow.EpsModel`
(``condition``, ``take``, ``cond_rows``; :mod:`pflow.conditioning`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .conditioning import Cond, cast_cond, cond_rows, take_cond
from .model import sigma_column
from .schedule import FlowSchedule, SigmaRange

__all__ = ["DenoiserModel", "VelocityModel"]


def _float_dtype(dtype: object, name: str) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be None or a floating torch.dtype, got {dtype!r}")
    return dtype


class _NetworkModel:
    """Shared plumbing: the network call (bound conditioning, output unwrapping, shape
    check), per-sample conditioning (``condition``/``take``/``cond_rows``) and ``to``."""

    # Derived from ``cond`` (hashed itself): pflow.identity leaves it out.
    _identity_skip = ("_cond_rows",)
    _what = "net"

    def __init__(self, net: Callable[..., Any], input_dtype: torch.dtype | None, cond: Cond | None):
        if not callable(net):
            raise TypeError(
                f"{self._what} must be callable as {self._what}(x, time), got {type(net).__name__}"
            )
        self.net = net
        self._input_dtype = input_dtype
        self._cond_rows = cond_rows(cond, "cond")
        self.cond: dict[str, Any] = dict(cond or {})

    # ------------------------------------------------------------ conditioning
    @property
    def cond_rows(self) -> int | None:
        """Samples the bound conditioning is for, or ``None`` when none of it is per sample."""
        return self._cond_rows

    def _copy(self, net: Callable[..., Any], cond: Cond) -> Any:
        out = copy.copy(self)
        out.net = net
        out._cond_rows = cond_rows(cond, "cond")
        out.cond = dict(cond)
        return out

    def condition(self, **cond: Any) -> Any:
        """A copy whose network gets ``**cond`` on every call (replacing any earlier
        conditioning), e.g. ``model.condition(class_labels=labels)``. Parameters are
        shared."""
        return self._copy(self.net, cond)

    def take(self, index: slice | Tensor) -> Any:
        """This model for the samples ``index`` of its conditioning; itself when nothing is
        per sample."""
        if self._cond_rows is None:
            return self
        return self._copy(self.net, take_cond(self.cond, index, self._cond_rows))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Any:
        """A copy whose network (when it is an ``nn.Module``) and floating conditioning are
        moved to ``dtype``/``device``: the float64 copy is what a reference solve needs."""
        net = self.net
        if isinstance(net, torch.nn.Module):
            net = copy.deepcopy(net).to(device=device, dtype=dtype)
        return self._copy(net, cast_cond(self.cond, dtype, device))

    # ------------------------------------------------------------ the call
    def _time_column(self, value: float | Tensor, batch: int, like: Tensor) -> Tensor:
        """The network's time input as a ``(batch,)`` tensor in ``input_dtype`` (``like``'s
        dtype by default)."""
        dtype = self._input_dtype or like.dtype
        if isinstance(value, Tensor):
            return value.reshape(-1).to(device=like.device, dtype=dtype)
        return torch.full((batch,), value, dtype=dtype, device=like.device)

    def _call(self, x: Tensor, time: Tensor, cond: Cond | None) -> Tensor:
        kwargs = self.cond if cond is None else cond
        out = self.net(x, time, **kwargs) if kwargs else self.net(x, time)
        if not isinstance(out, Tensor):  # diffusers returns an output object
            out = getattr(out, "sample", out[0] if isinstance(out, (tuple, list)) else out)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{self._what} returned {got} for an input of shape {tuple(x.shape)}; pflow "
                "needs a prediction of the input's shape"
            )
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def predict_xt(
        self, x_t: Tensor, sigma: float | Tensor, cond: Cond | None = None
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def eps_from_xt(self, x_t: Tensor, sigma: float | Tensor) -> Tensor:
        """``eps`` from the solver's state ``x_t = xbar / sqrt(1 + sigma^2)``."""
        return self.predict_xt(x_t, sigma)[0]


def _scalar(sigma: float | Tensor) -> float | Tensor:
    """A 0-d tensor as a float (the fast path); per-sample tensors as they are."""
    if isinstance(sigma, Tensor) and sigma.ndim == 0:
        return float(sigma)
    return sigma


class DenoiserModel(_NetworkModel):
    """An EDM / k-diffusion denoiser ``D(x; sigma)`` as the PF-ODE's right-hand side.

    EDM (arXiv 2206.00364) writes the PF-ODE as ``dx/dsigma = (x - D(x; sigma)) / sigma``
    (eq. 1 and 3 with ``sigma(t) = t``, ``s(t) = 1``): its ``x`` is pflow's ``xbar`` and

        eps(xbar, sigma) = (xbar - D(xbar, sigma)) / sigma,     x0_hat = D(xbar, sigma).

    EDM's own preconditioned networks (``EDMPrecond``, ``VPPrecond``, ``VEPrecond``: Table
    1 gives each one's ``c_skip``, ``c_out``, ``c_in``, ``c_noise`` inside ``D``) and
    k-diffusion's ``Denoiser`` wrappers all take ``x`` in this space, so any of them is
    ``D``. pflow's Heun on a ``karras`` grid is EDM's Algorithm 1 (deterministic,
    ``S_churn = 0``), and ``euler``/``heun``/``dpmpp_2m`` are k-diffusion's
    ``sample_euler``/``sample_heun``/``sample_dpmpp_2m``.

    Args:
        D: callable ``D(x, sigma, **cond) -> x0_hat`` with ``x`` of shape ``(batch, ...)``
            in EDM's (VE) scale and ``sigma`` a 1-D tensor of shape ``(batch,)``.
        sigma_min, sigma_max: the range the denoiser is defined on (EDM: 0.002 and 80);
            grids (``karras``, ``logsnr``, ``uniform`` in sigma) are built from it
            (``model.schedule``, a :class:`pflow.SigmaRange`).
        sigma_dtype: dtype of the ``sigma`` tensor given to ``D``; the state's by default.
        cond: keyword inputs of a conditional denoiser (``class_labels=...``), travelling
            with their samples (:mod:`pflow.conditioning`).

    Raises:
        TypeError: ``D`` is not callable, a sigma is not a number, or ``sigma_dtype`` is
            not a floating dtype.
        ValueError: ``sigma_min``/``sigma_max`` not ``0 < sigma_min < sigma_max``.

    The state at ``sigma = 0`` has no ``eps`` (``0 / 0``): the step into 0 is the driver's
    Euler step, ``x0_hat = D`` at the last positive sigma (``last_step="euler"``, the
    default, as EDM's Algorithm 1 does); evaluating at ``sigma = 0`` is an error.

    Sampling starts from ``noise`` in pflow's convention, ``xbar = noise * sqrt(1 +
    sigma_max^2)``. EDM draws ``x_0 = sigma_max * n``: pass ``noise = n * sigma_max /
    sqrt(1 + sigma_max^2)`` to start from the same point.
    """

    _what = "D"

    def __init__(
        self,
        D: Callable[..., Any],
        sigma_min: float,
        sigma_max: float,
        *,
        sigma_dtype: torch.dtype | None = None,
        cond: Cond | None = None,
    ) -> None:
        super().__init__(D, _float_dtype(sigma_dtype, "sigma_dtype"), cond)
        self.schedule = SigmaRange(sigma_min, sigma_max)

    @property
    def D(self) -> Callable[..., Any]:
        """The denoiser."""
        return self.net

    def __repr__(self) -> str:
        extra = f", cond={sorted(self.cond)}" if self.cond else ""
        return (
            f"DenoiserModel(D={type(self.net).__name__}, sigma_min={self.schedule.sigma_min:g}, "
            f"sigma_max={self.schedule.sigma_max:g}{extra})"
        )

    @staticmethod
    def _check_sigma(sigma: float | Tensor) -> None:
        if not isinstance(sigma, Tensor) and not sigma > 0:
            raise ValueError(
                f"DenoiserModel: eps = (xbar - D(xbar, sigma)) / sigma needs sigma > 0, got "
                f"sigma={sigma!r}; the step into sigma = 0 is the Euler step x0_hat = D at the "
                "last positive sigma (last_step='euler')"
            )

    def predict_xt(
        self, x_t: Tensor, sigma: float | Tensor, cond: Cond | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(eps, x0_hat)`` from the solver's state ``x_t = xbar / sqrt(1 + sigma^2)``:
        ``xbar = x_t sqrt(1 + sigma^2)``, ``x0_hat = D(xbar, sigma)``,
        ``eps = (xbar - x0_hat) / sigma``. ``cond`` replaces the bound conditioning for
        this call."""
        sigma = _scalar(sigma)
        self._check_sigma(sigma)
        if isinstance(sigma, Tensor):
            s = sigma_column(sigma, x_t)
            xbar = x_t * (1 + s**2).sqrt().to(x_t.dtype)
            x0 = self._call(xbar, self._time_column(sigma, x_t.shape[0], x_t), cond)
            return (xbar - x0) * (1 / s).to(x_t.dtype), x0
        xbar = x_t * math.sqrt(1.0 + sigma * sigma)
        x0 = self._call(xbar, self._time_column(sigma, x_t.shape[0], x_t), cond)
        return (xbar - x0).mul_(1.0 / sigma), x0

    def __call__(self, xbar: Tensor, sigma: float | Tensor) -> Tensor:
        """``eps = (xbar - D(xbar, sigma)) / sigma``."""
        sigma = _scalar(sigma)
        self._check_sigma(sigma)
        x0 = self._call(xbar, self._time_column(sigma, xbar.shape[0], xbar), None)
        if isinstance(sigma, Tensor):
            return (xbar - x0) * (1 / sigma_column(sigma, xbar)).to(xbar.dtype)
        return (xbar - x0).mul_(1.0 / sigma)


def _flow_coefficients(sigma: float) -> tuple[float, float, float]:
    """``(t, 1 - t, r)`` at ``sigma`` (``inf`` is ``t = 1``), float64:
    ``t = sigma / (1 + sigma)``, ``1 - t = 1 / (1 + sigma)`` (each without cancellation),
    ``r = sqrt(1 + sigma^2) / (1 + sigma) = sqrt(t^2 + (1 - t)^2)``, the factor from the
    solver's VP-scaled state to the flow's ``x_t``."""
    if sigma == math.inf:
        return 1.0, 0.0, 1.0
    u = 1.0 / (1.0 + sigma)
    t = sigma * u
    return t, u, math.sqrt(t * t + u * u)


class VelocityModel(_NetworkModel):
    """A flow-matching / rectified-flow velocity network as the PF-ODE's right-hand side.

    The network was trained on ``x_t = (1 - t) x0 + t eps`` (``t in [0, 1]``, noise at
    ``t = 1``: diffusers' ``FlowMatchEulerDiscreteScheduler``, SD3, Flux) to predict
    ``v = dx_t/dt = eps - x0``. In pflow's variables

        sigma = t / (1 - t),    xbar = x_t / (1 - t),    t = sigma / (1 + sigma),
        x0_hat = x_t - t v,     eps = x_t + (1 - t) v

    (so ``xbar = x0_hat + sigma eps``, and one pflow Euler step is one flow Euler step
    ``x_t' = x_t + (t' - t) v``). The solver's state is in the VP scale, ``x = xbar /
    sqrt(1 + sigma^2)``; the network gets

        x_t = x * sqrt(1 + sigma^2) / (1 + sigma) = x * sqrt(t^2 + (1 - t)^2),

    a factor in ``[1/sqrt(2), 1]`` computed in float64, and the time input
    ``schedule.time_scale * t``.

    Args:
        net: callable ``net(x_t, time, **cond) -> v`` with ``time`` a 1-D tensor of shape
            ``(batch,)``.
        schedule: a :class:`pflow.FlowSchedule`: its ``time_scale`` (1, or 1000 for
            diffusers' SD3/Flux transformers, which take ``t * 1000``), its ``shift`` for
            ``uniform`` grids and its ``[t_min, t_max]``. ``FlowSchedule()`` by default.
        t_dtype: dtype of the time tensor; the state's by default.
        cond: keyword inputs of a conditional network (``encoder_hidden_states=...``),
            travelling with their samples.

    ``sigma = inf`` (``t = 1``) is accepted by :meth:`predict_xt` (``x_t = x``,
    ``x0_hat = x - v``, ``eps = x``); pflow's grids start just below it, at the schedule's
    ``t_max`` (see :class:`pflow.FlowSchedule`). A network trained with noise at ``t = 0``
    (``x_t = t x0 + (1 - t) eps``) is this one with ``v'(x, t) = -v(x, 1 - t)``.
    """

    def __init__(
        self,
        net: Callable[..., Any],
        schedule: FlowSchedule | None = None,
        *,
        t_dtype: torch.dtype | None = None,
        cond: Cond | None = None,
    ) -> None:
        super().__init__(net, _float_dtype(t_dtype, "t_dtype"), cond)
        if schedule is None:
            schedule = FlowSchedule()
        if not isinstance(schedule, FlowSchedule):
            raise TypeError(f"schedule must be a pflow.FlowSchedule, got {type(schedule).__name__}")
        self.schedule = schedule

    def __repr__(self) -> str:
        extra = f", cond={sorted(self.cond)}" if self.cond else ""
        return f"VelocityModel(net={type(self.net).__name__}, {self.schedule!r}{extra})"

    def predict_xt(
        self, x_t: Tensor, sigma: float | Tensor, cond: Cond | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(eps, x0_hat)`` from the solver's state ``x = xbar / sqrt(1 + sigma^2)``: the
        flow's ``x_t = x sqrt(1 + sigma^2) / (1 + sigma)``, ``v = net(x_t, time_scale t)``,
        ``x0_hat = x_t - t v``, ``eps = x_t + (1 - t) v``. ``cond`` replaces the bound
        conditioning for this call."""
        sigma = _scalar(sigma)
        batch = x_t.shape[0]
        scale = self.schedule.time_scale
        if isinstance(sigma, Tensor):
            s = sigma_column(sigma, x_t)
            top = torch.isposinf(s)
            finite = torch.where(top, torch.zeros_like(s), s)
            u64 = torch.where(top, torch.zeros_like(s), 1 / (1 + finite))
            t64 = torch.where(top, torch.ones_like(s), finite * u64)
            r64 = (t64**2 + u64**2).sqrt()
            x = x_t * r64.to(x_t.dtype)
            v = self._call(x, self._time_column(scale * t64.reshape(-1), batch, x), cond)
            t, u = t64.to(x_t.dtype), u64.to(x_t.dtype)
            return x + u * v, x - t * v
        t_f, u_f, r_f = _flow_coefficients(float(sigma))
        x = x_t if r_f == 1.0 else x_t * r_f
        v = self._call(x, self._time_column(scale * t_f, batch, x), cond)
        return torch.add(x, v, alpha=u_f), torch.add(x, v, alpha=-t_f)

    def __call__(self, xbar: Tensor, sigma: float | Tensor) -> Tensor:
        """``eps = x_t + (1 - t) v(x_t, t)`` with ``x_t = xbar / (1 + sigma)``."""
        sigma = _scalar(sigma)
        if isinstance(sigma, Tensor):
            s = sigma_column(sigma, xbar)
            u = (1 / (1 + s)).to(xbar.dtype)
            x = xbar * u
            time = self.schedule.time_scale * (s / (1 + s)).reshape(-1)
            v = self._call(x, self._time_column(time, xbar.shape[0], xbar), None)
            return x + u * v
        t_f, u_f, _ = _flow_coefficients(float(sigma))
        x = xbar * u_f
        v = self._call(x, self._time_column(self.schedule.time_scale * t_f, xbar.shape[0], x), None)
        return torch.add(x, v, alpha=u_f)
