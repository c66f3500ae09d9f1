"""The optimizer (AdamW, or apex's FusedAdam in AdamW mode) and improved-diffusion's linear LR anneal."""

import torch

from fastdiff.config import OPTIMIZERS


def apex_fused_adam():
    """apex's FusedAdam class, or None when apex is not importable."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        return None
    return FusedAdam


def build_optimizer(
    name: str, params, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """``adamw``: torch.optim.AdamW (fused); ``fused_adam``: apex's FusedAdam (AdamW mode, CUDA only)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if name == "adamw":
        # fused: one kernel per step, and it can skip a non-finite step on the device (found_inf)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    fused_adam = apex_fused_adam()
    if fused_adam is None:
        raise ValueError(
            "--optimizer fused_adam needs NVIDIA apex (apex.optimizers.FusedAdam): it is not importable"
        )
    if device.type != "cuda":
        raise ValueError("--optimizer fused_adam runs on CUDA devices only; use --optimizer adamw on the CPU")
    return fused_adam(params, lr=lr, weight_decay=weight_decay, adam_w_mode=True)


def annealed_lr(base_lr: float, step: int, anneal_steps: int) -> float:
    """improved-diffusion's ``base_lr * (1 - step / anneal_steps)``; constant when anneal_steps is 0."""
    if not anneal_steps:
        return base_lr
    return base_lr * (1.0 - step / anneal_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
