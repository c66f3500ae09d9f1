"""Timestep respacing, the respaced model wrapper, timestep rescaling and create_gaussian_diffusion."""

import numpy as np
import pytest
import torch

from fastdiff.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_gaussian_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)


def test_space_timesteps_sections():
    # improved-diffusion's docstring example: 300 steps in sections of 100 keeping 10, 15 and 20 steps,
    # each spread evenly from the section's first to its last step. Position 7 of the middle section
    # falls at 49.5; improved-diffusion's accumulated float position rounds it down to 49.
    first = [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    middle = [100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185, 192, 199]
    last = [
        200,
        205,
        210,
        216,
        221,
        226,
        231,
        236,
        242,
        247,
        252,
        257,
        263,
        268,
        273,
        278,
        283,
        289,
        294,
        299,
    ]
    expected = {*first, *middle, *last}
    assert space_timesteps(300, [10, 15, 20]) == expected
    assert space_timesteps(300, "10,15,20") == expected
    assert space_timesteps(300, "300") == set(range(300))
    assert space_timesteps(300, 1) == {0}
    # 10 steps into 3 sections: sizes 4, 3, 3; first and last step of each section are kept.
    assert space_timesteps(10, [2, 2, 3]) == {0, 3, 4, 6, 7, 8, 9}


def test_space_timesteps_ddim_uses_one_integer_stride():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(100, "ddim7") == set(range(0, 100, 15))
    assert space_timesteps(100, "ddim1") == {0}


@pytest.mark.parametrize(
    ("steps", "section_counts", "why"),
    [
        (100, "ddim11", "no integer stride"),
        (300, [5, 200], "section 1 spans 150"),
        (3, "1,1,1,1", "section 3 spans 0"),
        (100, "ten", "comma-separated integers"),
        (100, "ddimx", "integer N"),
        (100, [0, 4], "positive"),
        (100, [], "positive"),
    ],
)
def test_space_timesteps_unmeetable_respacing_names_the_argument(steps, section_counts, why):
    with pytest.raises(ValueError, match="section_counts") as info:
        space_timesteps(steps, section_counts)
    assert why in str(info.value)


def _spaced(schedule, steps, respacing, rescale=False):
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, respacing),
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_LARGE,
        loss_type=LossType.MSE,
        rescale_timesteps=rescale,
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("respacing", ["ddim25", "10,15,20", "3,1,7,40"])
def test_respaced_betas_keep_alphas_cumprod_at_kept_steps(schedule, respacing):
    base_betas = get_named_beta_schedule(schedule, 600)
    spaced = _spaced(schedule, 600, respacing)
    kept = sorted(space_timesteps(600, respacing))
    assert spaced.timestep_map == kept and spaced.num_timesteps == len(kept)
    assert spaced.original_num_steps == 600
    base_alphas_cumprod = np.cumprod(1.0 - base_betas)
    np.testing.assert_allclose(np.cumprod(1.0 - spaced.betas), base_alphas_cumprod[kept], rtol=1e-10, atol=0)
    np.testing.assert_allclose(spaced.alphas_cumprod, base_alphas_cumprod[kept], rtol=1e-10, atol=0)


def test_spacing_with_every_step_is_the_base_process():
    betas = get_named_beta_schedule("linear", 200)
    spaced = _spaced("linear", 200, "200")
    np.testing.assert_allclose(spaced.betas, betas, rtol=1e-12, atol=1e-15)


def test_spaced_diffusion_rejects_bad_use_timesteps():
    betas = get_named_beta_schedule("linear", 50)
    kwargs = dict(
        betas=betas,
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_LARGE,
        loss_type=LossType.MSE,
    )
    with pytest.raises(ValueError, match="use_timesteps"):
        SpacedDiffusion(use_timesteps=[], **kwargs)
    with pytest.raises(ValueError, match=r"use_timesteps must lie in \[0, 50\)"):
        SpacedDiffusion(use_timesteps=[0, 50], **kwargs)


class _RecordingModel(torch.nn.Module):
    """Returns zeros and records the timesteps and keyword arguments it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, timesteps, **kwargs):
        self.calls.append((timesteps.clone(), kwargs))
        return torch.zeros_like(x)


@pytest.mark.parametrize("rescale", [False, True])
def test_respaced_model_sees_base_timesteps_and_kwargs(rescale):
    spaced = _spaced("linear", 400, "ddim20", rescale=rescale)
    model = _RecordingModel()
    t = torch.tensor([0, 1, 7, 19])
    x = torch.randn(4, 2, 3)
    labels = torch.tensor([3, 1, 4, 1])
    spaced.training_losses(model, x, t, model_kwargs={"y": labels})
    spaced.p_mean_variance(model, x, t, model_kwargs={"y": labels})
    base_steps = torch.tensor([0, 20, 140, 380])
    for seen, kwargs in model.calls:
        assert torch.equal(kwargs["y"], labels)
        if rescale:
            assert seen.dtype == torch.float32
            torch.testing.assert_close(seen, base_steps.float() * (1000 / 400))
        else:
            assert seen.dtype == torch.long and torch.equal(seen, base_steps)
    assert len(model.calls) == 2


@pytest.mark.parametrize("rescale", [False, True])
def test_plain_diffusion_scales_timesteps_when_asked(rescale):
    diffusion = GaussianDiffusion(
        betas=get_named_beta_schedule("linear", 250),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
        rescale_timesteps=rescale,
    )
    model = _RecordingModel()
    t = torch.tensor([0, 249])
    diffusion.training_losses(model, torch.randn(2, 3), t)
    seen = model.calls[0][0]
    assert torch.equal(seen, torch.tensor([0.0, 996.0]) if rescale else t)


def test_respaced_wrapper_is_reused_not_nested():
    spaced = _spaced("linear", 100, "ddim10")
    wrapped = spaced._wrap_model(_RecordingModel())
    assert spaced._wrap_model(wrapped) is wrapped
    assert not isinstance(wrapped, torch.nn.Module)


@pytest.mark.parametrize(
    ("flags", "mean_type", "var_type", "loss_type"),
    [
        ({}, ModelMeanType.EPSILON, ModelVarType.FIXED_LARGE, LossType.MSE),
        ({"sigma_small": True}, ModelMeanType.EPSILON, ModelVarType.FIXED_SMALL, LossType.MSE),
        (
            {"learn_sigma": True, "sigma_small": True},
            ModelMeanType.EPSILON,
            ModelVarType.LEARNED_RANGE,
            LossType.MSE,
        ),
        (
            {"rescale_learned_sigmas": True},
            ModelMeanType.EPSILON,
            ModelVarType.FIXED_LARGE,
            LossType.RESCALED_MSE,
        ),
        (
            {"use_kl": True, "rescale_learned_sigmas": True},
            ModelMeanType.EPSILON,
            ModelVarType.FIXED_LARGE,
            LossType.RESCALED_KL,
        ),
        ({"predict_xstart": True}, ModelMeanType.START_X, ModelVarType.FIXED_LARGE, LossType.MSE),
    ],
)
def test_create_gaussian_diffusion_flags(flags, mean_type, var_type, loss_type):
    diffusion = create_gaussian_diffusion(steps=100, **flags)
    assert isinstance(diffusion, SpacedDiffusion)
    assert diffusion.model_mean_type == mean_type
    assert diffusion.model_var_type == var_type
    assert diffusion.loss_type == loss_type
    assert diffusion.num_timesteps == 100 and not diffusion.rescale_timesteps


def test_create_gaussian_diffusion_schedule_and_respacing():
    diffusion = create_gaussian_diffusion(
        steps=1000, noise_schedule="cosine", timestep_respacing="ddim25", rescale_timesteps=True
    )
    assert (
        diffusion.num_timesteps == 25 and diffusion.original_num_steps == 1000 and diffusion.rescale_timesteps
    )
    base = np.cumprod(1.0 - get_named_beta_schedule("cosine", 1000))
    np.testing.assert_allclose(diffusion.alphas_cumprod, base[::40], rtol=1e-12)
    with pytest.raises(ValueError, match="schedule_name"):
        create_gaussian_diffusion(noise_schedule="sqrt")
