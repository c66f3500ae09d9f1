"""Training objectives and options of issue 13: min-SNR-gamma weights, zero-terminal-SNR betas, EMA warm-up,
class dropout, their bad input, and a tiny run with each flag that trains, resumes exactly and samples."""

import math

import numpy as np
import pytest
import torch
from test_train_resume import TINY, assert_identical
from tiny_run import one_thread  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import sample, train
from fastdiff.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    create_gaussian_diffusion,
    get_named_beta_schedule,
    rescale_zero_terminal_snr,
)
from fastdiff.script_util import create_model
from fastdiff.training.class_dropout import drop_class_labels
from fastdiff.training.ema import ParameterEMA, warmup_decay


class FixedOutput:
    def __init__(self, output):
        self.output = output

    def __call__(self, x, t, **kwargs):
        return self.output


# ---------------------------------------------------------------- min-SNR-gamma and v


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_min_snr_weighted_losses_against_hand_derived_values(mean_type):
    gamma = 5.0
    betas = np.linspace(1e-3, 0.2, 30)
    enum = {"eps": ModelMeanType.EPSILON, "x0": ModelMeanType.START_X, "v": ModelMeanType.VELOCITY}[mean_type]
    weighted = GaussianDiffusion(
        betas=betas, model_mean_type=enum, model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE,
        snr_gamma=gamma,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x0, noise, output = (torch.randn(4, 2, 3, dtype=torch.float64, generator=gen) for _ in range(3))
    t = torch.tensor([0, 5, 17, 29])
    losses = weighted.training_losses(FixedOutput(output), x0, t, noise=noise)
    for i, step in enumerate(t.tolist()):
        ab = float(np.prod(1 - betas[: step + 1]))
        snr = ab / (1 - ab)
        target = {
            "eps": noise[i],
            "x0": x0[i],
            "v": math.sqrt(ab) * noise[i] - math.sqrt(1 - ab) * x0[i],
        }[mean_type]
        weight = {"eps": min(snr, gamma) / snr, "x0": min(snr, gamma), "v": min(snr, gamma) / (snr + 1)}[
            mean_type
        ]
        expected = weight * ((target - output[i]) ** 2).mean().item()
        assert losses["loss"][i].item() == pytest.approx(expected, rel=1e-10)


def test_min_snr_eps_weight_is_one_where_snr_is_zero():
    diffusion = create_gaussian_diffusion(
        steps=50, predict_v=True, rescale_zero_terminal_snr=True, snr_gamma=5
    )
    t = torch.tensor([49])
    like = torch.zeros(1, 2)
    assert diffusion.min_snr_weight(t, like).item() == 0.0  # v: min(0, gamma) / 1
    eps = create_gaussian_diffusion(steps=50, snr_gamma=5)
    eps_zero = GaussianDiffusion(
        betas=diffusion.betas, model_mean_type=ModelMeanType.EPSILON, model_var_type=eps.model_var_type,
        loss_type=LossType.MSE, snr_gamma=5.0,
    )  # fmt: skip
    assert eps_zero.min_snr_weight(t, like).item() == 1.0


def test_defaults_keep_improved_diffusions_objective():
    plain = create_gaussian_diffusion(steps=50)
    assert plain.snr_gamma is None and plain.model_mean_type == ModelMeanType.EPSILON


# ---------------------------------------------------------------- zero terminal SNR


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_betas(schedule):
    betas = get_named_beta_schedule(schedule, 1000)
    rescaled = rescale_zero_terminal_snr(betas)
    alpha_bar = np.cumprod(1.0 - rescaled)
    assert alpha_bar[-1] == 0.0 and rescaled[-1] == 1.0
    assert alpha_bar[0] == pytest.approx(np.cumprod(1.0 - betas)[0], rel=1e-12)
    # sqrt(alpha_bar) is an affine map of the original: (s - s_T) * s_0 / (s_0 - s_T)
    original = np.sqrt(np.cumprod(1.0 - betas))
    expected = (original - original[-1]) * original[0] / (original[0] - original[-1])
    np.testing.assert_allclose(np.sqrt(alpha_bar), expected, rtol=1e-9, atol=1e-15)
    assert np.all(np.diff(alpha_bar) < 0) and np.all((rescaled > 0) & (rescaled <= 1))
    diffusion = create_gaussian_diffusion(
        steps=1000, noise_schedule=schedule, predict_v=True, rescale_zero_terminal_snr=True
    )
    assert diffusion.alphas_cumprod[-1] == 0.0
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    t = torch.tensor([999, 999])
    assert torch.equal(diffusion.q_sample(x0, t, noise=noise), noise)  # pure noise at the last step
    eps = diffusion._predict_eps_from_xstart(noise, t, x0)
    assert torch.equal(eps, noise)  # no 0/0 where alpha_bar = 0
    losses = diffusion.training_losses(FixedOutput(torch.zeros(2, 3)), x0, t, noise=noise)
    torch.testing.assert_close(losses["loss"], (x0**2).mean(1))  # v = -x_0 there


def test_bad_objective_flags():
    with pytest.raises(ValueError, match="predict_v True"):
        create_gaussian_diffusion(steps=50, rescale_zero_terminal_snr=True)
    with pytest.raises(ValueError, match="exclusive"):
        create_gaussian_diffusion(steps=50, predict_v=True, predict_xstart=True)
    with pytest.raises(ValueError, match="snr_gamma"):
        create_gaussian_diffusion(steps=50, snr_gamma=-1.0)
    with pytest.raises(ValueError, match="snr_gamma"):
        GaussianDiffusion(
            betas=np.linspace(1e-3, 0.02, 10), model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE, snr_gamma=0.0,
        )  # fmt: skip
    for prob in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"class_dropout_prob must be in \[0, 1\)"):
            create_model(8, 32, 1, class_cond=True, channel_mult="1,2", class_dropout_prob=prob)
    with pytest.raises(ValueError, match="class_cond True"):
        create_model(8, 32, 1, channel_mult="1,2", class_dropout_prob=0.1)


# ---------------------------------------------------------------- EMA warm-up and class dropout


def test_ema_warmup_decays_and_exact_state():
    assert warmup_decay(0.9999, 0) == 0.0
    assert warmup_decay(0.9999, 7) == pytest.approx(1 - 8 ** (-2 / 3))
    assert warmup_decay(0.99, 10**6) == 0.99
    model = torch.nn.Linear(3, 2)
    ema = ParameterEMA(model, [0.9, 0.999], warmup=True)
    shadows = [[p.detach().clone() for p in model.parameters()] for _ in range(2)]
    for update in range(5):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        ema.update(model)
        for index, rate in enumerate((0.9, 0.999)):
            decay = min(rate, 1 - (1 + update) ** (-2 / 3))
            for shadow, param in zip(shadows[index], model.parameters(), strict=True):
                shadow.mul_(decay).add_(param.detach(), alpha=1 - decay)
    for index in range(2):
        for value, shadow in zip(ema.shadows[index], shadows[index], strict=True):
            torch.testing.assert_close(value, shadow)
    restored = ParameterEMA(model, [0.9, 0.999], warmup=True)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 5
    with pytest.raises(ValueError, match="ema_warmup"):
        ParameterEMA(model, [0.9, 0.999]).load_state_dict(ema.state_dict())


def test_ema_warmup_skipped_steps_change_nothing_and_do_not_advance_the_count():
    """A step skipped on the device (non-finite) leaves the averages and the warm-up count as they were:
    the updates that follow match an EMA that never saw the skipped steps."""
    model = torch.nn.Linear(3, 2)
    skipping = ParameterEMA(model, [0.9, 0.999], warmup=True)
    plain = ParameterEMA(model, [0.9, 0.999], warmup=True)
    for skip in (False, True, True, False, False, True, False):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        skipping.update(model, skip=torch.tensor(skip))
        if not skip:
            plain.update(model)
    assert int(skipping.num_updates) == plain.num_updates == 4
    for ours, theirs in zip(skipping.shadows, plain.shadows, strict=True):
        for value, expected in zip(ours, theirs, strict=True):
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    assert skipping.state_dict()["num_updates"] == 4


def test_class_dropout_depends_on_position_only():
    y = torch.arange(40) % 5
    whole = drop_class_labels(y, 0.3, 5, seed=1, step=7, first=0)
    parts = torch.cat(
        [drop_class_labels(y[:13], 0.3, 5, 1, 7, 0), drop_class_labels(y[13:], 0.3, 5, 1, 7, 13)]
    )
    assert torch.equal(whole, parts)
    dropped = whole == 5
    assert torch.equal(whole[~dropped], y[~dropped]) and 0 < dropped.sum() < 40
    many = drop_class_labels(torch.zeros(20000, dtype=torch.long), 0.3, 5, 0, 0, 0)
    assert abs((many == 5).double().mean().item() - 0.3) < 5 * math.sqrt(0.21 / 20000)
    assert torch.equal(drop_class_labels(y, 0.0, 5, 1, 7, 0), y)


# ---------------------------------------------------------------- tiny runs with each flag

FLAG_RUNS = {
    "class_dropout": ["--class_cond", "True", "--class_dropout_prob", "0.5"],
    "predict_v": ["--predict_v", "True"],
    "snr_gamma": ["--snr_gamma", "5"],
    "zero_terminal_snr": ["--predict_v", "True", "--rescale_zero_terminal_snr", "True"],
    "ema_warmup": ["--ema_warmup", "True"],
}
SAMPLE_FLAGS = {
    "class_dropout": ["--guidance_scale", "2", "--sampler", "dpmpp_2m", "--steps", "5"],
    "predict_v": ["--sampler", "heun", "--steps", "4", "--timestep_spacing", "karras"],
    "snr_gamma": ["--use_ddim", "True", "--steps", "5"],
    "zero_terminal_snr": ["--sampler", "euler", "--steps", "6", "--timestep_spacing", "quadratic"],
    "ema_warmup": ["--steps", "3"],
}


@pytest.mark.parametrize("name", list(FLAG_RUNS))
def test_each_training_flag_trains_resumes_exactly_and_samples(name, tmp_path):
    flags = FLAG_RUNS[name]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*TINY, *flags, "--save_interval", "4"]
    assert train.main([*common, "--log_dir", str(straight), "--max_steps", "4"]) == 0
    assert train.main([*common, "--log_dir", str(resumed), "--max_steps", "2"]) == 0
    assert train.main([*common, "--log_dir", str(resumed), "--max_steps", "4"]) == 0
    for file in (
        "model000004.pt",
        "ema_0.9_000004.pt",
        "ema_0.99_000004.pt",
        "opt000004.pt",
        "state000004.pt",
    ):
        if file == "state000004.pt":
            a = torch.load(straight / file, weights_only=False)
            b = torch.load(resumed / file, weights_only=False)
            assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 4
            assert a["ema"]["warmup"] == (name == "ema_warmup")
            continue
        assert_identical(straight / file, resumed / file)
    out = tmp_path / "samples"
    argv = ["--model_path", str(straight / "ema_0.9_000004.pt"), "--num_samples", "2", "--batch_size", "2"]
    assert sample.main([*argv, *SAMPLE_FLAGS[name], "--out_dir", str(out), "--grid_samples", "0"]) == 0
    images = np.load(next(out.glob("samples_*.npz")))["arr_0"]
    assert images.shape == (2, 8, 8, 3)


def test_bad_flags_fail_before_training(tmp_path):
    log_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="--snr_gamma must be > 0"):
        train.main([*TINY, "--log_dir", log_dir, "--snr_gamma", "0"])
    with pytest.raises(ValueError, match=r"class_dropout_prob must be in \[0, 1\)"):
        train.main([*TINY, "--log_dir", log_dir, "--class_cond", "True", "--class_dropout_prob", "1"])
    with pytest.raises(ValueError, match="--preview_sampler must be one of"):
        train.main([*TINY, "--log_dir", log_dir, "--sample_interval", "2", "--preview_sampler", "plms"])
    with pytest.raises(ValueError, match="--preview_guidance_scale other than 1 needs a class-conditional"):
        train.main([*TINY, "--log_dir", log_dir, "--sample_interval", "2", "--preview_guidance_scale", "3"])
    assert not (tmp_path / "run" / "state000001.pt").exists()


def test_bad_sampling_flags(tmp_path):
    run = tmp_path / "run"
    assert train.main([*TINY, "--log_dir", str(run), "--max_steps", "1"]) == 0
    argv = ["--model_path", str(run / "model000001.pt"), "--num_samples", "2", "--out_dir", str(tmp_path)]
    for extra, match in [
        (["--guidance_scale", "2"], "class-conditional"),
        (["--steps", "51"], "exceeds the 50 trained timesteps"),
        (["--sampler", "heun", "--steps", "1"], "needs --steps >= 2"),
        (["--timestep_spacing", "karras"], "karras"),
        (["--use_ddim", "True", "--sampler", "heun"], "--use_ddim True asks for DDIM"),
        (["--sampler", "dpmpp_3m", "--steps", "2"], "--sampler dpmpp_3m needs --steps >= 3"),
        (
            ["--sampler", "unipc", "--steps", "2", "--solver_order", "3"],
            "--solver_order 3 needs --steps >= 3",
        ),
        (["--sampler", "unipc", "--sigma_max", "1e6"], "--sigma_max 1000000.0 is beyond this schedule"),
        (
            ["--sampler", "unipc", "--timestep_spacing", "logsnr", "--sigma_max", "5"],
            "--sigma_max applies to",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            sample.main([*argv, *extra])
    assert not list(tmp_path.glob("samples_*"))
    assert sample.main([*argv, "--sampler", "unipc", "--steps", "4", "--solver_order", "2"]) == 0
    assert list(tmp_path.glob("samples_*.npz"))


def test_preview_grids_take_the_sampling_flags(tmp_path):
    run = tmp_path / "run"
    preview = ["--sample_interval", "2", "--num_preview_samples", "4", "--preview_steps", "5"]
    preview += [
        "--preview_sampler",
        "heun",
        "--preview_timestep_spacing",
        "karras",
        "--preview_guidance_scale",
        "3",
    ]
    flags = ["--class_cond", "True", "--class_dropout_prob", "0.2", "--max_steps", "2", *preview]
    assert train.main([*TINY, *flags, "--log_dir", str(run)]) == 0
    assert (run / "samples_000002.png").exists()
