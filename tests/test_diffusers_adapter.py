"""pflow.integrations.diffusers: diffusers denoisers as pflow models, pflow solvers as a
diffusers scheduler, and pipelines with pflow's ODE in between.

Everything is built from configs with random weights (no download): a small UNet2DModel
and a tiny Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL, a one-layer
CLIPTextModel and a CLIPTokenizer over a letters-only vocabulary; both in
tests/conftest.py), and a one-layer DiT.

Tolerances: a random network's samples reach tens to hundreds, so float32 differences are
judged relative to the output's scale (DESIGN.md, section 4). Where pflow and diffusers do
the same arithmetic in a different order (diffusers' float32 ``alphas_cumprod`` against
pflow's float64 coefficients), ``REL_TOL``; measured at most 7.5e-7 here. Where the same
evaluations meet the same solver arithmetic, equality is exact.
"""

from __future__ import annotations

import math

import diffusers
import pytest
import torch

import pflow
from pflow.integrations.diffusers import (
    PFlowScheduler,
    check_config,
    from_unet,
    invert_pipeline,
    pipeline_model,
    reconstruct,
    sample_pipeline,
    schedule_from_config,
)

from .conftest import SD_SCHEDULE, tiny_sd_pipeline, tiny_vae

REL_TOL = 2e-6
# pflow.Guided's x0_hat = x0_u + w (x0_c - x0_u) carries w times the float32 rounding of
# each x0 (test_pipeline_scheduler_is_sample_pipeline).
GUIDED_TOL = 5e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one intra-op thread is much faster, and the CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` relative to the reference's scale (at least 1)."""
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def drive(unet, scheduler, x: torch.Tensor, **cond) -> torch.Tensor:
    """diffusers' loop: one network call and one ``step`` per entry of ``timesteps``."""
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t, **cond).sample
            x = scheduler.step(out, t, x).prev_sample
    return x


# ------------------------------------------------------------------ the tiny SD pipeline


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    """The tiny Stable Diffusion pipeline of ``tests/conftest.py``
    (:func:`~tests.conftest.tiny_sd_pipeline`): 8x8 latents, 16x16 images, Stable
    Diffusion's DDIMScheduler config (leading, steps_offset=1, ending at the first
    training step's sigma)."""
    return tiny_sd_pipeline(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def sd(sd_pipeline):
    """The module's pipeline with its DDIM scheduler, put back after the test."""
    ddim = sd_pipeline.scheduler
    yield sd_pipeline
    sd_pipeline.scheduler = ddim


def _run(pipe, scheduler, steps=10, output_type="latent", **kwargs):
    pipe.scheduler = scheduler
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(
        "a cat", num_inference_steps=steps, guidance_scale=7.5, output_type=output_type, **kwargs
    ).images


def test_pipeline_euler_is_ddim(sd):
    """``PFlowScheduler(solver="euler")`` on the DDIM config's grid gives DDIM's images
    (eta = 0) in the pipeline, under its guidance (7.5). Measured 4.5e-7 relative on the
    latents (scale 31) and 3.6e-7 on the images."""
    ddim = sd.scheduler
    ref = _run(sd, ddim)
    pf = PFlowScheduler.from_config(ddim.config, solver="euler")
    out = _run(sd, pf)
    assert pf.timesteps.tolist() == ddim.timesteps.tolist()
    assert len(pf.timesteps) == 10 and pf.order == 1
    assert rel(out, ref) < REL_TOL, rel(out, ref)
    ref_img = _run(sd, ddim, output_type="pt")
    img = _run(sd, pf, output_type="pt")
    assert float((img - ref_img).abs().max()) < 1e-5


def test_pipeline_dpmpp_2m_is_dpm_solver_multistep(sd):
    """``solver="dpmpp_2m"`` is diffusers' DPM-Solver++(2M) (solver_order 2, midpoint,
    lower_order_final on a grid under 15 steps, x0_hat into sigma = 0); "trailing"
    timesteps are the same in both (DPMSolverMultistep's "leading"/"linspace" differ from
    DDIM's, which pflow follows). The config is read from the DPM scheduler itself:
    spacing, and ``final_sigmas_type="zero"``. Measured 5.4e-7 relative."""
    dpm = diffusers.DPMSolverMultistepScheduler(
        **SD_SCHEDULE,
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
        timestep_spacing="trailing",
    )
    ref = _run(sd, dpm)
    pf = PFlowScheduler.from_config(dpm.config, solver="dpmpp_2m")
    out = _run(sd, pf)
    assert pf.timesteps.tolist() == dpm.timesteps.tolist()
    assert float(pf.sigmas[-1]) == 0.0
    assert rel(out, ref) < REL_TOL, rel(out, ref)


@pytest.mark.parametrize("solver,spacing,steps", [("heun", None, 6), ("dpmpp_3m", "logsnr", 8)])
def test_pipeline_scheduler_is_sample_pipeline(sd, solver, spacing, steps):
    """The pipeline with ``PFlowScheduler`` (its own guidance) and :func:`sample_pipeline`
    (pflow.guide on the same UNet, one batched call) take the same evaluations: Heun's
    second stages included (``len(timesteps)`` is the NFE), the same guided ``eps`` bit
    for bit. They differ in ``x0_hat``: the scheduler forms it from the guided ``eps``
    (``sqrt(1 + sigma^2) x_t - sigma eps``), ``pflow.Guided`` as ``x0_u + w (x0_c - x0_u)``,
    which multiplies the float32 rounding of each ``x0`` by ``w = 7.5``. Against the
    float64 solve (measured): the scheduler 8.1e-7 (heun) and 1.7e-6 (dpmpp_3m), pflow.guide
    2.3e-6 and 2.4e-6; so the two lie up to 2.5e-6 apart."""
    ddim = sd.scheduler
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pf = PFlowScheduler.from_config(ddim.config, solver=solver, spacing=spacing)
    sd.scheduler = pf
    ref = sd(
        ["a cat", "a dog"],
        num_inference_steps=steps,
        guidance_scale=7.5,
        latents=noise,
        output_type="latent",
    ).images
    res = sample_pipeline(
        sd,
        ["a cat", "a dog"],
        solver=solver,
        steps=steps,
        spacing=spacing,
        latents=noise,
        output_type="latent",
    )
    assert res.nfe == len(pf.timesteps)
    assert res.rows == 2 * 2 * res.nfe  # two prompts, guided: two network rows each
    assert torch.equal(res.images, res.latents)
    model = pipeline_model(sd, ["a cat", "a dog"], guidance_scale=7.5).to(torch.float64)
    with torch.no_grad():
        exact = pflow.sample(model, noise.double(), solver, sigmas=res.result.sigmas).x
    assert rel(ref.double(), exact) < REL_TOL, rel(ref.double(), exact)
    assert rel(res.latents.double(), exact) < GUIDED_TOL, rel(res.latents.double(), exact)
    assert rel(res.latents, ref) < GUIDED_TOL, rel(res.latents, ref)


def test_sample_pipeline_adaptive_decodes_images(sd):
    """An adaptive solver (what PFlowScheduler cannot run) through the pipeline's prompt
    encoding and VAE; the noise is the pipeline's own draw from the generator."""
    res = sample_pipeline(
        sd, "a cat", solver="rk45", rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(0)
    )
    assert len(res.images) == 1 and res.images[0].size == (16, 16)
    assert res.nfe > 0 and res.result.n_accepted > 0
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    euler = sample_pipeline(sd, "a cat", solver="euler", steps=5, latents=noise, output_type="pt")
    drawn = sample_pipeline(
        sd,
        "a cat",
        solver="euler",
        steps=5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    assert torch.equal(euler.images, drawn.images)
    assert euler.images.shape == (1, 3, 16, 16)


def test_alf_inversion_is_exact_under_guidance(sd):
    """``invert_pipeline(solver="alf")`` then ``reconstruct`` with its companion returns
    the image's latent bit for bit in float32 under guidance 7.5. DDIM inversion
    (``ddim_inverse`` up, ``euler`` down) on the same grid, prompt and guidance comes
    back with a max error of 11.9 at 10 steps (7.3 at 50; 4.1 and 7.3 without guidance)
    for a latent whose entries stay below 0.13: on a random network the ODE is far from
    the linearisation DDIM inversion relies on."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    kw = dict(prompt="a cat", guidance_scale=7.5, steps=10)
    inv = invert_pipeline(sd, image, solver="alf", **kw)
    assert inv.companion is not None and inv.latents.shape == (1, 4, 8, 8)
    back = reconstruct(sd, inv.latents, companion=inv.companion, output_type="latent", **kw)
    assert back.latents.dtype == torch.float32
    assert torch.equal(back.latents, inv.image_latents)
    assert (inv.nfe, back.nfe) == (11, 10)  # alf: N + 1 to start its companion, then N
    # The image latent is the VAE's mean, scaled as the pipeline scales it.
    pixels = sd.image_processor.preprocess(image)
    with torch.no_grad():
        mean = sd.vae.encode(pixels).latent_dist.mode() * sd.vae.config.scaling_factor
    assert torch.equal(inv.image_latents, mean)

    ddim = invert_pipeline(sd, latents=inv.image_latents, solver="ddim_inverse", **kw)
    again = reconstruct(sd, ddim.latents, solver="euler", output_type="latent", **kw)
    assert rel(again.latents, inv.image_latents) > 0.1


# ------------------------------------------------------------------ the scheduler alone

FIXED = [
    "euler",
    "heun",
    "midpoint",
    "rk4",
    "dpmpp_2m",
    "dpmpp_3m[variant=reference]",
    "dpm_solver_2",
    "dpm_solver_3",
    "dpmpp_2s",
    "unipc[order=3]",
    "ipndm",
    "lms",
    "ddim",
    "alf",
    "ddim[eta=1,seed=3]",
]


@pytest.mark.parametrize("solver", FIXED)
def test_scheduler_is_pflow_sample(unet, noise, solver):
    """Every fixed-grid solver, driven by diffusers' loop through the step inversion,
    makes exactly the evaluations of ``pflow.sample`` (``len(timesteps)`` is its NFE, at
    the same sigmas) and returns the same sample bit for bit."""
    config = diffusers.DDIMScheduler(clip_sample=False).config
    scheduler = PFlowScheduler.from_config(config, solver=solver, spacing="trailing")
    scheduler.set_timesteps(5)
    x = drive(unet, scheduler, noise[:2].clone())
    with torch.no_grad():
        res = pflow.sample(from_unet(unet, config), noise[:2], solver, steps=5, spacing="trailing")
    assert len(scheduler.timesteps) == res.nfe
    assert torch.equal(x, res.x)
    expected = [scheduler.schedule.sigma_to_t(float(s)) for s in scheduler.sigmas[:-1]]
    assert scheduler.timesteps.double().tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="call set_timesteps again"):
        scheduler.step(torch.zeros_like(x), 0, x)


def test_scheduler_walks_another_schedulers_timesteps(unet, noise):
    """``set_timesteps(timesteps=...)`` walks any scheduler's exact timesteps:
    DPMSolverMultistep's own "linspace" (11 points, the last dropped), which differs from
    DDIM's and so from pflow's ``spacing="linspace"``."""
    dpm = diffusers.DPMSolverMultistepScheduler()
    dpm.set_timesteps(10)
    ref = drive(unet, dpm, noise.clone())
    pf = PFlowScheduler.from_config(dpm.config, solver="dpmpp_2m")
    pf.set_timesteps(10)
    assert pf.timesteps.tolist() != dpm.timesteps.tolist()
    pf.set_timesteps(timesteps=dpm.timesteps)
    assert pf.timesteps.tolist() == dpm.timesteps.tolist()
    assert rel(drive(unet, pf, noise.clone()), ref) < REL_TOL


def test_ddpm_pipeline_runs_the_scheduler(unet):
    """DDPMPipeline passes ``generator`` to ``step`` (DDIMPipeline, ``eta`` too, but it
    converts any scheduler to DDIMScheduler); the sample is ``pflow.sample``'s from the
    pipeline's own noise."""
    config = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing").config
    pipe = diffusers.DDPMPipeline(
        unet=unet, scheduler=PFlowScheduler.from_config(config, solver="unipc")
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=6,
        output_type="np",
    ).images
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = pflow.sample(from_unet(unet, config), noise, "unipc", steps=6).x
    ours = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - images).max() == 0.0
    with pytest.raises(ValueError, match="ddim\\[eta=0.5"):
        pipe.scheduler.step(torch.zeros(1, 3, 8, 8), 999, torch.zeros(1, 3, 8, 8), eta=0.5)


def test_scheduler_order_and_timesteps_of_multistage_solvers():
    """Heun's timesteps hold both stages of each step (the second at the next grid
    point, as HeunDiscreteScheduler repeats its sigmas) and end with one evaluation for
    the Euler step into 0; rk4's inner stages are at fractional timesteps."""
    heun = PFlowScheduler(solver="heun", timestep_spacing="trailing")
    heun.set_timesteps(4)
    assert heun.order == 2
    assert heun.timesteps.tolist() == [999, 749, 749, 499, 499, 249, 249]
    rk4 = PFlowScheduler(solver="rk4", timestep_spacing="trailing")
    rk4.set_timesteps(2)
    assert rk4.timesteps.dtype == torch.float32 and len(rk4.timesteps) == 5


def test_scheduler_adopts_latents_replaced_between_steps(unet, noise):
    """A pipeline may replace ``latents`` between steps (inpainting, callbacks): the
    scheduler takes them as the state, as DDIMScheduler does."""
    config = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1).config
    runs = []
    for scheduler in (
        diffusers.DDIMScheduler.from_config(config),
        PFlowScheduler.from_config(config, solver="euler"),
    ):
        scheduler.set_timesteps(10)
        x = noise.clone()
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
                if i == 4:
                    x = 0.5 * x  # a new tensor with other values
        runs.append(x)
    assert rel(runs[1], runs[0]) < REL_TOL


@pytest.mark.parametrize("solver,begin", [("heun", 4), ("dpmpp_2m", 3), ("unipc", 2)])
def test_set_begin_index_starts_mid_grid(unet, noise, solver, begin):
    """img2img: ``set_begin_index`` at a step's first evaluation, ``add_noise`` at its
    timestep; the walk is ``pflow.sample`` on the rest of the grid from that state."""
    scheduler = PFlowScheduler(solver=solver, timestep_spacing="trailing")
    scheduler.set_timesteps(6)
    scheduler.set_begin_index(begin)
    t0 = scheduler.timesteps[begin]
    x0 = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7))
    start = scheduler.add_noise(x0, noise, t0.reshape(1))
    sigma = float(scheduler.sigmas[begin])
    c = 1 / math.sqrt(1 + sigma**2)
    assert rel(start, c * x0 + c * sigma * noise) < 1e-6
    x = start.clone()
    with torch.no_grad():
        for t in scheduler.timesteps[begin:]:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        grid = torch.tensor(scheduler._grid, dtype=torch.float64)
        rest = grid[grid <= sigma]
        res = pflow.sample(from_unet(unet, scheduler), start, solver, sigmas=rest)
    assert torch.equal(x, res.x)
    alf = PFlowScheduler(solver="alf", timestep_spacing="trailing")
    alf.set_timesteps(6)
    with pytest.raises(ValueError, match="begin_index=3"):
        alf.set_begin_index(3)


def test_img2img_pipeline_runs(sd):
    """StableDiffusionImg2ImgPipeline (add_noise, set_begin_index) with PFlowScheduler."""
    ddim = sd.scheduler
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**sd.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = PFlowScheduler.from_config(ddim.config, solver="heun")
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    out = pipe(
        "a cat",
        image=image,
        strength=0.6,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    assert pipe.scheduler.begin_index == 4 and bool(torch.isfinite(out).all())


def test_scheduler_refuses_what_it_cannot_drive():
    with pytest.raises(ValueError, match="sample_pipeline"):
        PFlowScheduler(solver="rk45")
    with pytest.raises(ValueError, match="only encodes"):
        PFlowScheduler(solver="ddim_inverse")
    with pytest.raises(ValueError, match="solver must be one of"):
        PFlowScheduler(solver="nope")
    with pytest.raises(ValueError, match="last_step='euler' only"):
        PFlowScheduler(solver="dpmpp_2m", last_step="solver")
    with pytest.raises(TypeError, match="does not take eta"):
        PFlowScheduler(solver="heun", solver_options={"eta": 1.0})
    s = PFlowScheduler(solver="euler")
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1, 1), 999, torch.zeros(1, 1))
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="timesteps\\[0\\] = 750"):
        s.step(torch.zeros(1, 1), 3, torch.zeros(1, 1))
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps(4, timesteps=[999, 500])


def test_scheduler_config_round_trip(tmp_path):
    s = PFlowScheduler(**SD_SCHEDULE, solver="unipc", solver_options={"order": 3}, spacing="logsnr")
    s.save_pretrained(tmp_path)
    t = PFlowScheduler.from_pretrained(tmp_path)
    assert t.config.solver == "unipc" and t.config.solver_options == {"order": 3}
    s.set_timesteps(7)
    t.set_timesteps(7)
    assert torch.equal(s.timesteps, t.timesteps)


def test_from_config_reproduces_the_source_scheduler():
    """The source scheduler's effective values count, those it took from its own
    defaults included: DPMSolverMultistep walks "linspace" timesteps and ends at 0,
    Stable Diffusion's DDIM "leading" with steps_offset 1 ends at the first training
    step's sigma, Euler's karras flag gives the karras grid; a default DDIMScheduler
    clips, which pflow refuses."""
    dpm = PFlowScheduler.from_config(diffusers.DPMSolverMultistepScheduler().config)
    dpm.set_timesteps(10)
    assert dpm._spacing == "linspace" and dpm.sigmas[-1] == 0.0
    sd = diffusers.DDIMScheduler(
        **SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    pf = PFlowScheduler.from_config(sd.config)
    pf.set_timesteps(10)
    sd.set_timesteps(10)
    assert pf.timesteps.tolist() == sd.timesteps.tolist()
    assert float(pf.sigmas[-1]) == pf.schedule.sigma_min
    # A DDIM config that went through a DPM scheduler carries DPM's final_sigmas_type as a
    # hidden key (and its _class_name, as every config loaded from a file does): DDIM's
    # own set_alpha_to_one counts.
    through = {**sd.config, "_class_name": "DDIMScheduler", "final_sigmas_type": "zero"}
    assert PFlowScheduler.from_config(through)._to_zero is False
    assert PFlowScheduler.from_config(through, final_sigmas_type="zero")._to_zero is True
    karras = PFlowScheduler.from_config(
        diffusers.EulerDiscreteScheduler(use_karras_sigmas=True).config, solver="heun"
    )
    assert karras._spacing == "karras"
    with pytest.raises(ValueError, match="clip_sample=True"):
        PFlowScheduler.from_config(diffusers.DDIMScheduler().config)


# ------------------------------------------------------------------ schedules and configs


@pytest.mark.parametrize(
    "config",
    [
        {},
        SD_SCHEDULE,
        {"beta_schedule": "squaredcos_cap_v2"},
        {"trained_betas": torch.linspace(1e-4, 0.03, 500).tolist(), "num_train_timesteps": 500},
        {**SD_SCHEDULE, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
        {"beta_schedule": "linear", "rescale_betas_zero_snr": True},
    ],
    ids=["linear", "scaled_linear", "cosine", "trained", "zero_snr_v", "zero_snr_eps"],
)
def test_schedule_is_diffusers_table(config):
    """The table is diffusers' float32 ``alphas_cumprod`` bit for bit; a zero terminal
    SNR's last entry (0) becomes ``zero_snr_alpha``."""
    scheduler = diffusers.DDIMScheduler(**config, clip_sample=False)
    table = scheduler.alphas_cumprod.double()
    schedule = schedule_from_config(scheduler)
    assert torch.equal(schedule.alphas_cumprod[:-1], table[:-1])
    if config.get("rescale_betas_zero_snr"):
        assert float(table[-1]) == 0.0
        # eps-prediction: 2**-24 (EulerDiscreteScheduler's) unless a_(N-2) is smaller
        # (the linear schedule's is 4.2e-9), then half of it, so the table still falls.
        eps = min(2.0**-24, float(table[-2]) / 2)
        expected = eps if config.get("prediction_type") is None else 2.0**-48
        assert float(schedule.alphas_cumprod[-1]) == expected
    else:
        assert float(schedule.alphas_cumprod[-1]) == float(table[-1])


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_zero_terminal_snr_first_step_is_ddim(unet, noise, prediction):
    """Zero terminal SNR (``a_{N-1} = 0``, trailing timesteps): DDIM's first step at
    ``a = 0`` exactly (``x0_hat = -v``, ``eps = x_t``) against pflow's at
    ``a = 2**-48``: 7e-8 relative after the first step, 3.5e-7 after all eight, in
    :func:`pflow.sample` and in PFlowScheduler alike. diffusers' DPM-Solver++ clamps to
    ``2**-24`` (4e-4 from the ``a = 0`` limit here); ``zero_snr_alpha=2**-24`` reproduces
    it (measured 3.9e-7)."""
    ddim = diffusers.DDIMScheduler(
        **SD_SCHEDULE,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type=prediction,
        clip_sample=False,
    )
    ddim.set_timesteps(8)
    first_t = ddim.timesteps[0]
    with torch.no_grad():
        first = ddim.step(unet(noise, first_t).sample, first_t, noise).prev_sample
    ref = drive(unet, ddim, noise.clone())
    model = from_unet(unet, ddim)
    assert model.schedule.sigma_max == pytest.approx(2.0**24)
    with torch.no_grad():
        res = pflow.sample(
            model, noise, "euler", steps=8, spacing="trailing", return_trajectory=True
        )
    assert bool(torch.isfinite(res.trajectory).all())
    assert rel(res.trajectory[1], first) < 2e-7, rel(res.trajectory[1], first)
    assert rel(res.x, ref) < REL_TOL, rel(res.x, ref)
    pf = PFlowScheduler.from_config(ddim.config, solver="euler")
    pf.set_timesteps(8)
    assert torch.equal(drive(unet, pf, noise.clone()), res.x)
    if prediction == "v_prediction":
        dpm = diffusers.DPMSolverMultistepScheduler(
            **SD_SCHEDULE,
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            prediction_type=prediction,
        )
        dpm.set_timesteps(8)
        ref = drive(unet, dpm, noise.clone())
        with torch.no_grad():
            same = pflow.sample(
                from_unet(unet, dpm, zero_snr_alpha=2.0**-24), noise, "dpmpp_2m", steps=8
            )
            limit = pflow.sample(from_unet(unet, dpm), noise, "dpmpp_2m", steps=8)
        assert rel(same.x, ref) < REL_TOL
        assert rel(limit.x, ref) > 1e-5


def test_zero_terminal_snr_eps_prediction_stays_finite(unet, noise):
    """With an eps-prediction network DDIM's first step at ``a = 0`` divides by
    ``sqrt(a) = 0`` (NaN); pflow's ``a_{N-1} = 2**-24`` (EulerDiscreteScheduler's) keeps
    it finite."""
    ddim = diffusers.DDIMScheduler(
        rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False
    )
    ddim.set_timesteps(5)
    assert not bool(torch.isfinite(drive(unet, ddim, noise.clone())).all())
    with torch.no_grad():
        res = pflow.sample(from_unet(unet, ddim), noise, "euler", steps=5)
    assert bool(torch.isfinite(res.x).all())
    with pytest.raises(ValueError, match="zero_snr_alpha"):
        from_unet(unet, ddim, zero_snr_alpha=0.5)
    with pytest.raises(ValueError, match="zero_snr_alpha"):
        from_unet(unet, diffusers.DDIMScheduler(clip_sample=False), zero_snr_alpha=1e-9)


BAD = [
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    ({"timestep_spacing": "middle"}, "timestep_spacing='middle'"),
    ({"thresholding": True}, "thresholding=True"),
    ({"clip_sample": True}, "clip_sample=True"),
    ({"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
    ({"use_beta_sigmas": True}, "use_beta_sigmas=True"),
    ({"lambda_min_clipped": -5.1}, "lambda_min_clipped=-5.1"),
    ({"timestep_type": "continuous"}, "timestep_type='continuous'"),
    ({"final_sigmas_type": "denoise_to_zero"}, "final_sigmas_type='denoise_to_zero'"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas has 2 entries"),
]


@pytest.mark.parametrize("config,message", BAD, ids=[m.split("=")[0] for _, m in BAD])
def test_config_keys_pflow_cannot_reproduce_are_named(unet, config, message):
    full = {"clip_sample": False, **config}
    with pytest.raises(ValueError, match=message.replace("[", "\\[")):
        from_unet(unet, full)
    with pytest.raises(ValueError, match=message.replace("[", "\\[")):
        PFlowScheduler(**full)
    with pytest.raises(ValueError, match=message.replace("[", "\\[")):
        check_config(full)


def test_flow_matching_schedulers_are_refused(unet):
    with pytest.raises(ValueError, match="flow-matching"):
        from_unet(unet, diffusers.FlowMatchEulerDiscreteScheduler())


# ------------------------------------------------------------------ networks


def test_from_unet_class_conditional_unet_and_keywords(noise):
    """A UNet2DModel with class embeddings: ``class_labels`` travel as conditioning; a
    keyword the network does not take is named before any call."""
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=4,
    ).eval()
    labels = torch.tensor([0, 1, 2, 3])
    ddim = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    ddim.set_timesteps(5)
    ref = drive(net, ddim, noise.clone(), class_labels=labels)
    with torch.no_grad():
        res = pflow.sample(from_unet(net, ddim, class_labels=labels), noise, "euler", steps=5)
    assert rel(res.x, ref) < REL_TOL
    with pytest.raises(TypeError, match="encoder_hidden_states"):
        from_unet(net, ddim, encoder_hidden_states=torch.zeros(4, 2, 8))


def test_from_unet_dit_with_class_labels_and_dit_pipeline(noise):
    """A transformer denoiser (DiT: ``hidden_states``, ``timestep``, ``class_labels``, a
    learned variance in the second half of its channels) as a pflow model, against DDIM;
    and DiTPipeline (which steps the scheduler on its doubled CFG batch) with
    PFlowScheduler against pflow.guide on the same network."""
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=4,
    ).eval()
    labels = torch.tensor([1, 7])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    # 5 steps divide 1000: DDIM steps to t - N // steps, the next timestep only then.
    ddim = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    ddim.set_timesteps(5)
    x = x_T.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            out = dit(x, timestep=t.expand(2), class_labels=labels).sample[:, :4]
            x = ddim.step(out, t, x).prev_sample
        model = from_unet(dit, ddim, class_labels=labels)
        res = pflow.sample(model, x_T, "euler", steps=5, spacing="trailing")
    assert rel(res.x, x) < REL_TOL

    vae = tiny_vae()
    pipe = diffusers.DiTPipeline(
        transformer=dit,
        vae=vae,
        scheduler=PFlowScheduler.from_config(ddim.config, solver="dpmpp_2m"),
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [1, 7],
        guidance_scale=4.0,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    noise_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    guided = pflow.guide(model, 4.0, uncond={"class_labels": torch.tensor([1000, 1000])})
    with torch.no_grad():
        latents = pflow.sample(guided, noise_T, "dpmpp_2m", steps=5, spacing="trailing").x
        ours = vae.decode(latents / vae.config.scaling_factor).sample
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert float((ours - images).abs().max()) < 1e-5
