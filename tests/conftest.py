"""Shared fixtures: exact models, a small randomly initialised diffusers UNet and a tiny
Stable Diffusion pipeline."""

from __future__ import annotations

import json

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
    import diffusers

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


# ------------------------------------------------------------------ the tiny SD pipeline

#: Stable Diffusion's schedule (scaled linear betas 0.00085..0.012).
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def tiny_clip_tokenizer(folder):
    """A CLIPTokenizer over single letters (no merges), its files written into ``folder``."""
    import transformers

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in letters:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16
    )


def tiny_vae():
    """An AutoencoderKL with random weights: 4 latent channels, a scale factor of 2."""
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def tiny_sd_pipeline(folder):
    """A Stable Diffusion pipeline a few kB in size (random weights, seeded): 8x8 latents,
    16x16 images, a one-layer CLIP text encoder over a letters-only vocabulary (written
    into ``folder``), and the DDIMScheduler config Stable Diffusion ships (leading,
    steps_offset=1, ending at the first training step's sigma)."""
    import diffusers
    import transformers

    tokenizer = tiny_clip_tokenizer(folder)
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=len(tokenizer),
            max_position_embeddings=16,
        )
    ).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=8,
        attention_head_dim=4,
    ).eval()
    scheduler = diffusers.DDIMScheduler(
        **SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
