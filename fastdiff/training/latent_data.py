"""Training on a latent dataset (``fastdiff.prepare_data --vae``): the model's shape from the data, the
latents' info recorded in the run config, and the VAE that decodes the sample grids and the in-training
evaluation (``--vae``, by default the folder the dataset records), checked against the latents'
fingerprint."""

import dataclasses
import os

from fastdiff.config import LatentsConfig, RunConfig
from fastdiff.data.prepared import HEADER_FILENAME, read_header
from fastdiff.data.sources import source_kind
from fastdiff.runtime.latent_vae import VAE_PATH_KEY, checked_vae, dataset_latent_info


def _size_text(sides: tuple[int, int]) -> str:
    return str(sides[0]) if sides[0] == sides[1] else f"{sides[0]},{sides[1]}"


@dataclasses.dataclass
class LatentData:
    """What training on a latent dataset needs beyond the data: the VAE (None when none could be found)
    and why there is none."""

    vae: object | None
    missing: str = ""


def latent_data(config: RunConfig, given: set[str]) -> tuple[RunConfig, LatentData | None]:
    """``config`` completed from a latent prepared dataset at ``--data_dir`` (``--in_channels`` and
    ``--image_size`` from the data, the latents' info recorded, ``--vae`` resolved), and the
    :class:`LatentData`; ``(config, None)`` for data of pixels, where ``--vae`` is an error."""
    data_dir = config.train.data_dir
    latent = bool(data_dir) and source_kind(data_dir) == "prepared dataset"
    header = read_header(data_dir) if latent else None
    if header is None or header["kind"] != "latents":
        if config.latents.vae:
            what = f"the {source_kind(data_dir)} {data_dir!r}" if data_dir else "the embedded shapes dataset"
            raise ValueError(
                f"--vae {config.latents.vae!r}: {what} holds images, not latents; --vae decodes a latent "
                "dataset's samples (prepare one with fastdiff.prepare_data --vae)"
            )
        return dataclasses.replace(config, latents=LatentsConfig()), None  # no latents (nor a --config's)
    header_path = os.path.join(data_dir, HEADER_FILENAME)
    info = dataset_latent_info(data_dir, header)
    size, channels = tuple(header["image_size"]), header["channels"]
    if "image_size" in given and config.model.image_hw != size:
        raise ValueError(
            f"--image_size {_size_text(config.model.image_hw)}: the latent dataset {header_path} holds "
            f"latents of {size[0]}x{size[1]} (height x width); leave --image_size out (it comes from the "
            f"data) or give {_size_text(size)}"
        )
    if "in_channels" in given and config.model.in_channels != channels:
        raise ValueError(
            f"--in_channels {config.model.in_channels}: the latent dataset {header_path} holds latents of "
            f"{channels} channels; leave --in_channels out (it comes from the data) or give {channels}"
        )
    config = config.with_flags({"image_size": _size_text(size), "in_channels": channels})
    whose = f"the latent dataset {header_path}"
    recorded = header["metadata"].get(VAE_PATH_KEY) or ""
    vae, missing, path = None, "", config.latents.vae
    if path:
        vae = checked_vae(path, info, whose)
    elif recorded and os.path.isdir(recorded):
        path = recorded
        vae = checked_vae(recorded, info, whose, flag=f"the VAE {header_path} records (--vae's default)")
    else:
        where = f"the VAE it records, {recorded!r}, does not exist" if recorded else "it records no VAE"
        missing = f"{whose}: {where}"
    latents = dataclasses.replace(config.latents, vae=path, info=info.to_dict())
    return dataclasses.replace(config, latents=latents), LatentData(vae, missing)
