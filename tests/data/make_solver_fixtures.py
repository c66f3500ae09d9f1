"""Writes tests/data/solver_reference.pt: euler, heun and dpmpp_2m samples on explicit grids, computed by
fastdiff before issue 21 (commit 701d017).

Issue 21 adds grids and solvers; the existing samplers on the grids they already had must not change (bit
for bit on the AMD EPYC that recorded them, to float32 rounding on other CPUs). tests/test_sampling.py
compares today's ``sample_batch`` with this file. DDPM and DDIM have their own file
(``sampler_reference.pt``, make_sampler_fixtures.py).

The model is make_sampler_fixtures' analytic function of (x, t), so the file holds only the outputs:
``{name: {"flags": create_gaussian_diffusion kwargs, "sampler", "spacing", "steps", "clip",
"output": [2, 2, 4, 4]}}``.
Run from the repository root: ``PYTHONPATH=.:tests python tests/data/make_solver_fixtures.py``.
"""

import os

import torch
from data.make_sampler_fixtures import SHAPE, analytic_model

from fastdiff.diffusion import create_gaussian_diffusion
from fastdiff.diffusion.sampling import sample_batch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_FILE = "solver_reference.pt"

DIFFUSIONS = {
    "eps_cosine": dict(steps=40, noise_schedule="cosine", rescale_timesteps=True),
    "xstart_linear": dict(steps=40, noise_schedule="linear", predict_xstart=True),
    "v_learned_cosine_respaced": dict(
        steps=40, noise_schedule="cosine", predict_v=True, learn_sigma=True, timestep_respacing="20"
    ),
    "v_zero_snr_linear": dict(
        steps=40, noise_schedule="linear", predict_v=True, rescale_zero_terminal_snr=True
    ),
}
GRIDS = {"uniform": 7, "quadratic": 6, "karras": 7, "logsnr": 5}
SAMPLERS = ("euler", "heun", "dpmpp_2m")


def run_case(flags: dict, sampler: str, spacing: str, steps: int, clip: bool) -> torch.Tensor:
    diffusion = create_gaussian_diffusion(**flags)
    model = analytic_model(flags.get("learn_sigma", False))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    return sample_batch(
        model, diffusion, SHAPE, sampler=sampler, steps=steps, timestep_spacing=spacing, noise=noise,
        clip_denoised=clip,
    )  # fmt: skip


def cases():
    """(name, flags, sampler, spacing, steps, clip_denoised) of every fixture."""
    for name, flags in DIFFUSIONS.items():
        for sampler in SAMPLERS:
            for spacing, steps in GRIDS.items():
                clip = spacing != "karras"
                yield f"{name}/{sampler}/{spacing}", flags, sampler, spacing, steps, clip


def main() -> None:
    fixtures = {}
    for name, flags, sampler, spacing, steps, clip in cases():
        output = run_case(flags, sampler, spacing, steps, clip)
        fixtures[name] = dict(
            flags=flags, sampler=sampler, spacing=spacing, steps=steps, clip=clip, output=output
        )
    torch.save(fixtures, os.path.join(HERE, FIXTURE_FILE))


if __name__ == "__main__":
    main()
