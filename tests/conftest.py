"""Shared fixtures: exact models and a small randomly initialised diffusers UNet."""

from __future__ import annotations

import pytest
import torch

from pflow.zoo import GaussianMixture


def make_gmm(dim: int = 4, k: int = 3, seed: int = 0, full: bool = False) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(k, dim, generator=g, dtype=torch.float64)
    if full:
        a = torch.randn(k, dim, dim, generator=g, dtype=torch.float64)
        covs = a @ a.transpose(1, 2) / dim + 0.05 * torch.eye(dim, dtype=torch.float64)
    else:
        covs = 0.05 + 0.3 * torch.rand(k, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    return GaussianMixture(means, covs, weights)


@pytest.fixture
def gmm() -> GaussianMixture:
    return make_gmm()


def tiny_unet(seed: int = 0, channels: int = 3, size: int = 8):
    """A small UNet2DModel with random weights (no download)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet():
    """The random UNet the peer-equivalence tests run pflow and diffusers on."""
    return tiny_unet()


@pytest.fixture(scope="module")
def noise():
    """``x_T`` for the peer-equivalence tests: 4 draws of the UNet's (3, 8, 8)."""
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
