"""Peak memory of a train step of improved-diffusion's 64x64 UNet with one attention implementation.

Run in a fresh process per implementation and precision (``python -m benchmarks.attention_memory_step
MODE [fp32|bf16]``), so that each peak is its own: ``fastdiff`` (``ops.qkv_attention``, the UNet as
built), ``einsum`` (improved-diffusion's attention math, which keeps the T x T weights for the backward)
or ``none`` (attention that keeps nothing: the baseline that isolates attention's own share). Prints one
JSON line.
"""

import json
import math
import resource
import sys
import time

import torch
from torch import nn

from benchmarks.timing import peak_memory
from fastdiff.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from fastdiff.unet import AttentionBlock

MODES = ("fastdiff", "einsum", "none")
PRECISIONS = ("fp32", "bf16")
"""fp32, or bf16 autocast (weights, gradients and optimizer state stay fp32)."""
CONFIG = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=3,
    channel_mult="1,2,3,4",
    attention_resolutions="32,16,8",
    num_heads=4,
    learn_sigma=True,
)
"""improved-diffusion's ImageNet-64 UNet."""
BATCH = 8


class EinsumQKVAttention(nn.Module):
    """improved-diffusion's QKVAttention math on the legacy layout ``[B, 3*H*D, T] -> [B, H*D, T]``."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        b, width, t = qkv.shape
        d = width // (3 * self.num_heads)
        q, k, v = qkv.reshape(b * self.num_heads, 3 * d, t).split(d, dim=1)
        s = 1 / math.sqrt(math.sqrt(d))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s).float(), dim=-1).type(qkv.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, t)


class KeepNothingAttention(nn.Module):
    """Returns the first third of qkv's channels: no weights, nothing kept for the backward."""

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return qkv[:, : qkv.shape[1] // 3]


PEAKS = (("step_peak_bytes", "step"), ("peak_bytes", "process"))
"""The two peaks each run reports, and the label of each in ``ratios``."""


def ratios(runs: dict[str, dict]) -> dict[str, float]:
    """fastdiff's peaks against einsum's, whole and attention's own share (above the keep-nothing run)."""
    fastdiff, einsum, base = runs["fastdiff"], runs["einsum"], runs["none"]
    out = {}
    for key, label in PEAKS:
        out[f"{label}_peak_vs_einsum"] = fastdiff[key] / einsum[key]
        out[f"{label}_attention_share_vs_einsum"] = (fastdiff[key] - base[key]) / (einsum[key] - base[key])
    return out


def process_peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(mode: str, precision: str = "fp32") -> dict:
    """Two AdamW steps; the second, with the optimizer state in place, is the measured one.

    ``step_peak_bytes``: the peak the second step allocates above what is live before it (weights and
    optimizer state; gradients are dropped first), i.e. activations, gradients and temporaries.
    ``peak_bytes``: the whole process's peak resident memory, for comparison.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    flags = {**model_and_diffusion_defaults(), **CONFIG}
    model, diffusion = create_model_and_diffusion(**flags)
    for block in model.modules():
        if isinstance(block, AttentionBlock) and mode != "fastdiff":
            block.attention = (
                EinsumQKVAttention(block.num_heads) if mode == "einsum" else KeepNothingAttention()
            )
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(BATCH, 3, 64, 64, device=device)
    t = torch.randint(0, flags["diffusion_steps"], (BATCH,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = diffusion.training_losses(model, x, t)["loss"].mean()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    step_peak, method = peak_memory(step, device)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "mode": mode,
        "precision": precision,
        "device": str(device),
        "parameters": parameters,
        "step_peak_bytes": step_peak,
        "step_peak_method": method,
        "peak_bytes": process_peak_bytes(device),
        "first_step_s": seconds,
    }


if __name__ == "__main__":
    print(json.dumps(measure(*sys.argv[1:])))
