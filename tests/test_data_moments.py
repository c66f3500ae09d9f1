"""The data's Gaussian fit (fastdiff.diffusion.data_moments) and the ODE's Gaussian start (--ode_start):
the fit against float64 eigendecompositions, its exact flow against matrix square roots and the closed-form
Gaussian map, the start's grids and flags, its file, and its path from fastdiff.train to fastdiff.sample."""

import itertools
import math
import os

import numpy as np
import pytest
import torch
from tiny_run import TINY_RUN_ARGV, one_thread  # noqa: F401 (one_thread: autouse)

from fastdiff import measure_moments, sample, train
from fastdiff.builders import build_model
from fastdiff.config import ConfigError, SamplingConfig
from fastdiff.data.images import ImageDataError
from fastdiff.data.keys import ItemKey
from fastdiff.diffusion import create_gaussian_diffusion
from fastdiff.diffusion.data_moments import MOMENTS_FILENAME, DataMoments, moments_beside
from fastdiff.diffusion.gaussian_reference import GaussianData
from fastdiff.diffusion.sampling import (
    Denoiser,
    NoiseSchedule,
    gaussian_start,
    resolved_sigma_min,
    sample_batch,
    sampling_grid,
)

DATA = GaussianData.log_uniform(12, 0.05, 2.0, seed=5, mean=0.3)
CPU = type("Context", (), {"rank": 0, "world_size": 1, "is_main": False, "device": torch.device("cpu")})()


class Items(torch.utils.data.Dataset):
    """A dataset of given float tensors ``[N, ...]`` (label 0), keyed as fastdiff's datasets are."""

    def __init__(self, items: torch.Tensor) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        return self.items[ItemKey.of(key).index], 0


def _random_items(count=300, shape=(2, 3, 5), seed=0) -> torch.Tensor:
    """Correlated items: a random mixing of independent coordinates with spread-out scales, plus a mean."""
    generator = torch.Generator().manual_seed(seed)
    size = math.prod(shape)
    mixing = torch.randn(size, size, generator=generator, dtype=torch.float64) / math.sqrt(size)
    scales = torch.logspace(0, -2, size, dtype=torch.float64)
    latent = torch.randn(count, size, generator=generator, dtype=torch.float64) * scales
    return (latent @ mixing.T + 0.4).reshape(count, *shape).float()


def test_the_fit_is_the_leading_eigenpairs_of_the_items_covariance_and_the_rest_is_their_mean():
    items = _random_items()
    moments = DataMoments.measure(Items(items), count=len(items), rank=6)
    flat = items.reshape(len(items), -1).double().numpy()
    covariance = np.cov(flat, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    assert moments.shape == (2, 3, 5) and moments.count == len(items)
    np.testing.assert_allclose(moments.mean.reshape(-1).numpy(), flat.mean(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(moments.variances.numpy(), eigenvalues[:6], rtol=1e-4)
    alignment = np.abs(np.sum(moments.directions.numpy() * eigenvectors[:, :6].T, axis=1))
    np.testing.assert_allclose(alignment, 1.0, atol=1e-4)  # the same directions, up to sign
    np.testing.assert_allclose(moments.directions @ moments.directions.T, np.eye(6), atol=1e-9)
    assert moments.residual_variance == pytest.approx(eigenvalues[6:].mean(), rel=1e-4)


def test_measure_spaces_items_evenly_and_caps_them():
    items = _random_items(count=50)
    seen = []

    class Watched(Items):
        def __getitem__(self, key):
            seen.append(ItemKey.of(key).index)
            return super().__getitem__(key)

    moments = DataMoments.measure(Watched(items), count=11, rank=3)
    assert moments.count == 11 and seen[1:] == np.linspace(0, 49, 11).round().astype(int).tolist()
    assert moments.directions.shape == (3, 30)
    with pytest.raises(ValueError, match="needs 2 items or more, got 1"):
        DataMoments.measure(Items(items[:1]))

    class Unreadable(Items):  # items 0 and 10 fail as a corrupt image does
        def __getitem__(self, key):
            if ItemKey.of(key).index in (0, 10):
                raise ImageDataError("bad_0.png: cannot identify image file")
            return super().__getitem__(key)

    with pytest.raises(ImageDataError, match=r"bad_0\.png"):
        DataMoments.measure(Unreadable(items), count=11)
    skipped = DataMoments.measure(Unreadable(items), count=11, rank=3, skip=(ImageDataError,))
    assert skipped.count == 9 and skipped.shape == (2, 3, 5)


@pytest.mark.parametrize("top", [math.inf, 155.0, 3.0])
def test_the_flow_from_noise_is_the_gaussian_probability_flow(top):
    """Against the matrix form: y(s) = mu + C(s)^(1/2) C(top)^(-1/2) (y_T - mu), C(s) = Sigma + s^2 I, with
    Sigma the fit's covariance (from pure noise: mu + C(s)^(1/2) z)."""
    moments = DataMoments.measure(Items(_random_items()), count=300, rank=5)
    directions, variances = moments.directions, moments.variances
    size = directions.shape[1]
    sigma_matrix = directions.T @ torch.diag(variances) @ directions
    sigma_matrix += moments.residual_variance * (
        torch.eye(size, dtype=torch.float64) - directions.T @ directions
    )

    def root(matrix, power):
        values, vectors = torch.linalg.eigh(matrix)
        return vectors @ torch.diag(values**power) @ vectors.T

    noise = torch.randn(7, *moments.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z, mu = noise.reshape(7, -1), moments.mean.reshape(1, -1)
    for s in (0.5, 2.0, 40.0):
        grown = root(sigma_matrix + s * s * torch.eye(size, dtype=torch.float64), 0.5)
        if math.isinf(top):
            expected = mu + z @ grown
        else:
            shrink = root(sigma_matrix + top * top * torch.eye(size, dtype=torch.float64), -0.5)
            expected = mu + (z * math.sqrt(1 + top * top) - mu) @ shrink @ grown
        got = moments.flow_from_noise(noise, s, top).reshape(7, -1)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert moments.flow_from_noise(noise.float(), 1.0).dtype == torch.float32
    with pytest.raises(ValueError, match=r"items \[2, 3, 5\], the samples \[3, 2, 5\]"):
        moments.flow_from_noise(torch.zeros(1, 3, 2, 5), 1.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "zero-snr"])
def test_the_gaussian_start_is_exact_on_gaussian_data(schedule):
    """With the exact fit the state at the first grid point is the exact flow of x_T, so a converged solve
    from there lands on the exact probability-flow map; its grid spends every model call below the start."""
    zero_snr = schedule == "zero-snr"
    diffusion = create_gaussian_diffusion(
        steps=1000, noise_schedule="linear" if zero_snr else schedule, predict_v=zero_snr,
        rescale_zero_terminal_snr=zero_snr,
    )  # fmt: skip
    table = NoiseSchedule.from_diffusion(diffusion)
    noise = torch.randn(64, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    moments = DATA.moments()
    target = DATA.flow(table, noise, table.point(0))
    errors = []
    for steps in (5, 10, 20, 40, 80):
        out = sample_batch(
            DATA.model(diffusion), diffusion, noise.shape, sampler="unipc", steps=steps, noise=noise,
            clip_denoised=False, data_moments=moments,
        )  # fmt: skip
        errors.append((out - target).pow(2).mean().sqrt().item())
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-4
    # A rank-4 fit (the rest one variance) is only approximate: from s = 2 it lands far further away.
    exact, rough = (
        sample_batch(
            DATA.model(diffusion),
            diffusion,
            noise.shape,
            sampler="unipc",
            steps=80,
            noise=noise,
            clip_denoised=False,
            data_moments=fit,
            sigma_max=2.0,
        )
        for fit in (moments, DATA.moments(rank=4))
    )
    exact_error, rough_error = ((out - target).pow(2).mean().sqrt().item() for out in (exact, rough))
    assert exact_error < 1e-4 and rough_error > 100 * exact_error


def test_the_gaussian_grid_and_the_model_calls():
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    table = NoiseSchedule.from_diffusion(diffusion)
    grid = sampling_grid(table, 10, "capped_logsnr", 0.0, "unipc", gaussian=True)
    levels = [point.sigma / point.alpha for point in grid]
    assert len(grid) == 10 and levels[0] == pytest.approx(3.0) and grid[-1] == table.point_at_sigma(0.0256)
    np.testing.assert_allclose(np.diff(np.log(levels)), math.log(0.0256 / 3.0) / 9, rtol=1e-9)
    assert sampling_grid(table, 1, "capped_logsnr", 4.0, "euler", gaussian=True) == [
        table.point_at_sigma(4.0)
    ]
    heun = sampling_grid(table, 8, "capped_karras", 0.0, "heun", gaussian=True)  # 15 calls, 8 points: 2.4
    assert heun[0].sigma / heun[0].alpha == pytest.approx(2.4) and heun[-1] == table.point_at_sigma(
        resolved_sigma_min(table, 15)
    )
    calls = []
    original = Denoiser.__call__

    def counted(self, x, point):
        calls.append(point)
        return original(self, x, point)

    noise = torch.randn(4, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sampler, steps, expected in (("unipc", 5, 5), ("dpmpp_3m", 6, 6), ("heun", 4, 7), ("euler", 3, 3)):
        calls.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Denoiser, "__call__", counted)
            sample_batch(
                DATA.model(diffusion), diffusion, noise.shape, sampler=sampler, steps=steps, noise=noise,
                data_moments=DATA.moments(),
            )  # fmt: skip
        assert len(calls) == expected and max(p.sigma / p.alpha for p in calls) < 3.0 + 1e-9


def test_auto_starts_from_the_fit_only_for_an_ode_sampler_on_a_capped_grid():
    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="cosine")
    model, moments = DATA.model(diffusion), DATA.moments()
    noise = torch.randn(8, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def draw(**options):
        return sample_batch(model, diffusion, noise.shape, noise=noise, clip_denoised=False, **options)

    # No fit: auto is noise, bit for bit; a fit changes an ODE sampler's capped grid and nothing else.
    assert torch.equal(draw(sampler="unipc", steps=6), draw(sampler="unipc", steps=6, ode_start="noise"))
    assert not torch.equal(
        draw(sampler="unipc", steps=6), draw(sampler="unipc", steps=6, data_moments=moments)
    )
    assert torch.equal(
        draw(sampler="unipc", steps=6, data_moments=moments, ode_start="noise"),
        draw(sampler="unipc", steps=6),
    )
    for options in (dict(sampler="ddim", steps=6), dict(sampler="unipc", steps=6, timestep_spacing="logsnr")):
        assert torch.equal(draw(**options), draw(**options, data_moments=moments))
    assert gaussian_start("auto", "dpmpp_2m", "capped_karras", moments)
    assert not gaussian_start("auto", "dpmpp_2m", "karras", moments)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(ode_start="gaussian"),
            r"--ode_start gaussian needs the data's Gaussian fit \(data_moments.npz",
        ),
        (dict(ode_start="gaussian", sampler="ddim"), "--ode_start gaussian starts the ODE of a capped grid"),
        (dict(ode_start="gaussian", timestep_spacing="logsnr"), "got unipc on logsnr"),
        (dict(ode_start="data"), r"--ode_start must be one of \['auto', 'noise', 'gaussian'\], got 'data'"),
        (dict(sigma_max=0.02, moments=True), r"--sigma_min 0.0256 \(where the grid ends\) must lie below"),
    ],
)
def test_bad_gaussian_starts_name_the_flag(options, message):
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    moments = DATA.moments() if options.pop("moments", False) else None
    options = {"sampler": "unipc", "steps": 10, **options}
    with pytest.raises(ValueError, match=message):
        sample_batch(DATA.model(diffusion), diffusion, (2, 12), data_moments=moments, **options)
    if options.get("ode_start", "auto") not in (
        "auto",
        "noise",
        "gaussian",
    ):  # the config refuses it when built
        with pytest.raises(ConfigError, match="ode_start must be one of"):
            SamplingConfig(**options)
        return
    preview = SamplingConfig(**options)
    prefixed = message.replace("--", "--preview_")
    with pytest.raises(ValueError, match=prefixed):
        preview.check_against(diffusion, flag_prefix="preview_", data_moments=moments)


def test_the_file_round_trips_and_bad_files_are_named(tmp_path):
    moments = DataMoments.measure(Items(_random_items()), count=100, rank=4)
    path = str(tmp_path / MOMENTS_FILENAME)
    moments.save(path)
    assert os.listdir(tmp_path) == [MOMENTS_FILENAME]  # no temporary file left
    loaded = DataMoments.load(path)
    for name in ("mean", "directions", "variances"):
        assert torch.equal(getattr(loaded, name), getattr(moments, name))
    assert (loaded.residual_variance, loaded.count) == (moments.residual_variance, moments.count)
    assert moments_beside(str(tmp_path / "ema_0.9999_000010.pt")).shape == moments.shape
    assert moments_beside(str(tmp_path / "elsewhere" / "model.pt")) is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"bad.npz: not a readable data-moments file"):
        DataMoments.load(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"other.npz: not a fastdiff-data-moments file"):
        DataMoments.load(str(tmp_path / "other.npz"))
    with np.load(path) as data:
        arrays = dict(data)
    arrays["directions"] = arrays["directions"][:, :-1]
    np.savez(tmp_path / "cut.npz", **arrays)
    with pytest.raises(ValueError, match=r"cut.npz: inconsistent data moments"):
        DataMoments.load(str(tmp_path / "cut.npz"))


def test_training_writes_the_fit_and_sampling_starts_from_it(tmp_path, capsys):
    """fastdiff.train measures the fit before training and writes it beside the checkpoints; its grids and
    fastdiff.sample start from it; a resumed run keeps it; measure_moments rewrites it for an earlier run."""
    run = ["--max_steps", "2", "--save_interval", "2", "--batch_size", "4", "--sample_interval", "2"]
    assert train.main([*TINY_RUN_ARGV, *run, "--preview_steps", "6", "--log_dir", str(tmp_path)]) == 0
    path = tmp_path / MOMENTS_FILENAME
    written = DataMoments.load(str(path))
    assert written.shape == (3, 8, 8) and "Gaussian fit measured on" in capsys.readouterr().out
    config, _ = train.parse_args([*TINY_RUN_ARGV, "--preview_steps", "6"])
    model = build_model(config.model, config.diffusion)
    assert train.build_previews(config, model, written)[1]["data_moments"] is written  # grids, evaluation
    model_path = str(tmp_path / "ema_0.9999_000002.pt")
    config, given = sample.parse_args(["--model_path", model_path, "--sampler", "unipc", "--steps", "6"])
    setup = sample.prepare(config, given, model_path, CPU)
    assert torch.equal(setup.data_moments.mean, written.mean)
    before = os.stat(path).st_mtime_ns
    resume = ["--resume_checkpoint", str(tmp_path / "state000002.pt"), "--max_steps", "4"]
    assert train.main([*TINY_RUN_ARGV, *run[2:], *resume, "--log_dir", str(tmp_path)]) == 0
    assert os.stat(path).st_mtime_ns == before and "Gaussian fit read from" in capsys.readouterr().out
    os.remove(path)
    assert measure_moments.main(["--model_path", model_path, "--num_items", "64"]) == 0
    assert DataMoments.load(str(path)).count == 64
    with pytest.raises(ValueError, match=r"no run_config\.json beside it"):
        measure_moments.main(["--model_path", str(tmp_path / "nowhere" / "model.pt")])
    # Moments of another item shape beside a model are refused, naming the file to remove or remeasure.
    DataMoments.measure(Items(_random_items(count=10)), count=10).save(str(path))
    with pytest.raises(ValueError, match=r"data moments beside --model_path .* are of items \[2, 3, 5\]"):
        sample.prepare(config, given, model_path, CPU)


def test_a_fit_the_main_process_cannot_get_stops_every_rank(monkeypatch):
    """The main process raises its own error; the other ranks get its message (tests/test_train_ddp.py
    checks that one process measures and every rank holds its fit)."""
    sent = []

    def fail(*args, **kwargs):
        raise ValueError("measuring the data's moments needs 2 items or more, got 1")

    monkeypatch.setattr(train, "moments_for_run", fail)
    monkeypatch.setattr(train.dist_util, "broadcast_object", lambda message: sent.append(message) or message)
    with pytest.raises(ValueError, match="needs 2 items or more, got 1"):
        train.shared_moments([None], "log", is_main=True)
    assert sent == ["ValueError: measuring the data's moments needs 2 items or more, got 1"]
    monkeypatch.setattr(train.dist_util, "broadcast_object", lambda nothing: sent[0])  # what rank 0 sent
    expected = "the main process could not get the data's Gaussian fit: ValueError: measuring"
    with pytest.raises(RuntimeError, match=f"^{expected}"):
        train.shared_moments([None], "log", is_main=False)
