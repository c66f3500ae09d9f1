"""Peak memory of a train step of improved-diffusion's 64x64 UNet with one attention implementation.

Run in a fresh process per implementation (``python -m benchmarks.attention_memory_step MODE``), so that
each peak is its own: ``fastdiff`` (``ops.qkv_attention``, the UNet as built), ``einsum``
(improved-diffusion's attention math, which keeps the T x T weights for the backward) or ``none``
(attention that keeps nothing: the baseline that isolates attention's own share). Prints one JSON line.
"""

import json
import math
import resource
import sys
import time

import torch
from torch import nn

from fastdiff.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from fastdiff.unet import AttentionBlock

MODES = ("fastdiff", "einsum", "none")
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


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(mode: str) -> dict:
    """Two AdamW steps (the second with optimizer state in place); the process's peak memory."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
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
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        loss = diffusion.training_losses(model, x, t)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "mode": mode,
        "device": str(device),
        "parameters": parameters,
        "peak_bytes": peak_bytes(device),
        "step_s": seconds[-1],
    }


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
