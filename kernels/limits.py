"""What fastdiff's Triton kernels can take, importable without Triton.

The op boundary (``fastdiff.ops``) checks inputs against these once and falls back or raises there; the
kernels' host code only asserts them.
"""

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Storage dtypes the kernels are compiled for (statistics and softmax run in fp32)."""

MAX_SAMPLE_ELEMENTS = 2**31
"""The GroupNorm kernels index inside one sample with 32-bit offsets (the sample index is 64-bit)."""

MAX_HEAD_DIM = 256
"""Largest attention head dim (fp16, bf16 and fp32; D is padded to a power of two, at least 16)."""
