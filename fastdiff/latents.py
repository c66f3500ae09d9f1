"""The VAE of latent diffusion as fastdiff uses it: a diffusers ``AutoencoderKL`` read from a local folder.

* :func:`load_vae` reads the folder (``from_pretrained`` with ``local_files_only=True``: nothing is
  downloaded) and refuses, naming the path, a missing folder, a folder that is not a diffusers model, a
  model of another class, and weights that do not fill the model (missing or unexpected keys).
* :func:`vae_fingerprint` hashes the weights (names, shapes, dtypes, bytes) and the config fields that
  change the encoding; a dataset or run encoded with one VAE keeps it, and :func:`check_vae_matches`
  refuses another VAE.
* :func:`encode_images` maps images ``[B, C, H, W]`` in [-1, 1] to normalised latents ``[B, latent_channels,
  H/f, W/f]``; :func:`decode_latents` maps them back to images in [-1, 1].
* :class:`LatentInfo` (scaling, shift, channels, downsampling factor, fingerprint) is what a prepared
  dataset and a run config store about their latents; it round-trips through JSON.

Encoding takes the posterior **mean**, not a sample. LDM's and Stable Diffusion's training scripts draw a
sample of the posterior ``N(mean, std^2)`` at every step from images encoded on the fly; a prepared
dataset encodes each image once, so a stored sample would freeze one draw (no augmentation) while making
the dataset depend on a random seed. The mean is deterministic: the same images and VAE give the same
latents. Training on it leaves out the posterior noise that a per-step sample adds; for a VAE trained with a
small KL weight, as Stable Diffusion's (1e-6 in LDM's kl-f8 config), that noise is expected to be small, but
fastdiff has not measured it.

Normalisation, as diffusers' pipelines do it: with ``scaling_factor`` s and ``shift_factor`` m (0 when the
config has none), ``latents = (z - m) * s`` and ``z = latents / s + m``. A VAE whose config has per-channel
``latents_mean`` and ``latents_std`` (as SDXL-style pipelines read them) uses ``latents = (z - mean) * s /
std`` instead; a config with both a ``shift_factor`` and ``latents_mean`` is refused as ambiguous.
"""

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

try:
    from diffusers import AutoencoderKL
    from diffusers.utils import is_accelerate_available
except ImportError as error:  # the optional dependency is missing
    raise ImportError("fastdiff.latents needs diffusers: pip install 'fastdiff[diffusers]'") from error

Tensor = torch.Tensor

VAE_CLASS = "AutoencoderKL"
WEIGHTS_NAME = "diffusion_pytorch_model"
WEIGHTS_HINT = "config.json and diffusion_pytorch_model.safetensors, as AutoencoderKL.save_pretrained writes"

ENCODING_CONFIG_FIELDS = ("latent_channels", "scaling_factor", "shift_factor", "latents_mean", "latents_std")
"""Config fields of an AutoencoderKL that change what its latents mean (hashed into the fingerprint)."""

FINGERPRINT_VERSION = b"fastdiff.vae_fingerprint/1\n"

LATENT_INFO_FORMAT = "fastdiff.latent_info"
LATENT_INFO_VERSION = 1

RANGE_TOLERANCE = 1e-3
"""How far outside [-1, 1] an image value may lie (rounding) before encode_images refuses the images."""


# --- loading -----------------------------------------------------------------------------------------


def load_vae(path: str | os.PathLike) -> AutoencoderKL:
    """The ``AutoencoderKL`` saved in the folder ``path``, in eval mode, without gradients, on the CPU.

    Weights load in float32 (diffusers' default, whatever dtype they were saved in); cast the model after
    fingerprinting it. Raises ``FileNotFoundError`` for a missing path, ``NotADirectoryError`` for a file,
    ``ValueError`` for a folder that is not a diffusers model, holds another model class, or whose weights
    are missing, unreadable or do not match its config.
    """
    folder = Path(path)
    expected = f"expected a folder holding a diffusers {VAE_CLASS} ({WEIGHTS_HINT})"
    if not folder.exists():
        raise FileNotFoundError(f"VAE folder {folder} does not exist; {expected}")
    if not folder.is_dir():
        raise NotADirectoryError(f"VAE path {folder} is a file, not a folder; {expected}")
    _check_config(folder, expected)
    if not any(folder.glob(f"{WEIGHTS_NAME}*")):
        raise ValueError(f"{folder} has a config.json but no weights ({WEIGHTS_NAME}*); {expected}")
    try:
        vae, loading = AutoencoderKL.from_pretrained(
            str(folder),
            local_files_only=True,
            output_loading_info=True,
            low_cpu_mem_usage=is_accelerate_available(),
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise ValueError(f"cannot load the {VAE_CLASS} in {folder}: {error}; {expected}") from error
    problems = [
        f"{label}: {_some(loading.get(key, []))}"
        for key, label in (
            ("missing_keys", "weights missing from the file"),
            ("unexpected_keys", "weights the model does not have"),
            ("mismatched_keys", "weights of another shape"),
            ("error_msgs", "load errors"),
        )
        if loading.get(key)
    ]
    if problems:
        raise ValueError(f"the weights in {folder} do not fill its {VAE_CLASS}: {'; '.join(problems)}")
    vae.eval().requires_grad_(False)
    return vae


def _check_config(folder: Path, expected: str) -> None:
    """Refuse ``folder`` unless its config.json names an AutoencoderKL."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        hint = ""
        if (folder / "model_index.json").is_file() and (folder / "vae" / "config.json").is_file():
            hint = f"; it holds a diffusers pipeline: pass its VAE folder, {folder / 'vae'}"
        raise ValueError(f"{folder} is not a diffusers model folder: it has no config.json{hint}; {expected}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not a readable JSON file ({error}); {expected}") from error
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ValueError(f"{config_file} names no diffusers model class (_class_name); {expected}")
    if config["_class_name"] != VAE_CLASS:
        raise ValueError(
            f"{folder} holds a diffusers {config['_class_name']}, not an {VAE_CLASS}; {expected}"
        )


def _some(items: list, limit: int = 5) -> str:
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_vae(vae: object, name: str = "vae") -> AutoencoderKL:
    """``vae`` when it is a diffusers AutoencoderKL, else a ``TypeError`` naming ``name``."""
    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"{name} must be a diffusers {VAE_CLASS}, got {type(vae).__name__}")
    return vae


# --- fingerprint and latent info -------------------------------------------------------------------


def _encoding_config(vae: AutoencoderKL) -> dict[str, Any]:
    """The config fields that change the encoding, as JSON values (tuples as lists, absent as None)."""
    config = vae.config
    values = {}
    for key in ENCODING_CONFIG_FIELDS:
        value = config.get(key)
        values[key] = list(value) if isinstance(value, (tuple, list)) else value
    return values


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """64 hex digits: SHA-256 of ``vae``'s state dict (every name, shape, dtype and the bytes, in name
    order) and of its config's latent channels, scaling and shift factors and latent mean/std.

    Equal for the same weights loaded twice (and before and after ``apply_fastdiff``, which keeps the
    state dict); different when one weight, its dtype or one of those config fields differs. Tensors on
    another device are copied to the CPU one at a time.
    """
    check_vae(vae)
    digest = hashlib.sha256(FINGERPRINT_VERSION)
    digest.update(json.dumps(_encoding_config(vae), sort_keys=True).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"\n{name}|{list(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def downsampling_factor(vae: AutoencoderKL) -> int:
    """How many image pixels one latent covers along each side: 2 per downsampling encoder block."""
    blocks = check_vae(vae).encoder.down_blocks
    return 2 ** sum(getattr(block, "downsamplers", None) is not None for block in blocks)


def _optional_floats(value: Any, field: str, source: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"{source}: field '{field}' must be a non-empty list of numbers or null, got {value!r}"
        )
    return tuple(_finite(item, f"{field}[{index}]", source) for index, item in enumerate(value))


def _finite(value: Any, field: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{source}: field '{field}' must be a finite number, got {value!r}")
    return float(value)


def _positive_int(value: Any, field: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: field '{field}' must be a positive integer, got {value!r}")
    return value


FINGERPRINT_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LatentScaling:
    """How VAE latents ``z`` become the diffusion model's latents, and back.

    ``latents = (z - shift) * scaling_factor / std`` per channel, where ``shift`` is ``latents_mean`` when
    given, else ``shift_factor`` (None: 0), and ``std`` is ``latents_std`` (None: 1). Checked on creation
    (``ValueError`` naming the field).
    """

    latent_channels: int
    scaling_factor: float
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self._validate(type(self).__name__)

    @classmethod
    def checked(cls, values: dict[str, Any], source: str) -> "LatentScaling":
        """A scaling from ``values`` (one per field), checked with ``source`` in the errors."""
        scaling = object.__new__(cls)
        for name in SCALING_FIELDS:
            object.__setattr__(scaling, name, values[name])
        scaling._validate(source)
        return scaling

    def _validate(self, source: str) -> None:
        set_ = object.__setattr__
        channels = _positive_int(self.latent_channels, "latent_channels", source)
        scaling = _finite(self.scaling_factor, "scaling_factor", source)
        if scaling == 0:
            raise ValueError(f"{source}: field 'scaling_factor' must not be 0")
        set_(self, "scaling_factor", scaling)
        if self.shift_factor is not None:
            set_(self, "shift_factor", _finite(self.shift_factor, "shift_factor", source))
        for field in ("latents_mean", "latents_std"):
            values = _optional_floats(getattr(self, field), field, source)
            if values is not None and len(values) != channels:
                raise ValueError(
                    f"{source}: field '{field}' has {len(values)} values for {channels} latent channels"
                )
            set_(self, field, values)
        if self.latents_std is not None and self.latents_mean is None:
            raise ValueError(f"{source}: field 'latents_std' is given without 'latents_mean'")
        if self.latents_std is not None and any(value <= 0 for value in self.latents_std):
            raise ValueError(f"{source}: field 'latents_std' must be positive, got {list(self.latents_std)}")
        if self.latents_mean is not None and self.shift_factor is not None:
            raise ValueError(
                f"{source}: both 'shift_factor' and 'latents_mean' are set; which one shifts the latents "
                "is ambiguous"
            )

    @classmethod
    def from_vae(cls, vae: AutoencoderKL) -> "LatentScaling":
        """The scaling of ``vae``'s config; ``ValueError`` naming the VAE when its config has none valid."""
        config = _encoding_config(check_vae(vae))
        try:
            return cls(**config)
        except ValueError as error:
            where = vae.config.get("_name_or_path") or "the VAE"
            raise ValueError(f"the config of {where} cannot encode latents: {error}") from None

    def normalise(self, z: Tensor) -> Tensor:
        """VAE latents ``z [B, C, h, w]`` -> the diffusion model's latents, float32."""
        shift, scale = self._affine(z.device)
        return (z.float() - shift) * scale

    def denormalise(self, latents: Tensor) -> Tensor:
        """The diffusion model's latents ``[B, C, h, w]`` -> VAE latents, float32."""
        shift, scale = self._affine(latents.device)
        return latents.float() / scale + shift

    def _affine(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(shift, scale), each float32 ``[C, 1, 1]`` on ``device``."""
        channels = self.latent_channels
        shift = self.latents_mean or (self.shift_factor or 0.0,) * channels
        std = torch.tensor(self.latents_std or (1.0,) * channels, dtype=torch.float64)
        scale = (self.scaling_factor / std).to(torch.float32)
        return (
            torch.tensor(shift, dtype=torch.float32, device=device).view(-1, 1, 1),
            scale.to(device).view(-1, 1, 1),
        )


SCALING_FIELDS = tuple(spec.name for spec in fields(LatentScaling))


@dataclass(frozen=True)
class LatentInfo:
    """What latents were made with: the VAE's normalisation (:class:`LatentScaling`), the downsampling
    factor and the VAE's fingerprint.

    Images of ``H x W`` give latents ``[latent_channels, H / downsampling_factor, W /
    downsampling_factor]``. Every field is checked on creation (``ValueError`` naming it).
    """

    scaling_factor: float
    shift_factor: float | None
    latent_channels: int
    downsampling_factor: int
    fingerprint: str
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self._validate(type(self).__name__)

    def _validate(self, source: str) -> None:
        scaling = LatentScaling.checked({name: getattr(self, name) for name in SCALING_FIELDS}, source)
        for name in SCALING_FIELDS:
            object.__setattr__(self, name, getattr(scaling, name))
        factor = _positive_int(self.downsampling_factor, "downsampling_factor", source)
        if factor & (factor - 1):
            raise ValueError(f"{source}: field 'downsampling_factor' must be a power of two, got {factor}")
        if not isinstance(self.fingerprint, str) or not FINGERPRINT_PATTERN.fullmatch(self.fingerprint):
            raise ValueError(
                f"{source}: field 'fingerprint' must be 64 lowercase hex digits (vae_fingerprint), "
                f"got {self.fingerprint!r}"
            )

    @property
    def scaling(self) -> LatentScaling:
        return LatentScaling(**{name: getattr(self, name) for name in SCALING_FIELDS})

    @classmethod
    def from_vae(cls, vae: AutoencoderKL, fingerprint: str | None = None) -> "LatentInfo":
        """The info of the latents :func:`encode_images` makes with ``vae`` (``fingerprint``: its
        :func:`vae_fingerprint`, computed here when not given)."""
        scaling = LatentScaling.from_vae(vae)
        return cls(
            **{name: getattr(scaling, name) for name in SCALING_FIELDS},
            downsampling_factor=downsampling_factor(vae),
            fingerprint=vae_fingerprint(vae) if fingerprint is None else fingerprint,
        )

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(latent_channels, height / f, width / f)`` for images of ``height x width``; ``ValueError`` when
        a side does not divide by the downsampling factor f."""
        return self.latent_channels, *_latent_size(height, width, self.downsampling_factor)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": LATENT_INFO_FORMAT, "version": LATENT_INFO_VERSION}
        for key, value in asdict(self).items():
            data[key] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "LatentInfo":
        """The info :meth:`to_dict` wrote; ``source`` (a file name) goes into every error."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: latent info must be a JSON object, got {type(data).__name__}")
        if data.get("format") != LATENT_INFO_FORMAT:
            raise ValueError(
                f"{source}: field 'format' must be {LATENT_INFO_FORMAT!r}, got {data.get('format')!r}"
            )
        if data.get("version") != LATENT_INFO_VERSION:
            raise ValueError(
                f"{source}: latent info version {data.get('version')!r} is not the version this fastdiff "
                f"reads ({LATENT_INFO_VERSION})"
            )
        names = {spec.name for spec in fields(cls)}
        unknown = sorted(set(data) - names - {"format", "version"})
        missing = sorted(names - set(data))
        if unknown:
            raise ValueError(f"{source}: unknown latent info field(s) {', '.join(unknown)}")
        if missing:
            raise ValueError(f"{source}: missing latent info field(s) {', '.join(missing)}")
        info = object.__new__(cls)
        for name in names:
            object.__setattr__(info, name, data[name])
        info._validate(source)
        return info

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> "LatentInfo":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: latent info is not valid JSON ({error})") from None
        return cls.from_dict(data, source)


def _latent_size(height: int, width: int, factor: int) -> tuple[int, int]:
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} does not divide by the VAE's downsampling factor {factor}"
        )
    return height // factor, width // factor


def check_vae_matches(vae: AutoencoderKL, info: LatentInfo, name: str) -> None:
    """Raise ``ValueError`` unless ``vae`` is the VAE whose latents ``info`` describes.

    ``name`` says whose latents they are (a prepared dataset's or a run's file), for the error, which names
    both fingerprints and where ``vae`` was loaded from. A matching fingerprint whose other fields disagree
    with ``vae``'s config (an edited file) is refused too.
    """
    check_vae(vae)
    if not isinstance(info, LatentInfo):
        raise TypeError(f"info must be a LatentInfo, got {type(info).__name__}")
    fingerprint = vae_fingerprint(vae)
    where = vae.config.get("_name_or_path") or "given"
    if fingerprint != info.fingerprint:
        raise ValueError(
            f"the VAE {where} (fingerprint {fingerprint[:16]}) is not the VAE {name} was encoded with "
            f"(fingerprint {info.fingerprint[:16]}); use that VAE, or encode the data again with this one"
        )
    actual = LatentInfo.from_vae(vae, fingerprint)
    differing = [
        f"{spec.name} {getattr(info, spec.name)!r} (the VAE's: {getattr(actual, spec.name)!r})"
        for spec in fields(LatentInfo)
        if getattr(info, spec.name) != getattr(actual, spec.name)
    ]
    if differing:
        raise ValueError(
            f"{name}: the latent info disagrees with the config of the VAE {where}: {'; '.join(differing)}"
        )


# --- encoding and decoding -------------------------------------------------------------------------


def _placement(vae: AutoencoderKL) -> tuple[torch.device, torch.dtype]:
    parameter = next(vae.parameters())
    return parameter.device, parameter.dtype


def _check_batch(value: object, name: str, channels: int, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 4 or value.shape[1] != channels:
        raise ValueError(f"{name} must be {what} [B, {channels}, H, W], got shape {list(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return value


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _check_finite(result: Tensor, vae: AutoencoderKL, what: str) -> None:
    if not torch.isfinite(result).all():
        _, dtype = _placement(vae)
        raise FloatingPointError(
            f"the VAE's {what} holds NaN or infinite values with its weights in {dtype}; "
            "run it in float32 (or bfloat16, whose range is float32's)"
        )


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: Tensor, *, batch_size: int = 16) -> Tensor:
    """Images -> normalised latents: the posterior mean of each image, shifted and scaled (module docstring).

    ``images``: float ``[B, in_channels, H, W]`` with values in [-1, 1] (uint8 pixels p as ``p / 127.5 -
    1``), H and W divisible by the downsampling factor f. Returns float32 ``[B, latent_channels, H / f, W /
    f]`` on ``images``' device. The VAE runs where its weights are, in their dtype, ``batch_size`` images
    at a time, under ``torch.no_grad``.
    """
    check_vae(vae)
    images = _check_batch(images, "images", vae.config.in_channels, "a batch of images")
    low, high = images.min().item(), images.max().item()
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            "images must hold values in [-1, 1] (uint8 pixels p as p / 127.5 - 1), "
            f"got values in [{low:.4g}, {high:.4g}]"
        )
    scaling = LatentScaling.from_vae(vae)
    _latent_size(images.shape[2], images.shape[3], downsampling_factor(vae))
    device, dtype = _placement(vae)
    latents = []
    for chunk in images.split(_check_batch_size(batch_size)):
        z = vae.encode(chunk.to(device=device, dtype=dtype)).latent_dist.mean
        _check_finite(z, vae, "encoding")
        latents.append(scaling.normalise(z).to(images.device))
    return torch.cat(latents)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: Tensor, *, batch_size: int = 16) -> Tensor:
    """Normalised latents (as :func:`encode_images` makes them) -> images in [-1, 1].

    ``latents``: float ``[B, latent_channels, h, w]``. Returns float32 ``[B, out_channels, h * f, w * f]``
    on ``latents``' device, clamped to [-1, 1] (the decoder's output is not bounded; a non-finite value is
    an error, not clamped). The VAE runs where its weights are, in their dtype, ``batch_size`` at a time,
    under ``torch.no_grad``.
    """
    check_vae(vae)
    scaling = LatentScaling.from_vae(vae)
    latents = _check_batch(latents, "latents", scaling.latent_channels, "a batch of latents")
    device, dtype = _placement(vae)
    images = []
    for chunk in latents.split(_check_batch_size(batch_size)):
        z = scaling.denormalise(chunk.to(device)).to(dtype)
        decoded = vae.decode(z).sample
        _check_finite(decoded, vae, "decoding")
        images.append(decoded.float().clamp(-1, 1).to(latents.device))
    return torch.cat(images)
