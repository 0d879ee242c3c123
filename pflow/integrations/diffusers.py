"""diffusers pipelines and UNets on pflow's ODE.

Three ways in, one ODE (``d xbar / d sigma = eps(xbar, sigma)``, DESIGN.md section 1):

- :func:`from_unet` turns a diffusers denoiser (``UNet2DModel``, ``UNet2DConditionModel``,
  a transformer such as ``DiTTransformer2DModel``) and its scheduler's config into a
  :class:`~pflow.EpsModel`: the schedule is the config's ``alphas_cumprod`` table, bit for
  bit, and the network's ``prediction_type`` is converted to ``eps`` once, at the boundary.
- :class:`PFlowScheduler` is a diffusers scheduler that walks a pflow grid with a pflow
  solver, so that ``pipe.scheduler = PFlowScheduler.from_config(pipe.scheduler.config,
  solver="dpmpp_3m", spacing="logsnr")`` runs inside any standard pipeline, with the
  pipeline's own guidance, callbacks and VAE.
- :func:`sample_pipeline`, :func:`invert_pipeline` and :func:`reconstruct` keep the
  pipeline's prompt encoding and VAE and put pflow's own plan in between (adaptive
  solvers, exact inversion with ``alf``, NFE and network rows counted).

**The sample space.** A DDIM-like pipeline holds ``latents`` in the network's scale,
``x_t = sqrt(a) xbar`` (``init_noise_sigma = 1``, ``scale_model_input`` the identity),
which is the scale pflow's solvers keep their state in (``x = C(sigma) xbar``). The
scheduler therefore hands the pipeline pflow's own states.

**Inverting the control.** A pflow solver asks for evaluations (``ode.eval(x, sigma)``)
inside its step; a pipeline evaluates the network once per ``scheduler.step`` call and
hands the output in. :class:`PFlowScheduler` turns one into the other by *replaying*:

1. ``set_timesteps`` walks the grid once with a recording ODE that answers every request
   with zeros. For a fixed grid the sigmas at which a solver evaluates do not depend on
   the values it gets back, so this is the exact list of evaluations, one per entry of
   ``timesteps`` (``t(sigma)`` of each, continuous between table entries), including the
   inner stages of Runge-Kutta and singlestep methods, UniPC's evaluation at each
   predicted state and ``alf``'s extra first one.
2. ``step`` runs the current solver step on an ODE that serves the evaluations of this
   step made so far, in order, from a cache; at the first one it does not have, it
   stops the step (an internal signal) and returns the state the solver wanted
   evaluated as ``prev_sample``. The pipeline evaluates the network there at the next
   timestep and calls ``step`` again: the output joins the cache and the step is run
   again from its start. Each replay is the same arithmetic on the same inputs, so it
   reaches the same request, now answered, and goes on. A completed step becomes the
   new state (its multistep history, FSAL evaluation or companion included) and the
   next step starts at once, up to its first request.

So ``latents`` between two calls is always the point of the next evaluation (a stage
state, or UniPC's predictor before its correction, as in diffusers' own
``UniPCMultistepScheduler``), and after the last call it is the solver's result. A step
costs its stages' arithmetic once per stage (negligible next to the network) and no
extra evaluation: the images are those of :func:`pflow.sample` with the same model
(bit for bit without guidance; with the pipeline's guidance, which combines the raw
outputs where :class:`pflow.Guided` combines ``eps`` and ``x0_hat`` separately, to
float32 round-off).

The pipeline may replace ``latents`` between steps (inpainting blends the known region
back in, ``callback_on_step_end`` may return new ones): a request at the start of a step
then takes the pipeline's tensor as the solver's state, as a diffusers scheduler would.
A change made to a mid-step stage state is evaluated but the solver keeps its own stage
(as ``HeunDiscreteScheduler`` keeps its first-order sample).

**Zero terminal SNR.** ``rescale_betas_zero_snr=True`` (or trained betas ending at 1)
gives ``a_{N-1} = 0``, ``sigma_max = inf``; pflow's schedules need a finite
``sigma_max``. diffusers' ``DDIMScheduler`` takes the first step at ``a = 0`` exactly:
with a v-prediction, ``x0_hat = sqrt(a) x_t - sqrt(1-a) v = -v`` and ``eps = x_t`` are
finite. pflow sets ``a_{N-1}`` to ``zero_snr_alpha`` instead: by default ``2**-48``
(``sigma_max = 2**24``) for v- and x0-prediction, where ``sqrt(a) = 2**-24`` changes
``eps`` and ``x0_hat`` from their ``a = 0`` limits by less than float32's round-off
(``sqrt(a) |x_t|``, relative ~6e-8), and the float64 step sizes ``sigma_next - sigma``
lose ``2**24 * 2**-52 = 4e-9`` absolute; and ``2**-24`` (``sigma_max = 4096``) for
eps-prediction (or ``a_{N-2} / 2`` where that is smaller, as for the linear schedule:
the table must keep falling), diffusers' own choice in ``EulerDiscreteScheduler``, since ``x0_hat =
(x_t - sqrt(1-a) eps) / sqrt(a)`` has no ``a = 0`` limit (DDIM gets NaN there) and
cancels about ``sigma_max`` float32 units of ``eps``. A first-order first step (euler,
ddim, the multistep methods' first step) is then DDIM's to round-off; a method that
evaluates inside the first interval (heun, midpoint, rk4, dpm_solver_2/3, dpmpp_2s)
spends that evaluation on an interval of length ~``sigma_max``, which no clamp makes
meaningful: use trailing spacing and a first-order start for such networks.

Config keys pflow cannot reproduce are errors that name the key (:func:`check_config`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import (
    KarrasDiffusionSchedulers,
    SchedulerMixin,
    SchedulerOutput,
)
from torch import Tensor

from ..grids import SPACINGS, get_sigmas, validate_sigmas
from ..guidance import guide
from ..inversion import InversionResult, decode, encode
from ..model import EpsModel
from ..schedule import NoiseSchedule
from ..solve import SolveResult, sample
from ..solvers import Evaluation, Solver, State, StepInfo, parse_solver, resolve_options
from ..solvers.driver import euler_into_zero

__all__ = [
    "DiffusersNet",
    "InvertOutput",
    "PFlowScheduler",
    "PipelineOutput",
    "check_config",
    "decode_latents",
    "from_unet",
    "invert_pipeline",
    "load_pipeline",
    "pipeline_grid",
    "pipeline_model",
    "reconstruct",
    "sample_pipeline",
    "schedule_from_config",
]

# ---------------------------------------------------------------------------- configs

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # DDIMScheduler's definitions
_FINAL_SIGMAS = {"zero": True, "sigma_min": False}
#: ``zero_snr_alpha`` defaults (see the module docstring).
ZERO_SNR_ALPHA = {"epsilon": 2.0**-24, "sample": 2.0**-48, "v_prediction": 2.0**-48}
# Defaults of a config that does not say (DDIMScheduler's).
_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "timestep_spacing": "leading",
    "steps_offset": 0,
}


def _config_of(scheduler_or_config: Any) -> dict[str, Any]:
    """The effective config of a diffusers scheduler, or a config mapping, as a dict.

    A scheduler's ``config`` holds every init argument, those it took from its own
    defaults included (``_use_default_values`` lists them): they are what the scheduler
    does, so they are what pflow reproduces."""
    if isinstance(scheduler_or_config, Mapping):
        cfg = dict(scheduler_or_config)
    else:
        config = getattr(scheduler_or_config, "config", None)
        if not isinstance(config, Mapping):
            raise TypeError(
                "expected a diffusers scheduler or its config (a mapping), got "
                f"{type(scheduler_or_config).__name__}"
            )
        cfg = dict(config)
        cfg.setdefault("_class_name", type(scheduler_or_config).__name__)
    return cfg


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    value = cfg.get(key)
    return _DEFAULTS.get(key) if value is None else value


def check_config(scheduler_or_config: Any) -> dict[str, Any]:
    """The config as a dict, after checking that pflow can reproduce it.

    Raises:
        ValueError: naming the first key pflow cannot reproduce: an unknown
            ``beta_schedule``, ``prediction_type`` or ``timestep_spacing``;
            ``thresholding=True`` or ``clip_sample=True`` (they change ``x0_hat`` inside a
            sampler's step; the ODE has no such step); ``use_beta_sigmas`` or
            ``use_flow_sigmas``; a finite ``lambda_min_clipped``; ``timestep_type=
            "continuous"``; ``trained_betas`` whose length is not ``num_train_timesteps``;
            a flow-matching scheduler.
    """
    cfg = _config_of(scheduler_or_config)
    name = str(cfg.get("_class_name", ""))
    if name.startswith("FlowMatch"):
        raise ValueError(
            f"{name} is a flow-matching scheduler (x_t = (1-t) x0 + t eps, a velocity "
            "network): another family of the same ODE that this adapter does not build"
        )
    n = _get(cfg, "num_train_timesteps")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {n!r}")
    trained = cfg.get("trained_betas")
    schedule = _get(cfg, "beta_schedule")
    if trained is None and schedule not in _BETA_SCHEDULES:
        raise ValueError(
            f"beta_schedule={schedule!r}: pflow reproduces "
            f"{', '.join(_BETA_SCHEDULES)} or trained_betas"
        )
    if trained is not None and len(trained) != n:
        raise ValueError(f"trained_betas has {len(trained)} entries but num_train_timesteps={n}")
    prediction = _get(cfg, "prediction_type")
    if prediction not in _PREDICTIONS:
        raise ValueError(
            f"prediction_type={prediction!r}: pflow converts {', '.join(_PREDICTIONS)}"
        )
    spacing = _get(cfg, "timestep_spacing")
    if spacing not in SPACINGS:
        own = ", ".join(s for s in SPACINGS if s not in _TIMESTEP_SPACINGS)
        raise ValueError(
            f"timestep_spacing={spacing!r}: pflow has {', '.join(_TIMESTEP_SPACINGS)} "
            f"(DDIMScheduler's timesteps) and its own {own}"
        )
    if cfg.get("thresholding"):
        raise ValueError(
            "thresholding=True: dynamic thresholding clips x0_hat inside each sampler "
            "step; pflow integrates the ODE, which has no such step (set thresholding=False)"
        )
    if cfg.get("clip_sample"):
        raise ValueError(
            "clip_sample=True: clipping x0_hat to [-clip_sample_range, clip_sample_range] "
            "happens inside each sampler step; pflow's ODE does not clip (set "
            "clip_sample=False, as Stable Diffusion's configs do)"
        )
    for key in ("use_beta_sigmas", "use_flow_sigmas"):
        if cfg.get(key):
            raise ValueError(
                f"{key}=True: pflow has no such grid (spacings: {', '.join(SPACINGS)})"
            )
    clipped = cfg.get("lambda_min_clipped")
    if clipped is not None and math.isfinite(float(clipped)):
        raise ValueError(
            f"lambda_min_clipped={clipped!r}: pflow's grids do not clip lambda; pass "
            "set_timesteps(sigmas=...) or timesteps=... for such a grid"
        )
    if cfg.get("timestep_type", "discrete") == "continuous":
        raise ValueError(
            "timestep_type='continuous' feeds the network 0.25 log(sigma); pflow feeds the "
            "training timestep t(sigma)"
        )
    final = cfg.get("final_sigmas_type")
    if final is not None and final not in _FINAL_SIGMAS:
        raise ValueError(f"final_sigmas_type={final!r}: pflow ends at 'zero' or 'sigma_min'")
    return cfg


def _cosine_betas(n: int, max_beta: float = 0.999) -> Tensor:
    """``squaredcos_cap_v2``: Improved DDPM's cosine ``alpha_bar`` (Nichol & Dhariwal 2021,
    eq. 17, offset 0.008) discretised into ``beta_i = min(1 - abar((i+1)/n) / abar(i/n),
    max_beta)`` in float64, then rounded to float32 as diffusers stores them."""

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023 (arXiv 2305.08891, Algorithm 1): shift ``sqrt(abar)`` so its last
    value is 0 and scale it so its first is unchanged; back to betas. In ``betas``'s
    dtype (float32), so the table is the one diffusers builds."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root * root
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def _betas(cfg: Mapping[str, Any]) -> Tensor:
    n = int(_get(cfg, "num_train_timesteps"))
    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(np.asarray(trained, dtype=np.float64), dtype=torch.float32)
    else:
        start, end = float(_get(cfg, "beta_start")), float(_get(cfg, "beta_end"))
        schedule = _get(cfg, "beta_schedule")
        if schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
        else:
            betas = _cosine_betas(n)
    if _get(cfg, "rescale_betas_zero_snr"):
        betas = _zero_terminal_snr(betas)
    return betas


def schedule_from_config(
    scheduler_or_config: Any, *, zero_snr_alpha: float | None = None
) -> NoiseSchedule:
    """The :class:`~pflow.NoiseSchedule` of a diffusers scheduler or config: its
    ``alphas_cumprod`` exactly as diffusers computes it (float32 betas from
    ``beta_schedule`` / ``beta_start`` / ``beta_end`` / ``num_train_timesteps`` or
    ``trained_betas``, ``rescale_betas_zero_snr``, a float32 cumulative product), held in
    float64.

    A table ending at ``a_{N-1} = 0`` (zero terminal SNR) gets ``a_{N-1} = zero_snr_alpha``
    (default: ``2**-48`` for v- and x0-prediction, ``2**-24`` for eps-prediction, or half
    of ``a_{N-2}`` where that is smaller, so the table keeps falling; the module
    docstring says what each costs).

    Raises:
        ValueError: a key pflow cannot reproduce (:func:`check_config`), or a table with
            more than its last entry at 0 (or ``zero_snr_alpha`` not below ``a_{N-2}``).
    """
    cfg = check_config(scheduler_or_config)
    a = torch.cumprod(1.0 - _betas(cfg), dim=0).to(torch.float64)
    if float(a[-1]) == 0.0:
        if zero_snr_alpha is None:
            zero_snr_alpha = min(ZERO_SNR_ALPHA[_get(cfg, "prediction_type")], float(a[-2]) / 2)
        zero_snr_alpha = float(zero_snr_alpha)
        if not 0.0 < zero_snr_alpha < float(a[-2]):
            raise ValueError(
                f"zero_snr_alpha must lie in (0, a_(N-2) = {float(a[-2]):.3g}), got "
                f"{zero_snr_alpha!r}"
            )
        a = a.clone()
        a[-1] = zero_snr_alpha
    elif zero_snr_alpha is not None:
        raise ValueError(
            "zero_snr_alpha applies to a zero-terminal-SNR table (a_(N-1) = 0), but this "
            f"config's ends at {float(a[-1]):.3g}"
        )
    return NoiseSchedule.from_alphas_cumprod(a)


def _grid_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``spacing``, ``steps_offset`` and ``set_alpha_to_one`` for pflow's grids, as the
    config asks: a :class:`PFlowScheduler`'s own ``spacing``, else karras or logsnr
    (``use_karras_sigmas``, ``use_exponential_sigmas``/``use_lu_lambdas``), else its
    ``timestep_spacing``; the end at 0 unless ``final_sigmas_type="sigma_min"`` or
    ``set_alpha_to_one=False``."""
    spacing = cfg.get("spacing")
    if spacing is None:
        if cfg.get("use_karras_sigmas"):
            spacing = "karras"
        elif cfg.get("use_exponential_sigmas") or cfg.get("use_lu_lambdas"):
            spacing = "logsnr"
        else:
            spacing = _get(cfg, "timestep_spacing")
    final = cfg.get("final_sigmas_type")
    if final is not None:
        to_zero = _FINAL_SIGMAS[final]
    else:
        to_zero = bool(cfg.get("set_alpha_to_one", True) is not False)
    return {
        "spacing": spacing,
        "steps_offset": int(_get(cfg, "steps_offset")),
        "set_alpha_to_one": to_zero,
    }


# ---------------------------------------------------------------------------- networks


class DiffusersNet(torch.nn.Module):
    """A diffusers denoiser as pflow's ``net(x_t, t, **cond) -> prediction``.

    It calls ``model(sample=x_t, timestep=t, **cond, return_dict=False)[0]`` (``hidden_states=``
    for transformers such as ``DiTTransformer2DModel``, whose second positional argument
    is not the timestep) and keeps the first ``C`` channels of an output with ``2 C``
    (a learned variance, as DiT's and improved DDPM's networks give: the ODE needs the
    mean prediction only, as diffusers' DiT pipeline and DDPMScheduler take it).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected a diffusers model (nn.Module), got {type(model).__name__}")
        params = inspect.signature(model.forward).parameters
        if "sample" in params:
            self.input_name = "sample"
        elif "hidden_states" in params:
            self.input_name = "hidden_states"
        else:
            raise TypeError(
                f"{type(model).__name__}.forward takes neither sample nor hidden_states"
            )
        if "timestep" not in params:
            raise TypeError(f"{type(model).__name__}.forward takes no timestep")
        self.model = model
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self._open = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.keywords = frozenset(k for k, p in params.items() if p.kind in named) - {
            self.input_name,
            "timestep",
            "return_dict",
        }

    def check_keywords(self, cond: Mapping[str, Any] | None, name: str = "cond") -> None:
        """A ``TypeError`` naming a keyword the model's forward does not take."""
        if self._open or not cond:
            return
        unknown = sorted(set(cond) - self.keywords)
        if unknown:
            raise TypeError(
                f"{name}: {type(self.model).__name__}.forward does not take "
                f"{', '.join(map(repr, unknown))}; it takes {', '.join(sorted(self.keywords))}"
            )

    def forward(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        out = self.model(**{self.input_name: x_t}, timestep=t, return_dict=False, **cond)[0]
        c = x_t.shape[1]
        if out.shape[1] == 2 * c and out.shape[2:] == x_t.shape[2:]:
            out = out[:, :c]
        return out


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def from_unet(
    unet: torch.nn.Module,
    scheduler_or_config: Any,
    *,
    quantize: bool = False,
    net_dtype: torch.dtype | None = None,
    zero_snr_alpha: float | None = None,
    **cond: Any,
) -> EpsModel:
    """A diffusers denoiser as a :class:`~pflow.EpsModel` on its scheduler's schedule.

    Args:
        unet: ``UNet2DModel``, ``UNet2DConditionModel``, or a transformer denoiser taking
            ``hidden_states``/``timestep`` (``DiTTransformer2DModel``, which takes
            ``class_labels``): wrapped in :class:`DiffusersNet`.
        scheduler_or_config: the scheduler the network was trained with, or its config:
            the schedule (:func:`schedule_from_config`) and ``prediction_type`` come from
            it; every key pflow cannot reproduce is an error naming it (:func:`check_config`).
        quantize: hand the network integer timesteps (nearest training step).
        net_dtype: run the network in this dtype while the ODE state keeps its own; by
            default the network's own when it is float16/bfloat16.
        zero_snr_alpha: ``a_{N-1}`` for a zero-terminal-SNR table (module docstring).
        cond: the network's conditioning keywords (``encoder_hidden_states=``,
            ``class_labels=``, ``added_cond_kwargs=``, ...), one row per sample or one
            row shared by all; or condition later with ``model.condition(...)``.

    Example::

        model = from_unet(pipe.unet, pipe.scheduler, encoder_hidden_states=emb)
        res = pflow.sample(model, noise, "dpmpp_2m", steps=20)
    """
    cfg = check_config(scheduler_or_config)
    schedule = schedule_from_config(cfg, zero_snr_alpha=zero_snr_alpha)
    net = DiffusersNet(unet)
    net.check_keywords(cond, "from_unet")
    if net_dtype is None:
        first = next(iter(unet.parameters()), None)
        if first is not None and _half(first.dtype):
            net_dtype = first.dtype
    return EpsModel(
        net,
        schedule,
        _get(cfg, "prediction_type"),
        quantize=quantize,
        net_dtype=net_dtype,
        cond=cond or None,
    )


# ---------------------------------------------------------------------------- the scheduler


class _NeedEval(BaseException):
    """A solver step asked for an evaluation the pipeline has not made yet. A
    ``BaseException``, so no ``except Exception`` inside a step can swallow it."""

    def __init__(self, x: Tensor, sigma: float, start: bool) -> None:
        super().__init__()
        self.x, self.sigma, self.start = x, sigma, start


class _Recorder:
    """The ODE of the dry run: answers every request with zeros and records its sigma."""

    model = None

    def __init__(self) -> None:
        self.sigmas: list[float] = []

    def eval(self, x: Tensor, sigma: Any) -> Evaluation:
        self.sigmas.append(float(sigma))
        zero = torch.zeros_like(x)
        return Evaluation(x, sigma, zero, zero)

    def eps(self, x: Tensor, sigma: Any) -> Tensor:
        return self.eval(x, sigma).eps


class _Replay:
    """The ODE of a live step: the step's evaluations so far, in order, then a
    :class:`_NeedEval` for the first one the pipeline has not made."""

    model = None

    def __init__(self, cache: list[Evaluation], state_x: Tensor) -> None:
        self.cache, self.state_x, self.used = cache, state_x, 0

    def eval(self, x: Tensor, sigma: Any) -> Evaluation:
        if self.used < len(self.cache):
            self.used += 1
            return self.cache[self.used - 1]
        raise _NeedEval(x, float(sigma), self.used == 0 and x is self.state_x)

    def eps(self, x: Tensor, sigma: Any) -> Tensor:
        return self.eval(x, sigma).eps


class _Given:
    """The network output the pipeline computed, as a "network" for
    :meth:`EpsModel.predict_xt`, so the scheduler converts it to ``(eps, x0_hat)`` with
    exactly the arithmetic of a pflow solve."""

    out: Tensor | None = None

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        assert self.out is not None
        return self.out


class PFlowScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]
    """A diffusers scheduler that integrates pflow's PF-ODE with a pflow solver.

    ``pipe.scheduler = PFlowScheduler.from_config(pipe.scheduler.config, solver="dpmpp_3m",
    spacing="logsnr")`` runs inside any standard pipeline; its guidance, callbacks and VAE
    are untouched. The schedule comes from the config exactly (:func:`schedule_from_config`),
    so the same config gives the model :func:`from_unet` builds.

    Config (besides diffusers' usual schedule keys, read as :func:`check_config` says):
        solver: any fixed-grid pflow solver, options in brackets allowed
            (``"unipc[order=3]"``): euler, heun, midpoint, rk4, dpmpp_2m, dpmpp_3m,
            dpm_solver_2, dpm_solver_3, dpmpp_2s, unipc, ipndm, lms, ddim (and ddpm),
            alf. Adaptive solvers (rk45, bosh3) choose their steps as they go, so the
            pipeline's ``timesteps`` cannot be known beforehand: use
            :func:`sample_pipeline`.
        spacing: a pflow grid (:func:`pflow.get_sigmas`): ``leading``, ``trailing``,
            ``linspace`` (DDIMScheduler's timesteps), ``uniform``, ``quadratic``,
            ``karras``, ``logsnr``. By default the config's: ``use_karras_sigmas`` gives
            karras, ``use_exponential_sigmas``/``use_lu_lambdas`` logsnr, else its
            ``timestep_spacing``. (DPMSolverMultistep, UniPC and Euler define "leading"
            and "linspace" a little differently from DDIM; "trailing" is the same in all.
            To walk another scheduler's exact timesteps, ``set_timesteps(timesteps=...)``.)
        solver_options: the solver's options as a dict (or write them in ``solver``).
        last_step: ``"euler"`` (the step into 0 is ``x0_hat``, as DDIM) or ``"solver"``.
        rho: the karras grid's exponent.
        zero_snr_alpha: ``a_{N-1}`` for a zero-terminal-SNR table (module docstring).
        steps_offset, set_alpha_to_one / final_sigmas_type: as in diffusers (the grid ends
            at 0, or at the first training step's sigma).

    ``timesteps`` has one entry per network evaluation (``len(timesteps)`` is the NFE),
    the continuous ``t(sigma)`` of each (int64 when all are training steps, else float32),
    stages of multi-stage solvers included; ``sigmas[i]`` is the sigma of ``timesteps[i]``
    and ``sigmas[-1]`` the grid's end. ``order`` is the solver's evaluations per step
    (what pipelines use to count progress). ``init_noise_sigma`` is 1 and
    ``scale_model_input`` the identity: ``latents`` are pflow's states ``x_t``.
    ``alphas_cumprod`` is the schedule's table (float32, with a zero terminal SNR's last
    entry at ``zero_snr_alpha``).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    # The walk (set by _reset): the state at the start of the current step, its index in
    # the grid, the evaluations of this step so far, the request the pipeline is
    # answering, evaluations answered, the tensor last returned, the state's dtype and
    # the options with per-sample ones expanded to the batch.
    _state: State | None
    _index: int
    _cache: list[Evaluation]
    _pending: _NeedEval | None
    _answered: int
    _returned: Tensor | None
    _dtype: torch.dtype
    _live: dict[str, Any]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool | None = None,
        final_sigmas_type: str | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        lambda_min_clipped: float | None = None,
        timestep_type: str = "discrete",
        clip_sample: bool = False,
        thresholding: bool = False,
        variance_type: str | None = None,
        solver: str = "euler",
        spacing: str | None = None,
        solver_options: dict[str, Any] | None = None,
        last_step: str = "euler",
        rho: float = 7.0,
        zero_snr_alpha: float | None = None,
    ) -> None:
        cfg = check_config(dict(self.config))
        self.schedule = schedule_from_config(cfg, zero_snr_alpha=zero_snr_alpha)
        self._prediction = _get(cfg, "prediction_type")
        grid = _grid_defaults(cfg)
        if grid["spacing"] not in SPACINGS:
            raise ValueError(
                f"spacing must be one of {', '.join(SPACINGS)}; got {grid['spacing']!r}"
            )
        self._spacing, self._steps_offset = grid["spacing"], grid["steps_offset"]
        self._to_zero = grid["set_alpha_to_one"]
        self._rho = float(rho)
        self.solver, self._options = _fixed_solver(solver, solver_options, last_step)
        self._last_step = last_step
        self.order = self.solver.nfe_per_step
        self.init_noise_sigma = 1.0
        # What pipelines that read the table directly expect (float32, as diffusers').
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)
        self._convert = EpsModel(_Given(), self.schedule, self._prediction)
        self.timesteps: Tensor | None = None
        self.sigmas: Tensor | None = None
        self.num_inference_steps: int | None = None
        self._grid: list[float] = []
        self._plan: list[float] = []
        self._begin_index: int | None = None
        self._begin_step = 0
        self._reset()

    @classmethod
    def from_config(  # type: ignore[override]
        cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """As diffusers' ``from_config``, but the source scheduler's *effective* values are
        kept: diffusers drops the keys a scheduler took from its own defaults
        (``_use_default_values``) in favour of the new class's defaults; a
        ``DPMSolverMultistepScheduler()`` walks ``"linspace"`` timesteps and a
        ``DDIMScheduler()`` clips, and pflow reproduces (or refuses) what they do. Of
        ``set_alpha_to_one`` and ``final_sigmas_type`` the source class's own key counts."""
        if config is not None and isinstance(config, Mapping):
            config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
            config = _own_final_key(config, kwargs)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ------------------------------------------------------------------ diffusers' surface
    def __len__(self) -> int:
        return int(self.config["num_train_timesteps"])

    @property
    def step_index(self) -> int | None:
        """Evaluations answered so far (the index of the next one in ``timesteps``)."""
        return self._answered if self._state is not None else None

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The identity: the pipeline's ``latents`` are already the network's ``x_t``."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | Tensor | None = None,
        sigmas: Sequence[float] | Tensor | None = None,
    ) -> None:
        """Build the grid and the list of evaluations.

        Give one of: ``num_inference_steps`` (a grid of that many steps with the
        configured spacing), ``timesteps`` (decreasing training steps, fractional allowed:
        another scheduler's exact timesteps) or ``sigmas`` (decreasing noise levels). The
        grid's end (0, or ``sigma_min`` when the config says so) is appended to the last
        two unless they already end there.
        """
        given = [v is not None for v in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("give exactly one of num_inference_steps, timesteps or sigmas")
        schedule = self.schedule
        if num_inference_steps is not None:
            grid = get_sigmas(
                schedule,
                num_inference_steps,
                self._spacing,
                steps_offset=self._steps_offset,
                set_alpha_to_one=self._to_zero,
                rho=self._rho,
            )
        else:
            if timesteps is not None:
                t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
                points = schedule.t_to_sigma(t)
            else:
                points = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
            end = 0.0 if self._to_zero else schedule.sigma_min
            if points.numel() and float(points[-1]) > end:
                points = torch.cat([points, torch.tensor([end], dtype=torch.float64)])
            grid = validate_sigmas(points, schedule=schedule, name="sigmas")
            if float(grid[-1]) > float(grid[0]):
                raise ValueError("sigmas (or timesteps) must decrease: a scheduler samples")
        self._grid = grid.tolist()
        self.num_inference_steps = len(self._grid) - 1
        self._plan = self._dry_run(0)
        t_values = [schedule.sigma_to_t(s) for s in self._plan]
        integral = all(float(v).is_integer() for v in t_values)
        self.timesteps = torch.tensor(
            t_values, dtype=torch.int64 if integral else torch.float32, device=device
        )
        self.sigmas = torch.tensor([*self._plan, self._grid[-1]], dtype=torch.float64)
        self._begin_index, self._begin_step = None, 0
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (img2img): it must be where a step of the
        grid starts, and a solver started there must evaluate at the remaining
        timesteps (true of every solver but ``alf``, whose fresh start costs one extra
        evaluation)."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps before set_begin_index")
        k = int(begin_index)
        if k == 0:
            self._begin_index, self._begin_step = 0, 0
            return
        if not 0 <= k < len(self._plan):
            raise ValueError(f"begin_index must lie in [0, {len(self._plan)}), got {k}")
        sigma = self._plan[k]
        step = next((j for j, s in enumerate(self._grid[:-1]) if s == sigma), None)
        if step is None or self._dry_run(step) != self._plan[k:]:
            raise ValueError(
                f"begin_index={k}: timesteps[{k}] is not where solver {self.solver.name!r} "
                "could start afresh and evaluate at the remaining timesteps"
            )
        self._begin_index, self._begin_step = k, step
        self._reset()

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``x_t = sqrt(a) x0 + sqrt(1-a) noise`` at the (per-sample) timesteps ``t``:
        ``C(sigma) (x0 + sigma noise)`` with ``sigma = sigma(t)`` in float64."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
        sigma = self.schedule.t_to_sigma(t)
        c = (1.0 + sigma * sigma).rsqrt()
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        dev, dtype = original_samples.device, original_samples.dtype
        c_x = c.reshape(shape).to(dev, dtype)
        c_n = (c * sigma).reshape(shape).to(dev, dtype)
        return c_x * original_samples + c_n * noise.to(dev, dtype)

    def step(
        self,
        model_output: Tensor,
        timestep: Any,
        sample: Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
    ) -> SchedulerOutput | tuple[Tensor]:
        """Take the network's output at the pending evaluation and run the solver up to
        its next one; ``prev_sample`` is where that is (or the result, after the last).

        ``model_output`` is the pipeline's prediction (after its guidance) in the config's
        ``prediction_type``, at ``sample`` (the ``prev_sample`` of the previous call, or
        the initial noise), and ``timestep`` must be ``timesteps[step_index]``.

        ``generator``, ``eta`` and ``use_clipped_model_output`` are the keywords that
        DDPMPipeline and DDIMPipeline always pass: the ODE draws nothing (pflow's
        stochastic solvers take ``seed``/``generator`` among their own options) and
        clips nothing; ``eta`` other than 0 is an error pointing to ``solver="ddim[eta=...]"``.
        """
        if eta:
            raise ValueError(
                f"eta={eta}: PFlowScheduler integrates the ODE (eta = 0); for DDIM's noise "
                f"use PFlowScheduler(solver='ddim[eta={eta},seed=0]')"
            )
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        if self._state is None:
            self._start(sample)
        need = self._pending
        if need is None:
            raise ValueError(
                f"all {len(self._plan)} evaluations of this grid have been used; call "
                "set_timesteps again"
            )
        self._check_timestep(timestep)
        x = need.x
        if need.start and self._state is not None and not self._unchanged(sample):
            # The pipeline replaced the state between steps (inpainting, a callback).
            x = sample.to(self._dtype)
            self._state = dataclasses.replace(self._state, x=x)
        out = model_output
        if out.ndim > 1 and out.shape[1] == 2 * sample.shape[1]:  # a learned variance
            out = out[:, : sample.shape[1]]
        given: _Given = self._convert.net  # type: ignore[assignment]
        given.out = out.to(self._dtype)
        try:
            eps, x0 = self._convert.predict_xt(x, need.sigma)
        finally:
            given.out = None
        self._cache.append(Evaluation(x, need.sigma, eps, x0))
        self._answered += 1
        prev = self._advance().to(sample.dtype)
        self._returned = prev
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    # ------------------------------------------------------------------ the walk
    def _reset(self) -> None:
        self._state = None
        self._index = 0
        self._cache = []
        self._pending = None
        self._answered = self._begin_index or 0
        self._returned = None
        self._dtype = torch.float32
        self._live = {}

    def _one_step(self, ode: Any, state: State, i: int, options: dict[str, Any]) -> State:
        """Step ``i`` of the grid, as the driver's fixed-grid loop takes it."""
        n = len(self._grid) - 1
        if i == n - 1 and self._last_step == "euler" and self._grid[-1] == 0.0:
            return euler_into_zero(ode, state)
        return self.solver.step(ode, state, self._grid[i + 1], options, StepInfo(i, n))

    def _dry_run(self, start: int) -> list[float]:
        """The sigmas of every evaluation from step ``start`` on, in order."""
        options = dict(self._options)
        for o in self.solver.options:
            if o.batch_dim is not None or o.name == "generator":
                options[o.name] = None
        seed = self.solver.option("seed")
        if seed is not None:  # keyed noise: the dry run leaves every generator alone
            options["seed"] = seed.expand(0, 1) if seed.expand is not None else 0
        ode: Any = _Recorder()  # duck-types PFODE for a solver's step
        state = self.solver.init(
            ode, torch.zeros(1, 1, dtype=torch.float64), self._grid[start], options
        )
        for i in range(start, len(self._grid) - 1):
            state = self._one_step(ode, state, i, options)
        return ode.sigmas

    def _start(self, sample: Tensor) -> None:
        if not isinstance(sample, Tensor) or not sample.is_floating_point():
            raise TypeError(f"sample must be a floating-point tensor, got {sample!r:.60}")
        self._dtype = torch.float32 if _half(sample.dtype) else sample.dtype
        options = dict(self._options)
        for o in self.solver.options:
            value = options.get(o.name)
            if o.batch_dim is None or value is None:
                continue
            if o.expand is not None:
                value = options[o.name] = o.expand(value, sample.shape[0])
            if len(value) != sample.shape[0]:
                raise ValueError(
                    f"{o.name} must hold one entry per sample ({sample.shape[0]}), got {len(value)}"
                )
        self._live = options
        x = sample.to(self._dtype)
        self._returned = sample
        self._index = self._begin_step
        replay: Any = _Replay([], x)
        self._state = self.solver.init(replay, x, self._grid[self._index], options)
        self._advance()

    def _advance(self) -> Tensor:
        """Run steps until one asks for an evaluation not yet made (returning where) or
        the grid ends (returning the result)."""
        assert self._state is not None
        while self._index < len(self._grid) - 1:
            ode = _Replay(self._cache, self._state.x)
            try:
                new = self._one_step(ode, self._state, self._index, self._live)
            except _NeedEval as need:
                k = self._answered
                if k >= len(self._plan) or need.sigma != self._plan[k]:
                    raise RuntimeError(
                        f"PFlowScheduler: solver {self.solver.name!r} asked for evaluation "
                        f"{k} at sigma={need.sigma!r}, not where set_timesteps planned it"
                    ) from None
                self._pending = need
                return need.x
            if ode.used != len(self._cache):  # pragma: no cover - a solver bug
                raise RuntimeError("a step used fewer evaluations on replay than it made")
            self._state, self._index, self._cache = new, self._index + 1, []
        self._pending = None
        return self._state.x

    def _unchanged(self, sample: Tensor) -> bool:
        last = self._returned
        if sample is last:
            return True
        return (
            last is not None
            and sample.shape == last.shape
            and sample.dtype == last.dtype
            and bool(torch.equal(sample, last))
        )

    def _check_timestep(self, timestep: Any) -> None:
        assert self.timesteps is not None
        k = self._answered
        try:
            got = float(timestep)
        except (TypeError, ValueError):
            return
        expected = float(self.timesteps[k])
        if abs(got - expected) > 0.5:
            raise ValueError(
                f"step() got timestep {got:g}, but the next evaluation of this grid is "
                f"timesteps[{k}] = {expected:g}: call step() once per entry of "
                "scheduler.timesteps, in order"
            )


def _fixed_solver(
    label: str, solver_options: Mapping[str, Any] | None, last_step: str
) -> tuple[Solver, dict[str, Any]]:
    """The solver of a :class:`PFlowScheduler` and its resolved options; clear errors for
    solvers a scheduler cannot drive."""
    spec, from_label = parse_solver(label)
    if spec.adaptive:
        raise ValueError(
            f"solver {spec.name!r} is adaptive: it chooses its steps from its error "
            "estimates as it goes, so a pipeline's timesteps cannot be known beforehand; "
            "use pflow.integrations.diffusers.sample_pipeline(pipe, ..., solver="
            f"{spec.name!r}) (the pipeline's prompt encoding and VAE, pflow's plan)"
        )
    if spec.external:
        raise ValueError(f"solver {spec.name!r} runs its own loop; use sample_pipeline")
    if "down" not in spec.directions:
        raise ValueError(f"solver {spec.name!r} only encodes; a scheduler samples")
    options = resolve_options(spec, from_label, dict(solver_options or {}), label)
    if any(o.batch_dim not in (None, 0) and options.get(o.name) is not None for o in spec.options):
        raise ValueError(
            f"solver {spec.name!r}: a companion state is for pflow.decode; a scheduler "
            "samples from noise"
        )
    if last_step not in ("euler", "solver"):
        raise ValueError(f"last_step must be 'euler' or 'solver', got {last_step!r}")
    if last_step not in spec.last_steps:
        raise ValueError(
            f"solver {spec.name!r} supports last_step="
            f"{' or '.join(map(repr, spec.last_steps))} only, got {last_step!r}"
        )
    return spec, options


def _own_final_key(config: dict[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Of ``set_alpha_to_one`` (DDIM, PNDM) and ``final_sigmas_type`` (DPM-Solver, UniPC,
    Euler) keep the one the source class has (a config may carry the other's as a hidden
    key from an earlier scheduler), unless the caller gives one."""
    if "set_alpha_to_one" in kwargs or "final_sigmas_type" in kwargs:
        return config
    import diffusers

    source = getattr(diffusers, str(config.get("_class_name", "")), None)
    if source is None or source is PFlowScheduler:
        return config
    own = set(inspect.signature(source.__init__).parameters)
    for key in ("set_alpha_to_one", "final_sigmas_type"):
        if key not in own:
            config.pop(key, None)
    return config


# ---------------------------------------------------------------------------- pipelines


@dataclass
class PipelineOutput:
    """What :func:`sample_pipeline` and :func:`reconstruct` return.

    Attributes:
        images: the decoded images as the pipeline's ``output_type`` gives them (a list of
            PIL images, an array, a tensor), or the latents for ``output_type="latent"``.
        latents: the ODE's result, the latents the VAE decoded.
        nfe: network evaluations (a guided evaluation is one).
        rows: network rows evaluated (twice the batch per evaluation under guidance).
        result: pflow's full result (grid, step counts, trajectory if asked for).
        nsfw_content_detected: the safety checker's verdicts, when the pipeline has one.
    """

    images: Any
    latents: Tensor
    nfe: int
    rows: int
    result: SolveResult
    nsfw_content_detected: list[bool] | None = None


@dataclass
class InvertOutput:
    """What :func:`invert_pipeline` returns.

    Attributes:
        latents: the latent noise ``x_T`` (at the grid's top) in the network's scale.
        companion: ``alf``'s companion state (pass it to :func:`reconstruct` to retrace
            the inversion exactly); ``None`` for other solvers.
        image_latents: the encoded image ``x0`` the inversion started from (the VAE's
            mean, times its scaling factor).
        nfe, rows, result: as in :class:`PipelineOutput`.
    """

    latents: Tensor
    companion: Tensor | None
    image_latents: Tensor
    nfe: int
    rows: int
    result: InversionResult


def _device(pipe: Any) -> torch.device:
    device = getattr(pipe, "_execution_device", None)
    return torch.device(device if device is not None else pipe.device)


def _state_dtype(pipe: Any) -> torch.dtype:
    dtype = pipe.unet.dtype
    return torch.float32 if _half(dtype) else dtype


def pipeline_model(
    pipe: Any,
    prompt: str | list[str] | None = None,
    *,
    negative_prompt: str | list[str] | None = None,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    num_images_per_prompt: int = 1,
    prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    scheduler: Any = None,
    zero_snr_alpha: float | None = None,
) -> Any:
    """The ODE a Stable-Diffusion-style pipeline integrates: its UNet on its scheduler's
    schedule (:func:`from_unet`), conditioned on ``pipe.encode_prompt``'s embeddings, with
    classifier-free guidance (:func:`pflow.guide`, one batched network call of the
    negative and the positive prompt, as the pipeline makes) when ``guidance_scale > 1``.

    ``scheduler`` (a scheduler or config) gives the schedule instead of ``pipe.scheduler``.

    Raises:
        TypeError: a pipeline without ``encode_prompt``/``unet``, or whose
            ``encode_prompt`` does not return ``(prompt_embeds, negative_prompt_embeds)``
            (SDXL's also returns pooled embeddings for ``added_cond_kwargs``: build that
            model with :func:`from_unet` and ``added_cond_kwargs=``).
        NotImplementedError: a UNet with ``time_cond_proj_dim`` (guidance-distilled).
    """
    for attr in ("encode_prompt", "unet", "scheduler"):
        if not hasattr(pipe, attr):
            raise TypeError(f"the pipeline {type(pipe).__name__} has no {attr}")
    if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        raise NotImplementedError(
            "the UNet takes a guidance embedding (time_cond_proj_dim): a guidance-distilled "
            "model, which this adapter does not condition"
        )
    do_cfg = guidance_scale > 1.0
    out = pipe.encode_prompt(
        prompt=prompt,
        device=_device(pipe),
        num_images_per_prompt=num_images_per_prompt,
        do_classifier_free_guidance=do_cfg,
        negative_prompt=negative_prompt,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
    )
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(
            f"{type(pipe).__name__}.encode_prompt does not return (prompt_embeds, "
            "negative_prompt_embeds); build its model with from_unet(pipe.unet, "
            "pipe.scheduler, ...) and its conditioning keywords"
        )
    embeds, negative = out
    model = from_unet(
        pipe.unet,
        pipe.scheduler if scheduler is None else scheduler,
        zero_snr_alpha=zero_snr_alpha,
        encoder_hidden_states=embeds,
    )
    if not do_cfg:
        return model
    return guide(
        model,
        guidance_scale,
        uncond={"encoder_hidden_states": negative},
        rescale=guidance_rescale,
    )


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loggers at ``error`` and their progress bars off for
    the block (a load prints "Loading pipeline components..." bars and advice about
    ``accelerate`` otherwise), restored after."""
    from diffusers.utils import logging as d_logging

    undo: list[Any] = []
    before = d_logging.get_verbosity()
    bars = d_logging.is_progress_bar_enabled()
    d_logging.set_verbosity_error()
    d_logging.disable_progress_bar()
    undo.append(lambda: d_logging.set_verbosity(before))
    if bars:
        undo.append(d_logging.enable_progress_bar)
    try:
        from transformers.utils import logging as t_logging
    except ImportError:  # a pipeline without a text encoder needs no transformers
        t_logging = None
    if t_logging is not None:
        t_before = t_logging.get_verbosity()
        t_bars = t_logging.is_progress_bar_enabled()
        t_logging.set_verbosity_error()
        t_logging.disable_progress_bar()
        undo.append(lambda: t_logging.set_verbosity(t_before))
        if t_bars:
            undo.append(t_logging.enable_progress_bar)
    try:
        yield
    finally:
        for step in reversed(undo):
            step()


def load_pipeline(
    folder: str | Path,
    *,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    quiet: bool = True,
) -> Any:
    """A diffusers pipeline saved in a local folder (``save_pretrained``, or a downloaded
    snapshot): ``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``,
    nothing fetched, with its progress bar off and moved to ``device``.

    ``torch_dtype`` loads the weights in that dtype (``torch.float16``: pflow's solves
    keep a float32 state). ``quiet`` silences diffusers' and transformers' loading
    messages and progress bars (errors still raise).

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: ``folder`` has no ``model_index.json`` (not a pipeline: a model's own
            folder such as ``unet/`` holds a ``config.json`` instead).
    """
    from diffusers import DiffusionPipeline

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    with _quiet_loading() if quiet else contextlib.nullcontext(), warnings.catch_warnings():
        # diffusers >= 0.36 prefers ``dtype=`` and warns at ``torch_dtype=``, which is the
        # name every version takes.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if device is not None and torch.device(device) != pipe.device:
        pipe = pipe.to(device)
    return pipe


def pipeline_grid(
    pipe: Any,
    *,
    scheduler: Any = None,
    spacing: str | None = None,
    set_alpha_to_one: bool | None = None,
) -> dict[str, Any]:
    """The grid options :func:`sample_pipeline` walks for ``pipe`` (or ``scheduler``, a
    scheduler or config): ``spacing``, ``steps_offset`` and ``set_alpha_to_one`` as
    :class:`PFlowScheduler` reads them from the config, unless given; keywords for
    :func:`pflow.sample`, :func:`pflow.encode` and :func:`pflow.decode`."""
    return _grid_args(pipe, scheduler, spacing, set_alpha_to_one)


def _grid_args(
    pipe: Any, scheduler: Any, spacing: str | None, set_alpha_to_one: bool | None
) -> dict[str, Any]:
    cfg = _config_of(pipe.scheduler if scheduler is None else scheduler)
    grid = _grid_defaults(cfg)
    if spacing is not None:
        grid["spacing"] = spacing
    if set_alpha_to_one is not None:
        grid["set_alpha_to_one"] = set_alpha_to_one
    return grid


def decode_latents(pipe: Any, latents: Tensor, output_type: str = "pil") -> Any:
    """The pipeline's VAE decode of ``latents`` (the network's scale, as
    :class:`PipelineOutput` holds them) and its postprocessing into ``output_type``
    (``"pil"``, ``"np"``, ``"pt"``), as the pipeline makes its images; the safety checker,
    when the pipeline has one, runs too."""
    return _decode_latents(pipe, latents, output_type)[0]


@torch.no_grad()
def _decode_latents(pipe: Any, latents: Tensor, output_type: str) -> tuple[Any, Any]:
    if output_type == "latent":
        return latents, None
    vae = pipe.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z + shift
    image = vae.decode(z, return_dict=False)[0]
    nsfw = None
    if getattr(pipe, "safety_checker", None) is not None:
        image, nsfw = pipe.run_safety_checker(image, _device(pipe), image.dtype)
    denormalize = [True] * image.shape[0] if nsfw is None else [not h for h in nsfw]
    images = pipe.image_processor.postprocess(
        image, output_type=output_type, do_denormalize=denormalize
    )
    return images, nsfw


@torch.no_grad()
def sample_pipeline(
    pipe: Any,
    prompt: str | list[str] | None = None,
    *,
    negative_prompt: str | list[str] | None = None,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    num_images_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: Tensor | None = None,
    prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    solver: str = "rk45",
    steps: int | None = None,
    spacing: str | None = None,
    sigmas: Tensor | None = None,
    set_alpha_to_one: bool | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_nfe: int | None = None,
    output_type: str = "pil",
    scheduler: Any = None,
    **solver_options: Any,
) -> PipelineOutput:
    """Text-to-image with the pipeline's prompt encoding and VAE and pflow's ODE between.

    The model is :func:`pipeline_model`'s (the pipeline's UNet, schedule and guidance);
    ``latents`` (``x_T``, N(0, I)) default to the pipeline's own draw from ``generator``,
    so with the same generator the noise is the pipeline's. The solve is
    :func:`pflow.sample`: any solver, adaptive ones included (``rtol``/``atol``,
    ``max_nfe``); fixed-step ones take ``steps`` (or ``sigmas``). The grid follows the
    pipeline's scheduler config (:class:`PFlowScheduler` says how) unless ``spacing`` /
    ``set_alpha_to_one`` say otherwise. The state is float32 (or the UNet's dtype when
    wider); a half-precision UNet runs in its own dtype.

    Returns:
        A :class:`PipelineOutput` (images, latents, nfe, rows, the solve's result).
    """
    model = pipeline_model(
        pipe,
        prompt,
        negative_prompt=negative_prompt,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        num_images_per_prompt=num_images_per_prompt,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        scheduler=scheduler,
    )
    rows = model.cond_rows or 1
    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        factor = getattr(pipe, "vae_scale_factor", 8)
        height = height or pipe.unet.config.sample_size * factor
        width = width or pipe.unet.config.sample_size * factor
        shape = (rows, pipe.unet.config.in_channels, height // factor, width // factor)
        latents = randn_tensor(
            shape, generator=generator, device=_device(pipe), dtype=pipe.unet.dtype
        )
    noise = latents.to(_device(pipe), _state_dtype(pipe))
    grid = _grid_args(pipe, scheduler, spacing, set_alpha_to_one)
    res = sample(
        model,
        noise,
        solver,
        steps=steps,
        spacing=grid["spacing"],
        sigmas=sigmas,
        rtol=rtol,
        atol=atol,
        max_nfe=max_nfe,
        steps_offset=grid["steps_offset"],
        set_alpha_to_one=grid["set_alpha_to_one"],
        **solver_options,
    )
    images, nsfw = _decode_latents(pipe, res.x, output_type)
    return PipelineOutput(images, res.x, res.nfe, res.rows, res, nsfw)


@torch.no_grad()
def _encode_image(pipe: Any, image: Any, height: int | None, width: int | None) -> Tensor:
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    pixels = pixels.to(_device(pipe), vae.dtype)
    x0 = vae.encode(pixels).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        x0 = x0 - shift
    return (x0 * vae.config.scaling_factor).to(_state_dtype(pipe))


@torch.no_grad()
def invert_pipeline(
    pipe: Any,
    image: Any = None,
    *,
    latents: Tensor | None = None,
    prompt: str | list[str] | None = "",
    negative_prompt: str | list[str] | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    solver: str = "alf",
    steps: int | None = 50,
    spacing: str | None = None,
    sigmas: Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_nfe: int | None = None,
    height: int | None = None,
    width: int | None = None,
    scheduler: Any = None,
    **solver_options: Any,
) -> InvertOutput:
    """Invert an image into the pipeline's latent noise: :func:`pflow.encode` on the
    pipeline's model (prompt, guidance) from the VAE's latent of ``image``.

    ``image`` is whatever ``pipe.image_processor.preprocess`` takes (PIL, array, tensor);
    ``latents`` gives the image latent ``x0`` directly instead. The grid is
    :func:`pflow.encode`'s with ``steps`` and the config's spacing: from the first
    training step's sigma up to ``sigma_max`` (``x0`` is the state at the first sigma, as
    in diffusers' DDIM inversion with ``set_alpha_to_one=False``). With ``solver="alf"``
    the result carries a companion and :func:`reconstruct` given it returns ``x0`` bit for
    bit; ``solver="ddim_inverse"`` is diffusers' ``DDIMInverseScheduler`` (reconstruct its
    latents with ``solver="euler"``); adaptive solvers take ``steps=None`` and
    ``rtol``/``atol``.
    """
    if (image is None) == (latents is None):
        raise ValueError("give image or latents (the image's VAE latent), one of them")
    spec = parse_solver(solver)[0]
    x0 = _encode_image(pipe, image, height, width) if latents is None else latents
    x0 = x0.to(_device(pipe), _state_dtype(pipe))
    model = pipeline_model(
        pipe,
        prompt,
        negative_prompt=negative_prompt,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        num_images_per_prompt=1,
        scheduler=scheduler,
    )
    grid = _grid_args(pipe, scheduler, spacing, False)
    res = encode(
        model,
        x0,
        solver,
        steps=None if spec.adaptive or sigmas is not None else steps,
        spacing=grid["spacing"],
        sigmas=sigmas,
        rtol=rtol,
        atol=atol,
        max_nfe=max_nfe,
        steps_offset=grid["steps_offset"],
        set_alpha_to_one=False,
        **solver_options,
    )
    return InvertOutput(res.x, res.companion, x0, res.nfe, res.rows, res)


@torch.no_grad()
def reconstruct(
    pipe: Any,
    latents: Tensor,
    *,
    prompt: str | list[str] | None = "",
    negative_prompt: str | list[str] | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    solver: str = "alf",
    steps: int | None = 50,
    spacing: str | None = None,
    sigmas: Tensor | None = None,
    companion: Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_nfe: int | None = None,
    output_type: str = "pil",
    scheduler: Any = None,
    **solver_options: Any,
) -> PipelineOutput:
    """Decode inverted latents back to an image: :func:`pflow.decode` on the grid
    :func:`invert_pipeline` walked up (same ``steps``, ``spacing``, prompt and
    guidance), ending at the first training step's sigma, then the VAE. Given ``alf``'s
    ``companion`` it retraces the inversion exactly."""
    spec = parse_solver(solver)[0]
    latents = latents.to(_device(pipe), _state_dtype(pipe))
    model = pipeline_model(
        pipe,
        prompt,
        negative_prompt=negative_prompt,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        num_images_per_prompt=1,
        scheduler=scheduler,
    )
    grid = _grid_args(pipe, scheduler, spacing, False)
    res = decode(
        model,
        latents,
        solver,
        steps=None if spec.adaptive or sigmas is not None else steps,
        spacing=grid["spacing"],
        sigmas=sigmas,
        companion=companion,
        rtol=rtol,
        atol=atol,
        max_nfe=max_nfe,
        steps_offset=grid["steps_offset"],
        set_alpha_to_one=False,
        **solver_options,
    )
    images, nsfw = _decode_latents(pipe, res.x, output_type)
    return PipelineOutput(images, res.x, res.nfe, res.rows, res, nsfw)
