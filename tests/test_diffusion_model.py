"""GaussianDiffusion with models: every mean/variance/loss type, loss semantics against closed forms,
ancestral and DDIM sampling of a known distribution, DDIM inversion, the bound, and a tiny training run."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from fastdiff.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_gaussian_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    space_timesteps,
)

LN2 = math.log(2.0)


class TinyDenoiser(nn.Module):
    """Per-position MLP on [N, C, *spatial], conditioned on sinusoidal features of the timestep."""

    def __init__(self, channels, out_channels, hidden=32):
        super().__init__()
        self.inp = nn.Linear(channels, hidden)
        self.time = nn.Linear(6, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, out_channels)
        self.register_buffer("freqs", torch.tensor([0.003, 0.03, 0.3]))

    def forward(self, x, timesteps, y=None):
        h = x.movedim(1, -1)
        angles = timesteps.to(h.dtype)[:, None] * self.freqs.to(h.dtype)
        emb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = torch.nn.functional.silu(self.inp(h) + emb.view(x.shape[0], *[1] * (x.ndim - 2), -1))
        h = torch.nn.functional.silu(self.mid(h))
        return self.out(h).movedim(-1, 1)


class FixedOutput:
    """A model that ignores its input and returns a given tensor."""

    def __init__(self, output):
        self.output = output

    def __call__(self, x, timesteps, **kwargs):
        return self.output


class MixtureEps:
    """The exact E[eps | x_t] for data from an equal mixture of N(center, std^2 I) and N(-center, std^2 I)."""

    def __init__(self, betas, center, std):
        self.alpha_bar = torch.from_numpy(np.cumprod(1.0 - np.asarray(betas)))
        self.center = center
        self.std = std

    def __call__(self, x, timesteps, **kwargs):
        ab = self.alpha_bar.to(x.dtype)[timesteps].view(-1, 1)
        var = ab * self.std**2 + 1 - ab
        logits, eps = [], []
        for sign in (1.0, -1.0):
            offset = x - sign * ab.sqrt() * self.center
            logits.append(-(offset**2).sum(1) / (2 * var[:, 0]))
            eps.append((1 - ab).sqrt() * offset / var)
        weights = torch.softmax(torch.stack(logits), dim=0)[..., None]
        return weights[0] * eps[0] + weights[1] * eps[1]


def _diffusion(mean_type, var_type, loss_type, steps=40, schedule="cosine"):
    return GaussianDiffusion(
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
    )


def _closed_forms(betas, t):
    """Per-step float64 alpha_bar_t, alpha_bar_{t-1}, beta_t and the posterior variance (Bayes)."""
    betas = [float(b) for b in betas]
    ab = math.prod(1 - b for b in betas[: t + 1])
    ab_prev = math.prod(1 - b for b in betas[:t])
    post_var = betas[t] * (1 - ab_prev) / (1 - ab)
    return ab, ab_prev, betas[t], post_var


def _posterior_mean(betas, t, x0, xt):
    """Mean of q(x_{t-1} | x_t, x_0) by multiplying q(x_t | x_{t-1}) and q(x_{t-1} | x_0)."""
    _, ab_prev, beta, _ = _closed_forms(betas, t)
    if t == 0:
        return x0
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    return (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - beta) * xt / beta) / precision


# ---------------------------------------------------------------- every combination


COMBINATIONS = list(itertools.product(ModelMeanType, ModelVarType, LossType))


@pytest.mark.parametrize(("mean_type", "var_type", "loss_type"), COMBINATIONS, ids=lambda e: e.name)
def test_every_combination_trains_and_predicts(mean_type, var_type, loss_type):
    torch.manual_seed(0)
    diffusion = SpacedDiffusion(
        use_timesteps=space_timesteps(40, "ddim10"),
        betas=get_named_beta_schedule("cosine", 40),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=True,
    )
    learned = var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    model = TinyDenoiser(2, 4 if learned else 2)
    x0 = torch.rand(4, 2, 3, 3) * 2 - 1
    t = torch.tensor([0, 3, 6, 9])
    terms = diffusion.training_losses(model, x0, t)
    if loss_type.is_vb():
        assert set(terms) == {"loss", "vb"}
    else:
        assert set(terms) == ({"loss", "mse", "vb"} if learned else {"loss", "mse"})
    for value in terms.values():
        assert value.shape == (4,) and torch.isfinite(value).all()
    terms["loss"].mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    with torch.no_grad():
        out = diffusion.p_mean_variance(model, x0, t)
    assert set(out) == {"mean", "variance", "log_variance", "pred_xstart"}
    for value in out.values():
        assert value.shape == x0.shape and torch.isfinite(value).all()
    # FIXED_SMALL's variance is 0 at t = 0, where its log-variance is clipped to that of t = 1.
    checked = slice(1, None) if var_type == ModelVarType.FIXED_SMALL else slice(None)
    torch.testing.assert_close(out["variance"][checked], out["log_variance"][checked].exp())
    assert out["pred_xstart"].abs().max() <= 1.0


def test_model_output_of_wrong_width_is_rejected():
    diffusion = _diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, LossType.MSE)
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"model output must have shape \(2, 6, 4\)"):
        diffusion.training_losses(FixedOutput(torch.zeros(2, 3, 4)), x, torch.tensor([1, 2]))


# ---------------------------------------------------------------- loss semantics


@pytest.mark.parametrize("mean_type", list(ModelMeanType), ids=lambda e: e.name)
def test_mse_loss_targets(mean_type):
    diffusion = _diffusion(mean_type, ModelVarType.FIXED_LARGE, LossType.MSE)
    gen = torch.Generator().manual_seed(3)
    x0, noise, output = (torch.randn(4, 2, 5, dtype=torch.float64, generator=gen) for _ in range(3))
    t = torch.tensor([0, 1, 20, 39])
    terms = diffusion.training_losses(FixedOutput(output), x0, t, noise=noise)
    assert set(terms) == {"loss", "mse"} and torch.equal(terms["loss"], terms["mse"])
    for i, step in enumerate(t.tolist()):
        ab = _closed_forms(diffusion.betas, step)[0]
        xt = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        target = {
            ModelMeanType.EPSILON: noise[i],
            ModelMeanType.START_X: x0[i],
            ModelMeanType.PREVIOUS_X: _posterior_mean(diffusion.betas, step, x0[i], xt),
            ModelMeanType.VELOCITY: math.sqrt(ab) * noise[i] - math.sqrt(1 - ab) * x0[i],
        }[mean_type]
        assert terms["mse"][i].item() == pytest.approx(((target - output[i]) ** 2).mean().item(), rel=1e-10)


def _learned_range_setup(loss_type, seed=4):
    diffusion = _diffusion(ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, loss_type)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (4, 2, 3), generator=gen).double() / 127.5 - 1
    noise = torch.randn(4, 2, 3, dtype=torch.float64, generator=gen)
    eps = torch.randn(4, 2, 3, dtype=torch.float64, generator=gen)
    v = torch.rand(4, 2, 3, dtype=torch.float64, generator=gen) * 2 - 1
    return diffusion, x0, noise, torch.cat([eps, v], 1).requires_grad_(True)


def test_hybrid_vb_term_matches_closed_form():
    diffusion, x0, noise, output = _learned_range_setup(LossType.MSE)
    t = torch.tensor([0, 1, 17, 39])
    terms = diffusion.training_losses(FixedOutput(output), x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    eps_pred, v = output.detach()[:, :2], output.detach()[:, 2:]
    for i, step in enumerate(t.tolist()):
        ab, _, beta, post_var = _closed_forms(diffusion.betas, step)
        xt = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        pred_x0 = (xt - math.sqrt(1 - ab) * eps_pred[i]) / math.sqrt(ab)
        model_mean = _posterior_mean(diffusion.betas, step, pred_x0, xt)
        min_log = math.log(post_var if step > 0 else _closed_forms(diffusion.betas, 1)[3])
        model_log_var = (v[i] + 1) / 2 * math.log(beta) + (1 - v[i]) / 2 * min_log
        if step == 0:
            log_probs = discretized_gaussian_log_likelihood(
                x0[i], means=model_mean, log_scales=0.5 * model_log_var
            )
            expected = -log_probs.mean().item() / LN2
        else:
            true_mean = _posterior_mean(diffusion.betas, step, x0[i], xt)
            kl = 0.5 * (
                model_log_var
                - math.log(post_var)
                + post_var / model_log_var.exp()
                + (true_mean - model_mean) ** 2 / model_log_var.exp()
                - 1
            )
            expected = kl.mean().item() / LN2
        assert terms["vb"][i].item() == pytest.approx(expected, rel=1e-9)


def test_hybrid_vb_trains_only_the_variance_and_mse_only_the_mean():
    diffusion, x0, noise, output = _learned_range_setup(LossType.MSE)
    t = torch.tensor([0, 5, 17, 39])
    terms = diffusion.training_losses(FixedOutput(output), x0, t, noise=noise)
    (vb_grad,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert torch.all(vb_grad[:, :2] == 0) and torch.all(vb_grad[:, 2:].abs().sum((1, 2)) > 0)
    (mse_grad,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert torch.all(mse_grad[:, 2:] == 0) and torch.all(mse_grad[:, :2].abs().sum((1, 2)) > 0)


def test_rescaled_losses_scale_the_bound_term():
    t = torch.tensor([0, 3, 20, 39])
    results = {}
    for loss_type in LossType:
        diffusion, x0, noise, output = _learned_range_setup(loss_type)
        results[loss_type] = diffusion.training_losses(FixedOutput(output), x0, t, noise=noise)
    steps = 40
    torch.testing.assert_close(
        results[LossType.RESCALED_MSE]["vb"], results[LossType.MSE]["vb"] * steps / 1000
    )
    torch.testing.assert_close(results[LossType.RESCALED_MSE]["mse"], results[LossType.MSE]["mse"])
    torch.testing.assert_close(results[LossType.RESCALED_KL]["loss"], results[LossType.KL]["loss"] * steps)
    # The KL loss is the bound term alone, the same term the hybrid loss adds to its MSE.
    torch.testing.assert_close(results[LossType.KL]["loss"], results[LossType.MSE]["vb"])


# ---------------------------------------------------------------- p_mean_variance


def test_fixed_and_learned_variances():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen)
    t = torch.tensor([0, 1, 30])
    expected_small, expected_large = [], []
    betas = get_named_beta_schedule("cosine", 40)
    for step in t.tolist():
        _, _, beta, post_var = _closed_forms(betas, step)
        post_var_1 = _closed_forms(betas, 1)[3]
        expected_small.append(post_var)
        expected_large.append(beta if step > 0 else post_var_1)

    def variance(var_type, output):
        diffusion = _diffusion(ModelMeanType.EPSILON, var_type, LossType.MSE)
        return diffusion.p_mean_variance(FixedOutput(output), x, t, clip_denoised=False)

    eps = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen)
    out = variance(ModelVarType.FIXED_SMALL, eps)
    torch.testing.assert_close(out["variance"][:, 0, 0], torch.tensor(expected_small, dtype=torch.float64))
    assert out["log_variance"][0, 0, 0].item() == pytest.approx(math.log(_closed_forms(betas, 1)[3]))
    out = variance(ModelVarType.FIXED_LARGE, eps)
    torch.testing.assert_close(out["variance"][:, 0, 0], torch.tensor(expected_large, dtype=torch.float64))
    for v, bound in ((-1.0, "small"), (1.0, "large")):
        out = variance(ModelVarType.LEARNED_RANGE, torch.cat([eps, torch.full_like(eps, v)], 1))
        logs = torch.log(
            torch.tensor(expected_small if bound == "small" else expected_large, dtype=torch.float64)
        )
        if bound == "small":
            logs[0] = math.log(_closed_forms(betas, 1)[3])
        else:
            logs[0] = math.log(betas[0])
        torch.testing.assert_close(out["log_variance"][:, 1, 2], logs)
    out = variance(ModelVarType.LEARNED, torch.cat([eps, torch.full_like(eps, -3.0)], 1))
    assert torch.all(out["log_variance"] == -3.0)


@pytest.mark.parametrize("mean_type", list(ModelMeanType), ids=lambda e: e.name)
def test_mean_is_the_posterior_mean_of_the_x0_prediction(mean_type):
    diffusion = _diffusion(mean_type, ModelVarType.FIXED_SMALL, LossType.MSE)
    gen = torch.Generator().manual_seed(6)
    x, output = (torch.randn(3, 2, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    t = torch.tensor([0, 11, 39])
    out = diffusion.p_mean_variance(FixedOutput(output), x, t, clip_denoised=False)
    for i, step in enumerate(t.tolist()):
        expected_mean = _posterior_mean(diffusion.betas, step, out["pred_xstart"][i], x[i])
        torch.testing.assert_close(out["mean"][i], expected_mean, rtol=1e-9, atol=1e-9)
    if mean_type == ModelMeanType.START_X:
        torch.testing.assert_close(out["pred_xstart"], output)
    if mean_type == ModelMeanType.PREVIOUS_X:
        torch.testing.assert_close(out["mean"], output)
    if mean_type == ModelMeanType.VELOCITY:  # x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v
        for i, step in enumerate(t.tolist()):
            ab = _closed_forms(diffusion.betas, step)[0]
            expected = math.sqrt(ab) * x[i] - math.sqrt(1 - ab) * output[i]
            torch.testing.assert_close(out["pred_xstart"][i], expected, rtol=1e-9, atol=1e-9)


def test_denoised_fn_runs_before_clipping():
    diffusion = _diffusion(ModelMeanType.START_X, ModelVarType.FIXED_SMALL, LossType.MSE)
    x = torch.randn(2, 3)
    seen = []

    def denoised_fn(pred):
        seen.append(pred)
        return pred * 10

    output = torch.tensor([[0.5, -0.2, 0.01], [0.05, 0.3, -0.9]])
    out = diffusion.p_mean_variance(FixedOutput(output), x, torch.tensor([3, 4]), denoised_fn=denoised_fn)
    torch.testing.assert_close(seen[0], output)
    torch.testing.assert_close(out["pred_xstart"], (output * 10).clamp(-1, 1))


# ---------------------------------------------------------------- sampling


CENTER = torch.tensor([[0.5, -0.3]], dtype=torch.float64)
STD = 0.1


def _mixture_setup(steps=100):
    diffusion = create_gaussian_diffusion(steps=steps, noise_schedule="cosine")
    return diffusion, MixtureEps(get_named_beta_schedule("cosine", steps), CENTER, STD)


def _assert_mixture(samples, std_rtol):
    """Samples split evenly between the two modes, each with the data's mean and spread."""
    positive = (samples @ CENTER.T)[:, 0] > 0
    assert positive.double().mean().item() == pytest.approx(0.5, abs=0.05)
    for sign, part in ((1.0, samples[positive]), (-1.0, samples[~positive])):
        torch.testing.assert_close(part.mean(0), sign * CENTER[0], atol=0.02, rtol=0)
        np.testing.assert_allclose(part.std(0).numpy(), STD, rtol=std_rtol)


@pytest.mark.parametrize(("sampler", "eta", "std_rtol"), [("p_sample_loop", None, 0.12), ("ddim", 0.0, 0.15)])
def test_sampling_with_the_exact_denoiser_recovers_the_data(sampler, eta, std_rtol):
    diffusion, model = _mixture_setup()
    torch.manual_seed(7)
    noise = torch.randn(2000, 2, dtype=torch.float64)
    if sampler == "p_sample_loop":
        samples = diffusion.p_sample_loop(model, (2000, 2), noise=noise)
    else:
        samples = diffusion.ddim_sample_loop(model, (2000, 2), noise=noise, eta=eta)
    assert samples.dtype == torch.float64
    _assert_mixture(samples, std_rtol)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_closed_form(eta):
    """x_{t-1} = sqrt(ab_prev) x0_pred + sqrt(1 - ab_prev - sigma^2) eps + sigma z, with
    sigma^2 = eta^2 (1 - ab_prev) / (1 - ab) (1 - ab / ab_prev) (Song et al. 2021, eq. 12 and 16)."""
    diffusion = _diffusion(ModelMeanType.EPSILON, ModelVarType.FIXED_LARGE, LossType.MSE)
    n, step = 40000, 3
    x = torch.full((n, 1), 0.3, dtype=torch.float64)
    eps = torch.full((n, 1), -0.4, dtype=torch.float64)
    torch.manual_seed(11)
    out = diffusion.ddim_sample(FixedOutput(eps), x, torch.full((n,), step), clip_denoised=False, eta=eta)
    ab, ab_prev, _, _ = _closed_forms(diffusion.betas, step)
    x0_pred = (0.3 - math.sqrt(1 - ab) * -0.4) / math.sqrt(ab)
    sigma2 = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    mean = math.sqrt(ab_prev) * x0_pred + math.sqrt(1 - ab_prev - sigma2) * -0.4
    if eta == 0:
        torch.testing.assert_close(out["sample"], torch.full_like(x, mean), rtol=1e-12, atol=1e-12)
    else:
        assert out["sample"].mean().item() == pytest.approx(mean, abs=4 * math.sqrt(sigma2 / n))
        assert out["sample"].var().item() == pytest.approx(sigma2, rel=0.03)


def test_ddim_with_eta_zero_is_deterministic_and_eta_one_is_not():
    diffusion, model = _mixture_setup(steps=20)
    noise = torch.randn(16, 2, dtype=torch.float64)
    runs = []
    for seed, eta in ((1, 0.0), (2, 0.0), (1, 1.0), (2, 1.0)):
        torch.manual_seed(seed)
        runs.append(diffusion.ddim_sample_loop(model, noise.shape, noise=noise, eta=eta))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[2], runs[3])


def test_ddim_reverse_sample_inverts_ddim_sample():
    diffusion, model = _mixture_setup(steps=100)
    torch.manual_seed(8)
    sign = torch.where(torch.rand(64, 1) < 0.5, 1.0, -1.0).double()
    x0 = sign * CENTER + STD * torch.randn(64, 2, dtype=torch.float64)
    x = x0
    for step in range(diffusion.num_timesteps):
        x = diffusion.ddim_reverse_sample(model, x, torch.full((64,), step), clip_denoised=False)["sample"]
    # The encoding lands on (roughly) standard normal latents ...
    assert x.std().item() == pytest.approx(1.0, abs=0.25)
    decoded = diffusion.ddim_sample_loop(model, x0.shape, noise=x, clip_denoised=False)
    # ... and decoding them gives the data back, up to the O(1/T) discretisation of the ODE
    # (max 0.005 at T = 1000, 0.03 to 0.06 at T = 100), far below the spread of the data.
    error = (decoded - x0).abs()
    assert error.max().item() < 0.1 and error.mean().item() < 0.02, (error.max(), error.mean())
    with pytest.raises(ValueError, match="eta"):
        diffusion.ddim_reverse_sample(model, x, torch.zeros(64, dtype=torch.long), eta=0.5)


def test_sample_loops_yield_every_step_and_keep_grad_mode():
    diffusion = create_gaussian_diffusion(steps=30, learn_sigma=True, timestep_respacing="ddim6")
    model = TinyDenoiser(3, 6)
    steps_seen = []
    for out in diffusion.p_sample_loop_progressive(model, (2, 3, 4, 4), progress=True):
        assert torch.is_grad_enabled() and not out["sample"].requires_grad
        assert out["sample"].shape == (2, 3, 4, 4) and torch.isfinite(out["sample"]).all()
        steps_seen.append(out)
    assert len(steps_seen) == 6
    ddim = list(diffusion.ddim_sample_loop_progressive(model, [2, 3, 4, 4], eta=0.5))
    assert len(ddim) == 6
    with pytest.raises(TypeError, match="shape"):
        diffusion.p_sample_loop(model, 3)
    with pytest.raises(ValueError, match="noise"):
        diffusion.p_sample_loop(model, (2, 3, 4, 4), noise=torch.randn(2, 3, 4, 5))


def test_last_step_adds_no_noise_and_plain_callables_sample_on_cpu():
    diffusion = _diffusion(ModelMeanType.EPSILON, ModelVarType.FIXED_LARGE, LossType.MSE)
    model = FixedOutput(torch.zeros(3, 2))
    x = torch.randn(3, 2)
    first = diffusion.p_sample(model, x, torch.zeros(3, dtype=torch.long))["sample"]
    second = diffusion.p_sample(model, x, torch.zeros(3, dtype=torch.long))["sample"]
    assert torch.equal(first, second)
    samples = diffusion.p_sample_loop(model, (3, 2))
    assert samples.device.type == "cpu" and samples.shape == (3, 2)


# ---------------------------------------------------------------- the bound


def test_calc_bpd_loop_totals_and_prior():
    diffusion = create_gaussian_diffusion(steps=40, learn_sigma=True, timestep_respacing="8")
    torch.manual_seed(9)
    model = TinyDenoiser(2, 4)
    x0 = torch.randint(0, 256, (3, 2, 4)).float() / 127.5 - 1
    result = diffusion.calc_bpd_loop(model, x0)
    assert set(result) == {"total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"}
    assert result["vb"].shape == result["xstart_mse"].shape == result["mse"].shape == (3, 8)
    for value in result.values():
        assert torch.isfinite(value).all()
    torch.testing.assert_close(result["total_bpd"], result["prior_bpd"] + result["vb"].sum(1))
    ab_last = float(np.prod(1.0 - get_named_beta_schedule("linear", 40)))
    mean = math.sqrt(ab_last) * x0.double()
    prior = 0.5 * ((1 - ab_last) + mean**2 - 1 - math.log(1 - ab_last))
    torch.testing.assert_close(result["prior_bpd"].double(), prior.mean((1, 2)) / LN2, rtol=1e-5, atol=1e-7)
    assert (result["vb"] > 0).all() and (result["xstart_mse"] >= 0).all()


# ---------------------------------------------------------------- training


def _two_mode_batch(size, generator=None):
    sign = torch.where(torch.rand(size, 1, generator=generator) < 0.5, 1.0, -1.0)
    return sign * CENTER.float() + STD * torch.randn(size, 2, generator=generator)


def _fraction_near_modes(samples):
    center = CENTER.float()
    distance = torch.minimum((samples - center).norm(dim=1), (samples + center).norm(dim=1))
    return (distance < 4 * STD).float().mean().item()


def test_tiny_model_learns_a_two_mode_distribution():
    torch.manual_seed(10)
    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="cosine", rescale_timesteps=True)
    model = TinyDenoiser(2, 2, hidden=32)
    gen = torch.Generator().manual_seed(0)
    eval_x0 = _two_mode_batch(512, gen)
    eval_t = torch.randint(0, diffusion.num_timesteps, (512,), generator=gen)
    eval_noise = torch.randn(512, 2, generator=gen)

    def eval_loss():
        with torch.no_grad():
            return diffusion.training_losses(model, eval_x0, eval_t, noise=eval_noise)["loss"].mean().item()

    before = eval_loss()
    samples_before = diffusion.p_sample_loop(model, (500, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        t = torch.randint(0, diffusion.num_timesteps, (128,))
        loss = diffusion.training_losses(model, _two_mode_batch(128), t)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.4 * before, (before, after)
    # Samples move onto the modes: about 10% lie within 4 std of a mode before training, 60-70% after.
    near_before = _fraction_near_modes(samples_before)
    near_after = _fraction_near_modes(diffusion.p_sample_loop(model, (500, 2)))
    assert near_after > 0.45 and near_after > 3 * near_before, (near_before, near_after)
