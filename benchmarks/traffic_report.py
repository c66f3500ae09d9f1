"""Memory-traffic report: bytes moved by fastdiff's Triton kernels, the floor, and eager PyTorch's bytes.

    python -m benchmarks.traffic_report [--json PATH] [--jobs K]

The kernels run under Triton's interpreter on CPU tensors, in subprocesses started with
``TRITON_INTERPRET=1`` (the variable must be set before Triton is imported), inside
``fastdiff.kernels.traffic.count_traffic()``, which adds up the bytes of the active lanes of every load and
store. Per row:

* floor: each input of the op read once and each output written once (GroupNorm statistics included);
* eager: improved-diffusion's eager code (``fastdiff.selftest.eager``), bytes per aten op, in and out
  (``benchmarks.eager_bytes``);
* for attention forward, the tiling model ``q + out + lse + ceil(T / BLOCK_M) * (k + v)``: every query
  block re-reads k and v; and whether the kernels wrote anything beyond their outputs (a ``T x T`` store).

Shapes are small (the interpreter is slow) but keep the two GroupNorm paths: a group that fits one program
and a group split over several programs.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.eager_bytes import count_eager_bytes, tensor_bytes
from fastdiff.selftest import eager

NUM_GROUPS = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class NormCase:
    """A GroupNorm problem ``[N, C, H, W]``; ``label`` says which kernel path it exercises."""

    label: str
    shape: tuple[int, int, int, int]


NORM_CASES = (  # 2 channels per group at 16x16; 6 channels per group (padded to 8) at 48x48
    NormCase("group fits one program", (2, 64, 16, 16)),
    NormCase("group split over programs", (1, 192, 48, 48)),
)
ATTENTION_SHAPE = (1, 4, 64, 256)  # B, H, D, T: the CIFAR-10 model's 16x16 attention, one sample
NORM_VARIANTS = ("group_norm", "group_norm_silu", "group_norm_scale_shift_silu")

TARGETS = {
    ("forward", "fits"): 1.05,
    ("forward", "split"): 1.55,
    ("backward", "fits"): 1.10,
    ("backward", "split"): 1.10,
}
EAGER_TARGETS = {"group_norm_silu": 2.2, "group_norm_scale_shift_silu": 3.5}
ATTENTION_FORWARD_TARGET = 1.10


def _sum_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(tensor_bytes(t) for t in tensors if t is not None)


def norm_path(shape: tuple[int, ...], backward: bool) -> str:
    """'fits' or 'split': whether one program holds a whole group (``kernels.group_norm.launch_path``)."""
    from fastdiff.kernels.group_norm import launch_path

    return "fits" if launch_path(shape, NUM_GROUPS, backward=backward) == "fused" else "split"


def _counted(run: Callable[[], Any]) -> tuple[Any, int, int]:
    """(result, bytes read, bytes written) of the Triton kernels launched by ``run``."""
    from fastdiff.kernels.traffic import count_traffic

    with count_traffic() as traffic:
        result = run()
    return result, traffic.bytes_read, traffic.bytes_written


def _row(pass_name: str, **fields: Any) -> dict[str, Any]:
    """A report row with its derived totals and ratios; ``pass_name`` is stored under ``pass``."""
    fields = {"pass": pass_name, **fields}
    kernel_bytes = fields["kernel_read"] + fields["kernel_written"]
    fields["kernel_bytes"] = kernel_bytes
    fields["kernel_over_floor"] = kernel_bytes / fields["floor_bytes"]
    fields["eager_over_kernel"] = fields["eager_bytes"] / kernel_bytes
    return fields


def _check(ratio: float, target: float | None, at_least: bool = False) -> bool | None:
    if target is None:
        return None
    return ratio >= target if at_least else ratio <= target


def norm_rows(variant: str, case: NormCase, dtype_name: str, seed: int = 0) -> list[dict[str, Any]]:
    """Forward, backward and their sum for one GroupNorm variant at one shape and dtype."""
    from fastdiff.kernels import group_norm as kernels

    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    n, c = case.shape[:2]
    x = torch.randn(case.shape, generator=gen).to(dtype)
    weight = 1 + 0.1 * torch.randn(c, generator=gen)
    bias = 0.1 * torch.randn(c, generator=gen)
    scale = shift = None
    if variant == "group_norm_scale_shift_silu":
        scale, shift = (
            (0.1 * torch.randn(n, c, generator=gen)).to(dtype),
            (0.1 * torch.randn(n, c, generator=gen)).to(dtype),
        )
    silu = variant != "group_norm"
    dy = torch.randn(case.shape, generator=gen).to(dtype)

    (y, mean, rstd), fwd_read, fwd_written = _counted(
        lambda: kernels.group_norm_forward(x, NUM_GROUPS, weight, bias, scale, shift, 1e-5, silu)
    )
    needs = (True, True, True, scale is not None, shift is not None)
    grads, bwd_read, bwd_written = _counted(
        lambda: kernels.group_norm_backward(
            dy, x, NUM_GROUPS, weight, bias, scale, shift, mean, rstd, silu, needs
        )
    )
    fwd_floor = _sum_bytes(x, weight, bias, scale, shift) + _sum_bytes(y, mean, rstd)
    bwd_floor = _sum_bytes(dy, x, weight, bias, scale, shift, mean, rstd) + _sum_bytes(*grads)

    leaves = [
        t.clone().requires_grad_() for t in (x, weight, bias) + ((scale, shift) if scale is not None else ())
    ]
    with count_eager_bytes() as eager_fwd:
        if variant == "group_norm":
            out = eager.group_norm32(leaves[0], NUM_GROUPS, leaves[1], leaves[2])
        elif variant == "group_norm_silu":
            out = eager.group_norm32_silu(leaves[0], NUM_GROUPS, leaves[1], leaves[2])
        else:
            out = eager.group_norm32_scale_shift_silu(
                leaves[0], NUM_GROUPS, leaves[1], leaves[2], leaves[3], leaves[4]
            )
    with count_eager_bytes() as eager_bwd:
        torch.autograd.grad(out, leaves, dy)

    common = {
        "kernel": variant,
        "case": case.label,
        "shape": list(case.shape),
        "dtype": dtype_name,
    }
    rows = []
    for pass_name, read, written, floor, eager_bytes, path in (
        ("forward", fwd_read, fwd_written, fwd_floor, eager_fwd.bytes_total, norm_path(case.shape, False)),
        ("backward", bwd_read, bwd_written, bwd_floor, eager_bwd.bytes_total, norm_path(case.shape, True)),
    ):
        row = _row(
            **common,
            pass_name=pass_name,
            path=path,
            kernel_read=read,
            kernel_written=written,
            floor_bytes=floor,
            eager_bytes=eager_bytes,
        )
        rows.append(row)
    total = _row(
        **common,
        pass_name="forward+backward",
        path=f"{rows[0]['path']}/{rows[1]['path']}",
        kernel_read=fwd_read + bwd_read,
        kernel_written=fwd_written + bwd_written,
        floor_bytes=fwd_floor + bwd_floor,
        eager_bytes=eager_fwd.bytes_total + eager_bwd.bytes_total,
    )
    rows.append(total)
    for row in rows:
        floor_target = TARGETS.get((row["pass"], row["path"]))
        row["floor_target"] = floor_target
        row["floor_target_met"] = _check(row["kernel_over_floor"], floor_target)
        eager_target = EAGER_TARGETS.get(variant)
        row["eager_target"] = eager_target
        row["eager_target_met"] = _check(row["eager_over_kernel"], eager_target, at_least=True)
    return rows


def attention_rows(dtype_name: str, seed: int = 0) -> list[dict[str, Any]]:
    """Forward and backward of the flash attention over the UNet's qkv layout at ``ATTENTION_SHAPE``."""
    from fastdiff.kernels import attention as kernels
    from fastdiff.kernels import launch

    from fastdiff.ops.attention import qkv_views

    dtype = DTYPES[dtype_name]
    batch, heads, head_dim, tokens = ATTENTION_SHAPE
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, 3 * heads * head_dim, tokens, generator=gen).to(dtype)
    q, k, v = qkv_views(qkv, heads, "legacy")
    out_flat = qkv.new_empty(batch, heads * head_dim, tokens)
    out = out_flat.view(batch, heads, head_dim, tokens).transpose(-1, -2)
    scale = head_dim**-0.5
    (_, lse), fwd_read, fwd_written = _counted(lambda: kernels.attention_forward(q, k, v, scale, out=out))
    dout_flat = torch.randn(out_flat.shape, generator=gen).to(dtype)
    dout = dout_flat.view(batch, heads, head_dim, tokens).transpose(-1, -2)
    dqkv = torch.empty_like(qkv)
    dq, dk, dv = qkv_views(dqkv, heads, "legacy")
    _, bwd_read, bwd_written = _counted(
        lambda: kernels.attention_backward(dout, q, k, v, out, lse, scale, dq, dk, dv)
    )
    precision = "fp32" if dtype == torch.float32 else "half"
    forward = kernels.kernel_name("fwd", precision, kernels.head_dim_bucket(head_dim))
    block_m = launch.last_config(forward).meta["BLOCK_M"]  # the config the forward above ran
    q_blocks = math.ceil(tokens / block_m)
    fwd_floor = _sum_bytes(q, k, v) + _sum_bytes(out, lse)
    tiled_model = _sum_bytes(q, out, lse) + q_blocks * _sum_bytes(k, v)
    bwd_floor = _sum_bytes(dout, q, k, v, out, lse) + _sum_bytes(dq, dk, dv)
    score_matrix = batch * heads * tokens * tokens * 4

    leaf = qkv.clone().requires_grad_()
    with count_eager_bytes() as eager_fwd:
        eager_out = eager.qkv_attention(leaf, heads)
    with count_eager_bytes() as eager_bwd:
        torch.autograd.grad(eager_out, leaf, dout_flat)
    common = {
        "kernel": "qkv_attention",
        "case": f"B{batch} H{heads} D{head_dim} T{tokens}",
        "dtype": dtype_name,
    }
    common["shape"] = [batch, 3 * heads * head_dim, tokens]
    forward = _row(
        **common,
        pass_name="forward",
        path=f"BLOCK_M={block_m}",
        kernel_read=fwd_read,
        kernel_written=fwd_written,
        floor_bytes=fwd_floor,
        eager_bytes=eager_fwd.bytes_total,
    )
    forward["tiled_model_bytes"] = tiled_model
    forward["kernel_over_tiled_model"] = forward["kernel_bytes"] / tiled_model
    forward["floor_target"] = ATTENTION_FORWARD_TARGET
    forward["floor_target_met"] = forward["kernel_over_tiled_model"] <= ATTENTION_FORWARD_TARGET
    forward["writes_beyond_outputs"] = fwd_written - _sum_bytes(out, lse)
    forward["score_matrix_bytes"] = score_matrix
    forward["no_txt_store"] = forward["writes_beyond_outputs"] < score_matrix
    backward = _row(
        **common,
        pass_name="backward",
        path="dK/dV + dQ kernels",
        kernel_read=bwd_read,
        kernel_written=bwd_written,
        floor_bytes=bwd_floor,
        eager_bytes=eager_bwd.bytes_total,
    )
    backward["floor_target"] = None
    backward["floor_target_met"] = None
    for row in (forward, backward):
        row["eager_target"] = None
        row["eager_target_met"] = None
    return [forward, backward]


def work_items(dtypes: tuple[str, ...] = tuple(DTYPES)) -> list[tuple[str, str, str]]:
    """(dtype, kernel, case label) of every report section, in report order."""
    items = []
    for dtype_name in dtypes:
        items += [(dtype_name, variant, case.label) for variant in NORM_VARIANTS for case in NORM_CASES]
        items.append((dtype_name, "qkv_attention", ""))
    return items


def rows_of(item: tuple[str, str, str]) -> list[dict[str, Any]]:
    """The rows of one work item (needs ``TRITON_INTERPRET=1`` in this process)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the traffic report needs TRITON_INTERPRET=1 set before Triton is imported")
    dtype_name, kernel, label = item
    if kernel == "qkv_attention":
        return attention_rows(dtype_name)
    case = next(c for c in NORM_CASES if c.label == label)
    return norm_rows(kernel, case, dtype_name)


def traffic_rows(jobs: int = 1, timeout_s: float = 900.0) -> list[dict[str, Any]]:
    """Every row of the report, in report order, computed by ``jobs`` subprocesses of this module run with
    ``TRITON_INTERPRET=1`` (work items dealt out round-robin)."""
    import tempfile

    if jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        outputs = [Path(tmp, f"shard{i}.json") for i in range(jobs)]
        command = [sys.executable, "-m", "benchmarks.traffic_report", "--quiet"]
        procs = [
            subprocess.Popen(
                [*command, "--shard", f"{i}/{jobs}", "--json", str(out)],
                cwd=root,
                env=env,
            )
            for i, out in enumerate(outputs)
        ]
        codes = [proc.wait(timeout=timeout_s) for proc in procs]
        if any(codes):
            raise RuntimeError(f"traffic report subprocesses failed with exit codes {codes}")
        shards = [json.loads(out.read_text()) for out in outputs]
    by_item = {tuple(entry["item"]): entry["rows"] for shard in shards for entry in shard}
    return [row for item in work_items() for row in by_item[item]]


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'kernel':<28} {'pass':<16} {'dtype':<5} {'case':<26} {'path':<12} {'kernel B':>10} "
        f"{'floor B':>10} {'eager B':>10} {'k/floor':>7} {'eager/k':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['kernel']:<28} {r['pass']:<16} {r['dtype']:<5} {r['case']:<26} {r['path']:<12} "
            f"{r['kernel_bytes']:>10} {r['floor_bytes']:>10} {r['eager_bytes']:>10} "
            f"{r['kernel_over_floor']:>7.3f} {r['eager_over_kernel']:>7.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.traffic_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--jobs", type=int, default=1, help="run in this many processes")
    parser.add_argument("--shard", help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="print no table")
    args = parser.parse_args(argv)
    if args.shard is None:
        rows: list = traffic_rows(args.jobs)
    else:
        index, count = (int(v) for v in args.shard.split("/"))
        rows = [{"item": item, "rows": rows_of(item)} for item in work_items()[index::count]]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.quiet and args.shard is None:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
