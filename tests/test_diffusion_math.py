"""Diffusion math against float64 closed forms derived here: schedules, q(x_t | x_0), the forward
posterior (by Bayes' rule on Gaussians), Gaussian KL and the discretised decoder likelihood."""

import math

import numpy as np
import pytest
import torch

from fastdiff.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    approx_standard_normal_cdf,
    betas_for_alpha_bar,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
)

norm = pytest.importorskip("scipy.stats").norm  # not on the GPU machines (tools/gpu_check.sh)


def _diffusion(betas, var_type=ModelVarType.FIXED_SMALL):
    return GaussianDiffusion(
        betas=betas, model_mean_type=ModelMeanType.EPSILON, model_var_type=var_type, loss_type=LossType.MSE
    )


def _alpha_bar(betas, t):
    """prod_{s <= t} (1 - beta_s), with the empty product 1 for t = -1."""
    return math.prod(1.0 - float(b) for b in betas[: t + 1])


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("steps", [1000, 250, 37])
def test_linear_schedule_endpoints_scale_with_step_count(steps):
    betas = get_named_beta_schedule("linear", steps)
    scale = 1000.0 / steps
    assert betas.dtype == np.float64 and betas.shape == (steps,)
    assert betas[0] == pytest.approx(1e-4 * scale, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02 * scale, rel=1e-12)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) * scale / (steps - 1), rtol=1e-9)


@pytest.mark.parametrize("steps", [1000, 50])
def test_cosine_schedule_follows_alpha_bar_and_caps_betas(steps):
    betas = get_named_beta_schedule("cosine", steps)

    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    assert betas.shape == (steps,) and betas.max() == 0.999
    capped = np.flatnonzero(betas == 0.999)
    assert capped.tolist() == [steps - 1]  # only the last step, where alpha_bar(1) = 0
    for t in range(0, steps - 1, max(1, steps // 13)):
        assert _alpha_bar(betas, t) == pytest.approx(alpha_bar((t + 1) / steps) / alpha_bar(0.0), rel=1e-10)


def test_betas_for_alpha_bar_exponential_gives_constant_betas():
    betas = betas_for_alpha_bar(40, lambda s: math.exp(-3.0 * s))
    np.testing.assert_allclose(betas, 1.0 - math.exp(-3.0 / 40), rtol=1e-12)
    assert betas_for_alpha_bar(4, lambda s: 1.0 - s, max_beta=0.5)[-1] == 0.5


def test_unknown_schedule_name_is_named_in_error():
    with pytest.raises(ValueError, match=r"schedule_name.*'quadratic'.*linear.*cosine"):
        get_named_beta_schedule("quadratic", 100)
    with pytest.raises(ValueError, match="num_diffusion_timesteps"):
        get_named_beta_schedule("linear", 10)


@pytest.mark.parametrize(
    ("betas", "match"),
    [([], "non-empty"), ([[0.1, 0.2]], "1-D"), ([0.1, 0.0], r"\(0, 1\]"), ([1.5], r"\(0, 1\]")],
)
def test_invalid_betas_raise(betas, match):
    with pytest.raises(ValueError, match=match):
        _diffusion(np.array(betas, dtype=np.float64))


def test_bad_enum_arguments_raise_type_error():
    with pytest.raises(TypeError, match="model_var_type"):
        GaussianDiffusion(
            betas=[0.1, 0.2],
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type="fixed",
            loss_type=LossType.MSE,
        )
    assert LossType.KL.is_vb() and LossType.RESCALED_KL.is_vb()
    assert not LossType.MSE.is_vb() and not LossType.RESCALED_MSE.is_vb()


# ---------------------------------------------------------------- forward process


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_mean_variance_and_q_sample_match_closed_form(schedule):
    steps = 60
    betas = get_named_beta_schedule(schedule, steps)
    diffusion = _diffusion(betas)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 2, 3, dtype=torch.float64, generator=gen)
    noise = torch.randn(x0.shape, dtype=torch.float64, generator=gen)
    t = torch.tensor([0, 1, 17, 58, steps - 1])
    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    sample = diffusion.q_sample(x0, t, noise=noise)
    for i, step in enumerate(t.tolist()):
        ab = _alpha_bar(betas, step)
        torch.testing.assert_close(mean[i], math.sqrt(ab) * x0[i], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(var[i], torch.full_like(x0[i], 1 - ab), rtol=1e-12, atol=0)
        torch.testing.assert_close(
            log_var[i], torch.full_like(x0[i], math.log(1 - ab)), rtol=1e-12, atol=1e-14
        )
        expected = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        torch.testing.assert_close(sample[i], expected, rtol=1e-12, atol=1e-14)
    assert var.shape == log_var.shape == x0.shape


def test_q_sample_draws_have_the_forward_moments():
    diffusion = _diffusion(get_named_beta_schedule("linear", 100))
    torch.manual_seed(0)
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    t = torch.full((20000,), 30)
    draws = diffusion.q_sample(x0, t)
    ab = _alpha_bar(diffusion.betas, 30)
    assert draws.mean().item() == pytest.approx(0.7 * math.sqrt(ab), abs=0.02)
    assert draws.var().item() == pytest.approx(1 - ab, rel=0.04)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0); multiply the Gaussians."""
    betas = get_named_beta_schedule("cosine", 40)
    diffusion = _diffusion(betas)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 2, 3, dtype=torch.float64, generator=gen)
    xt = torch.randn(6, 2, 3, dtype=torch.float64, generator=gen)
    t = torch.tensor([1, 2, 9, 20, 38, 39])
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    for i, step in enumerate(t.tolist()):
        prior_mean_coef, prior_var = math.sqrt(_alpha_bar(betas, step - 1)), 1 - _alpha_bar(betas, step - 1)
        lik_coef, lik_var = math.sqrt(1 - betas[step]), betas[step]
        precision = 1 / prior_var + lik_coef**2 / lik_var
        expected_mean = (prior_mean_coef * x0[i] / prior_var + lik_coef * xt[i] / lik_var) / precision
        torch.testing.assert_close(mean[i], expected_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var[i], torch.full_like(x0[i], 1 / precision), rtol=1e-10, atol=0)
        torch.testing.assert_close(
            log_var[i], torch.full_like(x0[i], -math.log(precision)), rtol=1e-10, atol=0
        )


def test_posterior_at_first_step_is_x0_with_clipped_log_variance():
    betas = get_named_beta_schedule("linear", 30)
    diffusion = _diffusion(betas)
    x0, xt = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.long)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert torch.all(var == 0)
    _, var1, _ = diffusion.q_posterior_mean_variance(x0, xt, torch.ones(2, dtype=torch.long))
    torch.testing.assert_close(log_var, torch.log(var1), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
)
def test_per_step_values_follow_data_dtype(dtype, expected):
    diffusion = _diffusion(get_named_beta_schedule("linear", 50))
    x = torch.randn(3, 2, 4).to(dtype)
    t = torch.tensor([0, 10, 49])
    mean, var, log_var = diffusion.q_mean_variance(x, t)
    assert mean.dtype == var.dtype == log_var.dtype == expected
    assert diffusion.q_sample(x, t).dtype == expected
    # 1 - alpha_bar is taken from the float64 schedule, not computed in float32 near alpha_bar = 1.
    one_minus_ab0 = 1 - _alpha_bar(diffusion.betas, 0)
    assert var[0, 0, 0].item() == pytest.approx(
        one_minus_ab0, rel=1e-6 if expected == torch.float32 else 1e-14
    )


def test_bad_timesteps_raise():
    diffusion = _diffusion(get_named_beta_schedule("linear", 50))
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"t must have shape"):
        diffusion.q_sample(x, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer tensor"):
        diffusion.q_sample(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="noise"):
        diffusion.q_sample(x, torch.tensor([1, 2, 3]), noise=torch.randn(3, 3))


# ---------------------------------------------------------------- KL and likelihood


def test_normal_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    m1, m2, lv1, lv2 = (torch.randn(7, 5, dtype=torch.float64, generator=gen) for _ in range(4))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)),
        torch.distributions.Normal(m2, torch.exp(0.5 * lv2)),
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-12)
    # Scalars broadcast against tensors: KL(N(m, e^lv) || N(0, 1)) = (e^lv + m^2 - 1 - lv) / 2.
    torch.testing.assert_close(
        normal_kl(m1, lv1, 0.0, 0.0), 0.5 * (torch.exp(lv1) + m1**2 - 1 - lv1), rtol=1e-12, atol=1e-12
    )
    assert torch.all(normal_kl(m1, lv1, m1, lv1).abs() < 1e-12)
    with pytest.raises(TypeError, match="Tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_approx_standard_normal_cdf_is_close_to_erf():
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max().item() < 2e-4


def _exact_bin_log_probs(values, mean, std):
    """log P(value's 8-bit bin) under N(mean, std^2) with scipy, edges extended at -1 and 1."""
    upper = np.where(values > 0.999, np.inf, values + 1 / 255)
    lower = np.where(values < -0.999, -np.inf, values - 1 / 255)
    with np.errstate(divide="ignore"):  # bins far from the mean have mass 0 in float64
        return np.log(norm.cdf(upper, loc=mean, scale=std) - norm.cdf(lower, loc=mean, scale=std))


@pytest.mark.parametrize(("mean", "std"), [(0.0, 0.05), (0.93, 0.02), (-0.98, 0.1), (0.3, 0.5)])
def test_discretized_log_likelihood_matches_bin_integrals(mean, std):
    values = np.arange(256) / 127.5 - 1.0  # every 8-bit value in [-1, 1], both edges included
    x = torch.tensor(values, dtype=torch.float64)
    log_probs = discretized_gaussian_log_likelihood(
        x, means=torch.full_like(x, mean), log_scales=torch.full_like(x, math.log(std))
    )
    assert log_probs.shape == x.shape
    exact = _exact_bin_log_probs(values, mean, std)
    probs = log_probs.exp().numpy()
    # The tanh CDF is off by < 2e-4, so bin masses are off by < 4e-4.
    np.testing.assert_allclose(probs, np.exp(exact), atol=4e-4, rtol=0)
    big = np.exp(exact) > 0.05
    np.testing.assert_allclose(log_probs.numpy()[big], exact[big], atol=1e-2, rtol=0)
    # Adjacent bins share edges and the outer bins reach +-inf, so the masses sum to one.
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)


def test_discretized_log_likelihood_edge_bins_use_open_tails():
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    means = torch.tensor([-1.5, 1.5], dtype=torch.float64)
    log_probs = discretized_gaussian_log_likelihood(
        x, means=means, log_scales=torch.zeros(2, dtype=torch.float64)
    )
    # With the mean beyond the edge, an open tail bin holds most of the mass; a closed one would hold ~0.5%.
    expected = np.log([norm.cdf(-1 + 1 / 255, loc=-1.5), norm.sf(1 - 1 / 255, loc=1.5)])
    np.testing.assert_allclose(log_probs.numpy(), expected, atol=1e-3)
    with pytest.raises(ValueError, match="share one shape"):
        discretized_gaussian_log_likelihood(x, means=means[:1], log_scales=torch.zeros(2))
