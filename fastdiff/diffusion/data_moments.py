"""A Gaussian fit of the training data, and the exact high-noise part of the sampling ODE it gives.

For data x_0 ~ N(mu, Sigma), Sigma = U diag(lambda) U^T, the probability-flow ODE is linear: in EDM's
variables (y = x_t / alpha_t at noise level s = sigma_t / alpha_t) the state that starts as s z, z standard
normal, when s -> inf is

    y(s) = mu + U diag(sqrt(lambda + s^2)) U^T z      (principal coordinate i scales as sqrt(lambda_i + s^2))

Real data is not Gaussian, but while the noise is large against the data's spread its denoiser is nearly the
Gaussian one (the x_0 prediction is the linear estimate from the mean and covariance; Wang & Vastola 2023,
"The hidden linear structure in score-based models"). So a sampler can take the flow down to a moderate
noise level in closed form and spend every model call below it (``--ode_start gaussian``). The fit keeps
the mean, the ``rank`` leading principal directions with their variances, and one variance for every other
direction (their mean), so its size is (rank + 1) x C x H x W numbers at any resolution.

``fastdiff.train`` measures the fit on its dataset before training and writes it beside the checkpoints
(:data:`MOMENTS_FILENAME`); ``python -m fastdiff.measure_moments`` measures it for a run that has none.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from fastdiff.data.images import ImageDataError
from fastdiff.data.keys import ItemKey

MOMENTS_FILENAME = "data_moments.npz"
MOMENT_ITEMS = 2048
"""Items measured (evenly spaced over the dataset), fewer when they would take more than MOMENT_BYTES."""
MOMENT_BYTES = 2**29
MOMENT_RANK = 16
"""Principal directions kept; the ODE-start KID of the main job's model is the same with 8 and 64."""
MOMENTS_FORMAT = "fastdiff-data-moments"


@dataclass(frozen=True)
class DataMoments:
    """The Gaussian fit: ``mean`` [C, H, W], ``directions`` [K, C*H*W] (orthonormal rows, leading first),
    their ``variances`` [K], the ``residual_variance`` of every other direction, measured on ``count``
    items. Float64 tensors on the CPU."""

    mean: torch.Tensor
    directions: torch.Tensor
    variances: torch.Tensor
    residual_variance: float
    count: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The items' shape (C, H, W)."""
        return tuple(self.mean.shape)

    @classmethod
    def measure(
        cls,
        dataset,
        count: int = MOMENT_ITEMS,
        rank: int = MOMENT_RANK,
        skip: tuple[type[BaseException], ...] = (),
    ) -> DataMoments:
        """The fit of ``count`` items of ``dataset`` (``dataset[ItemKey(i, 0)]`` -> (float ``[C, H, W]``,
        label)), evenly spaced over it; at most :data:`MOMENT_BYTES` of them in float32 at once. An item
        whose loading raises one of ``skip`` (an unreadable image, which training names when it meets it)
        is left out."""
        if len(dataset) < 2:
            raise ValueError(f"measuring the data's moments needs 2 items or more, got {len(dataset)}")
        shape = _item_shape(dataset, skip)
        size = math.prod(shape)
        count = max(2, min(count, len(dataset), MOMENT_BYTES // (4 * size)))
        indices = np.linspace(0, len(dataset) - 1, count).round().astype(np.int64)
        items = torch.empty(count, size, dtype=torch.float32)
        filled = 0
        for index in indices.tolist():
            try:
                items[filled] = dataset[ItemKey(index, 0)][0].reshape(-1).float()
            except skip:
                continue
            filled += 1
        if filled < 2:
            raise ValueError(f"measuring the data's moments needs 2 readable items, got {filled}")
        items, count = items[:filled], filled
        mean = sum(chunk.double().sum(0) for chunk in items.split(256)) / count  # no float64 copy of all
        items -= mean.float()
        # The principal directions from the [count, count] Gram matrix (count <= MOMENT_ITEMS << C*H*W).
        gram = (items @ items.T).double() / (count - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        keep = min(rank, count - 1, size)
        variances = eigenvalues.flip(0)[:keep].clamp_min(0.0)
        coefficients = eigenvectors.flip(1)[:, :keep].float()
        directions = (coefficients.T @ items).double()  # [K, D], orthogonal up to float32 rounding
        orthonormal, triangle = torch.linalg.qr(directions.T)  # made exactly so, keeping each direction
        directions = (orthonormal * torch.sign(torch.diagonal(triangle))).T
        total = sum(float(chunk.double().pow(2).sum()) for chunk in items.split(256)) / (count - 1)
        rest = size - keep
        residual = max(total - float(variances.sum()), 0.0) / rest if rest else 0.0
        return cls(mean.reshape(shape), directions, variances, residual, count)

    def flow_from_noise(self, noise: torch.Tensor, sigma: float, top: float = math.inf) -> torch.Tensor:
        """The fit's exact probability-flow state at noise level ``sigma`` (EDM variables: x_t = alpha_t y)
        from x_T = ``noise`` [N, C, H, W] at noise level ``top`` (the noisiest trained step's; inf: pure
        noise, y(s) of the module docstring), in ``noise``'s dtype and device. From a finite ``top`` each
        principal coordinate of y - mu scales by sqrt((lambda + sigma^2) / (lambda + top^2))."""
        if tuple(noise.shape[1:]) != self.shape:
            raise ValueError(
                f"the data moments are of items {list(self.shape)}, the samples {list(noise.shape[1:])}: "
                "they were measured on another dataset or image size"
            )
        mean = self.mean.reshape(1, -1)
        z = noise.reshape(noise.shape[0], -1).double().cpu()
        variances = torch.cat([self.variances, self.variances.new_tensor([self.residual_variance])])
        if math.isinf(top):  # (y - mu) / sqrt(lambda + s^2) -> z as s -> inf
            start, gains = z, torch.sqrt(variances + sigma * sigma)
        else:  # from y_T = x_T / alpha_T = x_T sqrt(1 + top^2)
            start = z * math.sqrt(1.0 + top * top) - mean
            gains = torch.sqrt((variances + sigma * sigma) / (variances + top * top))
        rest_gain = float(gains[-1])  # the residual directions'
        coordinates = start @ self.directions.T  # [N, K]
        y = mean + rest_gain * start + (coordinates * (gains[:-1] - rest_gain)) @ self.directions
        return y.reshape(noise.shape).to(device=noise.device, dtype=noise.dtype)

    def save(self, path: str) -> None:
        """Write the fit to ``path`` (.npz) atomically: a temporary file in the same folder, then renamed."""
        folder = os.path.dirname(os.path.abspath(path))
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".data_moments.", suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(
                    file,
                    format=np.array(MOMENTS_FORMAT),
                    mean=self.mean.numpy(),
                    directions=self.directions.numpy(),
                    variances=self.variances.numpy(),
                    residual_variance=np.array(self.residual_variance),
                    count=np.array(self.count),
                )
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise

    @classmethod
    def load(cls, path: str) -> DataMoments:
        """The fit written by :meth:`save`; a ValueError naming ``path`` when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"{path}: not a readable data-moments file ({error})") from error
        expected = {"format", "mean", "directions", "variances", "residual_variance", "count"}
        if set(arrays) != expected or str(arrays["format"]) != MOMENTS_FORMAT:
            raise ValueError(f"{path}: not a {MOMENTS_FORMAT} file (arrays {sorted(arrays)})")
        mean, directions, variances = (
            torch.from_numpy(arrays[name]).double() for name in ("mean", "directions", "variances")
        )
        residual, count = float(arrays["residual_variance"]), int(arrays["count"])
        rank = variances.shape[0] if variances.dim() == 1 else -1
        if (
            mean.dim() == 0
            or directions.shape != (rank, mean.numel())
            or not all(torch.isfinite(t).all() for t in (mean, directions, variances))
            or not (variances >= 0).all()
            or not (math.isfinite(residual) and residual >= 0)
            or count < 2
        ):
            raise ValueError(
                f"{path}: inconsistent data moments (mean {list(mean.shape)}, directions "
                f"{list(directions.shape)}, variances {list(variances.shape)}, residual {residual}, "
                f"count {count})"
            )
        return cls(mean, directions, variances, residual, count)


def _item_shape(dataset, skip: tuple[type[BaseException], ...]) -> tuple[int, ...]:
    """The shape of ``dataset``'s first item that loads (items raising one of ``skip`` are passed over)."""
    for index in range(len(dataset)):
        try:
            return tuple(dataset[ItemKey(index, 0)][0].shape)
        except skip:
            continue
    raise ValueError(f"measuring the data's moments: none of the {len(dataset)} items could be read")


def moments_for_run(dataset, log_dir: str, write: bool) -> tuple[DataMoments, str]:
    """The run's fit and how it was got: :data:`MOMENTS_FILENAME` in ``log_dir`` when it is there and fits
    ``dataset``'s items (a resumed run keeps its own), else measured on ``dataset`` (unreadable images left
    out: training names them when it meets them) and, when ``write`` (the main process), written there."""
    path = os.path.join(log_dir, MOMENTS_FILENAME)
    if os.path.isfile(path):
        moments = DataMoments.load(path)
        if moments.shape == _item_shape(dataset, (ImageDataError,)):
            return moments, f"read from {path}"
    moments = DataMoments.measure(dataset, skip=(ImageDataError,))
    if write:
        os.makedirs(log_dir, exist_ok=True)
        moments.save(path)
    return moments, f"measured on {moments.count} items, written to {path}"


def moments_beside(path: str) -> DataMoments | None:
    """The fit in :data:`MOMENTS_FILENAME` in the folder of ``path`` (a checkpoint); None if it has none."""
    candidate = os.path.join(os.path.dirname(os.path.abspath(path)), MOMENTS_FILENAME)
    return DataMoments.load(candidate) if os.path.isfile(candidate) else None
