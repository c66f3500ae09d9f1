"""The VAE of a latent-diffusion run, as train, sample and evaluate use it: found, loaded, checked against
the latents' fingerprint, and turned into a decoder of sampled latents.

fastdiff.latents (and so diffusers) is imported only when a run works on latents: a model of pixels needs
neither.
"""

import os
from collections.abc import Callable
from typing import Any

import torch

from fastdiff.data.prepared import HEADER_FILENAME, PreparedDataError

LATENT_INFO_KEY = "latent_info"
"""The key of a latent dataset's ``metadata`` (dataset.json) holding its ``LatentInfo.to_dict()``."""
VAE_PATH_KEY = "vae_path"
"""The key of a latent dataset's ``metadata`` holding the VAE folder as prepare_data was given it."""

Decoder = Callable[[torch.Tensor], torch.Tensor]
"""Normalised latents ``[B, C, h, w]`` -> images ``[B, C', h * f, w * f]`` in [-1, 1]."""


def dataset_latent_info(path: str, header: dict[str, Any]):
    """The ``LatentInfo`` in the metadata of the latent prepared dataset at ``path`` (its checked
    ``header``); a PreparedDataError naming dataset.json when it is missing or malformed."""
    from fastdiff.latents import LatentInfo

    header_path = os.path.join(path, HEADER_FILENAME)
    data = header["metadata"].get(LATENT_INFO_KEY)
    if data is None:
        raise PreparedDataError(
            f"{header_path}: a latent dataset must record its latent info (metadata.{LATENT_INFO_KEY}); "
            "prepare it with fastdiff.prepare_data --vae"
        )
    try:
        info = LatentInfo.from_dict(data, f"{header_path} metadata.{LATENT_INFO_KEY}")
    except ValueError as error:
        raise PreparedDataError(str(error)) from None
    if info.latent_channels != header["channels"]:
        raise PreparedDataError(
            f"{header_path}: the latent info has {info.latent_channels} latent channels but the data "
            f"{header['channels']}"
        )
    return info


def open_vae(path: str, flag: str = "--vae"):
    """The AutoencoderKL in the folder ``path``; a ValueError naming ``flag`` when it cannot be loaded."""
    from fastdiff.latents import load_vae

    try:
        return load_vae(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag} {path!r}: {error}") from None


def checked_vae(path: str, info, whose: str, flag: str = "--vae"):
    """The VAE at ``path`` after checking that it made the latents ``info`` describes (``whose``: a
    dataset's or a run's file); a ValueError naming ``flag`` and both fingerprints otherwise."""
    from fastdiff.latents import check_vae_matches

    vae = open_vae(path, flag)
    try:
        check_vae_matches(vae, info, whose)
    except ValueError as error:
        raise ValueError(f"{flag} {path!r}: {error}") from None
    return vae


def decoder(vae, device: torch.device, batch_size: int = 16) -> Decoder:
    """``vae`` moved to ``device``, as a function of sampled latents (see :data:`Decoder`); it decodes in
    the VAE's float32 weights whatever autocast is in force."""
    from fastdiff.latents import decode_latents

    vae = vae.to(device)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=False):
            return decode_latents(vae, latents.float(), batch_size=batch_size)

    return decode
