"""diffusers' schedulers as peers: drive the same network from the same noise.

Each peer builds a diffusers scheduler from the model's own ``a_t`` table (as
``trained_betas``), then runs diffusers' usual loop (``scale_model_input``, network,
``step``), counting network calls. Imported only when asked for (``--peers diffusers``).

The network a peer drives is a plain ``net(x_t, t) -> eps`` (:func:`peer_network`): an
eps-prediction :class:`~pflow.EpsModel`'s network with its bound conditioning, or a
guided model's :meth:`~pflow.Guided.as_network`, which is what a diffusers pipeline
computes under the same classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..schedule import NoiseSchedule

__all__ = ["PEERS", "RowCount", "available", "ddim_round_trip", "peer_network", "run_peer"]

# name -> (scheduler class name, constructor options, NFE for N steps)
PEERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "dpmpp_3m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 3, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def _betas(schedule: NoiseSchedule) -> list[float]:
    a = schedule.alphas_cumprod
    prev = torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
    return (1 - a / prev).tolist()


def make_scheduler(name: str, schedule: NoiseSchedule) -> Any:
    import diffusers

    if name not in PEERS:
        raise ValueError(f"peer must be one of {', '.join(PEERS)}; got {name!r}")
    cls_name, options = PEERS[name]
    cls = getattr(diffusers, cls_name)
    return cls(
        num_train_timesteps=schedule.num_train_timesteps,
        trained_betas=_betas(schedule),
        prediction_type="epsilon",
        **options,
    )


@dataclass
class RowCount:
    """Network rows the calls of a :func:`peer_network` have cost so far (a guided call
    costs two rows per sample where guidance applies)."""

    total: int = 0


def peer_network(model: Any) -> tuple[Callable[[Tensor, Tensor], Tensor], RowCount]:
    """The plain ``net(x_t, t) -> eps`` (``t`` in training steps) of ``model`` that a
    diffusers loop drives, and the count of the network rows its calls cost.

    A model with ``as_network`` (:class:`pflow.Guided`) gives its guided prediction; a
    ``t`` that is one step for the whole batch is handed on as one value, so the guided
    model sees one sigma, as in pflow's own solves. An eps-prediction
    :class:`~pflow.EpsModel` gives its network called with the bound conditioning
    (``net(x_t, t, **cond)``) in its ``net_dtype``, the prediction cast back to ``x_t``'s
    dtype.

    Raises:
        ValueError: ``model`` is neither (another prediction type, a plain callable).
    """
    from ..model import EpsModel

    count = RowCount()
    as_network = getattr(model, "as_network", None)
    if as_network is not None:
        guided = as_network()
        schedule = model.schedule
        rows_of = getattr(model, "network_rows", None)

        def net(x_t: Tensor, t: Tensor) -> Tensor:
            t = torch.as_tensor(t).reshape(-1)
            if t.numel() > 1 and bool((t == t[0]).all()):
                t = t[:1]
            if rows_of is not None and t.numel() == 1:
                sigma = schedule.t_to_sigma(float(t[0]))
                count.total += int(rows_of(sigma, x_t.shape[0]))
            elif rows_of is not None:
                sigmas = schedule.t_to_sigma(t.to(torch.float64))
                count.total += int(rows_of(sigmas, x_t.shape[0]))
            else:
                count.total += x_t.shape[0]
            return guided(x_t, t)

        return net, count
    if not isinstance(model, EpsModel) or model.prediction != "epsilon":
        raise ValueError(
            "diffusers peers need an EpsModel with prediction='epsilon' or a guided model "
            f"(pflow.Guided), got {type(model).__name__}"
        )
    inner, cond, dtype = model.net, dict(model.cond), model.net_dtype

    def eps_net(x_t: Tensor, t: Tensor) -> Tensor:
        count.total += x_t.shape[0]
        x_in = x_t if dtype is None else x_t.to(dtype)
        out = inner(x_in, t, **cond) if cond else inner(x_in, t)
        if not isinstance(out, Tensor):  # diffusers' networks return an output object
            out = getattr(out, "sample", out[0] if isinstance(out, (tuple, list)) else out)
        return out if dtype is None else out.to(x_t.dtype)

    return eps_net, count


def run_peer(
    name: str,
    net: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    noise: Tensor,
    steps: int,
) -> tuple[Tensor, int]:
    """Sample with diffusers' scheduler ``name`` in ``steps`` steps from ``noise`` (``x_T``);
    returns the sample and the number of network calls."""
    scheduler = make_scheduler(name, schedule)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    nfe = 0
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            t_batch = torch.as_tensor(t).reshape(1).expand(x.shape[0]).to(x.device, x.dtype)
            eps = net(inp, t_batch)
            nfe += 1
            x = scheduler.step(eps, t, x).prev_sample
    return x, nfe


def ddim_round_trip(
    net: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    prediction: str,
    x0: Tensor,
    steps: int,
    spacing: str,
) -> tuple[Tensor, int, int]:
    """diffusers' ``DDIMInverseScheduler`` then ``DDIMScheduler`` on the same network, in
    ``steps`` steps each with ``spacing`` (``"leading"`` or ``"trailing"``): encode ``x0``
    and decode it back. Returns the decoded data and the network calls of each half."""
    import diffusers

    if spacing not in ("leading", "trailing"):
        raise ValueError(f"--peers supports leading and trailing spacing, got {spacing!r}")
    cfg = dict(
        num_train_timesteps=schedule.num_train_timesteps,
        trained_betas=_betas(schedule),
        prediction_type=prediction,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing=spacing,
    )
    inverse: Any = diffusers.DDIMInverseScheduler(**cfg)
    forward: Any = diffusers.DDIMScheduler(**cfg)
    inverse.set_timesteps(steps)
    forward.set_timesteps(steps)
    x, calls = x0.clone(), [0, 0]
    with torch.no_grad():
        for half, sched in enumerate((inverse, forward)):
            for t in sched.timesteps:
                t_batch = torch.full((len(x),), int(t), dtype=x.dtype)
                out = net(x, t_batch)
                x = sched.step(out, t, x).prev_sample
                calls[half] += 1
    return x, calls[0], calls[1]
