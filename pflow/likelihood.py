"""Log-likelihood of data through the probability-flow ODE (score-SDE, arXiv 2011.13456,
section 4.3 and appendix D.2), in bits/dim.

The PF-ODE ``d xbar / d sigma = eps(xbar, sigma)`` moves the density along with the
points (the instantaneous change of variables, Chen et al. 2018, arXiv 1806.07366):

    d/dsigma log p_sigma(xbar(sigma)) = -div_xbar eps(xbar(sigma), sigma).

Integrated upward from the data end ``sigma_min`` to ``sigma_max``,

    log p_{sigma_min}(xbar_0) = log p_prior(xbar_T) + int_{sigma_min}^{sigma_max} div eps dsigma,

where ``xbar_T`` is the end of the path started at ``xbar_0 = x0``. The data ``x0`` is
taken to be ``xbar`` at ``sigma_min``: the result is the density, at ``x0``, of the model's
marginal at the smallest noise level (the data distribution smoothed by
``N(0, sigma_min^2 I)``; ``sigma_min`` is about 0.01 for DDPM's linear schedule).

The state is carried in the network's scale ``x = C(sigma) xbar``, ``C = 1 / sqrt(1 +
sigma^2)``, by pflow's own Runge-Kutta stepper; the accumulated divergence is the one of
the ``xbar`` flow, ``div_xbar eps = C(sigma) tr(d eps / d x)``, so no Jacobian of the
``x``/``xbar`` map enters it. ``docs/likelihood.md`` derives every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import NonFiniteError
from .grids import validate_sigmas
from .model import EpsModel, ODEModel
from .schedule import NoiseSchedule
from .solve import SolveResult, run
from .solvers import PFODE, State
from .solvers.base import Option
from .solvers.controller import error_ratio
from .solvers.ode import Evaluation, scale
from .solvers.runge_kutta import EmbeddedRungeKutta, rk_step
from .solvers.tableau import BOSH3, DOPRI5, ButcherTableau

__all__ = ["LikelihoodResult", "bits_per_dim", "log_likelihood"]

Divergence = Literal["exact", "hutchinson"]
ProbeNoise = Literal["rademacher", "gaussian"]
Prior = Callable[[Tensor], Tensor]

# Adaptive embedded pairs the augmented ODE can be integrated with.
_TABLEAUX: dict[str, ButcherTableau] = {"rk45": DOPRI5, "bosh3": BOSH3}
# Cotangents per batched vector-Jacobian product in the exact divergence (memory bound).
_VJP_CHUNK = 32


@dataclass
class LikelihoodResult:
    """Per-sample log-likelihoods through the PF-ODE.

    Attributes:
        log_p: ``(batch,)`` float64, ``log p(x)`` in nats of the data under the model (the
            mean over probes for Hutchinson).
        bpd: ``(batch,)`` float64 bits per dimension, see :func:`bits_per_dim`.
        latent: the end of the path at ``sigma_max`` in the network's scale,
            ``x_T = xbar_T / sqrt(1 + sigma_max^2)`` (what a DDIM sampler starts from).
        nfe: network forward evaluations (one per batched call of the model).
        n_vjp: vector-Jacobian products (one backward pass each): ``D`` per divergence
            evaluation for the exact divergence, ``probes`` per evaluation for Hutchinson.
        log_p_stderr: ``(batch,)`` standard error of ``log_p`` over the probes (Hutchinson
            with ``probes > 1``), else ``None``.
        log_p_probes: ``(batch, probes)`` one estimate per probe (``probes = 1`` for exact).
        prior_log_p: ``(batch,)`` ``log p_prior(xbar_T)``.
        delta_log_p: ``(batch, probes)`` ``int div_xbar eps dsigma`` along the path, so that
            ``log_p_probes = prior_log_p[:, None] + delta_log_p``.
        x: the data that was evaluated (after dequantisation, if any), data scale.
        sigma_min, sigma_max: the ends of the path.
        n_accepted, n_rejected: steps of the adaptive solver.
    """

    log_p: Tensor
    bpd: Tensor
    latent: Tensor
    nfe: int
    n_vjp: int
    log_p_stderr: Tensor | None
    log_p_probes: Tensor
    prior_log_p: Tensor
    delta_log_p: Tensor
    x: Tensor
    sigma_min: float
    sigma_max: float
    n_accepted: int
    n_rejected: int

    @property
    def passes(self) -> int:
        """Forward plus backward passes through the network (``nfe + n_vjp``)."""
        return self.nfe + self.n_vjp


def bits_per_dim(log_p: Tensor | float, num_dims: int, bin_width: float | None = None) -> Tensor:
    """Bits per dimension of data with log-density ``log_p`` (nats, in the model's scale).

    A density ``p`` gives the bin of side ``bin_width`` around ``x`` (in every one of the
    ``num_dims`` dimensions) the probability ``P ~= p(x) * bin_width^D``, so

        bpd = -log2 P / D = -(log p(x) + D log(bin_width)) / (D ln 2).

    For 8-bit images scaled to ``[-1, 1]`` the bin width is ``2 / 256`` (this adds
    ``log2(128) = 7`` bits to ``-log2 p / D``); for the 17 grey levels of the digits,
    ``pixel / 8 - 1`` has bin width ``1 / 8``. ``bin_width=None`` (continuous data) gives
    ``-log p / (D ln 2)``, the differential entropy's bits per dimension.
    """
    if num_dims < 1:
        raise ValueError(f"num_dims must be >= 1, got {num_dims}")
    log_p = torch.as_tensor(log_p, dtype=torch.float64)
    log_bin = 0.0
    if bin_width is not None:
        if not bin_width > 0:
            raise ValueError(f"bin_width must be > 0, got {bin_width}")
        log_bin = math.log(bin_width)
    return -(log_p + num_dims * log_bin) / (num_dims * math.log(2.0))


def gaussian_prior(sigma_max: float) -> Prior:
    """``log N(xbar; 0, (1 + sigma_max^2) I)``: DDPM's ``x_T ~ N(0, I)`` seen in ``xbar``."""

    def log_prob(xbar: Tensor) -> Tensor:
        flat = xbar.reshape(xbar.shape[0], -1).to(torch.float64)
        var = 1.0 + sigma_max**2
        d = flat.shape[1]
        return -0.5 * (flat.pow(2).sum(1) / var + d * math.log(2 * math.pi * var))

    return log_prob


class _Stage(Evaluation):
    """An evaluation that also carries ``div_xbar eps`` per probe, shape ``(probes, batch)``."""

    __slots__ = ("div",)
    div: Tensor

    def __init__(
        self, x: Tensor, sigma: float | Tensor, eps: Tensor, x0: Tensor, div: Tensor
    ) -> None:
        super().__init__(x, sigma, eps, x0)
        self.div = div


class _AugmentedODE(PFODE):
    """The PF-ODE that also returns the divergence of its vector field at every stage.

    ``eval`` runs the model with gradients on the state only and takes ``probes``
    vector-Jacobian products of ``eps`` (the rows of the identity for the exact trace).
    ``eps`` (used only to choose the first step) is a plain forward without them.
    """

    def __init__(self, model: ODEModel, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.probes: Tensor | None = None  # (P, batch, ...) probes; None: the exact trace
        self.n_vjp = 0

    def eps(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        return PFODE.eval(self, x, sigma).eps

    def extras(self) -> dict[str, Any]:
        return {"n_vjp": self.n_vjp}

    def eval(self, x: Tensor, sigma: float | Tensor) -> _Stage:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            ev = PFODE.eval(self, xg, sigma)
            trace = self._trace(ev.eps, xg)  # tr(d eps / d x) per probe, (P, batch)
            x0 = ev.x0.detach()
        # d eps / d xbar = C(sigma) d eps / d x since x = C(sigma) xbar.
        div = trace.to(torch.float64) * scale(float(sigma))
        return _Stage(x, sigma, ev.eps.detach(), x0, div)

    def _trace(self, eps: Tensor, xg: Tensor) -> Tensor:
        """``v^T (d eps / d x) v`` per probe, ``(P, batch)``; for the exact trace (``P = 1``)
        the sum of it over the rows ``v`` of the identity, built ``_VJP_CHUNK`` at a time."""
        b, d = xg.shape[0], xg[0].numel()
        n = d if self.probes is None else self.probes.shape[0]
        if not eps.requires_grad:  # eps does not depend on x: zero divergence
            self.n_vjp += n
            return torch.zeros(
                1 if self.probes is None else n, b, dtype=torch.float64, device=xg.device
            )
        parts = []
        for start in range(0, n, _VJP_CHUNK):
            stop = min(n, start + _VJP_CHUNK)
            if self.probes is None:
                rows = torch.eye(d, dtype=xg.dtype, device=xg.device)[start:stop]
                chunk = rows[:, None, :].expand(stop - start, b, d).reshape(-1, *xg.shape)
            else:
                chunk = self.probes[start:stop]
            if chunk.shape[0] == 1:
                (g,) = torch.autograd.grad(eps, xg, chunk[0], retain_graph=stop < n)
                g = g.unsqueeze(0)
            else:
                (g,) = torch.autograd.grad(
                    eps, xg, chunk, retain_graph=stop < n, is_grads_batched=True
                )
            self.n_vjp += chunk.shape[0]
            parts.append((g * chunk).reshape(chunk.shape[0], b, -1).sum(-1))
        vjv = torch.cat(parts)
        return vjv.sum(0, keepdim=True) if self.probes is None else vjv


def _probes(x: Tensor, probes: int, noise: ProbeNoise, generator: torch.Generator) -> Tensor:
    """``(probes, batch, ...)`` Hutchinson probes, drawn once and kept for the whole path."""
    shape = (probes, *x.shape)
    if noise == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype)
        return 2 * v - 1
    return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)


def _sigma_range(
    model: ODEModel, sigma_min: float | None, sigma_max: float | None
) -> tuple[float, float]:
    schedule = getattr(model, "schedule", None)
    schedule = schedule if isinstance(schedule, NoiseSchedule) else None
    if schedule is None and (sigma_min is None or sigma_max is None):
        raise ValueError(
            "the model has no NoiseSchedule (model.schedule); pass sigma_min= and sigma_max="
        )
    lo = float(schedule.sigma_min if sigma_min is None else sigma_min)  # type: ignore[union-attr]
    hi = float(schedule.sigma_max if sigma_max is None else sigma_max)  # type: ignore[union-attr]
    if lo == 0.0 and isinstance(model, EpsModel):
        raise ValueError(
            "sigma_min=0 needs a model defined at sigma = 0; a network is defined from the "
            f"schedule's sigma_min={model.schedule.sigma_min:.6g} up"
        )
    grid = validate_sigmas([lo, hi], schedule=schedule, name="[sigma_min, sigma_max]")
    if not grid[1] > grid[0]:
        raise ValueError(f"sigma_min must be below sigma_max, got {lo} and {hi}")
    return float(grid[0]), float(grid[1])


def log_likelihood(
    model: ODEModel,
    x: Tensor,
    solver: str = "rk45",
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: Divergence = "exact",
    probes: int = 1,
    noise: ProbeNoise = "rademacher",
    seed: int = 0,
    prior: Prior | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    dequantize: bool = False,
    bin_width: float | None = None,
    max_nfe: int = 100_000,
    first_step: float | None = None,
    batch_size: int | None = None,
    process_group: Any = None,
) -> LikelihoodResult:
    """``log p(x)`` per sample by integrating the PF-ODE and its divergence upward.

    The path starts at ``xbar = x`` at ``sigma_min`` and ends at ``xbar_T`` at ``sigma_max``;

        log p(x) = log p_prior(xbar_T) + int_{sigma_min}^{sigma_max} div_xbar eps(xbar, s) ds.

    Args:
        model: ``eps = model(xbar, sigma)``, e.g. an :class:`~pflow.EpsModel` or the exact
            :class:`~pflow.zoo.GaussianMixture`. It is called with a Python float sigma,
            with gradients enabled on the state only.
        x: data ``(batch, ...)`` in the model's data scale (``[-1, 1]`` for images).
        solver: an adaptive Runge-Kutta pair: ``"rk45"`` (Dormand-Prince 5(4)) or
            ``"bosh3"``.
        rtol, atol: tolerances. The state's error is measured in the network's scale as in
            :func:`pflow.sample`; the accumulated divergence's error (nats) against
            ``atol + rtol * |delta_log_p|``; a step passes when both do, for every sample.
        divergence: ``"exact"``: the trace of ``d eps / d x`` from ``D`` vector-Jacobian
            products per evaluation (small data); ``"hutchinson"``: ``v^T (d eps / d x) v``
            with random probes ``v`` drawn once and kept along the whole path.
        probes: Hutchinson probes per sample; with more than one, ``log_p`` is the mean of
            the independent estimates and ``log_p_stderr`` their standard error.
        noise: Hutchinson probe distribution, ``"rademacher"`` (+-1) or ``"gaussian"``.
        seed: seeds the dequantisation noise, then the probes.
        prior: ``prior(xbar_T) -> (batch,)`` log-density of ``xbar`` at ``sigma_max``
            (float64 ``xbar_T``). Default ``N(0, (1 + sigma_max^2) I)``, i.e.
            ``x_T ~ N(0, I)`` as DDPM assumes.
        sigma_min, sigma_max: ends of the path; the model's schedule's range by default.
            The result is the density of the model's marginal at ``sigma_min``.
        dequantize: add uniform noise of width ``bin_width`` centred on each value (data on
            a grid of levels; the result is then a stochastic lower bound on the discrete
            log-probability minus ``D log(bin_width)``, the standard for bits/dim).
        bin_width: width of one quantisation bin in the model's data scale, for
            ``dequantize`` and :func:`bits_per_dim` (``2/256`` for 8-bit images in
            ``[-1, 1]``, ``1/8`` for the digits); ``None`` for continuous data.
        max_nfe: budget of forward evaluations.
        first_step: first step size (chosen by Hairer's rule by default, one extra forward).
        batch_size: integrate at most this many samples at a time (each chunk chooses its
            own steps; ``nfe`` and ``n_vjp`` are those of the costliest chunk).
        process_group: a ``torch.distributed`` group whose ranks each hold a shard: the
            adaptive steps are shared by every rank, as in :func:`pflow.sample`.

    Returns:
        A :class:`LikelihoodResult`. Cost convention: ``nfe`` counts forward passes of the
        network (one per batched call, including the one that picks the first step);
        ``n_vjp`` counts vector-Jacobian products, each a backward pass of the network over
        the batch (``D`` per evaluation for ``"exact"``, ``probes`` for ``"hutchinson"``),
        even when several are vectorised into one ``autograd.grad`` call.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError("x must be a floating-point tensor of shape (batch, ...)")
    if solver not in _TABLEAUX:
        raise ValueError(f"solver must be one of {', '.join(_TABLEAUX)}; got {solver!r}")
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
    if noise not in ("rademacher", "gaussian"):
        raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
    if isinstance(probes, bool) or int(probes) != probes or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    if divergence == "exact" and probes != 1:
        raise ValueError("probes applies to divergence='hutchinson'; the exact trace has none")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if dequantize and bin_width is None:
        raise ValueError("dequantize=True needs bin_width (the width of one data bin)")
    lo, hi = _sigma_range(model, sigma_min, sigma_max)
    prior = gaussian_prior(hi) if prior is None else prior
    generator = torch.Generator(device=x.device).manual_seed(int(seed))

    x = x.detach()
    if dequantize and bin_width is not None:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + (u - 0.5) * bin_width
    exact = divergence == "exact"
    n_est = 1 if exact else int(probes)
    v = None if exact else _probes(x, n_est, noise, generator)
    res = run(
        model,
        x * scale(lo),
        _AUGMENTED[solver],
        direction="up",
        name="x",
        caller="log_likelihood",
        sigmas=torch.tensor([lo, hi], dtype=torch.float64),
        rtol=rtol,
        atol=atol,
        max_nfe=max_nfe,
        batch_size=batch_size,
        process_group=process_group,
        solver_options={"first_step": first_step, "probes": v, "n_est": n_est},
        result=_AugmentedResult,
        ode_factory=_AugmentedODE,
    )
    assert isinstance(res, _AugmentedResult) and res.delta is not None
    x_T, delta = res.x, res.delta
    with torch.no_grad():
        xbar_T = x_T.to(torch.float64) * math.sqrt(1.0 + hi * hi)
        prior_log_p = torch.as_tensor(prior(xbar_T), dtype=torch.float64).reshape(-1)
    if prior_log_p.shape[0] != x.shape[0]:
        raise ValueError(
            f"prior must return one log-density per sample ({x.shape[0]}), got shape "
            f"{tuple(prior_log_p.shape)}"
        )
    per_probe = prior_log_p[:, None] + delta.T.cpu()  # (batch, P)
    log_p = per_probe.mean(1)
    stderr = per_probe.std(1) / math.sqrt(n_est) if n_est > 1 else None
    return LikelihoodResult(
        log_p=log_p,
        bpd=bits_per_dim(log_p, x[0].numel(), bin_width),
        latent=x_T,
        nfe=res.nfe,
        n_vjp=res.n_vjp,
        log_p_stderr=stderr,
        log_p_probes=per_probe,
        prior_log_p=prior_log_p,
        delta_log_p=delta.T.cpu(),
        x=x,
        sigma_min=lo,
        sigma_max=hi,
        n_accepted=res.n_accepted,
        n_rejected=res.n_rejected,
    )


@dataclass
class _AugmentedResult(SolveResult):
    """A solve of the augmented ODE: also ``delta = int div dsigma`` (``(P, batch)``) and
    the vector-Jacobian products it took."""

    delta: Tensor | None = None
    n_vjp: int = 0


class _AugmentedRungeKutta(EmbeddedRungeKutta):
    """An embedded pair on the state and ``delta = int div dsigma`` together.

    The state goes through :func:`pflow.solvers.runge_kutta.rk_step`; the divergence,
    which the right-hand side does not depend on, is a quadrature with the same weights:
    ``delta_next = delta + h sum_i b_i div_i``, error ``h sum_i (b_i - b_hat_i) div_i``,
    measured against ``atol + rtol * |delta|``. A step passes when the state and ``delta``
    both do, per sample. The driver's controller and loop do the rest.
    """

    options = EmbeddedRungeKutta.options + (
        Option("probes", object, None, "Hutchinson probes", allow_none=True, batch_dim=1),
        Option("n_est", int, 1, "estimates per sample", low=1),
    )

    def init(self, ode: PFODE, x: Tensor, sigma: Any, options: dict[str, Any]) -> State:
        assert isinstance(ode, _AugmentedODE)
        ode.probes = options["probes"]
        delta = torch.zeros(options["n_est"], x.shape[0], dtype=torch.float64, device=x.device)
        return State(x, sigma, aux=delta)

    def attempt(
        self, ode: PFODE, state: State, sigma_next: Any, options: dict[str, Any]
    ) -> tuple[State, Tensor]:
        tab, x, delta = self.tableau, state.x, state.aux
        rtol, atol = options["rtol"], options["atol"]
        x_next, err, evals = rk_step(ode, tab, x, state.sigma, sigma_next, state.ev)
        assert err is not None
        h = sigma_next - state.sigma
        divs = torch.stack([ev.div for ev in evals])  # type: ignore[attr-defined]
        b = torch.tensor(tab.b, dtype=torch.float64, device=x.device)
        e = torch.tensor(tab.e, dtype=torch.float64, device=x.device)
        delta_next = delta + h * torch.einsum("s,spb->pb", b, divs)
        delta_err = h * torch.einsum("s,spb->pb", e, divs)
        tol = atol + rtol * torch.maximum(delta.abs(), delta_next.abs())
        ratio = torch.maximum(
            error_ratio(err, x, x_next, rtol, atol), (delta_err.abs() / tol).amax(0)
        )
        if not bool(torch.isfinite(delta_err).all()):
            ode.raise_if_nonfinite()
            raise NonFiniteError(
                f"the divergence of the model's eps is NaN or inf between sigma="
                f"{state.sigma:.6g} and {sigma_next:.6g}"
            )
        ev = evals[-1] if tab.fsal else None
        return State(x_next, sigma_next, ev=ev, aux=delta_next), ratio

    def extras(self, state: State) -> dict[str, Any]:
        return {"delta": state.aux}


_AUGMENTED = {
    name: _AugmentedRungeKutta(name, tab, f"{name} on the PF-ODE and its divergence")
    for name, tab in _TABLEAUX.items()
}
