"""Encode / decode: round trips that come home, exact inversion, diffusers' DDIM inversion,
the latents' distribution, bad input and the command line."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

import pflow
from pflow.cli import main

from .conftest import make_gmm, tiny_unet
from .reference import rms, scipy_reference

GMM = make_gmm()


def _data(n: int = 64, seed: int = 0, model=GMM) -> torch.Tensor:
    return model.sample(n, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ round trips
def test_rk45_round_trip_comes_home():
    x0 = _data()
    enc = pflow.encode(GMM, x0, "rk45", rtol=1e-7, atol=1e-7)
    dec = pflow.decode(GMM, enc.x, "rk45", rtol=1e-7, atol=1e-7)
    assert enc.sigmas[0] == GMM.schedule.sigma_min and enc.sigmas[-1] == GMM.schedule.sigma_max
    assert dec.sigmas[0] == GMM.schedule.sigma_max and dec.sigmas[-1] == GMM.schedule.sigma_min
    assert rms(dec.x - x0) < 1e-5
    # The latent is the ODE's: the same as an independent DOP853 solve from sigma_min up.
    s0, s1 = GMM.schedule.sigma_min, GMM.schedule.sigma_max
    ref = scipy_reference(GMM, x0 * math.sqrt(1 + s0**2), s0, s1, 1e-11, 1e-11)
    assert rms(enc.x - ref / math.sqrt(1 + s1**2)) < 1e-5


def test_encode_then_sample_is_decode_on_the_mirrored_grid():
    x0 = _data(8)
    enc = pflow.encode(GMM, x0, "heun", steps=7, spacing="karras")
    grid = enc.sigmas.flip(0)
    dec = pflow.decode(GMM, enc.x, "heun", steps=7, spacing="karras")
    same = pflow.sample(GMM, enc.x, "heun", sigmas=grid)
    assert torch.equal(dec.sigmas, grid)
    assert torch.equal(dec.x, same.x) and dec.nfe == same.nfe == enc.nfe


@pytest.mark.parametrize("solver", ["euler", "ddim_inverse"])
def test_ddim_round_trip_error_falls_with_steps(solver):
    # DDIM paper, Table 2: encode then decode with DDIM, the error falls as steps grow.
    x0 = _data()
    errs = []
    for steps in (10, 20, 50):
        enc = pflow.encode(GMM, x0, solver, steps=steps)
        dec = pflow.decode(GMM, enc.x, "euler", steps=steps)
        assert enc.nfe == dec.nfe == steps
        errs.append(rms(dec.x - x0))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[0] / errs[2] > 3.0, errs  # first order: 5x the steps, ~5x smaller
    assert errs[2] > 1e-3  # and far from exact: the approximation these methods are


@functools.cache
def _latent_of_seed_1() -> torch.Tensor:
    return pflow.encode(GMM, _data(64, seed=1), "rk45", rtol=1e-9, atol=1e-9).x


GRIDS = [("trailing", 5), ("karras", 5), ("logsnr", 10), ("leading", 20), ("trailing", 50)]


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("spacing,steps", GRIDS)
def test_alf_inverts_exactly(dtype, bound, spacing, steps):
    x0 = _data(64, seed=1).to(dtype)
    enc = pflow.encode(GMM, x0, "alf", steps=steps, spacing=spacing)
    dec = pflow.decode(GMM, enc.x, "alf", steps=steps, spacing=spacing, companion=enc.companion)
    assert enc.x.dtype == dec.x.dtype == dtype
    assert dec.nfe == enc.nfe - 1  # the encode also starts its companion
    assert rms(dec.x - x0) < bound
    # Exactness is the scheme's, not accuracy: the latent is still only an approximation.
    assert rms(enc.x.double() - _latent_of_seed_1()) > 100 * bound
    # And back the other way: encoding the decode with its companion retraces the decode.
    again = pflow.encode(GMM, dec.x, "alf", steps=steps, spacing=spacing, companion=dec.companion)
    assert rms(again.x - enc.x) < bound and again.nfe == dec.nfe


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_alf_inverts_a_network_exactly(dtype, bound, prediction):
    # A small random UNet. A random eps-network is no denoiser: its ODE magnifies a
    # perturbation of the latent ~100-fold on the way down, and its x0_hat carries its
    # float32 rounding times sigma; alf's float64 shears make the decode feed the network
    # the very inputs the encode did, so the round trip is exact all the same.
    unet = tiny_unet().to(dtype)
    model = pflow.EpsModel(lambda x, t: unet(x, t).sample, pflow.NoiseSchedule.linear(), prediction)
    x0 = (2 * torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 1).to(dtype)
    for spacing, steps in (("trailing", 5), ("karras", 10)):
        enc = pflow.encode(model, x0, "alf", steps=steps, spacing=spacing)
        dec = pflow.decode(
            model, enc.x, "alf", steps=steps, spacing=spacing, companion=enc.companion
        )
        assert enc.x.dtype == dec.x.dtype == dtype and enc.companion.dtype == torch.float64
        assert rms(dec.x - x0) < bound, (spacing, steps)
        assert dec.nfe == enc.nfe - 1 == steps


def test_alf_decodes_as_a_second_order_sampler():
    # Without the companion alf is a sampler: second order, and more accurate than Heun at
    # the same number of network evaluations (grid ending at sigma_min, exact model).
    s = GMM.schedule
    noise = torch.randn(
        128, GMM.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    ref = scipy_reference(GMM, noise * math.sqrt(1 + s.sigma_max**2), s.sigma_max, s.sigma_min)
    ref = ref / math.sqrt(1 + s.sigma_min**2)
    steps, errs = [40, 80, 160], []
    for n in steps:
        res = pflow.decode(GMM, noise, "alf", steps=n, spacing="karras")
        assert res.nfe == n + 1
        errs.append(rms(res.x - ref))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert slope > 1.8, (slope, errs)
    for nfe in (20, 40):
        alf = pflow.decode(GMM, noise, "alf", steps=nfe - 1, spacing="karras")
        heun = pflow.decode(GMM, noise, "heun", steps=nfe // 2, spacing="karras")
        assert alf.nfe == heun.nfe == nfe
        assert rms(alf.x - ref) < rms(heun.x - ref)
    # Sampling into sigma = 0 ends with the Euler step, as every solver does.
    res = pflow.sample(GMM, noise, "alf", steps=10, spacing="karras")
    assert res.sigmas[-1] == 0 and res.nfe == 11


# ------------------------------------------------------------------ diffusers
diffusers_cases = [
    # (spacing, steps_offset, set_alpha_to_one, steps, prediction)
    ("leading", 0, True, 10, "epsilon"),
    ("leading", 1, False, 10, "epsilon"),
    ("leading", 0, False, 20, "epsilon"),
    ("trailing", 0, True, 10, "epsilon"),
    ("trailing", 0, False, 10, "v_prediction"),
    ("leading", 1, True, 8, "v_prediction"),
]


def _diffusers_round_trip(unet, cfg, steps, x0, z=None):
    """diffusers' DDIMInverseScheduler from ``x0`` (unless its latent ``z`` is given), then
    DDIMScheduler from the latent; returns (latent, decoded, inverse calls)."""
    import diffusers

    inverse, forward = diffusers.DDIMInverseScheduler(**cfg), diffusers.DDIMScheduler(**cfg)
    inverse.set_timesteps(steps)
    forward.set_timesteps(steps)
    x, calls = x0.clone(), 0
    with torch.no_grad():
        if z is None:
            for t in inverse.timesteps:
                x = inverse.step(unet(x, t).sample, t, x).prev_sample
                calls += 1
            z = x.clone()
        x = z.clone()
        for t in forward.timesteps:
            x = forward.step(unet(x, t).sample, t, x).prev_sample
    return z, x, calls, inverse.alphas_cumprod


def _close(ours, theirs, rel):
    scale = max(1.0, theirs.abs().max().item())
    return (ours - theirs).abs().max().item() <= rel * scale


@pytest.mark.parametrize("spacing,offset,alpha_one,steps,prediction", diffusers_cases)
def test_ddim_inverse_matches_diffusers(spacing, offset, alpha_one, steps, prediction):
    pytest.importorskip("diffusers")
    cfg = dict(
        num_train_timesteps=1000,
        prediction_type=prediction,
        timestep_spacing=spacing,
        steps_offset=offset,
        set_alpha_to_one=alpha_one,
        clip_sample=False,
    )
    grid = dict(steps=steps, spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one)
    x0 = 2 * torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) - 1
    for dtype in (torch.float32, torch.float64):
        unet = tiny_unet().to(dtype)
        ref_z, ref_x, calls, alphas = _diffusers_round_trip(unet, cfg, steps, x0.to(dtype))
        model = pflow.EpsModel(
            lambda x, t, unet=unet: unet(x, t).sample,
            pflow.NoiseSchedule.from_alphas_cumprod(alphas),
            prediction,
        )
        enc = pflow.encode(model, x0.to(dtype), "ddim_inverse", **grid)
        assert enc.x.dtype == dtype and _close(enc.x, ref_z, 1e-5)
        # diffusers spends a call on a zero-length first step when it starts at a_0 on a_0.
        wasted = 1 if (not alpha_one and spacing == "leading" and offset == 0) else 0
        assert enc.nfe == calls - wasted
        if dtype == torch.float32:
            # Each half from the same input: a random eps-UNet's ODE amplifies a 1e-6
            # difference in the latent ~100-fold on the way down (docs/inversion.md), so
            # the float32 chains are compared half by half ...
            dec = pflow.decode(model, ref_z, "euler", **grid)
            assert _close(dec.x, ref_x, 1e-5)
        else:
            # ... and end to end in float64, where round-off is 1e-16.
            dec = pflow.decode(model, enc.x, "euler", **grid)
            assert _close(dec.x, ref_x, 1e-5)
            # An approximation: the round trip does not come home.
            assert rms(dec.x - x0.double()) > 1e-3


# ------------------------------------------------------------------ distribution
def test_encoded_mixture_data_is_standard_normal():
    # The ODE pushes the data distribution onto the prior: latents of 4000 mixture draws
    # have the prior's mean and covariance within sampling error. The exact marginal at
    # sigma_max is N(C m, C^2 (S + sigma_max^2 I)) to within its (tiny) non-Gaussianity,
    # C = 1 / sqrt(1 + sigma_max^2); it differs from N(0, I) by ~1e-2 in the mean, below
    # the 1.6e-2 standard error of a 4000-sample mean, so either reference passes.
    n, d = 4000, GMM.dim
    x0 = _data(n, seed=5)
    z = pflow.encode(GMM, x0, "rk45", rtol=1e-6, atol=1e-6).x
    w = GMM.weights
    mean0 = (w[:, None] * GMM.means).sum(0)
    cov0 = sum(
        wk * (torch.diag(ck) + torch.outer(mk - mean0, mk - mean0))
        for wk, ck, mk in zip(w, GMM.covs, GMM.means)
    )
    s = GMM.schedule.sigma_max
    c2 = 1 / (1 + s**2)
    mean_t = mean0 * math.sqrt(c2)
    cov_t = c2 * (cov0 + s**2 * torch.eye(d, dtype=torch.float64))
    assert (mean_t.norm() < 0.02) and (cov_t - torch.eye(d, dtype=torch.float64)).abs().max() < 1e-3

    def statistics(sample: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor):
        m = sample.mean(0) - mean
        t2 = float(n * m @ torch.linalg.solve(cov, m))  # Hotelling: ~ chi2(d)
        dev = torch.cov(sample.T) - cov
        se = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov**2) / n).sqrt()
        return t2, float((dev / se).abs().max())  # entry-wise z-scores of the covariance

    t2_bound = chi2.ppf(1 - 1e-6, d)  # ~32.4 for d = 4
    z_bound = 5.3  # two-sided 1e-7 per entry, 10 entries
    for mean, cov in (
        (mean_t, cov_t),
        (torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)),
    ):
        t2, zmax = statistics(z, mean, cov)
        assert t2 < t2_bound and zmax < z_bound, (t2, zmax)
    # The statistics have power: the data themselves, or a latent 10% too wide, fail.
    identity = torch.eye(d, dtype=torch.float64)
    assert statistics(x0, torch.zeros(d, dtype=torch.float64), identity)[0] > t2_bound
    assert statistics(1.1 * z, mean_t, cov_t)[1] > z_bound


# ------------------------------------------------------------------ errors
def test_bad_input_names_the_argument():
    x0 = _data(4)
    with pytest.raises(ValueError, match="encoding starts at a positive sigma"):
        pflow.encode(GMM, x0, "euler", sigmas=[0.0, 1.0, 10.0])
    with pytest.raises(ValueError, match="encoding starts at a positive sigma"):
        pflow.encode(GMM, x0, "euler", steps=5, set_alpha_to_one=True)
    with pytest.raises(ValueError, match="encoding starts at a positive sigma"):
        pflow.encode(GMM, x0, "alf", sigmas=[0.0, 1.0, 10.0])
    with pytest.raises(ValueError, match="sigmas must increase for encode"):
        pflow.encode(GMM, x0, "euler", sigmas=[10.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="sigmas must be strictly monotone"):
        pflow.encode(GMM, x0, "euler", sigmas=[0.1, 1.0, 0.5, 10.0])
    with pytest.raises(ValueError, match="sigmas must decrease for decode"):
        pflow.decode(GMM, x0, "euler", sigmas=[0.1, 1.0, 10.0])
    with pytest.raises(ValueError, match="z has 5 values per sample .* expects 4"):
        pflow.decode(GMM, torch.randn(3, 5, dtype=torch.float64), "euler", steps=5)
    with pytest.raises(ValueError, match="x0 has 3 values per sample"):
        pflow.encode(GMM, torch.randn(3, 3, dtype=torch.float64), "euler", steps=5)
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        pflow.encode(GMM, x0.numpy(), "euler", steps=5)
    enc = pflow.encode(GMM, x0, "alf", steps=5)
    with pytest.raises(ValueError, match=r"companion has shape \(2, 3, 4\) but z has \(4, 4\)"):
        pflow.decode(GMM, enc.x, "alf", steps=5, companion=enc.companion[:, :3])
    with pytest.raises(ValueError, match="solver 'heun' does not take one"):
        pflow.decode(GMM, enc.x, "heun", steps=5, companion=enc.companion)
    with pytest.raises(ValueError, match="ddim_inverse' only encodes"):
        pflow.decode(GMM, enc.x, "ddim_inverse", steps=5)
    with pytest.raises(ValueError, match="solver must be one of euler.*alf.*ddim_inverse"):
        pflow.encode(GMM, x0, "bdia", steps=5)
    with pytest.raises(ValueError, match="rtol/atol apply to adaptive solvers"):
        pflow.encode(GMM, x0, "alf", steps=5, rtol=1e-3)
    with pytest.raises(TypeError, match="does not take companion"):
        pflow.sample(GMM, enc.x, "alf", steps=5, companion=enc.companion)


# ------------------------------------------------------------------ command line
def test_cli_encode_decode_round_trip(tmp_path, capsys):
    x0 = pflow.zoo.registry.load_model("gmm").exact.sample(6, torch.Generator().manual_seed(0))
    np.save(tmp_path / "x.npy", x0.numpy())
    common = ["--model", "gmm", "--dtype", "float64"]
    assert (
        main(
            [
                "encode",
                str(tmp_path / "x.npy"),
                "--out",
                str(tmp_path / "z.pt"),
                "--solver",
                "alf",
                "--steps",
                "8",
                *common,
            ]
        )
        == 0
    )
    # Settings come back from the .pt latent: alf, 8 steps, with the companion.
    assert (
        main(["decode", str(tmp_path / "z.pt"), "--out", str(tmp_path / "back.npy"), *common]) == 0
    )
    back = np.load(tmp_path / "back.npy")
    assert np.sqrt(np.mean((back - x0.numpy()) ** 2)) < 1e-10
    out = capsys.readouterr().out
    assert "NFE 9" in out and "exactly, with the stored companion" in out
    # A .npy latent is the latent alone: no companion, no sibling file, no exactness.
    assert (
        main(
            [
                "encode",
                str(tmp_path / "x.npy"),
                "--out",
                str(tmp_path / "z.npy"),
                "--solver",
                "alf",
                "--steps",
                "8",
                *common,
            ]
        )
        == 0
    )
    assert "companion is not stored in a .npy" in capsys.readouterr().out
    assert not (tmp_path / "z.companion.npy").exists()
    assert (
        main(
            [
                "decode",
                str(tmp_path / "z.npy"),
                "--out",
                str(tmp_path / "back2.pt"),
                "--solver",
                "alf",
                "--steps",
                "8",
                *common,
            ]
        )
        == 0
    )
    back2 = torch.load(tmp_path / "back2.pt", weights_only=True)
    assert rms(back2 - x0) > 1e-6  # a second-order sample, not the exact inverse
    out = capsys.readouterr().out
    assert "exactly" not in out and "no companion stored in z.npy" in out
    # A latent of the wrong size is refused, naming it.
    np.save(tmp_path / "bad.npy", np.zeros((2, 5)))
    assert (
        main(["decode", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o.npy"), *common]) == 2
    )
    assert "latent has shape (2, 5)" in capsys.readouterr().err


def test_cli_roundtrip(tmp_path, capsys):
    args = [
        "roundtrip",
        "--model",
        "gmm",
        "--solvers",
        "euler,alf,ddim_inverse,rk45",
        "--steps",
        "3,6",
        "--tols",
        "1e-4",
        "--samples",
        "16",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in ("euler", "alf", "ddim_inverse", "rk45", "RMSE", "PSNR"):
        assert name in out
    for suffix in ("csv", "json", "png"):
        assert (tmp_path / f"roundtrip.{suffix}").stat().st_size > 0
    rows = json.loads((tmp_path / "roundtrip.json").read_text())
    assert len(rows) == 7
    alf = [r for r in rows if r["solver"] == "alf"]
    assert all(r["rmse"] < 1e-5 and r["nfe_decode"] == r["nfe_encode"] - 1 for r in alf)


class _UNetEps(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unet = tiny_unet()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def tiny_image_model():
    """A ``module:factory`` model for the command line: a random 3x8x8 UNet."""
    return pflow.EpsModel(_UNetEps(), pflow.NoiseSchedule.linear()), (3, 8, 8)


def test_cli_png_round_trip(tmp_path, capsys):
    from PIL import Image

    pytest.importorskip("diffusers")
    pixels = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    common = ["--model", "tests.test_inversion:tiny_image_model", "--dtype", "float64"]
    latent, back = str(tmp_path / "z.pt"), str(tmp_path / "back.png")
    enc = ["encode", str(tmp_path / "img.png"), "--out", latent, "--solver", "alf"]
    assert main([*enc, "--steps", "5", "--spacing", "karras", *common]) == 0
    assert main(["decode", latent, "--out", back, *common]) == 0
    with Image.open(back) as img:
        assert np.array_equal(np.asarray(img), pixels)
    # An image of the wrong size is refused.
    Image.fromarray(pixels[:4]).save(tmp_path / "small.png")
    assert main(["encode", str(tmp_path / "small.png"), "--out", latent, *common]) == 2
    assert "small.png is 8x4 pixels; the model takes 8x8" in capsys.readouterr().err
