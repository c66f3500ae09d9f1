"""Decoding with a diffusers AutoencoderKL of Stable Diffusion's architecture, as built and after
``apply_fastdiff`` (``benchmarks.vae_patch`` builds and measures both).

Contestants, paired in one process: ``diffusers`` (the VAE as diffusers builds it) and ``fastdiff`` (a deep
copy with the same weights, patched; backend ``auto``). An iteration is one ``vae.decode(z)`` under
``torch.no_grad``: on a CPU batch 1 of 32x32 latents (256x256 images), on CUDA batch 4 of 64x64 (512x512).
Reported, never asserted: median time, the ratio (diffusers / fastdiff) and the tensor peak of the first
decode. The record joins the run's ``"diffusers"`` table. ``python -m benchmarks.vae_patch`` measures the
same decode with the process's CPU clock and adds the resident-set peak of a fresh process.

    pytest benchmarks/test_bench_vae.py --benchmark-only
"""

import pytest

from benchmarks.session import BenchRun
from benchmarks.timing import feed_contestant

pytest.importorskip("diffusers")

from benchmarks import vae_patch

GROUP = "diffusers AutoencoderKL decode"
LATENT_SIZE = {"cpu": 32, "cuda": 64}
BATCH = {"cpu": 1, "cuda": 4}


def measure(run: BenchRun) -> dict:
    settings = run.settings
    kind = settings.device.type
    record = vae_patch.measure(
        batch=BATCH[kind],
        size=LATENT_SIZE[kind],
        rounds=settings.e2e_rounds,
        clock_name="wall",
        device=settings.device,
        smoke=settings.smoke,
        rss_repeats=0,
        shares=False,
    )
    run.data.setdefault("diffusers", []).append(record)
    return record


@pytest.mark.parametrize("contestant", vae_patch.CONTESTANTS)
def test_diffusers_vae_decode(benchmark, bench: BenchRun, contestant: str):
    benchmark.group = GROUP
    record = bench.paired(GROUP, lambda: measure(bench))
    feed_contestant(
        benchmark,
        record,
        contestant,
        model=record["model"],
        diffusers_version=record["diffusers_version"],
        speedup_fastdiff_vs_diffusers=record["speedup"],
    )
