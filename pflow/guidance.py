"""Classifier-free guidance as a model: the ODE's right-hand side stays ``eps(xbar, sigma)``.

Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) replaces the network's
noise prediction by

    eps_w = eps_u + w (eps_c - eps_u),

with ``eps_c`` the conditional and ``eps_u`` the unconditional prediction at the same
``(x_t, t)``. In pflow's variables the guided probability-flow ODE is

    d xbar / d sigma = eps_w(xbar / sqrt(1 + sigma^2), sigma),

an ODE like any other, so every solver, grid, inversion and likelihood applies to it.
``w = 1`` is the conditional model, ``w = 0`` the unconditional one. Since ``x0_hat =
sqrt(1 + sigma^2) x_t - sigma eps`` is affine in ``eps`` with weights that sum to one, the
same combination of the two ``x0_hat`` is the guided ``x0_hat``: guiding ``eps``, ``x0``
or ``v`` is the same field.

Two refinements, both off by default:

- **interval** ``(sigma_lo, sigma_hi)`` (Kynkäänniemi et al. 2024, arXiv 2404.07724):
  guidance only where ``sigma_lo < sigma <= sigma_hi`` and the conditional model (``w =
  1``, one network row per sample) elsewhere. ``sigma`` is pflow's ``sqrt((1 - a)/a)``,
  which is EDM's sigma for a VP model, the variable the paper's intervals are given in.
  The field is discontinuous at the interval's ends: fixed grids do not care, adaptive
  solvers pay a few rejected steps there.
- **rescale** ``phi`` (Lin et al. 2023, arXiv 2305.08891, eq. 15-16): ``eps_w`` is scaled to
  the per-sample standard deviation of ``eps_c`` and mixed back, ``eps = phi * eps_w *
  std(eps_c) / std(eps_w) + (1 - phi) * eps_w``. Applied to ``eps`` as diffusers' pipelines
  do (the paper applies it to the v-prediction); it makes the field nonlinear in the two
  predictions.

Cost: a guided evaluation runs the network on ``2 * batch`` rows (``batch`` where the
interval switches guidance off, when ``w`` is 1, and when it is 0 without rescale), in
one call of twice the batch (``batched=True``, as diffusers does) or two calls
(``batched=False``: half the peak memory). pflow counts one NFE per evaluation of the
ODE's right-hand side, as every sampler paper does, and reports the network rows
separately (``SolveResult.rows``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .conditioning import check_keywords, concat_cond, cond_rows
from .model import EpsModel, ODEModel, evaluate, sigma_column

__all__ = ["Guided", "guide"]


def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"guidance scale must be a number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0, got {scale}")
    return scale


def _check_interval(interval: Any, model: ODEModel) -> tuple[float, float] | None:
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise TypeError(
            f"guidance interval must be a pair (sigma_lo, sigma_hi), got {interval!r}"
        ) from None
    if math.isnan(lo) or math.isnan(hi) or not 0 <= lo < hi:
        raise ValueError(
            f"guidance interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi, "
            f"got ({lo}, {hi})"
        )
    schedule = getattr(model, "schedule", None)
    if schedule is not None:
        s_min, s_max = float(schedule.sigma_min), float(schedule.sigma_max)
        if hi < s_min or lo >= s_max:
            raise ValueError(
                f"guidance interval ({lo:g}, {hi:g}) lies outside the schedule's sigma range "
                f"[{s_min:.4g}, {s_max:.4g}]: guidance would never apply"
            )
    return lo, hi


class Guided:
    """``eps = eps_u + w (eps_c - eps_u)`` of a conditional and an unconditional model.

    Args:
        conditional: the model given the condition (e.g. ``model.condition(class_labels=y)``).
        unconditional: the model without it (the null label, the empty prompt), or another
            model altogether (autoguidance's weaker model).
        scale: the guidance weight ``w >= 0``.
        interval: ``(sigma_lo, sigma_hi)``: guide only for ``sigma_lo < sigma <= sigma_hi``.
        rescale: ``phi`` in ``[0, 1]``, guidance rescale (0: off).
        batched: one network call on twice the batch when both are :class:`EpsModel` of
            the same network with the same keywords (else two calls, which is also what
            ``batched=False`` asks for).

    :func:`guide` builds one from a conditioned :class:`EpsModel` and the unconditional
    keywords.
    """

    _identity_skip = ("_rows", "_same_net", "_eps_native")  # derived (pflow.identity)

    def __init__(
        self,
        conditional: ODEModel,
        unconditional: ODEModel,
        scale: float,
        *,
        interval: tuple[float, float] | None = None,
        rescale: float = 0.0,
        batched: bool = True,
    ) -> None:
        for name, m in (("conditional", conditional), ("unconditional", unconditional)):
            if not callable(m):
                raise TypeError(f"{name} must be a model eps(xbar, sigma), got {type(m).__name__}")
        self.conditional = conditional
        self.unconditional = unconditional
        self.scale = _check_scale(scale)
        self.interval = _check_interval(interval, conditional)
        if isinstance(rescale, bool) or not isinstance(rescale, (int, float)):
            raise TypeError(f"guidance rescale must be a number, got {type(rescale).__name__}")
        rescale = float(rescale)
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.rescale = rescale
        self.batched = bool(batched)
        rc = getattr(conditional, "cond_rows", None)
        ru = getattr(unconditional, "cond_rows", None)
        if rc is not None and ru is not None and rc != ru:
            raise ValueError(
                f"the conditional model is for {rc} samples and the unconditional one for "
                f"{ru}; give both one row per sample (or one row shared by all)"
            )
        self._rows = rc if rc is not None else ru
        self._same_net = (
            isinstance(conditional, EpsModel)
            and isinstance(unconditional, EpsModel)
            and conditional.net is unconditional.net
            and conditional.prediction == unconditional.prediction
            and conditional.schedule is unconditional.schedule
            and conditional.quantize == unconditional.quantize
            and conditional.net_dtype == unconditional.net_dtype
            and conditional.t_dtype == unconditional.t_dtype
        )
        # Both predict eps: x0_hat is formed from the guided eps, as for an unguided eps
        # network, instead of combining the two x0_hat (which multiplies their float32
        # rounding by w). Other predictions combine their well-conditioned x0_hat.
        self._eps_native = all(
            isinstance(m, EpsModel) and m.prediction == "epsilon"
            for m in (conditional, unconditional)
        )
        if self.batched and self._same_net:
            # Fails now (naming the keywords) rather than at the first call.
            concat_cond(unconditional.cond, conditional.cond, 1, 1)  # type: ignore[union-attr]

    # ------------------------------------------------------------ model protocol
    @property
    def schedule(self) -> Any:
        return getattr(self.conditional, "schedule", None)

    @property
    def dim(self) -> Any:
        return getattr(self.conditional, "dim", None)

    @property
    def cond_rows(self) -> int | None:
        return self._rows

    @property
    def breakpoints(self) -> tuple[float, ...]:
        """Sigmas where the field jumps: the guidance interval's ends. Adaptive solves pass
        through them (:func:`pflow.solve.run`), so no step straddles a jump."""
        if self.interval is None or self.scale == 1.0:
            return ()
        return tuple(v for v in self.interval if 0 < v < math.inf)

    def _replace(self, conditional: ODEModel, unconditional: ODEModel) -> Guided:
        return Guided(
            conditional,
            unconditional,
            self.scale,
            interval=self.interval,
            rescale=self.rescale,
            batched=self.batched,
        )

    def take(self, index: slice | Tensor) -> Guided:
        """The guided model for the samples ``index`` of its conditioning."""
        if self._rows is None:
            return self

        def part(m: ODEModel) -> ODEModel:
            return m.take(index) if getattr(m, "cond_rows", None) is not None else m  # type: ignore[attr-defined]

        return self._replace(part(self.conditional), part(self.unconditional))

    def to(self, dtype: torch.dtype | None = None, device: Any = None) -> Guided:
        """Both models moved with their ``to`` (a reference solve needs float64); a model
        without one is kept as it is."""

        def moved(m: ODEModel) -> ODEModel:
            to = getattr(m, "to", None)
            return to(dtype=dtype, device=device) if to is not None else m

        if self._same_net:
            # One copy of the shared network, conditioned twice: still one batched call.
            c = moved(self.conditional)
            u = c.condition(**_cast_like(self.unconditional, c))  # type: ignore[attr-defined]
            return self._replace(c, u)
        return self._replace(moved(self.conditional), moved(self.unconditional))

    def with_network_precision(self, dtype: torch.dtype) -> Guided:
        if not self._same_net:
            raise TypeError(
                "with_network_precision needs both models to share one EpsModel network"
            )
        c = self.conditional.with_network_precision(dtype)  # type: ignore[attr-defined]
        return self._replace(c, c.condition(**self.unconditional.cond))  # type: ignore[attr-defined]

    def compile(self, **compile_kwargs: Any) -> Guided:
        if not self._same_net:
            raise TypeError("compile needs both models to share one EpsModel network")
        c = self.conditional.compile(**compile_kwargs)  # type: ignore[attr-defined]
        return self._replace(c, c.condition(**self.unconditional.cond))  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        extra = ""
        if self.interval is not None:
            extra += f", interval={self.interval}"
        if self.rescale:
            extra += f", rescale={self.rescale}"
        return f"Guided({self.conditional!r}, scale={self.scale}{extra})"

    # ------------------------------------------------------------ evaluation
    def _active(self, sigma: float | Tensor) -> bool | Tensor:
        """Whether guidance applies at ``sigma`` (a bool, or one per sample)."""
        if self.scale == 1.0:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        if isinstance(sigma, Tensor) and sigma.ndim:
            return (sigma > lo) & (sigma <= hi)
        s = float(sigma)
        return lo < s <= hi

    def network_rows(self, sigma: float | Tensor, batch: int) -> int:
        """Network rows one evaluation at ``sigma`` costs for ``batch`` samples."""
        active = self._active(sigma)
        if isinstance(active, Tensor):
            n = int(active.sum())
            if 0 < n < batch:
                return batch + n  # see _mixed: conditional for all, unconditional for n
            active = n == batch
        if not active or self._unconditional_only:
            return batch
        return 2 * batch

    @property
    def _unconditional_only(self) -> bool:
        """``w = 0`` without rescale is the unconditional model alone; with rescale the
        field still needs ``std(eps_c)`` (and ``_mixed`` applies it), so both are run."""
        return self.scale == 0.0 and not self.rescale

    def _pair(self, x_t: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(eps_u, x0_u, eps_c, x0_c)``, in one network call when possible."""
        if self.batched and self._same_net:
            c: EpsModel = self.conditional  # type: ignore[assignment]
            u: EpsModel = self.unconditional  # type: ignore[assignment]
            n = x_t.shape[0]
            both = concat_cond(u.cond, c.cond, n, n)
            s2 = torch.cat([sigma, sigma]) if isinstance(sigma, Tensor) and sigma.ndim else sigma
            eps, x0 = c.predict_xt(torch.cat([x_t, x_t]), s2, cond=both)
            eps_u, eps_c = eps.chunk(2)
            x0_u, x0_c = x0.chunk(2)
            return eps_u, x0_u, eps_c, x0_c
        eps_u, x0_u = evaluate(self.unconditional, x_t, sigma)
        eps_c, x0_c = evaluate(self.conditional, x_t, sigma)
        return eps_u, _x0(x_t, sigma, eps_u, x0_u), eps_c, _x0(x_t, sigma, eps_c, x0_c)

    def predict_xt(self, x_t: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
        """``(eps, x0_hat)`` of the guided field at the state ``x_t`` (network scale)."""
        if isinstance(sigma, Tensor) and sigma.ndim == 0:
            sigma = float(sigma)
        active = self._active(sigma)
        if isinstance(active, Tensor):
            if bool(active.all()):
                active = True
            elif not bool(active.any()):
                active = False
            else:
                return self._mixed(x_t, sigma, active)  # type: ignore[arg-type]
        if not active:
            eps, x0 = evaluate(self.conditional, x_t, sigma)
            return eps, _x0(x_t, sigma, eps, x0)
        if self._unconditional_only:
            eps, x0 = evaluate(self.unconditional, x_t, sigma)
            return eps, _x0(x_t, sigma, eps, x0)
        eps_u, x0_u, eps_c, x0_c = self._pair(x_t, sigma)
        return self._combine(x_t, sigma, eps_u, x0_u, eps_c, x0_c, self.scale)

    def _mixed(self, x_t: Tensor, sigma: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample sigmas of which only some lie in the interval: the conditional
        prediction for all, the unconditional one only for those guided."""
        eps_c, x0_c = evaluate(self.conditional, x_t, sigma)
        x0_c = _x0(x_t, sigma, eps_c, x0_c)
        idx = active.nonzero().squeeze(1).to(x_t.device)
        sub = self.take(idx) if self._rows is not None else self
        xs, ss = x_t.index_select(0, idx), sigma.index_select(0, idx.to(sigma.device))
        eps_u, x0_u = evaluate(sub.unconditional, xs, ss)
        x0_u = _x0(xs, ss, eps_u, x0_u)
        eps_g, x0_g = self._combine(
            xs, ss, eps_u, x0_u, eps_c.index_select(0, idx), x0_c.index_select(0, idx), self.scale
        )
        return eps_c.index_copy(0, idx, eps_g), x0_c.index_copy(0, idx, x0_g)

    def _combine(
        self,
        x_t: Tensor,
        sigma: float | Tensor,
        eps_u: Tensor,
        x0_u: Tensor,
        eps_c: Tensor,
        x0_c: Tensor,
        w: float,
    ) -> tuple[Tensor, Tensor]:
        eps = eps_u + w * (eps_c - eps_u)
        guided = eps
        if self.rescale:
            factor = _spread(eps_c) / _spread(eps)  # std(eps_c) / std(eps_w), per sample
            eps = eps * (self.rescale * factor + (1.0 - self.rescale))
        if self._eps_native:
            return eps, _x0(x_t, sigma, eps, None)
        x0 = x0_u + w * (x0_c - x0_u)
        if self.rescale:
            # x0_hat = sqrt(1 + sigma^2) x_t - sigma eps moves by -sigma * (eps - guided).
            if isinstance(sigma, Tensor):
                s = sigma_column(sigma, x_t).to(x_t.dtype)
            else:
                s = float(sigma)  # type: ignore[assignment]
            x0 = x0 - s * (eps - guided)
        return eps, x0

    def eps_from_xt(self, x_t: Tensor, sigma: float | Tensor) -> Tensor:
        return self.predict_xt(x_t, sigma)[0]

    def __call__(self, xbar: Tensor, sigma: float | Tensor) -> Tensor:
        """``eps_w`` at ``xbar``: the guided right-hand side of the PF-ODE."""
        if isinstance(sigma, Tensor) and sigma.ndim:
            x_t = xbar / (1 + sigma_column(sigma, xbar) ** 2).sqrt().to(xbar.dtype)
        else:
            x_t = xbar / math.sqrt(1.0 + float(sigma) ** 2)
        return self.eps_from_xt(x_t, sigma)

    def as_network(self) -> Any:
        """The guided prediction as a network ``net(x_t, t) -> eps`` with ``t`` in the
        schedule's training steps (integer or float), for samplers that drive a network
        themselves (diffusers' schedulers): what a diffusers pipeline computes with the
        same guidance. Needs an :class:`EpsModel` conditional model (for ``t -> sigma``)."""
        schedule = self.schedule
        if schedule is None:
            raise TypeError("as_network needs a model with a NoiseSchedule")

        def net(x_t: Tensor, t: Tensor) -> Tensor:
            tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
            sig = schedule.t_to_sigma(tt)
            sig = torch.as_tensor(sig, dtype=torch.float64)
            if sig.numel() == 1:
                return self.eps_from_xt(x_t, float(sig.reshape(())))
            return self.eps_from_xt(x_t, sig.to(x_t.device))

        return net


def _spread(eps: Tensor) -> Tensor:
    """Each sample's root sum of squared deviations from its mean, shaped ``(batch, 1,
    ...)``: its standard deviation up to a factor that cancels in rescale's ratio. Written
    out because ``Tensor.std`` over a batch of one does not round as it does over a larger
    batch (on the CPU), and a sample must get the same answer whatever its chunk."""
    flat = eps.reshape(eps.shape[0], -1)
    dev = flat - flat.mean(1, keepdim=True)
    return (dev * dev).sum(1).sqrt().reshape(eps.shape[0], *([1] * (eps.ndim - 1)))


def _x0(x_t: Tensor, sigma: float | Tensor, eps: Tensor, x0: Tensor | None) -> Tensor:
    if x0 is not None:
        return x0
    if isinstance(sigma, Tensor):
        s = sigma_column(sigma, x_t)
        return x_t * (1 + s**2).sqrt().to(x_t.dtype) - s.to(x_t.dtype) * eps
    return x_t * math.sqrt(1.0 + float(sigma) ** 2) - float(sigma) * eps


def _cast_like(unconditional: ODEModel, moved: Any) -> dict[str, Any]:
    from .conditioning import cast_cond

    first = next(iter(moved.net.parameters()), None) if hasattr(moved.net, "parameters") else None
    dtype = first.dtype if first is not None else None
    device = first.device if first is not None else None
    return cast_cond(unconditional.cond, dtype, device)  # type: ignore[attr-defined]


def guide(
    model: EpsModel,
    scale: float,
    uncond: dict[str, Any] | None = None,
    *,
    interval: tuple[float, float] | None = None,
    rescale: float = 0.0,
    batched: bool = True,
) -> Guided:
    """Classifier-free guidance of a conditioned :class:`EpsModel`.

    ``model`` is conditioned (``model.condition(class_labels=y)``, or built with
    ``cond=``); ``uncond`` is the unconditional keywords for the same network (the null
    label, the empty prompt's embeddings): the unconditional model is
    ``model.condition(**uncond)``. ``uncond=None`` calls the network without keywords.

    Example::

        g = pflow.guide(model.condition(class_labels=y), 4.0,
                        uncond={"class_labels": torch.tensor([10])})
        pflow.sample(g, noise, "dpmpp_2m", steps=10)

    Raises:
        TypeError: ``model`` is not an :class:`EpsModel`; a wrong type of argument; a
            keyword (of ``model``'s conditioning or of ``uncond``) that the network's
            signature does not take.
        ValueError: ``scale`` < 0 or not finite, an interval outside the schedule's sigma
            range, ``rescale`` outside [0, 1], conditioning rows that disagree, or (batched)
            keywords that differ between the two calls.
    """
    if not isinstance(model, EpsModel):
        raise TypeError(
            f"guide() needs a conditioned pflow.EpsModel, got {type(model).__name__}; for "
            "two models of any kind use pflow.Guided(conditional, unconditional, scale)"
        )
    if uncond is not None:
        cond_rows(uncond, "uncond")
    # A keyword the network cannot take fails here rather than at the first call.
    check_keywords(model.eager_net, model.cond, "model")
    check_keywords(model.eager_net, uncond, "uncond")
    unconditional = model.condition(**(uncond or {}))
    return Guided(model, unconditional, scale, interval=interval, rescale=rescale, batched=batched)
