"""Keyed per-sample noise (pflow.noise): the right law, independent streams, and draws
that depend on the sample's key alone, never on the batch it is drawn in."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import pflow
from pflow.noise import KeyedNormal, keyed_randn, noise_keys


def test_draws_are_standard_normal():
    z = keyed_randn(noise_keys(3, 400), (500,), dtype=torch.float64).reshape(-1).numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # The tails are there: |z| > 4 has probability 6.3e-5, so ~13 of 200000.
    assert 3 <= int((abs(z) > 4).sum()) <= 30


@pytest.mark.parametrize(
    "other",
    [
        lambda: keyed_randn(noise_keys(3, range(1, 401)), (500,), dtype=torch.float64),
        lambda: keyed_randn(noise_keys(3, 400), (500,), stream=1, dtype=torch.float64),
        lambda: keyed_randn(noise_keys(4, 400), (500,), dtype=torch.float64),
    ],
    ids=["neighbouring sample", "next stream", "next seed"],
)
def test_neighbouring_keys_streams_and_seeds_are_uncorrelated(other):
    z = keyed_randn(noise_keys(3, 400), (500,), dtype=torch.float64).reshape(-1)
    w = other().reshape(-1)
    r = torch.corrcoef(torch.stack([z, w]))[0, 1].item()
    assert abs(r) < 5 / math.sqrt(z.numel())
    # Elements within one sample are uncorrelated with their neighbours too.
    r_in = torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()
    assert abs(r_in) < 5 / math.sqrt(z.numel())


def test_a_sample_depends_on_its_key_only():
    full = keyed_randn(noise_keys(0, 50), (3, 4, 4), stream=2)
    for lo, hi in [(0, 1), (7, 8), (10, 33), (33, 50)]:
        part = keyed_randn(noise_keys(0, range(lo, hi)), (3, 4, 4), stream=2)
        assert torch.equal(part, full[lo:hi])
    shuffled = torch.tensor([9, 2, 40])
    assert torch.equal(keyed_randn(noise_keys(0, shuffled), (3, 4, 4), stream=2), full[shuffled])
    # Seed 0's keys are the indices themselves (EDM's "seeds 0-49999").
    assert torch.equal(noise_keys(0, 5), torch.arange(5))


def test_distinct_keys_get_distinct_noise():
    """The per-sample state is 64 bits: no two of 200000 samples share their first words."""
    words = KeyedNormal(noise_keys(0, 200_000)).words(2, stream=0)
    packed = words[:, 0] * 2**32 + words[:, 1]
    assert packed.unique().numel() == 200_000


def test_dtype_and_device_follow_the_request():
    z = keyed_randn([1, 2], (3,), dtype=torch.float16)
    assert z.dtype == torch.float16 and z.shape == (2, 3)
    z64 = keyed_randn([1, 2], (3,), dtype=torch.float64)
    assert torch.equal(z, z64.to(torch.float16))


def test_odd_sizes_and_scalars():
    z = keyed_randn(noise_keys(1, 3), (7,))
    assert z.shape == (3, 7)
    assert torch.isfinite(z).all()
    assert keyed_randn(noise_keys(1, 3), ()).shape == (3,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_match_cpu():
    cpu = keyed_randn(noise_keys(0, 64), (3, 8, 8), dtype=torch.float64)
    gpu = keyed_randn(noise_keys(0, 64), (3, 8, 8), dtype=torch.float64, device="cuda")
    assert torch.allclose(cpu, gpu.cpu(), rtol=0, atol=1e-12)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="seed must be an integer"):
        noise_keys(-1, 3)
    with pytest.raises(ValueError, match="seed must be an integer"):
        noise_keys(2**31, 3)
    with pytest.raises(ValueError, match="indices"):
        noise_keys(0, 0)
    with pytest.raises(ValueError, match="indices"):
        noise_keys(0, [2**32])
    with pytest.raises(ValueError, match="keys must be"):
        keyed_randn(torch.tensor([1.0, 2.0]), (3,))
    with pytest.raises(ValueError, match="keys must be >= 0"):
        keyed_randn(torch.tensor([-1]), (3,))
    with pytest.raises(ValueError, match="stream"):
        keyed_randn([1], (3,), stream=-1)


def test_public_names():
    assert pflow.noise_keys is noise_keys and pflow.keyed_randn is keyed_randn
