"""fastdiff.diffusion.sampling: every sampler against exact denoisers of Gaussian data, convergence orders,
DDPM/DDIM unchanged, guidance, grids and bad input.

For x_0 ~ N(m, S) and x_t = alpha x_0 + sigma eps, E[x_0 | x_t] = m + alpha S (alpha^2 S + sigma^2 I)^-1
(x_t - alpha m): the perfectly trained model. For a mixture of Gaussians the same holds per component,
weighted by each component's posterior probability. The probability-flow ODE of a Gaussian is solved in
closed form: in EDM's variables (y = x_t / alpha, s = sigma / alpha), y - m shrinks along each eigenvector
of S (variance v) as sqrt(v + s^2).
"""

import itertools
import math
import os

import numpy as np
import pytest
import torch

from fastdiff.config import SamplingConfig
from fastdiff.diffusion import create_gaussian_diffusion
from fastdiff.diffusion.sampling import (
    MIN_STEPS,
    SAMPLERS,
    GuidedModel,
    NoiseSchedule,
    check_sampling_options,
    resolve_spacing,
    sample_batch,
    sampling_grid,
    step_indices,
)
from fastdiff.unet import UNetModel

MEAN = torch.tensor([0.3, -0.2], dtype=torch.float64)
COV = torch.tensor([[0.25, 0.1], [0.1, 0.16]], dtype=torch.float64)
EYE = torch.eye(2, dtype=torch.float64)

# A two-component mixture: equal weights, means +-MIX_OFFSET, covariance MIX_COV each.
MIX_OFFSET = torch.tensor([0.5, 0.3], dtype=torch.float64)
MIX_COV = 0.02 * EYE


def gaussian_x0(x, alpha, sigma, mean=MEAN, cov=COV):
    """E[x_0 | x_t = x] for x_0 ~ N(mean, cov): [N, 2]."""
    gain = alpha * cov @ torch.linalg.inv(alpha**2 * cov + sigma**2 * EYE)
    return mean + (x - alpha * mean) @ gain.T


def mixture_x0(x, alpha, sigma):
    """E[x_0 | x_t = x] for the two-component mixture: [N, 2]."""
    log_weights, means = [], []
    for sign in (1.0, -1.0):
        centre = sign * MIX_OFFSET
        marginal = alpha**2 * MIX_COV + sigma**2 * EYE
        diff = x - alpha * centre
        log_weights.append(-0.5 * (diff @ torch.linalg.inv(marginal) * diff).sum(1))
        means.append(gaussian_x0(x, alpha, sigma, centre, MIX_COV))
    weights = torch.softmax(torch.stack(log_weights, 1), dim=1)
    return weights[:, :1] * means[0] + weights[:, 1:] * means[1]


def exact_model(diffusion, target="eps", x0_fn=gaussian_x0, learned_sigma=False):
    """The perfectly trained model for the diffusion's schedule, called with its model timesteps."""
    schedule = NoiseSchedule.from_diffusion(diffusion)
    finite = np.isfinite(schedule.edm_sigmas())
    log_sigmas = np.log(schedule.edm_sigmas()[finite])
    times = schedule.model_timesteps[finite]

    def model(x, t, **kwargs):
        step = float(t[0])
        if not finite[-1] and step >= schedule.model_timesteps[-1]:
            alpha, sigma = 0.0, 1.0
        else:
            s = math.exp(np.interp(step, times, log_sigmas))
            alpha, sigma = 1.0 / math.sqrt(1.0 + s * s), s / math.sqrt(1.0 + s * s)
        x0 = x0_fn(x, alpha, sigma)
        eps = (x - alpha * x0) / sigma
        out = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[target]
        # LEARNED_RANGE output -1: the posterior variance (what sigma_small fixes), for ddpm
        return torch.cat([out, -torch.ones_like(out)], 1) if learned_sigma else out

    return model


def start_noise(count, seed=0):
    return torch.randn(count, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- distributions at nominal steps

NOMINAL = {"ddpm": 1000, "ddim": 50, "dpmpp_2m": 20, "dpmpp_3m": 15, "unipc": 10, "heun": 20, "euler": 50}
"""Steps at which each sampler is used (of 1000 trained linear steps); heun's 20 cost 39 model calls."""
SPACING = {
    "ddpm": "uniform", "ddim": "uniform", "dpmpp_2m": "karras", "dpmpp_3m": "auto", "unipc": "auto",
    "heun": "karras", "euler": "karras",
}  # fmt: skip
"""Each sampler's spacing (heun on a uniform grid over a cosine schedule takes one huge first step)."""


def _assert_moments(samples, mean, cov, slack):
    """Sample mean and covariance within 5 standard errors plus ``slack`` (the sampler's own error)."""
    n = samples.shape[0]
    sample_mean = samples.mean(0)
    sample_cov = torch.cov(samples.T)
    mean_bound = 5 * torch.sqrt(torch.diagonal(cov) / n) + slack
    assert torch.all((sample_mean - mean).abs() <= mean_bound), (sample_mean, mean)
    variances = torch.diagonal(cov)
    cov_se = torch.sqrt((variances[:, None] * variances[None, :] + cov**2) / n)
    assert torch.all((sample_cov - cov).abs() <= 5 * cov_se + slack), (sample_cov, cov)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_reproduces_gaussian_data(sampler):
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear", sigma_small=True)
    torch.manual_seed(1)
    samples = sample_batch(
        exact_model(diffusion), diffusion, (4000, 2), sampler=sampler, steps=NOMINAL[sampler],
        timestep_spacing=SPACING[sampler], clip_denoised=False, noise=start_noise(4000),
    )  # fmt: skip
    _assert_moments(samples, MEAN, COV, slack=0.01)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_every_sampler_reproduces_a_mixture_with_every_parameterisation(sampler, target):
    flags = dict(predict_xstart=target == "x0", predict_v=target == "v", learn_sigma=target == "v")
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear", **flags)
    model = exact_model(diffusion, target, mixture_x0, learned_sigma=flags["learn_sigma"])
    torch.manual_seed(2)
    samples = sample_batch(
        model, diffusion, (3000, 2), sampler=sampler, steps=NOMINAL[sampler], clip_denoised=False,
        timestep_spacing=SPACING[sampler], noise=start_noise(3000, 1),
    )  # fmt: skip
    mixture_cov = MIX_COV + torch.outer(MIX_OFFSET, MIX_OFFSET)
    _assert_moments(samples, torch.zeros(2, dtype=torch.float64), mixture_cov, slack=0.01)
    share = (samples @ MIX_OFFSET > 0).double().mean().item()
    assert abs(share - 0.5) < 5 * math.sqrt(0.25 / 3000)  # both modes, in equal shares


# ---------------------------------------------------------------- convergence order of the ODE samplers


def _exact_ode_end(diffusion, noise, last):
    """The PF-ODE solution from noise at the noisiest step to grid point ``last``, then D there."""
    schedule = NoiseSchedule.from_diffusion(diffusion)
    s_max = schedule.edm_sigmas()[-1]
    y = noise / math.sqrt(schedule.alphas_cumprod[-1])
    s_min = last.sigma / last.alpha
    variances, vectors = torch.linalg.eigh(COV)
    factor = torch.sqrt((variances + s_min**2) / (variances + s_max**2))
    y_min = MEAN + ((y - MEAN) @ vectors) * factor @ vectors.T
    return gaussian_x0(last.alpha * y_min, last.alpha, last.sigma)


ORDERS = [
    # (sampler, spacing, steps, theoretical order)
    ("ddim", "uniform", [8, 16, 32, 64], 1),
    ("euler", "karras", [8, 16, 32, 64], 1),
    ("euler", "logsnr", [8, 16, 32, 64], 1),
    ("heun", "karras", [16, 32, 64, 128], 2),
    ("dpmpp_2m", "karras", [32, 64, 128, 256], 2),
    ("dpmpp_2m", "logsnr", [16, 32, 64, 128], 2),
]


@pytest.mark.parametrize(
    ("sampler", "spacing", "steps", "order"), ORDERS, ids=[f"{r[0]}-{r[1]}" for r in ORDERS]
)
def test_ode_samplers_converge_at_their_order(sampler, spacing, steps, order):
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    model, noise = exact_model(diffusion), start_noise(64)
    schedule = NoiseSchedule.from_diffusion(diffusion)
    errors = []
    for count in steps:
        out = sample_batch(
            model, diffusion, (64, 2), sampler=sampler, steps=count, timestep_spacing=spacing,
            clip_denoised=False, noise=noise,
        )  # fmt: skip
        reference = _exact_ode_end(diffusion, noise, sampling_grid(schedule, count, spacing)[-1])
        errors.append((out - reference).abs().max().item())
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert order - 0.2 <= slope <= order + 0.5, (errors, slope)
    assert errors[-1] < errors[0] / 2**order  # and the error does fall


def test_euler_is_ddim_on_trained_steps():
    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="linear")
    model, noise = exact_model(diffusion), start_noise(8)
    ddim = sample_batch(model, diffusion, (8, 2), sampler="ddim", steps=10, clip_denoised=False, noise=noise)
    euler = sample_batch(
        model, diffusion, (8, 2), sampler="euler", steps=10, timestep_spacing="uniform", clip_denoised=False,
        noise=noise,
    )  # fmt: skip
    torch.testing.assert_close(euler, ddim, rtol=1e-12, atol=1e-12)


def test_auto_spacing_is_uniform_for_ddpm_ddim_and_capped_logsnr_for_the_ode_samplers():
    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="cosine")
    model, noise = exact_model(diffusion), start_noise(8)
    assert SamplingConfig().timestep_spacing == "auto"
    capped = dict.fromkeys(("euler", "dpmpp_2m", "dpmpp_3m", "unipc", "heun"), "capped_logsnr")
    for sampler, spacing in {"ddpm": "uniform", "ddim": "uniform", **capped}.items():
        assert resolve_spacing(sampler, "auto") == spacing
        assert resolve_spacing(sampler, "quadratic") == "quadratic"
        torch.manual_seed(0)
        auto = sample_batch(
            model, diffusion, (8, 2), sampler=sampler, steps=10, clip_denoised=False, noise=noise
        )
        torch.manual_seed(0)
        explicit = sample_batch(
            model, diffusion, (8, 2), sampler=sampler, steps=10, timestep_spacing=spacing,
            clip_denoised=False, noise=noise,
        )  # fmt: skip
        assert torch.equal(auto, explicit), sampler


def test_model_calls_per_sampler():
    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="linear")
    inner = exact_model(diffusion)
    calls = []

    def model(x, t, **kwargs):
        calls.append(t)
        return inner(x, t)

    expected_calls = {
        "ddpm": 10,
        "ddim": 10,
        "euler": 10,
        "dpmpp_2m": 10,
        "dpmpp_3m": 10,
        "unipc": 10,
        "heun": 19,
    }
    for sampler, expected in expected_calls.items():
        calls.clear()
        sample_batch(
            model, diffusion, (4, 2), sampler=sampler, steps=10, clip_denoised=False, noise=start_noise(4)
        )
        assert len(calls) == expected, sampler


# ---------------------------------------------------------------- DDPM and DDIM unchanged

FIXTURES = torch.load(
    os.path.join(os.path.dirname(__file__), "data", "sampler_reference.pt"), weights_only=True
)


def assert_matches_recording(out: torch.Tensor, recorded: torch.Tensor) -> None:
    """``out`` is a recorded sample up to the CPU's float32 rounding.

    The recordings were made on an AMD EPYC (AVX-512, no AMX); elsewhere vectorised exp and tanh round
    differently (an Intel Xeon with AMX is off by up to 1.6e-6, 13 ulps of 1.0, in 39 of 56 cases). A
    changed method, grid or schedule moves the samples by orders of magnitude more."""
    torch.testing.assert_close(out, recorded, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_ddpm_and_ddim_match_the_code_before_issue_13(name):
    from data.make_sampler_fixtures import SHAPE, analytic_model, run_case

    fixture = FIXTURES[name]
    loop = run_case(fixture["flags"], fixture["sampler"])
    assert_matches_recording(loop, fixture["output"])
    diffusion = create_gaussian_diffusion(**fixture["flags"])
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(11)
    out = sample_batch(
        analytic_model(fixture["flags"].get("learn_sigma", False)), diffusion, SHAPE,
        sampler=fixture["sampler"], noise=noise,
    )  # fmt: skip
    assert torch.equal(out, loop), "sample_batch must be GaussianDiffusion's own loop, bit for bit"


SOLVER_FIXTURES = torch.load(
    os.path.join(os.path.dirname(__file__), "data", "solver_reference.pt"), weights_only=True
)


@pytest.mark.parametrize("name", sorted(SOLVER_FIXTURES))
def test_ode_samplers_on_their_grids_match_the_code_before_issue_21(name):
    from data.make_solver_fixtures import run_case

    case = SOLVER_FIXTURES[name]
    out = run_case(case["flags"], case["sampler"], case["spacing"], case["steps"], case["clip"])
    assert_matches_recording(out, case["output"])


def test_steps_respace_ddpm_like_timestep_respacing():
    """--steps N (uniform) is --timestep_respacing N, bit for bit."""
    from data.make_sampler_fixtures import SHAPE, analytic_model

    full = create_gaussian_diffusion(steps=40, noise_schedule="cosine", rescale_timesteps=True)
    spaced = create_gaussian_diffusion(
        steps=40, noise_schedule="cosine", rescale_timesteps=True, timestep_respacing="10"
    )
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    results = []
    for diffusion, steps in ((full, 10), (spaced, 0)):
        torch.manual_seed(5)
        results.append(
            sample_batch(analytic_model(False), diffusion, SHAPE, sampler="ddpm", steps=steps, noise=noise)
        )
    assert torch.equal(*results)


# ---------------------------------------------------------------- guidance


def _guided_unet(learn_sigma=False):
    torch.manual_seed(0)
    model = UNetModel(
        image_size=8, in_channels=3, model_channels=32, out_channels=6 if learn_sigma else 3,
        num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2, num_classes=3,
        null_class=True,
    )  # fmt: skip
    for param in model.parameters():  # zero-initialised output layers would make the test vacuous
        torch.nn.init.normal_(param, std=0.05)
    return model.eval()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc"])
def test_guidance_one_is_conditional_and_zero_unconditional_bit_for_bit(sampler):
    model = _guided_unet()
    diffusion = create_gaussian_diffusion(steps=20, noise_schedule="cosine", rescale_timesteps=True)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])

    def run(scale, y):
        return sample_batch(
            model, diffusion, noise.shape, sampler=sampler, steps=5, guidance_scale=scale,
            model_kwargs={"y": y}, noise=noise,
        )  # fmt: skip

    assert torch.equal(run(1.0, labels), sample_batch(model, diffusion, noise.shape, sampler=sampler, steps=5,
                                                       model_kwargs={"y": labels}, noise=noise))  # fmt: skip
    null = torch.full_like(labels, model.null_label)
    assert torch.equal(run(0.0, labels), run(1.0, null))
    assert not torch.equal(run(3.0, labels), run(1.0, labels))


def test_guided_output_is_the_formula_with_the_conditional_variance():
    model = _guided_unet(learn_sigma=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([3.0, 700.0]), torch.tensor([2, 0])
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return model(*args, **kwargs)

    with torch.no_grad():
        guided = GuidedModel(counting, 2.5, model.null_label)(x, t, y=y)
        cond, uncond = model(x, t, y=y), model(x, t, y=torch.full_like(y, 3))
    assert calls == [4]  # one forward on the doubled batch
    torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 2.5 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(guided[:, 3:], cond[:, 3:])


def test_guidance_needs_a_model_with_a_null_class():
    diffusion = create_gaussian_diffusion(steps=50)
    small = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1)
    conditional = UNetModel(**small, attention_resolutions=(), channel_mult=(1,), num_classes=3)
    unconditional = UNetModel(**small, attention_resolutions=(), channel_mult=(1,))
    with pytest.raises(ValueError, match="class_dropout_prob"):
        check_sampling_options(diffusion, "ddim", 0, "uniform", 2.0, model=conditional)
    with pytest.raises(ValueError, match="class-conditional"):
        check_sampling_options(diffusion, "ddim", 0, "uniform", 2.0, model=unconditional)
    assert conditional.label_emb.weight.shape[0] == 3  # improved-diffusion's rows without dropout
    assert _guided_unet().label_emb.weight.shape[0] == 4  # one null row with it


# ---------------------------------------------------------------- grids and zero terminal SNR


def test_grids():
    assert step_indices(1000, 10, "uniform") == sorted(
        __import__("fastdiff").diffusion.space_timesteps(1000, [10])
    )
    quadratic = step_indices(50, 40, "quadratic")
    assert quadratic[0] == 0 and quadratic[-1] == 49 and len(set(quadratic)) == 40 == len(quadratic)
    assert quadratic == sorted(quadratic)
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    schedule = NoiseSchedule.from_diffusion(diffusion)
    karras = sampling_grid(schedule, 12, "karras")
    sigmas = [p.sigma / p.alpha for p in karras]
    edm = schedule.edm_sigmas()
    assert sigmas[0] == pytest.approx(edm[-1]) and sigmas[-1] == pytest.approx(edm[0])
    rho = 7.0
    expected = [
        (edm[-1] ** (1 / rho) + i / 11 * (edm[0] ** (1 / rho) - edm[-1] ** (1 / rho))) ** rho
        for i in range(12)
    ]
    np.testing.assert_allclose(sigmas, expected, rtol=1e-12)
    assert all(a.t > b.t for a, b in itertools.pairwise(karras))
    logsnr = sampling_grid(schedule, 9, "logsnr")
    log_s = np.log([p.sigma / p.alpha for p in logsnr])
    np.testing.assert_allclose(log_s, np.linspace(np.log(edm[-1]), np.log(edm[0]), 9), rtol=1e-12, atol=1e-12)
    assert logsnr[0] == schedule.point(999) and logsnr[-1] == schedule.point(0)  # exact trained ends
    assert all(a.t > b.t for a, b in itertools.pairwise(logsnr))
    middle = logsnr[4]  # between trained steps: alpha, sigma from s itself, a fractional timestep
    assert middle.alpha**2 + middle.sigma**2 == pytest.approx(1.0, abs=1e-15)
    assert not float(middle.t).is_integer()


def test_logsnr_grid_makes_every_dpmpp_2m_step_equal():
    """On the log-SNR grid every step has the same h, so the 2M correction is always 1.5 D_i - 0.5 D_{i-1}."""
    schedule = NoiseSchedule.from_diffusion(create_gaussian_diffusion(steps=1000, noise_schedule="cosine"))
    grid = sampling_grid(schedule, 20, "logsnr")
    lambdas = [math.log(p.alpha / p.sigma) for p in grid]
    np.testing.assert_allclose(np.diff(lambdas), np.diff(lambdas)[0], rtol=1e-9)
    uniform = sampling_grid(schedule, 20, "uniform")
    steps = np.diff([math.log(p.alpha / p.sigma) for p in uniform])
    assert steps[-1] / steps[-2] > 2  # the uniform grid's last steps grow fast: what logsnr avoids


ZERO_SNR_STEPS = {
    "ddpm": 1000,
    "ddim": 200,
    "euler": 200,
    "dpmpp_2m": 100,
    "dpmpp_3m": 50,
    "unipc": 50,
    "heun": 50,
}
"""With zero terminal SNR the noise levels next to the last step are huge (s ~ 1e4 at step T - 2 of the
rescaled linear schedule), so the ODE samplers need more steps than on the usual schedule."""


@pytest.mark.parametrize(
    ("sampler", "spacing"), [(name, "uniform") for name in SAMPLERS] + [("dpmpp_2m", "logsnr")]
)
def test_zero_terminal_snr_samples_with_v_prediction(sampler, spacing):
    diffusion = create_gaussian_diffusion(
        steps=1000, noise_schedule="linear", predict_v=True, rescale_zero_terminal_snr=True
    )
    assert diffusion.alphas_cumprod[-1] == 0.0
    grid = sampling_grid(NoiseSchedule.from_diffusion(diffusion), 20, spacing)
    assert grid[0].alpha == 0.0 and all(p.alpha > 0 for p in grid[1:])  # pure noise first, then finite s
    torch.manual_seed(3)
    samples = sample_batch(
        exact_model(diffusion, "v"), diffusion, (4000, 2), sampler=sampler, steps=ZERO_SNR_STEPS[sampler],
        timestep_spacing=spacing, clip_denoised=False, noise=start_noise(4000, 2),
    )  # fmt: skip
    assert torch.isfinite(samples).all()
    _assert_moments(samples, MEAN, COV, slack=0.02)


# ---------------------------------------------------------------- bad input


def test_bad_sampling_options():
    diffusion = create_gaussian_diffusion(steps=50)
    for sampler, steps, spacing, scale, match in [
        ("plms", 0, "uniform", 1.0, "--sampler must be one of"),
        ("ddim", 0, "cosine", 1.0, "--timestep_spacing must be one of"),
        ("ddim", 0, "karras", 1.0, "karras"),
        ("ddpm", 10, "karras", 1.0, "karras"),
        ("ddim", 10, "logsnr", 1.0, "logsnr places noise levels between trained steps"),
        ("heun", 51, "uniform", 1.0, "exceeds the 50 trained timesteps"),
        ("heun", 1, "karras", 1.0, "needs --steps >= 2"),
        ("dpmpp_2m", 1, "uniform", 1.0, "needs --steps >= 2"),
        ("ddim", -3, "uniform", 1.0, "--steps must be an integer >= 0"),
        ("ddim", 0, "uniform", -1.0, "--guidance_scale"),
        ("ddim", 0, "uniform", float("nan"), "--guidance_scale"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_sampling_options(diffusion, sampler, steps, spacing, scale)
    with pytest.raises(ValueError, match="--eta applies to --sampler ddim only"):
        check_sampling_options(diffusion, "ddpm", 0, "uniform", 1.0, eta=0.5)
    assert MIN_STEPS["heun"] == 2


def test_samplers_reject_parameterisations_they_cannot_use():
    from fastdiff.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
    from fastdiff.diffusion.schedules import get_named_beta_schedule, rescale_zero_terminal_snr

    previous_x = GaussianDiffusion(
        betas=get_named_beta_schedule("linear", 50), model_mean_type=ModelMeanType.PREVIOUS_X,
        model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE,
    )  # fmt: skip
    check_sampling_options(previous_x, "ddpm", 0, "uniform", 1.0)
    for sampler in ("dpmpp_2m", "heun", "euler"):
        with pytest.raises(ValueError, match="PREVIOUS_X"):
            check_sampling_options(previous_x, sampler, 0, "uniform", 1.0)
    zero_snr_eps = GaussianDiffusion(
        betas=rescale_zero_terminal_snr(get_named_beta_schedule("linear", 50)),
        model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
    )  # fmt: skip
    with pytest.raises(ValueError, match="zero terminal SNR"):
        check_sampling_options(zero_snr_eps, "ddim", 0, "uniform", 1.0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_drawn_noise_is_drawn_as_the_loops_draw_it(sampler):
    """Without noise (fastdiff.sample's case), sample_batch is the loop itself, bit for bit."""
    from data.make_sampler_fixtures import SHAPE, analytic_model

    diffusion = create_gaussian_diffusion(steps=40, noise_schedule="cosine", timestep_respacing="8")
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    torch.manual_seed(4)
    expected = loop(analytic_model(False), SHAPE)
    torch.manual_seed(4)
    assert torch.equal(sample_batch(analytic_model(False), diffusion, SHAPE, sampler=sampler), expected)
