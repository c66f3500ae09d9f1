"""Writes tests/data/sampler_reference.pt: DDPM and DDIM samples computed by fastdiff before issue 13.

The samplers of issue 13 must leave improved-diffusion's DDPM and DDIM results unchanged: bit for bit on
the AMD EPYC that ran this script once, on the code before that change (commit a49f8d1), and to float32
rounding on other CPUs. tests/test_sampling.py compares today's ``GaussianDiffusion`` loops with it, and
``fastdiff.diffusion.sampling.sample_batch`` with those loops, bit for bit.

The model is a fixed analytic function of (x, t), so the file holds only the outputs:
``{name: {"flags": create_gaussian_diffusion kwargs, "sampler": "ddpm" | "ddim", "output": [2, 2, 4, 4]}}``.
"""

import os

import torch

from fastdiff.diffusion import create_gaussian_diffusion

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_FILE = "sampler_reference.pt"
SHAPE = (2, 2, 4, 4)

CASES = {
    "eps_fixed_large": dict(steps=40, noise_schedule="linear", rescale_timesteps=True),
    "xstart_fixed_small": dict(steps=40, noise_schedule="cosine", predict_xstart=True, sigma_small=True),
    "eps_learned_respaced": dict(
        steps=40, noise_schedule="cosine", learn_sigma=True, rescale_timesteps=True, timestep_respacing="10"
    ),
    "eps_ddim_stride": dict(steps=40, noise_schedule="linear", timestep_respacing="ddim8"),
}


def analytic_model(learn_sigma: bool):
    """A smooth, t-dependent stand-in for a trained network: [N, C, H, W] -> [N, C or 2C, H, W]."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = (1.0 + t.float() / 40.0).view(-1, 1, 1, 1)
        mean = torch.tanh(0.7 * x * scale) + 0.1 * torch.roll(x, 1, dims=-1)
        if not learn_sigma:
            return mean
        return torch.cat([mean, torch.tanh(x.sum(dim=1, keepdim=True).expand_as(x) * 0.3)], dim=1)

    return model


def run_case(flags: dict, sampler: str) -> torch.Tensor:
    diffusion = create_gaussian_diffusion(**flags)
    model = analytic_model(flags.get("learn_sigma", False))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(11)
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    return loop(model, SHAPE, noise=noise, clip_denoised=True)


def main() -> None:
    fixtures = {}
    for name, flags in CASES.items():
        for sampler in ("ddpm", "ddim"):
            fixtures[f"{name}/{sampler}"] = {
                "flags": flags,
                "sampler": sampler,
                "output": run_case(flags, sampler),
            }
    torch.save(fixtures, os.path.join(HERE, FIXTURE_FILE))


if __name__ == "__main__":
    main()
