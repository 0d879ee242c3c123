"""Classifier-free guidance (pflow.guidance): the guided field against its closed form on
exact Gaussian mixtures, against diffusers' CFG loop on a random class-conditional UNet,
and the conditioning rows that travel with the samples through chunks, ranks and the
per-sample adaptive driver.

The exact model: a mixture of six Gaussians in three classes (two components each). The
class-conditional density is the mixture of that class's components, the marginal (the
"null" label, 3) the mixture of all six, so ``eps_c`` and ``eps_u`` are both known in
closed form and so is the guided field ``eps_u + w (eps_c - eps_u)``. The reference field
is written from the formula in numpy, independently of pflow.zoo.gmm (whose mixtures are
one pair of models under test); ``ClassGMM`` is the same formula as a class-conditional
network ``net(x_t, t, class_labels)`` for :func:`pflow.guide`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pflow
from pflow.zoo.gmm import GaussianMixture

SCHEDULE = pflow.NoiseSchedule.linear()
SIGMA_MAX, SIGMA_MIN = float(SCHEDULE.sigma_max), float(SCHEDULE.sigma_min)

_g = torch.Generator().manual_seed(11)
MEANS = 1.5 * torch.randn(6, 3, generator=_g, dtype=torch.float64)
VARS = 0.05 + 0.3 * torch.rand(6, 3, generator=_g, dtype=torch.float64)
WEIGHTS = 0.5 + torch.rand(6, generator=_g, dtype=torch.float64)
CLASSES = torch.tensor([0, 0, 1, 1, 2, 2])
NULL = 3  # the null label: the marginal over all classes
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster, and the CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _components(label: int) -> torch.Tensor:
    return torch.ones(6, dtype=torch.bool) if label == NULL else CLASSES == label


def mixture(label: int) -> GaussianMixture:
    """p(x | label) (the marginal p(x) for the null label) as pflow's exact model."""
    keep = _components(label)
    return GaussianMixture(MEANS[keep], VARS[keep], WEIGHTS[keep])


def closed_eps(label: int, xbar: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """eps(xbar, sigma) = sigma sum_k r_k (xbar - mu_k) / (v_k + sigma^2), written out in
    float64 numpy: xbar (B, D), sigma a scalar or (B,)."""
    keep = _components(label).numpy()
    mu, v, w = MEANS.numpy()[keep], VARS.numpy()[keep], WEIGHTS.numpy()[keep]
    s = np.asarray(sigma, dtype=np.float64).reshape(-1, 1, 1)  # (B or 1, 1, 1)
    var = v[None] + s**2  # (B or 1, K, D)
    diff = xbar[:, None, :] - mu[None]  # (B, K, D)
    log_r = np.log(w)[None] - 0.5 * ((diff**2 / var).sum(-1) + np.log(var).sum(-1))
    r = np.exp(log_r - log_r.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    return s[:, :, 0] * (r[..., None] * diff / var).sum(1)


def closed_guided(labels, w: float, xbar: np.ndarray, sigma) -> np.ndarray:
    """The guided field for per-sample labels (one label per row of xbar)."""
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (xbar.shape[0],))
    out = np.empty_like(xbar)
    eps_u = closed_eps(NULL, xbar, sig)
    for c in set(int(c) for c in labels):
        rows = np.asarray(labels) == c
        eps_c = closed_eps(c, xbar[rows], sig[rows])
        out[rows] = eps_u[rows] + w * (eps_c - eps_u[rows])
    return out


# Each class's log mixture weights over the six components (-inf: not in the class).
LOG_WEIGHTS = torch.stack(
    [
        torch.where(_components(c), WEIGHTS.log(), torch.tensor(-math.inf, dtype=torch.float64))
        for c in range(NULL + 1)
    ]
)


class ClassGMM:
    """A class-conditional network ``net(x_t, t, class_labels)`` whose prediction is the
    exact eps of ``mixture(label)`` (label ``NULL`` or ``None``: the marginal), the
    formula in torch, vectorised over per-sample labels. Counts its calls and rows. Every
    row is computed on its own, so a sample's eps does not depend on the rest of the
    batch."""

    def __init__(self) -> None:
        self.calls = 0
        self.rows = 0

    def __call__(self, x_t, t, class_labels=None):
        self.calls += 1
        n = x_t.shape[0]
        self.rows += n
        if class_labels is None:
            class_labels = torch.tensor([NULL])
        labels = class_labels.reshape(-1).expand(n) if class_labels.numel() == 1 else class_labels
        s = SCHEDULE.t_to_sigma(t.to(torch.float64)).reshape(-1, 1, 1)
        xbar = x_t.to(torch.float64) * (1 + s[:, 0] ** 2).sqrt()
        var = VARS[None] + s**2  # (B, K, D)
        diff = xbar[:, None, :] - MEANS[None]
        log_r = LOG_WEIGHTS[labels] - 0.5 * ((diff**2 / var).sum(-1) + var.log().sum(-1))
        r = torch.softmax(log_r, dim=1)
        return (s[:, 0] * (r[..., None] * diff / var).sum(1)).to(x_t.dtype)


def class_model(labels: torch.Tensor) -> tuple[ClassGMM, pflow.EpsModel]:
    net = ClassGMM()
    return net, pflow.EpsModel(net, SCHEDULE).condition(class_labels=labels)


def _noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


LABELS7 = torch.tensor([0, 1, 2, 1, 0, 2, 2])


# ----------------------------------------------------------------- closed form


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 3.0, 7.5])
def test_guided_eps_is_the_closed_form_combination(w):
    """eps_u + w (eps_c - eps_u) of the two mixtures, in float64, at scalar sigmas and at
    one sigma per sample; and x0_hat = xbar - sigma eps of the same field."""
    cond, marg = mixture(1), mixture(NULL)
    g = pflow.Guided(cond, marg, w, batched=False)
    x = _noise(5, seed=1)
    for sigma in (0.02, 0.3, 1.0, 4.0, 60.0):
        xbar = x * math.sqrt(1 + sigma**2)
        want = closed_guided([1] * 5, w, xbar.numpy(), sigma)
        got = g(xbar, sigma).numpy()
        scale = max(1.0, np.abs(want).max())
        assert np.abs(got - want).max() <= 1e-12 * scale, sigma
        # The same from pflow's own two models, combined here.
        direct = marg(xbar, sigma) + w * (cond(xbar, sigma) - marg(xbar, sigma))
        assert (g(xbar, sigma) - direct).abs().max() <= 1e-13 * scale
        eps, x0 = g.predict_xt(x, sigma)
        assert (x0 - (xbar - sigma * eps)).abs().max() <= 1e-12 * math.sqrt(1 + sigma**2)
    sig = torch.tensor([0.02, 0.3, 1.0, 4.0, 60.0], dtype=torch.float64)
    xbar = x * (1 + sig[:, None] ** 2).sqrt()
    want = closed_guided([1] * 5, w, xbar.numpy(), sig.numpy())
    assert np.abs(g(xbar, sig).numpy() - want).max() <= 1e-12 * max(1.0, np.abs(want).max())

    # guide() of a class-conditional network (one batched call, labels per sample).
    labels = torch.tensor([0, 2, 1, 1, 0])
    net, model = class_model(labels)
    gm = pflow.guide(model, w, uncond={"class_labels": torch.tensor([NULL])})
    want = closed_guided(labels.tolist(), w, xbar.numpy(), sig.numpy())
    got = gm(xbar, sig).numpy()
    # t(sigma) and back through the schedule's table: a few ulps of sigma
    assert np.abs(got - want).max() <= 1e-11 * max(1.0, np.abs(want).max())
    assert net.calls == 1 and net.rows == (5 if w in (0.0, 1.0) else 10)


def test_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    """w = 1 samples the conditional model and w = 0 the unconditional one, bit for bit,
    at one network row per sample."""
    cond, marg = mixture(2), mixture(NULL)
    noise = _noise(6, seed=2)
    for w, alone in ((1.0, cond), (0.0, marg)):
        g = pflow.Guided(cond, marg, w, batched=False)
        for solver, kw in (("heun", {"steps": 8}), ("rk45", {"rtol": 1e-6, "atol": 1e-6})):
            res = pflow.sample(g, noise, solver, **kw)
            ref = pflow.sample(alone, noise, solver, **kw)
            assert torch.equal(res.x, ref.x), (w, solver)
            assert res.nfe == ref.nfe and res.rows == res.nfe * 6
    # The same through guide() on a conditioned network.
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    net, model = class_model(labels)
    res = pflow.sample(
        pflow.guide(model, 1.0, {"class_labels": torch.tensor([NULL])}), noise, "heun", steps=8
    )
    assert torch.equal(res.x, pflow.sample(model, noise, "heun", steps=8).x)
    assert res.rows == res.nfe * 6


def _reference_solve(labels, w, x_start, sigma_from, sigma_to):
    """The guided ODE d xbar / d sigma = eps_w(xbar, sigma) solved by scipy's DOP853 at
    rtol 1e-12 in float64, from the state x_start (network scale) at sigma_from to
    sigma_to; returns the state in the network scale at sigma_to."""
    from scipy.integrate import solve_ivp

    shape = x_start.shape
    y0 = (x_start.numpy() * math.sqrt(1 + sigma_from**2)).reshape(-1)

    def f(s, y):
        return closed_guided(labels, w, y.reshape(shape), s).reshape(-1)

    sol = solve_ivp(f, (sigma_from, sigma_to), y0, method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success, sol.message
    return torch.from_numpy(sol.y[:, -1].reshape(shape) / math.sqrt(1 + sigma_to**2))


def test_guided_ode_matches_a_float64_reference_solve():
    """pflow's rk45 at rtol = atol = 1e-10 on the w = 3 guided field against scipy's DOP853
    (rtol 1e-12) on the closed-form field. Measured: 1.9e-11 (Guided of the two mixtures,
    into sigma = 0, samples of size ~4) and 1.4e-9 (guide() of the class network,
    per-sample labels, rk45 at 1e-9, to sigma_min)."""
    noise = _noise(4, seed=3)
    g = pflow.Guided(mixture(1), mixture(NULL), 3.0, batched=False)
    res = pflow.sample(g, noise, "rk45", rtol=1e-10, atol=1e-10, last_step="solver")
    ref = _reference_solve([1] * 4, 3.0, noise, SIGMA_MAX, 0.0)
    assert (res.x - ref).abs().max() <= 1e-7
    assert res.rows == 2 * 4 * res.nfe

    labels = torch.tensor([0, 1, 2, 1])
    _, model = class_model(labels)
    gm = pflow.guide(model, 3.0, uncond={"class_labels": torch.tensor([NULL])})
    grid = torch.tensor([SIGMA_MAX, SIGMA_MIN], dtype=torch.float64)
    res = pflow.sample(gm, noise, "rk45", sigmas=grid, rtol=1e-9, atol=1e-9)
    ref = _reference_solve(labels.tolist(), 3.0, noise, SIGMA_MAX, SIGMA_MIN)
    assert (res.x - ref).abs().max() <= 1e-7
    # and guidance moved the samples: the conditional model alone (w = 1) lands far away
    plain = pflow.sample(model, noise, "rk45", sigmas=grid, rtol=1e-5, atol=1e-5)
    assert (plain.x - ref).abs().max() > 1e-2


def test_interval_guides_only_inside_it():
    """With interval (lo, hi): the guided field for lo < sigma <= hi, the conditional one
    elsewhere (per sample for a sigma per sample), and the rows to match."""
    lo, hi = 0.5, 5.0
    cond, marg = mixture(0), mixture(NULL)
    g = pflow.Guided(cond, marg, 4.0, interval=(lo, hi), batched=False)
    full = pflow.Guided(cond, marg, 4.0, batched=False)
    x = _noise(5, seed=4)
    for sigma in (0.1, lo, 0.5000001, 1.0, hi, 5.0000001, 40.0):
        xbar = x * math.sqrt(1 + sigma**2)
        inside = lo < sigma <= hi
        assert torch.equal(g(xbar, sigma), (full if inside else cond)(xbar, sigma)), sigma
        assert g.network_rows(sigma, 5) == (10 if inside else 5)
    sig = torch.tensor([0.1, 0.7, 5.0, 6.0, 2.0], dtype=torch.float64)
    inside = (sig > lo) & (sig <= hi)
    xbar = x * (1 + sig[:, None] ** 2).sqrt()
    want = torch.where(inside[:, None], full(xbar, sig), cond(xbar, sig))
    assert (g(xbar, sig) - want).abs().max() <= 1e-14 * want.abs().max()
    assert g.network_rows(sig, 5) == 5 + int(inside.sum())
    # Counted through a solve: rows = sum over evaluations of 2 or 1 per sample.
    noise = _noise(4, seed=5)
    res = pflow.sample(g, noise, "euler", steps=20)
    visited = res.sigmas[:-1]  # euler evaluates once at each sigma but the last (0)
    guided = int(((visited > lo) & (visited <= hi)).sum())
    assert res.nfe == 20 and res.rows == 4 * (20 + guided)
    assert 0 < guided < 20


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_the_formula_per_sample(phi):
    """eps = eps_w (phi std(eps_c) / std(eps_w) + 1 - phi), std over each sample's values
    (Lin et al. 2023, eq. 15-16 on eps), and x0_hat moves with it."""
    w = 5.0
    cond, marg = mixture(2), mixture(NULL)
    g = pflow.Guided(cond, marg, w, rescale=phi, batched=False)
    x = _noise(5, seed=6)
    for sigma in (0.2, 2.0, torch.tensor([0.05, 0.4, 1.5, 9.0, 80.0], dtype=torch.float64)):
        s = sigma[:, None] if isinstance(sigma, torch.Tensor) else sigma
        xbar = (x * (1 + s**2) ** 0.5).numpy()
        sn = sigma.numpy() if isinstance(sigma, torch.Tensor) else sigma
        eps_c = closed_eps(2, xbar, sn)
        eps_w = closed_guided([2] * 5, w, xbar, sn)
        factor = eps_c.std(1, keepdims=True) / eps_w.std(1, keepdims=True)
        want = eps_w * (phi * factor + 1 - phi)
        eps, x0 = g.predict_xt(x, sigma)
        assert np.abs(eps.numpy() - want).max() <= 1e-12 * np.abs(want).max()
        np.testing.assert_allclose(
            x0.numpy(), xbar - np.asarray(s) * want, rtol=0, atol=1e-12 * np.abs(xbar).max()
        )


def test_rescale_at_scale_zero_is_the_formula_whatever_the_batch():
    """w = 0 with rescale: eps_u (phi std(eps_c) / std(eps_u) + 1 - phi), the same whether
    the sigma is one for all or one per sample with some outside the interval (where
    the per-sample path evaluates both models anyway)."""
    phi, lo, hi = 0.5, 0.5, 5.0
    cond, marg = mixture(0), mixture(NULL)
    g = pflow.Guided(cond, marg, 0.0, rescale=phi, interval=(lo, hi), batched=False)
    x = _noise(3, seed=7)
    sigma = 2.0
    xbar = x.numpy() * math.sqrt(1 + sigma**2)
    eps_u, eps_c = closed_eps(NULL, xbar, sigma), closed_eps(0, xbar, sigma)
    want = eps_u * (phi * eps_c.std(1, keepdims=True) / eps_u.std(1, keepdims=True) + 1 - phi)
    one = g.predict_xt(x, sigma)[0]
    mixed = g.predict_xt(x, torch.tensor([sigma, sigma, 0.1], dtype=torch.float64))[0]
    assert np.abs(one.numpy() - want).max() <= 1e-12 * np.abs(want).max()
    assert torch.equal(one[:2], mixed[:2])
    assert g.network_rows(sigma, 3) == 6


# ----------------------------------------------------------------- diffusers


def class_unet():
    """A small randomly initialised class-conditional UNet2DModel: 10 classes and the
    null class 10 (num_class_embeds=11, class_embed_type=None: an nn.Embedding)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=11,
    )
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def cunet():
    return class_unet()


UNET_NULL = torch.tensor([10])
UNET_LABELS = torch.tensor([0, 3, 7, 3])


def test_cfg_euler_matches_a_diffusers_ddim_cfg_loop(cunet):
    """pflow.guide + euler on the DDIM grid is diffusers' DDIMScheduler driven by the CFG
    loop of its pipelines (one call on cat([x, x]) with cat([null, labels])). Measured:
    1.5e-4 at an output scale of 242 (6e-7 relative); as_network() in the same loop is
    bit-equal to it."""
    import diffusers

    w, steps = 3.0, 10
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=True,
        clip_sample=False,
    )
    scheduler.set_timesteps(steps)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    both = torch.cat([UNET_NULL.expand(4), UNET_LABELS])
    x = noise.clone()
    for t in scheduler.timesteps:
        eps_u, eps_c = cunet(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
        x = scheduler.step(eps_u + w * (eps_c - eps_u), t, x, eta=0.0).prev_sample
    ref = x

    schedule = pflow.NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    model = pflow.EpsModel(cunet, schedule).condition(class_labels=UNET_LABELS)
    grid = {"steps": steps, "spacing": "leading", "steps_offset": 1}
    scale = ref.abs().max().item()
    for batched in (True, False):
        g = pflow.guide(model, w, uncond={"class_labels": UNET_NULL}, batched=batched)
        res = pflow.sample(g, noise, "euler", **grid)
        assert res.x.dtype == torch.float32
        err = (res.x - ref).abs().max().item()
        assert err <= 2e-6 * max(1.0, scale), (batched, err, scale)
        assert res.nfe == steps and res.rows == 2 * 4 * steps
    # Guidance matters here: the conditional model alone lands elsewhere.
    plain = pflow.sample(model, noise, "euler", **grid)
    assert (plain.x - ref).abs().max() > 1e-2 * scale

    net = g.as_network()
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t), t, x, eta=0.0).prev_sample
    assert (x - ref).abs().max() <= 2e-6 * max(1.0, scale)


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_alf_round_trip_under_guidance_is_exact(cunet, dtype, bound):
    """encode with alf and decode with its companion under w = 7.5: the guided field is an
    ODE like any other, and alf retraces it to round-off. Measured max error: 3.6e-11
    (float64) and 0 (float32, whose decode feeds the network the encode's very inputs),
    data in [-1, 1]."""
    model = pflow.EpsModel(cunet, SCHEDULE).condition(class_labels=torch.tensor([2, 9]))
    g = pflow.guide(model, 7.5, uncond={"class_labels": UNET_NULL})
    if dtype == torch.float64:
        g = g.to(torch.float64)
    x0 = (2 * torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 1).to(dtype)
    enc = pflow.encode(g, x0, "alf", steps=20)
    dec = pflow.decode(g, enc.x, "alf", steps=20, companion=enc.companion)
    assert enc.x.dtype == dec.x.dtype == dtype
    err = (dec.x - x0).abs().max().item()
    assert err <= bound, err
    assert dec.nfe == enc.nfe - 1 == 20 and enc.rows == 2 * 2 * enc.nfe


# ----------------------------------------------------------------- slicing


def test_chunks_give_the_samples_of_the_whole_batch():
    """Per-sample labels travel with their samples: batch_size=3 gives the samples of the
    whole batch, bit for bit, at the same network rows in total."""
    noise = _noise(7, seed=8)
    for kw in ({}, {"interval": (0.5, 5.0)}, {"rescale": 0.5}):
        _, model = class_model(LABELS7)
        g = pflow.guide(model, 3.0, uncond={"class_labels": torch.tensor([NULL])}, **kw)
        whole = pflow.sample(g, noise, "heun", steps=10)
        split = pflow.sample(g, noise, "heun", steps=10, batch_size=3)
        assert torch.equal(whole.x, split.x), kw
        assert whole.rows == split.rows
        # and each sample is its own label's: sample 0 alone
        alone = pflow.sample(g.take(slice(0, 1)), noise[:1], "heun", steps=10)
        assert torch.equal(alone.x, whole.x[:1])


def test_per_sample_adaptive_solves_each_sample_as_alone():
    """rk45 with per_sample=True on a guided model with per-sample labels (with an
    interval, so the per-sample sigmas straddle it, and rescale): each sample is, bit for
    bit, the sample solved alone."""
    noise = _noise(3, seed=9)
    labels = torch.tensor([2, 0, 1])
    net, model = class_model(labels)
    g = pflow.guide(
        model, 3.0, uncond={"class_labels": torch.tensor([NULL])}, interval=(0.5, 5.0), rescale=0.3
    )
    kw = {"rtol": 1e-3, "atol": 1e-3, "per_sample": True}
    res = pflow.sample(g, noise, "rk45", **kw)
    sizes = set()
    for i in range(3):
        alone = pflow.sample(g.take(slice(i, i + 1)), noise[i : i + 1], "rk45", **kw)
        assert torch.equal(alone.x, res.x[i : i + 1]), i
        sizes.add(alone.nfe)
    assert len(sizes) > 1  # the samples did take different steps
    # and the labels matter: the same noise with the labels reversed lands elsewhere
    other = pflow.Guided(model.condition(class_labels=labels.flip(0)), g.unconditional, 3.0)
    assert (pflow.sample(other, noise, "rk45", **kw).x - res.x).abs().max() > 1e-2


def _rank_solves(rank: int, group) -> dict[str, tuple[torch.Tensor, int]]:
    """What rank ``rank`` of two solves: its shard of the 7 samples, with
    ``model.take(shard)`` and ``process_group``."""
    from pflow.distributed import shard

    _, model = class_model(LABELS7)
    g = pflow.guide(model, 3.0, uncond={"class_labels": torch.tensor([NULL])})
    part = shard(7, rank, 2)
    mine = slice(part.start, part.stop)
    noise = _noise(7, seed=10)[mine]
    out = {}
    for solver, kw in RANK_SOLVES:
        r = pflow.sample(g.take(mine), noise, solver, process_group=group, **kw)
        out[solver] = (r.x, r.nfe)
    return out


RANK_SOLVES = (("rk45", {"rtol": 1e-6, "atol": 1e-6}), ("heun", {"steps": 6}))

RANK_SCRIPT = """
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

torch.set_num_threads(1)
dist.init_process_group(
    "gloo", init_method="file://" + sys.argv[2], rank=1, world_size=2,
    timeout=timedelta(seconds=120),
)
from tests.test_guidance import _rank_solves

torch.save(_rank_solves(1, dist.group.WORLD), sys.argv[1])
dist.destroy_process_group()
"""


def test_two_ranks_give_the_single_process_samples(tmp_path):
    """Two gloo ranks, each solving its shard with model.take(shard) and process_group:
    the samples, and the adaptive steps, of one process holding the whole batch. Rank 1
    is a process of its own (as under torchrun, see tests/test_distributed.py); rank 0 is
    this one, which saves a second torch import on a busy machine."""
    from datetime import timedelta

    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    script, out, store = tmp_path / "rank1.py", tmp_path / "rank1.pt", tmp_path / "store"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), str(store)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=0,
            world_size=2,
            timeout=timedelta(seconds=120),
        )
        try:
            mine = _rank_solves(0, dist.group.WORLD)
        finally:
            dist.destroy_process_group()
        log = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, log[-4000:]
    theirs = torch.load(out)

    _, model = class_model(LABELS7)
    g = pflow.guide(model, 3.0, uncond={"class_labels": torch.tensor([NULL])})
    noise = _noise(7, seed=10)
    for solver, kw in RANK_SOLVES:
        one = pflow.sample(g, noise, solver, **kw)
        (x0, nfe0), (x1, nfe1) = mine[solver], theirs[solver]
        assert torch.equal(torch.cat([x0, x1]), one.x), solver
        assert nfe0 == nfe1 == one.nfe, solver
    # alone (no process_group), a shard takes the steps its own samples need
    alone = pflow.sample(g.take(slice(0, 3)), noise[:3], "rk45", **RANK_SOLVES[0][1])
    assert alone.nfe != one.nfe or not torch.equal(alone.x, one.x[:3])


def test_conditioning_rows_must_match_the_batch_before_any_call():
    net, model = class_model(torch.tensor([0, 1, 2]))
    g = pflow.guide(model, 3.0, uncond={"class_labels": torch.tensor([NULL])})
    noise = _noise(4)
    with pytest.raises(ValueError, match="conditioning has 3 rows but noise has 4 samples"):
        pflow.sample(g, noise, "heun", steps=4)
    with pytest.raises(ValueError, match="conditioning has 3 rows but x0 has 4"):
        pflow.encode(g, noise, "euler", steps=4)
    with pytest.raises(ValueError, match="conditioning has 3 rows"):
        pflow.sample(model, noise, "rk45", per_sample=True)
    # conditional and unconditional rows that disagree
    with pytest.raises(
        ValueError, match="conditional model is for 3 samples and the unconditional one for 4"
    ):
        pflow.guide(model, 3.0, uncond={"class_labels": torch.tensor([NULL] * 4)})
    # two per-sample keywords that disagree
    with pytest.raises(ValueError, match="'class_labels' has 3 rows but 'extra' has 2"):
        model.condition(class_labels=torch.tensor([0, 1, 2]), extra=torch.zeros(2, 5))
    assert net.calls == 0
    # shared (one-row) labels are for any batch
    pflow.sample(
        pflow.guide(
            model.condition(class_labels=torch.tensor([1])),
            3.0,
            {"class_labels": torch.tensor([NULL])},
        ),
        noise,
        "euler",
        steps=2,
    )
    assert net.calls == 2


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"scale": -0.5}, ValueError, "guidance scale must be a finite number >= 0, got -0.5"),
        (
            {"scale": float("nan")},
            ValueError,
            "guidance scale must be a finite number >= 0, got nan",
        ),
        (
            {"scale": float("inf")},
            ValueError,
            "guidance scale must be a finite number >= 0, got inf",
        ),
        ({"scale": "3"}, TypeError, "guidance scale must be a number, got str"),
        ({"scale": True}, TypeError, "guidance scale must be a number, got bool"),
        (
            {"interval": (200.0, 400.0)},
            ValueError,
            r"guidance interval \(200, 400\) lies outside the schedule's sigma range",
        ),
        (
            {"interval": (0.0, 0.005)},
            ValueError,
            "guidance interval .* lies outside the schedule's sigma range",
        ),
        (
            {"interval": (5.0, 1.0)},
            ValueError,
            "guidance interval must be .* sigma_lo < sigma_hi, got \\(5.0, 1.0\\)",
        ),
        ({"interval": (2.0, 2.0)}, ValueError, "guidance interval must be .*sigma_lo < sigma_hi"),
        ({"interval": (-1.0, 2.0)}, ValueError, "guidance interval must be .*0 <= sigma_lo"),
        ({"interval": (float("nan"), 2.0)}, ValueError, "guidance interval must be"),
        ({"interval": 3.0}, TypeError, "guidance interval must be a pair"),
        ({"interval": (1.0, 2.0, 3.0)}, TypeError, "guidance interval must be a pair"),
        ({"rescale": 1.5}, ValueError, r"guidance rescale must be in \[0, 1\], got 1.5"),
        ({"rescale": -0.1}, ValueError, r"guidance rescale must be in \[0, 1\], got -0.1"),
        ({"rescale": float("nan")}, ValueError, r"guidance rescale must be in \[0, 1\], got nan"),
        ({"rescale": None}, TypeError, "guidance rescale must be a number, got NoneType"),
    ],
)
def test_bad_guidance_arguments_are_named(kw, error, match):
    net, model = class_model(torch.tensor([0, 1]))
    args = {"scale": 3.0, **kw}
    with pytest.raises(error, match=match):
        pflow.guide(model, uncond={"class_labels": torch.tensor([NULL])}, **args)
    with pytest.raises(error, match=match):
        pflow.Guided(mixture(0), mixture(NULL), **args)
    assert net.calls == 0


class LooseClassGMM(ClassGMM):
    """ClassGMM that takes (and ignores) any other keyword."""

    def __call__(self, x_t, t, class_labels=None, **other):
        return super().__call__(x_t, t, class_labels)


def test_batched_guidance_needs_the_same_keywords():
    net, model = class_model(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"same keywords .* got \[\] and \['class_labels'\]"):
        pflow.guide(model, 3.0)  # uncond=None: the network called without keywords
    loose = pflow.EpsModel(LooseClassGMM(), SCHEDULE).condition(class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"got \['other'\] and \['class_labels'\]"):
        pflow.guide(loose, 3.0, uncond={"other": torch.tensor([1])})
    with pytest.raises(
        ValueError, match="'flag' differs between the conditional and the unconditional"
    ):
        pflow.guide(
            loose.condition(class_labels=torch.tensor([0, 1]), flag=True),
            3.0,
            {"class_labels": torch.tensor([NULL]), "flag": False},
        )
    # two calls take any keywords: no keywords at all is the marginal here
    g = pflow.guide(model, 3.0, batched=False)
    noise = _noise(2)
    x = g(noise, 1.0)
    want = closed_guided([0, 1], 3.0, noise.numpy(), 1.0)
    assert np.abs(x.numpy() - want).max() <= 1e-11 * np.abs(want).max()
    assert net.calls == 2


def test_conditioning_an_unconditional_network_names_the_keyword():
    """A network whose signature lacks the keyword: guide() says so, naming it, before any
    network call (for the model's conditioning and for uncond). A conditioned model used
    without guide() fails at its first call with Python's own TypeError, which names the
    keyword too (EpsModel.condition could check it as guide() does)."""
    calls = []

    def net(x_t, t):
        calls.append(x_t.shape[0])
        return torch.zeros_like(x_t)

    plain = pflow.EpsModel(net, SCHEDULE)
    labels = torch.tensor([0, 1])
    with pytest.raises(
        TypeError, match="uncond: the network does not accept the keyword 'class_labels'"
    ):
        pflow.guide(plain, 3.0, uncond={"class_labels": torch.tensor([NULL])})
    with pytest.raises(TypeError, match="the network does not accept the keyword 'class_labels'"):
        pflow.guide(plain.condition(class_labels=labels), 3.0, batched=False)
    assert calls == []
    with pytest.raises(TypeError, match="class_labels"):
        pflow.sample(plain.condition(class_labels=labels), _noise(2), "euler", steps=2)

    # A network taking the keyword, or **kwargs, passes; so does one whose signature
    # cannot be read.
    def named(x_t, t, class_labels=None):
        return torch.zeros_like(x_t)

    def loose(x_t, t, **kw):
        return torch.zeros_like(x_t)

    for ok in (named, loose, ClassGMM(), max):
        pflow.guide(
            pflow.EpsModel(ok, SCHEDULE).condition(class_labels=labels),
            3.0,
            {"class_labels": torch.tensor([NULL])},
        )
