"""A training step of a small diffusers ``UNet2DModel``, as diffusers builds it and after ``apply_fastdiff``.

Contestants, paired in one process (``benchmarks.timing``): ``diffusers`` (the model as built) and
``fastdiff`` (a deep copy with the same weights, patched by ``fastdiff.integrations.diffusers``; fastdiff's
default backend, ``auto``). Each has its own AdamW; a step is the epsilon-prediction MSE loss on fixed noisy
inputs, backward and the optimizer step. Reported, never asserted: median step time, the ratio
(diffusers / fastdiff: above 1 when the patch is faster) and peak memory of the first step. The record
goes to pytest-benchmark's table and JSON (``extra_info``) and to the run's data under ``"diffusers"``.

    pytest benchmarks/test_bench_diffusers.py --benchmark-only
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from benchmarks.session import BenchRun
from benchmarks.timing import Contestant, PairedResult, feed_contestant, measure_paired, smoke_run
from fastdiff import ops
from fastdiff.ops import backend as backends

diffusers = pytest.importorskip("diffusers")

from fastdiff.integrations.diffusers import apply_fastdiff  # noqa: E402  (needs diffusers)

CONTESTANTS = ("fastdiff", "diffusers")
GROUP = "diffusers UNet2DModel training step"
UNET_CONFIG = dict(
    sample_size=32,
    block_out_channels=(64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32,
)
BATCH = {"cpu": 4, "cuda": 32}


def _training_step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """One AdamW step of ``model`` on the noise-prediction loss; the optimizer is the contestant's own."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x, t).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # freed inside the step, so the peak covers the gradients

    return step


def measure(run: BenchRun) -> dict:
    """Builds both contestants, times them in interleaved rounds and returns the group's record."""
    settings = run.settings
    device = settings.device
    batch = BATCH[device.type]
    torch.manual_seed(0)
    base = diffusers.UNet2DModel(**UNET_CONFIG).to(device).train()
    patched = copy.deepcopy(base)
    report = apply_fastdiff(patched)
    gen = torch.Generator().manual_seed(0)
    size = UNET_CONFIG["sample_size"]
    clean = torch.randn(batch, 3, size, size, generator=gen)
    noise = torch.randn(clean.shape, generator=gen)
    alpha = torch.rand(batch, 1, 1, 1, generator=gen)
    x = (alpha.sqrt() * clean + (1 - alpha).sqrt() * noise).to(device)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    noise = noise.to(device)
    with ops.use_backend("auto"):
        resolved = {"group_norm": backends.resolve_group_norm(x)}
    contestants = [
        Contestant(
            "fastdiff",
            _training_step(patched, x, t, noise),
            {"changed": len(report.changes), "skipped": len(report.skipped), "backends": resolved},
        ),
        Contestant("diffusers", _training_step(base, x, t, noise), {}),
    ]
    if settings.smoke:
        result = smoke_run(contestants, device)
    else:
        result = measure_paired(
            contestants, device, settings.e2e_rounds, warmup=1, min_round_s=0.0, with_memory=True
        )
    record = _record(result, batch, device, report.summary())
    run.data.setdefault("diffusers", []).append(record)
    return record


def _record(result: PairedResult, batch: int, device: torch.device, patch_summary: str) -> dict:
    return {
        "model": "UNet2DModel",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
        "batch": batch,
        "device": str(device),
        "diffusers_version": diffusers.__version__,
        "speedup": result.speedup("fastdiff", "diffusers") if "fastdiff" in result.samples else None,
        "memory_method": result.memory_method,
        "patch": patch_summary,
        "contestants": result.contestant_records(),
    }


@pytest.mark.parametrize("contestant", CONTESTANTS)
def test_diffusers_unet_training_step(benchmark, bench: BenchRun, contestant: str):
    benchmark.group = GROUP
    record = bench.paired(GROUP, lambda: measure(bench))
    feed_contestant(
        benchmark,
        record,
        contestant,
        diffusers_version=record["diffusers_version"],
        speedup_fastdiff_vs_diffusers=record["speedup"],
    )
