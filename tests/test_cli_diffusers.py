"""The command line on a local diffusers pipeline folder (``--diffusers DIR``):
``pflow sample``, ``roundtrip`` and ``bench``.

The folders are written by ``save_pretrained`` from the tiny random Stable Diffusion
pipeline of ``tests/conftest.py`` (8x8 latents, 16x16 images, Stable Diffusion's DDIM
config: leading, steps_offset 1, ending at the first training step's sigma) and from a
DDPMPipeline on the small conftest UNet (pixel space). What is asserted is what the
command computes against the pipeline itself, or the library call, from the same seed:

* ``sample --solver euler`` is the pipeline with ``PFlowScheduler(solver="euler")`` and
  with its own ``DDIMScheduler`` (guidance 7.5), to float32 round-off on the images
  (measured 3.9e-7 and 3.6e-7 of [0, 1]); its PNG is the pipeline's ``numpy_to_pil``
  bytes (measured: the same bytes); the unconditional DDPM folder's images are
  ``PFlowScheduler``'s bit for bit;
* ``roundtrip --solver alf`` returns the image's latent bit for bit under guidance 7.5
  and writes the library's reconstruction;
* ``bench`` writes ``bench.json`` with pflow's rows and a diffusers peer on the same
  guided network against a float64 reference, pflow ``euler`` on the leading grid
  being the ``ddim`` peer (their RMSE against the reference agree to 5.4e-8 relative);
* misuse is one line naming the option or the folder, exit code 2, before any weight is
  loaded.
"""

from __future__ import annotations

import json
import math

import diffusers
import numpy as np
import pytest
import torch

from pflow.cli import main
from pflow.integrations.diffusers import (
    PFlowScheduler,
    decode_latents,
    invert_pipeline,
    reconstruct,
    sample_pipeline,
)
from pflow.zoo import registry

from .conftest import tiny_sd_pipeline, tiny_unet

PIL = pytest.importorskip("PIL.Image")

PROMPT = "a cat"
# Images in [0, 1]: pflow.guide against the pipeline's own guidance and DDIM arithmetic.
IMAGE_TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one intra-op thread is much faster, and the CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny Stable Diffusion pipeline and its saved folder."""
    root = tmp_path_factory.mktemp("sd")
    pipe = tiny_sd_pipeline(root)
    pipe.save_pretrained(root / "pipe")
    return pipe, root / "pipe"


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    """An unconditional DDPMPipeline (pixel space, 3x8x8) and its saved folder."""
    root = tmp_path_factory.mktemp("ddpm")
    pipe = diffusers.DDPMPipeline(
        unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(clip_sample=False)
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "pipe")
    return pipe, root / "pipe"


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _pipeline_images(pipe, scheduler, steps: int, n: int, seed: int) -> np.ndarray:
    ddim = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        return pipe(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=7.5,
            num_images_per_prompt=n,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images
    finally:
        pipe.scheduler = ddim


# ------------------------------------------------------------------ sample
def test_sample_is_the_pipeline_with_ddim(sd, tmp_path, capsys):
    """``pflow sample --diffusers DIR --prompt ... --solver euler --steps 5`` gives the
    images of the pipeline run with ``PFlowScheduler(solver="euler")`` and with its own
    DDIMScheduler from the same seed (the pipeline's noise, its grid, guidance 7.5), to
    float32 round-off; several PNGs are numbered, each the pipeline's ``numpy_to_pil``."""
    pipe, folder = sd
    common = ["sample", "--diffusers", str(folder), "--prompt", PROMPT, "--solver", "euler"]
    common += ["--steps", "5", "--samples", "2", "--seed", "3"]
    assert main([*common, "--out", str(tmp_path / "x.npy")]) == 0
    line = capsys.readouterr().out.strip()
    assert "2 images from StableDiffusionPipeline" in line
    assert "euler, 5 leading steps" in line and "guidance 7.5" in line
    assert "NFE 5 (10 network rows per image)" in line
    ours = np.load(tmp_path / "x.npy")

    pflow_sched = PFlowScheduler.from_config(pipe.scheduler.config, solver="euler")
    with_pflow = _pipeline_images(pipe, pflow_sched, 5, 2, 3)
    with_ddim = _pipeline_images(pipe, pipe.scheduler, 5, 2, 3)
    assert ours.shape == with_ddim.shape == (2, 16, 16, 3) and ours.dtype == np.float32
    assert float(np.abs(ours - with_pflow).max()) < IMAGE_TOL
    assert float(np.abs(ours - with_ddim).max()) < IMAGE_TOL

    assert main([*common, "--out", str(tmp_path / "x.png")]) == 0
    assert "x_000.png ... x_001.png (2 files)" in capsys.readouterr().out
    for i in range(2):
        png = np.asarray(PIL.open(tmp_path / f"x_{i:03d}.png"))
        expected = (ours[i] * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil
        assert np.array_equal(png, expected)
        # The pipeline's own bytes, but for a float32 rounding across a half level.
        assert int(np.abs(png.astype(int) - (with_ddim[i] * 255).round()).max()) <= 1


def test_sample_adaptive_in_batches_is_sample_pipeline(sd, tmp_path, capsys):
    """An adaptive solver (rk45) in chunks of ``--batch-size``: each chunk is
    ``sample_pipeline`` on its rows of the pipeline's noise, bit for bit; ``.pt`` holds
    the images and the latents."""
    pipe, folder = sd
    argv = ["sample", "--diffusers", str(folder), "--prompt", PROMPT, "--solver", "rk45"]
    argv += ["--rtol", "1e-2", "--atol", "1e-2", "--samples", "3", "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "y.pt")]) == 0
    line = capsys.readouterr().out
    assert "3 images" in line and "rk45, rtol 0.01, atol 0.01" in line
    got = torch.load(tmp_path / "y.pt")
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    first = sample_pipeline(
        pipe,
        PROMPT,
        latents=noise[:2],
        num_images_per_prompt=2,
        solver="rk45",
        rtol=1e-2,
        atol=1e-2,
        output_type="np",
    )
    assert torch.equal(got["latents"][:2], first.latents)
    assert np.array_equal(got["images"][:2].numpy(), first.images)
    assert got["images"].shape == (3, 16, 16, 3) and got["latents"].shape == (3, 4, 8, 8)


def test_unconditional_pipeline_is_pflow_scheduler_bit_for_bit(ddpm, tmp_path, capsys):
    """A DDPMPipeline folder samples without a prompt; its images are the pipeline's
    with ``PFlowScheduler(solver="dpmpp_2m")`` from the same seed, bit for bit."""
    pipe, folder = ddpm
    argv = ["sample", "--diffusers", str(folder), "--solver", "dpmpp_2m", "--steps", "5"]
    argv += ["--samples", "2", "--seed", "1", "--out", str(tmp_path / "u.npy")]
    assert main(argv) == 0
    assert "NFE 5 (5 network rows per image)" in capsys.readouterr().out
    own = pipe.scheduler
    pipe.scheduler = PFlowScheduler.from_config(own.config, solver="dpmpp_2m")
    try:
        ref = pipe(
            batch_size=2,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(1),
            output_type="np",
        ).images
    finally:
        pipe.scheduler = own
    assert np.array_equal(np.load(tmp_path / "u.npy"), ref)


# ------------------------------------------------------------------ roundtrip
def test_roundtrip_alf_is_exact_under_guidance(sd, tmp_path, capsys):
    """image -> VAE latent -> alf up -> alf down -> VAE: the latent comes back bit for bit
    under guidance 7.5 (printed as exact, the PSNR against the VAE's own decode is
    infinite) and ``--out`` is the library's reconstruction."""
    pipe, folder = sd
    rng = np.random.default_rng(0)
    image = PIL.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "in.png")
    argv = ["roundtrip", "--diffusers", str(folder), "--image", str(tmp_path / "in.png")]
    argv += ["--prompt", PROMPT, "--solver", "alf", "--steps", "6", "--guidance", "7.5"]
    assert main([*argv, "--out", str(tmp_path / "rec.npy")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("alf"))
    assert row.split()[:4] == ["alf", "6", "steps", "7+6"]
    assert "0.000e+00" in row and "0 (exact)" in row and " inf " in row

    inv = invert_pipeline(pipe, image, prompt=PROMPT, guidance_scale=7.5, solver="alf", steps=6)
    back = reconstruct(
        pipe,
        inv.latents,
        companion=inv.companion,
        prompt=PROMPT,
        guidance_scale=7.5,
        solver="alf",
        steps=6,
        output_type="np",
    )
    assert torch.equal(back.latents, inv.image_latents)
    rec = np.load(tmp_path / "rec.npy")
    assert np.array_equal(rec, back.images)
    assert np.array_equal(rec, decode_latents(pipe, inv.image_latents, "np"))


# ------------------------------------------------------------------ bench
def test_bench_on_the_pipeline_folder(sd, tmp_path, capsys):
    """The benchmark on the folder's guided UNet in latent space: pflow rows and a
    diffusers peer on the same network and noise, a float64 reference, the prompt and
    the guidance in the model's description; pflow euler on the leading grid is the
    ddim peer; the model is unregistered after the run."""
    _, folder = sd
    out = tmp_path / "bench"
    argv = ["bench", "--diffusers", str(folder), "--prompt", PROMPT, "--solvers", "euler"]
    argv += ["--spacing", "leading", "--steps", "3", "--samples", "2", "--peers", "ddim"]
    argv += ["--ref-tol", "1e-4", "--no-plots", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert "prompt 'a cat', guidance 7.5" in capsys.readouterr().out
    data = json.loads((out / "bench.json").read_text())
    assert data["model"]["shape"] == [4, 8, 8]
    assert "StableDiffusionPipeline" in data["model"]["description"]
    ref = data["reference"]
    assert ref["dtype"] == "float64" and ref["tol"] == 1e-4 and ref["nfe"] > 0
    rows = {(r["solver"], r["peer"]): r for r in data["rows"]}
    assert set(rows) == {("euler", False), ("ddim", True)}
    ours, peer = rows["euler", False], rows["ddim", True]
    assert ours["nfe"] == peer["nfe"] == 3
    assert ours["rows_per_sample"] == peer["rows_per_sample"] == 6.0  # guided: 2 rows
    assert math.isclose(ours["rmse"], peer["rmse"], rel_tol=1e-5)
    assert data["config"]["model"] not in registry.available_models()


# ------------------------------------------------------------------ misuse
@pytest.mark.parametrize(
    "argv, words",
    [
        (["sample", "--diffusers", "{empty}", "--prompt", "x"], ["{empty}", "model_index.json"]),
        (["sample", "--diffusers", "{missing}"], ["{missing}", "does not exist"]),
        (["sample", "--diffusers", "{sd}/unet"], ["{sd}/unet", "the folder above"]),
        (["sample", "--diffusers", "{ddpm}", "--prompt", "x"], ["--prompt", "unconditional"]),
        (["sample", "--diffusers", "{sd}"], ["--prompt", "text-conditioned"]),
        (
            ["sample", "--diffusers", "{sd}", "--prompt", "x", "--model", "digits"],
            ["--diffusers", "--model"],
        ),
        (["sample", "--prompt", "x"], ["--prompt", "needs --diffusers"]),
        (["sample", "--diffusers", "{sd}", "--prompt", "x", "--label", "3"], ["--label"]),
        (["sample", "--diffusers", "{sd}", "--prompt", "x", "--height", "15"], ["--height"]),
        (["roundtrip", "--diffusers", "{sd}", "--prompt", "x"], ["--image"]),
        (
            ["roundtrip", "--diffusers", "{ddpm}", "--image", "{png}", "--guidance", "3"],
            ["--guidance", "unconditional"],
        ),
        (["bench", "--diffusers", "{sd}", "--prompt", "x", "--model", "gmm"], ["--model"]),
        (["bench", "--diffusers", "{sd}", "--prompt", "x", "--guidance", "1,2"], ["--guidance"]),
        (["bench", "--diffusers", "{empty}"], ["{empty}", "model_index.json"]),
    ],
)
def test_misuse_is_one_line(sd, ddpm, tmp_path, capsys, argv, words):
    (tmp_path / "empty").mkdir()
    PIL.new("RGB", (8, 8)).save(tmp_path / "in.png")
    names = {
        "empty": str(tmp_path / "empty"),
        "missing": str(tmp_path / "missing"),
        "sd": str(sd[1]),
        "ddpm": str(ddpm[1]),
        "png": str(tmp_path / "in.png"),
    }
    argv = [a.format(**names) for a in argv]
    if argv[0] != "bench":
        argv += ["--out", str(tmp_path / "o.png")]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"pflow {argv[0]}: error: ")
    for word in words:
        assert word.format(**names) in line, line
