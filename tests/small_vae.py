"""A small randomly initialised diffusers AutoencoderKL, saved to a folder as ``save_pretrained`` writes it,
shared by the latent and VAE-patch tests. Nothing is downloaded."""

from pathlib import Path

import torch


def small_vae_config(**overrides) -> dict:
    """AutoencoderKL kwargs: two levels (32, 64 channels; downsampling factor 2), one ResnetBlock2D per
    level, 32 groups, the mid-block attention, 4 latent channels; updated by ``overrides``."""
    config = dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=32,
        latent_channels=4,
    )
    config.update(overrides)
    return config


def small_vae(seed: int = 0, **overrides):
    """The small AutoencoderKL (eval mode) with weights drawn from ``seed``. Its GroupNorm affine
    parameters are drawn too (diffusers initialises them to 1 and 0), so a kernel that ignored them would
    show."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):  # the caller's random stream goes on untouched
        torch.manual_seed(seed)
        vae = AutoencoderKL(**small_vae_config(**overrides))
        with torch.no_grad():
            for name, parameter in vae.named_parameters():
                if "norm" in name:
                    offset = 1.0 if name.endswith("weight") else 0.0
                    parameter.copy_(torch.randn_like(parameter) * 0.2 + offset)
    return vae.eval()


def save_small_vae(folder: Path, seed: int = 0, **overrides) -> Path:
    """Save :func:`small_vae` to ``folder`` with ``save_pretrained``; returns ``folder``."""
    small_vae(seed, **overrides).save_pretrained(folder)
    return folder
