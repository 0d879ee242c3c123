"""The ODE's right-hand side: a trained network reduced to ``eps(xbar, sigma)``.

pflow integrates the probability-flow ODE in the variance-exploding variables of DDIM
(arXiv 2010.02502, eq. 14):

    d xbar / d sigma = eps_theta(xbar / sqrt(sigma^2 + 1), t(sigma)).

:class:`EpsModel` wraps a network ``net(x_t, t)`` trained on a DDPM schedule and predicting
``eps`` (``"epsilon"``), ``x0`` (``"sample"``) or ``v`` (``"v_prediction"``), and converts
its output to ``eps`` exactly:

    eps = (x_t - sqrt(a) x0) / sqrt(1 - a),        eps = sqrt(1 - a) x_t + sqrt(a) v.

Solvers never see the prediction type (k-diffusion's ``external.py`` and EDM's
``*Precond`` do the same). Besides ``model(xbar, sigma)`` a model may offer
``model.eps_from_xt(x_t, sigma)``, the same function of the state in the network's own
scale ``x_t = xbar / sqrt(1 + sigma^2)``, and ``model.predict_xt(x_t, sigma) ->
(eps, x0_hat)``. Solvers keep their state in that scale and write each step around the
denoised ``x0_hat`` (``xbar_next = x0_hat + sigma_next * eps`` for Euler), because that
is far better conditioned in float32 than ``xbar`` (``sigma_max`` is ~157 for the linear
schedule and above 1e4 for the cosine one).

Reduced precision and compilation: ``net_dtype`` (or :meth:`EpsModel.with_network_precision`)
runs ``net`` in bfloat16/float16 while the ODE state ``x_t``, the conversion to ``eps`` and
``x0_hat`` and every solver step stay in the caller's dtype; :meth:`EpsModel.compile` wraps
``net`` in :func:`torch.compile`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from .conditioning import Cond, cast_cond, check_keywords, cond_rows, take_cond
from .schedule import ContinuousVPSchedule, NoiseSchedule

__all__ = ["EpsModel", "ODEModel", "Prediction", "evaluate", "sigma_column"]

Prediction = Literal["epsilon", "sample", "v_prediction"]
_PREDICTIONS = ("epsilon", "sample", "v_prediction")


@runtime_checkable
class ODEModel(Protocol):
    """Anything pflow can integrate: ``eps = model(xbar, sigma)``.

    ``sigma`` is a Python float, a 0-d tensor, or a 1-D tensor with one sigma per sample.
    Optional attributes: ``schedule`` (a :class:`NoiseSchedule`, needed to build grids
    from ``steps``), ``eps_from_xt(x_t, sigma)`` and ``predict_xt(x_t, sigma)``.

    A model bound to per-sample inputs (conditioning, :mod:`pflow.conditioning`) also
    offers ``cond_rows`` (the number of samples it is for, or ``None`` when nothing is
    per sample) and ``take(index) -> model`` (the model for the samples ``index``, a
    slice or an index tensor): the plan checks ``cond_rows`` against the batch before any
    network call and gives each chunk, shard or subset of running samples its own rows.
    """

    def __call__(self, xbar: Tensor, sigma: float | Tensor) -> Tensor: ...


def sigma_column(sigma: float | Tensor, x: Tensor) -> Tensor:
    """``sigma`` as a float64 tensor on ``x``'s device, shaped to broadcast against ``x``
    (``(batch, 1, 1, ...)`` for one sigma per sample, ``()`` for a scalar)."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != x.shape[0]:
        raise ValueError(
            f"sigma must be a scalar or have one entry per sample ({x.shape[0]}), got shape "
            f"{tuple(s.shape)}"
        )
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def _check_float_dtype(dtype: object, name: str) -> torch.dtype:
    """``dtype`` when it is a floating ``torch.dtype``; a ``TypeError`` naming ``name``
    otherwise."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating torch.dtype such as torch.bfloat16, torch.float16 or "
            f"torch.float32, got {dtype!r}"
        )
    return dtype


class EpsModel:
    """A DDPM network as the right-hand side of the probability-flow ODE.

    Args:
        net: callable ``net(x_t, t) -> prediction`` with ``x_t`` of shape ``(batch, ...)``
            and ``t`` a 1-D tensor of shape ``(batch,)``.
        schedule: the schedule the network was trained with: a table
            (:class:`NoiseSchedule`) or score-SDE's continuous VP schedule
            (:class:`~pflow.ContinuousVPSchedule`, whose ``t`` is continuous).
        prediction: what ``net`` predicts: ``"epsilon"``, ``"sample"`` (x0) or
            ``"v_prediction"``.
        quantize: pass the nearest training step (an int64 tensor) instead of the
            continuous ``t(sigma)`` (a float tensor in ``x_t``'s dtype). Use it for
            networks that only accept integer timesteps.
        t_dtype: dtype of the continuous ``t`` given to ``net``; ``x_t``'s (the state's)
            dtype by default, also when ``net_dtype`` is set.
        net_dtype: a floating dtype (``torch.bfloat16``, ``torch.float16``, ...) to run
            ``net`` in: ``x_t`` is cast to it before the call and the prediction is cast
            back to ``x_t``'s dtype before it is converted to ``eps`` and ``x0_hat``, so the
            ODE state and the solver's arithmetic stay in the caller's dtype. ``None`` (the
            default) hands ``net`` the state's dtype. The network's parameters must already
            be in this dtype; :meth:`with_network_precision` casts
            an ``nn.Module`` and sets this in one go. ``t`` is not cast to ``net_dtype``
            (as in diffusers' half-precision pipelines): near ``t = 1000`` bfloat16 can only
            represent multiples of 4, which costs more accuracy than the network's own
            rounding. A network that needs ``t`` in its own dtype casts it (pflow's bundled
            networks do) or gets ``t_dtype=net_dtype``.
        cond: keyword inputs of a conditional network, ``net(x_t, t, **cond)``: tensors
            with one row per sample (or one row shared by all), nested mappings and plain
            values (see :mod:`pflow.conditioning`). :meth:`condition` makes a conditioned
            copy; the samples' rows travel with them through chunks and shards.

    Raises:
        TypeError: ``net`` is not callable, ``schedule`` is not a :class:`NoiseSchedule`, or
            ``t_dtype`` or ``net_dtype`` is not ``None`` or a floating ``torch.dtype``
            (``quantize=True`` is how a network gets integer timesteps).
        ValueError: an unknown ``prediction``, or per-sample ``cond`` tensors that disagree
            on the number of rows.

    ``model(xbar, sigma)`` returns ``eps`` in ``xbar``'s dtype. Conversion coefficients are
    computed in float64 from sigma: ``sqrt(a) = 1 / sqrt(1 + sigma^2)`` and
    ``sqrt(1 - a) = sigma / sqrt(1 + sigma^2)``.

    A compiled model (:meth:`compile`) keeps the uncompiled network (:attr:`eager_net`) and
    the ``torch.compile`` arguments; :meth:`to` and :meth:`with_network_precision` act on
    the uncompiled network and compile the result again with the same arguments.
    """

    # Derived from ``cond``, which is hashed (an empty ``cond`` adds nothing, so an
    # unconditional model keeps the identity it had before conditioning existed).
    _identity_skip = ("_cond_rows",)

    def __init__(
        self,
        net: Callable[[Tensor, Tensor], Tensor],
        schedule: NoiseSchedule | ContinuousVPSchedule,
        prediction: Prediction = "epsilon",
        *,
        quantize: bool = False,
        t_dtype: torch.dtype | None = None,
        net_dtype: torch.dtype | None = None,
        cond: Cond | None = None,
    ) -> None:
        if not callable(net):
            raise TypeError(f"net must be callable as net(x_t, t), got {type(net).__name__}")
        if not isinstance(schedule, (NoiseSchedule, ContinuousVPSchedule)):
            raise TypeError(
                "schedule must be a pflow.NoiseSchedule or pflow.ContinuousVPSchedule (a VP "
                f"schedule), got {type(schedule).__name__}; an EDM denoiser is a "
                "pflow.DenoiserModel, a flow-matching velocity a pflow.VelocityModel"
            )
        if prediction not in _PREDICTIONS:
            raise ValueError(
                f"prediction must be one of {', '.join(_PREDICTIONS)}; got {prediction!r}"
            )
        self.net = net
        self.schedule = schedule
        self.prediction: Prediction = prediction
        self.quantize = bool(quantize)
        self.t_dtype = None if t_dtype is None else _check_float_dtype(t_dtype, "t_dtype")
        self.net_dtype = None if net_dtype is None else _check_float_dtype(net_dtype, "net_dtype")
        self._cond_rows = cond_rows(cond, "cond")
        check_keywords(net, cond, "cond")
        self.cond: dict[str, Any] = dict(cond or {})
        # Set by compile(): the network before torch.compile and the arguments it got.
        self._eager_net: Callable[[Tensor, Tensor], Tensor] | None = None
        self._compile_kwargs: dict[str, Any] | None = None

    @property
    def eager_net(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The uncompiled network: ``net`` itself unless this model came from :meth:`compile`."""
        return self._eager_net if self._eager_net is not None else self.net

    @property
    def is_compiled(self) -> bool:
        """Whether ``net`` is the ``torch.compile`` wrapper made by :meth:`compile`."""
        return self._compile_kwargs is not None

    @property
    def cond_rows(self) -> int | None:
        """Samples the bound conditioning is for, or ``None`` when none of it is per sample."""
        return self._cond_rows

    def condition(self, **cond: Any) -> EpsModel:
        """A copy of this model whose network gets ``**cond`` on every call (replacing any
        earlier conditioning): ``model.condition(class_labels=labels)``,
        ``model.condition(encoder_hidden_states=emb)``. The network's parameters are
        shared."""
        return self._copy_with(self.eager_net, self.net_dtype, cond)

    def take(self, index: slice | Tensor) -> EpsModel:
        """This model for the samples ``index`` (a slice or an index tensor) of its
        conditioning; itself when nothing is per sample."""
        if self._cond_rows is None:
            return self
        return self._copy_with(
            self.eager_net, self.net_dtype, take_cond(self.cond, index, self._cond_rows)
        )

    def __repr__(self) -> str:
        extra = ""
        if self.cond:
            extra += f", cond={sorted(self.cond)}"
        if self.net_dtype is not None:
            extra += f", net_dtype={self.net_dtype}"
        if self.is_compiled:
            extra += ", compiled=True"
        return (
            f"EpsModel(net={type(self.eager_net).__name__}, {self.schedule!r}, "
            f"prediction={self.prediction!r}, quantize={self.quantize}{extra})"
        )

    def _copy_with(
        self,
        eager_net: Callable[..., Tensor],
        net_dtype: torch.dtype | None,
        cond: Cond | None = None,
    ) -> EpsModel:
        """This model with another (uncompiled) network, ``net_dtype`` and conditioning
        (this one's by default), compiled again with the same arguments when this one is
        compiled (the compiled function is shared, not compiled twice)."""
        model = EpsModel(
            eager_net,
            self.schedule,
            self.prediction,
            quantize=self.quantize,
            t_dtype=self.t_dtype,
            net_dtype=net_dtype,
        )
        if cond is None or cond is self.cond:
            model.cond, model._cond_rows = self.cond, self._cond_rows
        else:  # new conditioning: its rows (and, when the network changed, its keywords)
            model._cond_rows = cond_rows(cond, "cond")
            if eager_net is not self.eager_net or set(cond) - set(self.cond):
                check_keywords(eager_net, cond, "cond")
            model.cond = dict(cond)
        if self._compile_kwargs is not None:
            if eager_net is self.eager_net:
                model.net = self.net
                model._eager_net = eager_net
                model._compile_kwargs = dict(self._compile_kwargs)
            else:
                model = model.compile(**self._compile_kwargs)
        return model

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> EpsModel:
        """A copy whose network (when it is an ``nn.Module``) is moved to ``dtype``/``device``;
        the float64 copy is what a reference solve needs.

        The options are carried over. When the network is cast to ``dtype`` and
        ``net_dtype`` is set, ``net_dtype`` becomes ``dtype`` (the network now runs in
        it): ``model.with_network_precision(torch.bfloat16).to(torch.float64)`` runs in
        float64 again, with the weights already rounded to bfloat16 (start from the
        full-precision model for a reference solve). A compiled model's uncompiled
        network is copied and the copy is compiled again with the same arguments (it
        compiles on its first call).
        """
        net = self.eager_net
        net_dtype = self.net_dtype
        if isinstance(net, torch.nn.Module):
            net = copy.deepcopy(net).to(device=device, dtype=dtype)
            if dtype is not None and net_dtype is not None:
                net_dtype = dtype
        # Floating conditioning (embeddings) follows the network; labels keep their dtype.
        return self._copy_with(net, net_dtype, cast_cond(self.cond, dtype, device))

    def with_network_precision(self, dtype: torch.dtype) -> EpsModel:
        """A copy whose network runs in ``dtype`` while the ODE state keeps its own dtype.

        The ``nn.Module`` network is deep-copied and cast to ``dtype`` (``torch.bfloat16``,
        ``torch.float16``, or back to ``torch.float32``) and ``net_dtype = dtype`` is set:
        ``x_t`` is rounded to ``dtype`` for the call and the prediction comes back in the
        state's dtype, so ``eps``, ``x0_hat`` and the solver's steps keep float32/float64
        arithmetic. Expect a relative error of a few ``dtype`` epsilons per evaluation
        (bfloat16: 7.8e-3, float16: 9.8e-4). A compiled model stays compiled (its
        uncompiled network is cast and compiled again with the same arguments).

        Raises:
            TypeError: ``dtype`` is not a floating ``torch.dtype``, or ``net`` is not an
                ``nn.Module`` (pass ``net_dtype=`` to :class:`EpsModel` for a plain
                callable whose dtype you control yourself).
        """
        dtype = _check_float_dtype(dtype, "dtype")
        net = self.eager_net
        if not isinstance(net, torch.nn.Module):
            raise TypeError(
                "with_network_precision needs net to be a torch.nn.Module to cast its "
                f"parameters, got {type(net).__name__}; for a plain callable pass "
                "net_dtype= to EpsModel and handle the dtype inside it"
            )
        return self._copy_with(copy.deepcopy(net).to(dtype=dtype), dtype)

    def compile(self, **compile_kwargs: Any) -> EpsModel:
        """A copy whose network is ``torch.compile(net, **compile_kwargs)``.

        The keyword arguments go to :func:`torch.compile` unchanged (``backend=``,
        ``mode=``, ``dynamic=``, ``fullgraph=``, ...; its defaults otherwise). Only ``net``
        is compiled: ``eps``/``x0_hat`` conversion and solver steps stay eager. The copy
        shares the network's parameters with this model.

        Compilation is lazy: the first ``sample()`` call compiles (seconds to minutes; on
        the CPU the default ``"inductor"`` backend needs a C++ compiler), and a new input
        shape or dtype (the last, partial batch; a float64 state) compiles again. With
        ``dynamic=None`` (the default) the second batch size compiles a dynamic-shape graph
        that then serves every batch size; ``dynamic=False`` compiles one graph per shape.
        Compiling a compiled model compiles its uncompiled network (:attr:`eager_net`)
        with the new arguments instead of nesting.
        """
        eager = self.eager_net
        model = EpsModel(
            torch.compile(eager, **compile_kwargs),
            self.schedule,
            self.prediction,
            quantize=self.quantize,
            t_dtype=self.t_dtype,
            net_dtype=self.net_dtype,
            cond=self.cond,
        )
        model._eager_net = eager
        model._compile_kwargs = dict(compile_kwargs)
        return model

    def timesteps(self, sigma: float | Tensor, batch: int, like: Tensor) -> Tensor:
        """The ``t`` tensor of shape ``(batch,)`` handed to the network at ``sigma``: int64
        when quantized, else ``t_dtype`` or else ``like``'s dtype."""
        dtype = self.t_dtype or like.dtype
        if isinstance(sigma, Tensor) and sigma.ndim > 0:
            # The driver's per-sample sigmas: the unchecked map (the public sigma_to_t
            # checks a tensor's values, one host sync, which a network call must not pay).
            t = self.schedule._sigma_to_t_torch(sigma.reshape(-1).to(like.device))
            if self.quantize:
                return t.round().long()
            return t.to(dtype)
        t_val = self.schedule.sigma_to_t(float(sigma))
        if self.quantize:
            return torch.full((batch,), round(t_val), dtype=torch.long, device=like.device)
        return torch.full((batch,), t_val, dtype=dtype, device=like.device)

    def predict_xt(
        self, x_t: Tensor, sigma: float | Tensor, cond: Cond | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(eps, x0_hat)`` from the state in the network's scale ``x_t``.

        ``cond`` replaces the bound conditioning for this call (its rows must match
        ``x_t``'s); guidance uses it to evaluate the conditional and the unconditional
        inputs in one network call.

        Each is computed the well-conditioned way for the network's prediction type: a
        v-prediction gives ``x0_hat = sqrt(a) x_t - sqrt(1-a) v`` without dividing by a tiny
        ``sqrt(a)`` (the cosine schedule's ``sqrt(a)`` falls below 1e-4), which is what
        keeps a float32 solve within round-off of a float64 one.

        With ``net_dtype`` set, ``net`` sees ``x_t`` rounded to ``net_dtype`` and its
        prediction is cast back to ``x_t``'s dtype before the conversion above.
        """
        if isinstance(sigma, Tensor) and sigma.ndim == 0:
            sigma = float(sigma)
        t = self.timesteps(sigma, x_t.shape[0], x_t)
        x_in = x_t if self.net_dtype is None else x_t.to(self.net_dtype)
        kwargs = self.cond if cond is None else cond
        out = self.net(x_in, t, **kwargs) if kwargs else self.net(x_in, t)
        if not isinstance(out, Tensor):  # diffusers returns an output object
            out = getattr(out, "sample", out[0] if isinstance(out, (tuple, list)) else out)
        if out.shape != x_t.shape:
            raise ValueError(
                f"net returned shape {tuple(out.shape)} for an input of shape "
                f"{tuple(x_t.shape)}; pflow needs a prediction of the input's shape"
            )
        if out.dtype != x_t.dtype:
            out = out.to(x_t.dtype)
        sqrt_a: float | Tensor
        sqrt_1ma: float | Tensor
        sig: float | Tensor
        root: float | Tensor
        if isinstance(sigma, Tensor):
            s = sigma_column(sigma, x_t)
            root64 = (1 + s**2).sqrt()
            sqrt_a, sqrt_1ma = (1 / root64).to(x_t.dtype), (s / root64).to(x_t.dtype)
            sig, root = s.to(x_t.dtype), root64.to(x_t.dtype)
        else:
            sig = float(sigma)
            root = math.sqrt(1 + sig**2)
            sqrt_a, sqrt_1ma = 1 / root, sig / root
        if self.prediction == "epsilon":
            if isinstance(sig, float):  # one fused kernel fewer per evaluation
                return out, torch.add(x_t * root, out, alpha=-sig)
            return out, x_t * root - sig * out
        if self.prediction == "sample":
            return (x_t - sqrt_a * out) / sqrt_1ma, out
        return sqrt_1ma * x_t + sqrt_a * out, sqrt_a * x_t - sqrt_1ma * out

    def eps_from_xt(self, x_t: Tensor, sigma: float | Tensor) -> Tensor:
        """``eps`` from the state in the network's own scale, ``x_t = xbar / sqrt(1+sigma^2)``."""
        return self.predict_xt(x_t, sigma)[0]

    def __call__(self, xbar: Tensor, sigma: float | Tensor) -> Tensor:
        """``eps_theta(xbar / sqrt(sigma^2 + 1), t(sigma))``."""
        if isinstance(sigma, Tensor) and sigma.ndim == 0:
            sigma = float(sigma)
        if isinstance(sigma, Tensor):
            scale = (1 / (1 + sigma_column(sigma, xbar) ** 2).sqrt()).to(xbar.dtype)
        else:
            scale = 1 / math.sqrt(1 + float(sigma) ** 2)  # type: ignore[assignment]
        return self.eps_from_xt(xbar * scale, sigma)


def evaluate(model: ODEModel, x_t: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor | None]:
    """``(eps, x0_hat)`` of any :class:`ODEModel` at the state ``x_t`` in the network's
    scale: ``model.predict_xt`` when it has one, else ``eps_from_xt`` or ``model(xbar,
    sigma)`` with ``x0_hat = None`` (the caller computes it when it needs it)."""
    predict = getattr(model, "predict_xt", None)
    if predict is not None:
        return predict(x_t, sigma)
    direct = getattr(model, "eps_from_xt", None)
    if direct is not None:
        return direct(x_t, sigma), None
    if isinstance(sigma, Tensor) and sigma.ndim:
        xbar = x_t * (1 + sigma_column(sigma, x_t) ** 2).sqrt().to(x_t.dtype)
    else:
        xbar = x_t * math.sqrt(1.0 + float(sigma) ** 2)
    return model(xbar, sigma), None
