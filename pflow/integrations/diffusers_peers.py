"""diffusers' schedulers as peers: drive the same network from the same noise.

Each peer builds a diffusers scheduler from the model's own ``a_t`` table (as
``trained_betas``), then runs diffusers' usual loop (``scale_model_input``, network,
``step``), counting network calls. Imported only when asked for (``--peers diffusers``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..schedule import NoiseSchedule

__all__ = ["PEERS", "available", "ddim_round_trip", "run_peer"]

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
