"""Euler on the DDIM grid is DDIM (eta = 0): against diffusers' DDIMScheduler and against
the DDIM update written from the paper (arXiv 2010.02502, eq. 12 with sigma_t = 0)."""

from __future__ import annotations

import pytest
import torch

import pflow

from .conftest import tiny_unet

diffusers = pytest.importorskip("diffusers")

CASES = [
    # (beta_schedule, prediction_type, timestep_spacing, steps_offset, set_alpha_to_one, steps)
    ("linear", "epsilon", "leading", 0, True, 10),
    ("linear", "epsilon", "leading", 1, True, 20),
    ("linear", "epsilon", "leading", 0, False, 10),
    ("linear", "epsilon", "leading", 1, False, 25),
    ("linear", "epsilon", "trailing", 0, True, 10),
    ("linear", "epsilon", "trailing", 0, False, 50),
    ("squaredcos_cap_v2", "epsilon", "trailing", 0, True, 20),
    ("squaredcos_cap_v2", "v_prediction", "leading", 1, True, 10),
    ("linear", "v_prediction", "trailing", 0, True, 8),
    ("scaled_linear", "sample", "leading", 1, True, 10),
]


def _diffusers_ddim(unet, scheduler, noise):
    x = noise.clone()
    nfe = 0
    for t in scheduler.timesteps:
        out = unet(x, t).sample
        nfe += 1
        x = scheduler.step(out, t, x, eta=0.0).prev_sample
    return x, nfe


@pytest.mark.parametrize("beta_schedule,prediction,spacing,offset,alpha_one,steps", CASES)
def test_euler_matches_diffusers_ddim(beta_schedule, prediction, spacing, offset, alpha_one, steps):
    unet = tiny_unet()
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        prediction_type=prediction,
        timestep_spacing=spacing,
        steps_offset=offset,
        set_alpha_to_one=alpha_one,
        clip_sample=False,
    )
    scheduler.set_timesteps(steps)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref, ref_nfe = _diffusers_ddim(unet, scheduler, noise)

    schedule = pflow.NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    model = pflow.EpsModel(lambda x, t: unet(x, t).sample, schedule, prediction)
    res = pflow.sample(
        model,
        noise,
        "euler",
        steps=steps,
        spacing=spacing,
        steps_offset=offset,
        set_alpha_to_one=alpha_one,
    )

    assert res.x.dtype == torch.float32
    scale = ref.abs().max().item()
    err = (res.x - ref).abs().max().item()
    # Outputs of a random UNet reach tens; compare relative to that scale (DESIGN.md 4).
    assert err <= 1e-5 * max(1.0, scale), (err, scale)
    # diffusers spends one call on a zero-length last step when the grid ends at a_0
    # (leading, offset 0, set_alpha_to_one=False); pflow's grids are strictly monotone.
    wasted = 1 if (not alpha_one and spacing == "leading" and offset == 0) else 0
    assert res.nfe == ref_nfe - wasted


def test_euler_matches_paper_ddim_float64():
    unet = tiny_unet().double()
    schedule = pflow.NoiseSchedule.linear()
    a = schedule.alphas_cumprod
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for spacing, steps, alpha_one in [
        ("leading", 10, True),
        ("trailing", 7, False),
        ("quadratic", 12, True),
    ]:
        sigmas = pflow.get_sigmas(schedule, steps, spacing, set_alpha_to_one=alpha_one)
        ts = [int(round(schedule.sigma_to_t(float(s)))) for s in sigmas[:-1]]
        x = noise.clone()
        for i, t in enumerate(ts):
            a_t = a[t]
            a_prev = (
                a[ts[i + 1]]
                if i + 1 < len(ts)
                else torch.tensor(1.0 if alpha_one else float(a[0]), dtype=torch.float64)
            )
            eps = unet(x, torch.full((3,), t, dtype=torch.float64)).sample
            x0_hat = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
        model = pflow.EpsModel(lambda x, t: unet(x, t).sample, schedule)
        res = pflow.sample(model, noise, "euler", sigmas=sigmas)
        assert res.nfe == len(ts)
        assert (res.x - x).abs().max().item() <= 1e-10


def test_fractional_t_is_exact_on_table_sigmas():
    schedule = pflow.NoiseSchedule.linear()
    t = schedule.sigma_to_t(schedule.sigmas.numpy())
    assert (t == torch.arange(1000).numpy()).all()
