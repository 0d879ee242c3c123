"""Property tests: any shape with batch first, dtype and device kept, samples independent
of the rest of the batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pflow

from .conftest import make_gmm

FIXED = ["euler", "heun", "midpoint", "rk4"]
GMM = make_gmm(dim=6, k=2, seed=4)
SHAPES = [(6,), (2, 3), (1, 2, 3), (3, 1, 2)]


@settings(max_examples=25, deadline=None)
@given(
    solver=st.sampled_from(FIXED + ["rk45", "bosh3"]),
    batch=st.integers(1, 5),
    shape=st.sampled_from(SHAPES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    spacing=st.sampled_from(pflow.grids.SPACINGS),
    steps=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_shape_dtype_device_kept(solver, batch, shape, dtype, spacing, steps, seed):
    noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    if solver in ("rk45", "bosh3"):
        res = pflow.sample(GMM, noise, solver, rtol=1e-3, atol=1e-3)
    else:
        res = pflow.sample(GMM, noise, solver, steps=steps, spacing=spacing)
        assert res.n_accepted == len(res.sigmas) - 1
    assert res.x.shape == noise.shape
    assert res.x.dtype == dtype
    assert res.x.device == noise.device
    assert torch.isfinite(res.x).all()
    assert res.sigmas.dtype == torch.float64 and res.sigmas[-1] == 0


@settings(max_examples=20, deadline=None)
@given(
    solver=st.sampled_from(FIXED),
    batch=st.integers(2, 6),
    steps=st.integers(1, 12),
    spacing=st.sampled_from(pflow.grids.SPACINGS),
    seed=st.integers(0, 2**16),
)
def test_fixed_step_sample_does_not_depend_on_the_batch(solver, batch, steps, spacing, seed):
    noise = torch.randn(
        batch, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    together = pflow.sample(GMM, noise, solver, steps=steps, spacing=spacing).x
    for i in range(batch):
        alone = pflow.sample(GMM, noise[i : i + 1], solver, steps=steps, spacing=spacing).x
        assert torch.allclose(alone[0], together[i], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", FIXED)
def test_nfe_is_counted_not_computed(solver):
    calls = []

    class Counting:
        schedule = GMM.schedule

        def __call__(self, xbar, sigma):
            calls.append(sigma)
            return GMM(xbar, sigma)

    noise = torch.randn(3, 6, dtype=torch.float64)
    res = pflow.sample(Counting(), noise, solver, steps=6)
    assert res.nfe == len(calls)
    stages = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}[solver]
    # the last step, into sigma = 0, is one Euler step (EDM's Algorithm 1)
    assert res.nfe == stages * 5 + 1
    # a plain callable (no predict_xt) gives the same answer as the GaussianMixture
    assert torch.allclose(res.x, pflow.sample(GMM, noise, solver, steps=6).x, atol=1e-12)


def test_trajectory_only_when_asked():
    noise = torch.randn(2, 6, dtype=torch.float64)
    assert pflow.sample(GMM, noise, "heun", steps=4).trajectory is None
    res = pflow.sample(GMM, noise, "heun", steps=4, return_trajectory=True)
    assert res.trajectory.shape == (5, 2, 6)
    assert torch.equal(res.trajectory[0], noise) and torch.equal(res.trajectory[-1], res.x)
