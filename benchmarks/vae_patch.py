"""``apply_fastdiff`` on a diffusers AutoencoderKL decoder: time and peak memory against the unpatched one.

    python -m benchmarks.vae_patch                        # CPU, batch 1, 32x32 latents -> 256x256
    python -m benchmarks.vae_patch --rounds 9 --out benchmarks/results

The VAE has Stable Diffusion's architecture (block_out_channels (128, 256, 512, 512), 2 ResnetBlock2Ds per
level, 4 latent channels, 32 groups; 83.7 M parameters), randomly initialised (seed 0): the decoder's cost
does not depend on the weights' values, and nothing is downloaded. One decode, ``vae.decode(z)`` under
``torch.no_grad`` with ``z [batch, 4, 32, 32]``, is one iteration. Contestants, in one process:

* ``diffusers``: the VAE as diffusers builds it;
* ``fastdiff``: a deep copy (same weights) after ``apply_fastdiff``, fastdiff's default backend ``auto``.

Time: paired, interleaved rounds (``benchmarks.timing.measure_paired``), one decode per round, the order
rotating; medians, ``speedup = median(diffusers) / median(fastdiff)`` and the interquartile range of the
per-round ratios. Clock ``cpu`` (default with one torch thread): this process's CPU seconds
(``time.process_time``), which other jobs on a shared machine disturb far less than wall time.

Peak memory, two ways, each per contestant:

* ``tensor peak``: the most bytes PyTorch's CPU allocator had handed out at once during the first decode,
  above what was allocated before it, from torch.profiler's memory events (``benchmarks.timing``); tensors
  only, no allocator caches or code;
* ``RSS peak``: in a fresh Python process per contestant (``--rss-child``) that builds the model, reads its
  resident set, resets the kernel's high-water mark (``/proc/self/clear_refs``, value 5) and decodes once:
  VmHWM after the decode minus VmRSS before it. What the operating system saw, malloc's arenas included.

The record also gives the largest difference between the two contestants' images, the patch report's
counts, the CPU model (``/proc/cpuinfo``), threads and the load average before and after.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import load_average
from benchmarks.timing import Contestant, PairedResult, measure_paired, smoke_run
from fastdiff.ops import backend as backends
from fastdiff.ops import cpu_policy

CONTESTANTS = ("fastdiff", "diffusers")
SD_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)
"""Stable Diffusion 1.x/2.x's AutoencoderKL architecture (downsampling factor 8)."""

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def build_vae(seed: int = 0) -> torch.nn.Module:
    """SD's VAE architecture with weights drawn from ``seed``, in eval mode, without gradients."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging

    logging.set_verbosity_error()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    return vae.eval().requires_grad_(False)


def latents(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    """``[batch, 4, size, size]`` standard normal latents (what a diffusion model's samples look like)."""
    return torch.randn(
        batch, SD_VAE_CONFIG["latent_channels"], size, size, generator=torch.Generator().manual_seed(seed)
    )


def decoder(vae: torch.nn.Module, z: torch.Tensor):
    """One decode of ``z``, under ``torch.no_grad``; returns the images ``[B, 3, 8h, 8w]``."""

    def run() -> torch.Tensor:
        with torch.no_grad():
            return vae.decode(z).sample

    return run


def contestants(batch: int, size: int, device: torch.device) -> tuple[list[Contestant], dict[str, Any]]:
    """Both contestants on ``device`` and what the patch did (summary, counts, the backends ``auto`` runs)."""
    from fastdiff.integrations.diffusers import apply_fastdiff

    base = build_vae().to(device)
    patched = copy.deepcopy(base)
    report = apply_fastdiff(patched)
    z = latents(batch, size).to(device)
    with torch.no_grad():
        difference = (decoder(base, z)() - decoder(patched, z)()).abs().max().item()
    patch = {
        "changed": len(report.changes),
        "skipped": len(report.skipped),
        "summary": report.summary(),
        "max_abs_difference": difference,
        "auto_group_norm": backends.resolve_group_norm(torch.empty(1, 128, 2, 2, device=device)),
    }
    entries = [
        Contestant(
            "fastdiff", decoder(patched, z), {"changed": len(report.changes), "skipped": len(report.skipped)}
        ),
        Contestant("diffusers", decoder(base, z), {}),
    ]
    return entries, patch


def per_round_ratios(result: PairedResult) -> list[float]:
    """Round i of diffusers over round i of fastdiff, for each round (above 1: the patch is faster)."""
    return [b / f for b, f in zip(result.samples["diffusers"], result.samples["fastdiff"], strict=True)]


def quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


# --- RSS in a fresh process --------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def rss_child(name: str, batch: int, size: int) -> dict[str, Any]:
    """In this (fresh) process: build contestant ``name``, reset the RSS high-water mark, decode once.

    Returns the resident set before the decode, its peak during it (both KiB) and how the peak was reset.
    """
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    vae = build_vae()
    if name == "fastdiff":
        from fastdiff.integrations.diffusers import apply_fastdiff

        apply_fastdiff(vae)
    z = latents(batch, size)
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        reset = "VmHWM reset with /proc/self/clear_refs before the decode"
    except OSError as error:
        reset = f"VmHWM not reset ({error}): the peak may be the model build's"
    images = decoder(vae, z)()
    peak = _status_kib("VmHWM")
    return {"rss_before_kib": before, "rss_peak_kib": peak, "reset": reset, "checksum": float(images.sum())}


def rss_peaks(batch: int, size: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Each contestant's RSS peak above start over ``repeats`` fresh processes (``--rss-child``), the
    contestants alternating: the median, the range and every child's figures."""
    children: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTESTANTS}
    errors: dict[str, str] = {}
    for _ in range(repeats):
        for name in CONTESTANTS:
            if name in errors:
                continue
            command = [sys.executable, "-m", "benchmarks.vae_patch", "--rss-child", name]
            command += ["--batch", str(batch), "--latent-size", str(size)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                errors[name] = done.stderr.strip()[-2000:]
                continue
            child = json.loads(done.stdout.strip().splitlines()[-1])
            child["peak_above_start_bytes"] = (child["rss_peak_kib"] - child["rss_before_kib"]) * 1024
            children[name].append(child)
    out: dict[str, dict[str, Any]] = {}
    for name, runs in children.items():
        if name in errors:
            out[name] = {"error": errors[name]}
            continue
        peaks = [child["peak_above_start_bytes"] for child in runs]
        out[name] = {
            "peak_above_start_bytes": statistics.median(peaks),
            "range_bytes": [min(peaks), max(peaks)],
            "reset": runs[0]["reset"],
            "children": runs,
        }
    return out


# --- where the time goes -----------------------------------------------------------------------------

OP_KINDS = (
    ("convolution", ("conv", "mkldnn")),
    ("GroupNorm (+ SiLU)", ("group_norm",)),
    ("SiLU", ("silu",)),
    ("attention", ("attention", "bmm", "softmax", "baddbmm")),
    ("upsample", ("upsample",)),
)


def time_shares(run: Any) -> dict[str, float]:
    """Share of one call's self CPU time per kind of aten op (torch.profiler; ``other``: the rest). Ops
    that bypass the dispatcher, as fastdiff's C++ GroupNorm calls do, are not seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    totals: dict[str, float] = {kind: 0.0 for kind, _ in OP_KINDS}
    totals["other"] = 0.0
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for k, words in OP_KINDS if any(w in name for w in words)), "other")
        totals[kind] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {kind: value / whole for kind, value in totals.items()}


# --- the measurement ---------------------------------------------------------------------------------


def measure(
    batch: int = 1,
    size: int = 32,
    rounds: int = 7,
    clock_name: str = "cpu",
    device: torch.device | None = None,
    smoke: bool = False,
    rss_repeats: int = 3,
    shares: bool = True,
) -> dict[str, Any]:
    """Times, tensor peaks, RSS peaks (``rss_repeats`` fresh processes per contestant, 0: none; CPU only)
    and (``shares``) where the unpatched decode's time goes; the record for the results."""
    device = device or torch.device("cpu")
    load_before = load_average()
    entries, patch = contestants(batch, size, device)
    if smoke:
        result = smoke_run(entries, device)
    else:
        clock = CLOCKS[clock_name]
        result = measure_paired(
            entries, device, rounds, warmup=1, min_round_s=0.0, with_memory=True, clock=clock
        )
    import diffusers

    record: dict[str, Any] = {
        "model": f"AutoencoderKL decode {size}x{size} -> {8 * size}x{8 * size}",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in SD_VAE_CONFIG.items()},
        "batch": batch,
        "device": str(device),
        "diffusers_version": diffusers.__version__,
        "clock": "not timed (smoke run)" if smoke else clock_name,
        "speedup": result.speedup("fastdiff", "diffusers") if "fastdiff" in result.samples else None,
        "memory_method": result.memory_method,
        "patch": patch,
        "contestants": result.contestant_records(),
        "cpu_model": cpu_policy.cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "load_average_before": load_before,
    }
    if not result.errors and not smoke:
        ratios = per_round_ratios(result)
        record["speedup_iqr"] = quartiles(ratios)
    if shares and not smoke:
        record["time_shares"] = time_shares(next(e for e in entries if e.name == "diffusers").run)
    if rss_repeats > 0 and device.type == "cpu":
        record["rss"] = rss_peaks(batch, size, rss_repeats)
    record["load_average_after"] = load_average()
    return record


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def markdown(record: dict[str, Any]) -> str:
    """The record as the markdown committed under benchmarks/results/."""
    base, patched = record["contestants"]["diffusers"], record["contestants"]["fastdiff"]
    rss = record.get("rss", {})
    iqr = record.get("speedup_iqr") or []
    spread = f" [{iqr[0]:.3f}-{iqr[1]:.3f}]" if iqr else ""
    threads, device = record["torch_threads"], record["device"]
    lines = [
        f"# apply_fastdiff on an AutoencoderKL decoder: {record['model']}",
        "",
        "Redo: `OMP_NUM_THREADS=1 python -m benchmarks.vae_patch` (see the module docstring for the method).",
        "",
        f"Machine: **{record['cpu_model']}** (model name as /proc/cpuinfo gives it), {threads} torch "
        f"thread(s), torch {record['torch']}, diffusers {record['diffusers_version']}, device {device}; "
        f"{record['usable_cpus']} usable CPUs. Load average {record['load_average_before']} before, "
        f"{record['load_average_after']} after (above the CPU count: other jobs competed for the cores).",
        "",
        f"Model: Stable Diffusion's VAE architecture, randomly initialised; batch {record['batch']}; one "
        f"iteration is `vae.decode(z)` under `torch.no_grad`. Clock: {record['clock']} "
        f"({len(base['samples_s'])} paired rounds).",
        "",
        "| contestant | median s | tensor peak MiB | RSS peak above start MiB: median [range] |",
        "|---|---|---|---|",
    ]
    for name, entry in (("diffusers", base), ("fastdiff (apply_fastdiff, auto)", patched)):
        figures = rss.get(name.split()[0], {})
        peak = "not measured"
        if "range_bytes" in figures:
            low, high = figures["range_bytes"]
            peak = f"{_mib(figures['peak_above_start_bytes'])} [{_mib(low)}-{_mib(high)}]"
        lines.append(f"| {name} | {entry['median_s']:.3f} | {_mib(entry['peak_memory_bytes'])} | {peak} |")
    lines += [
        "",
        f"Speedup (median diffusers / median fastdiff): **{record['speedup']:.3f}**{spread} "
        "(interquartile range of the per-round ratios).",
        "",
        f"Tensor peak: {record['memory_method']}. RSS peak: VmHWM minus VmRSS around one decode in a fresh "
        f"process, {len(rss.get('fastdiff', {}).get('children', []))} per contestant, alternating "
        f"({rss.get('fastdiff', {}).get('reset', 'not measured')}).",
        "",
        *share_lines(record.get("time_shares", {})),
        f"Patch: {record['patch']['changed']} changes, {record['patch']['skipped']} skipped; largest "
        f"difference between the contestants' images {record['patch']['max_abs_difference']:.2e}; auto ran "
        f"the GroupNorms on `{record['patch']['auto_group_norm']}`.",
        "",
        "```",
        record["patch"]["summary"],
        "```",
        "",
    ]
    return "\n".join(lines)


def share_lines(shares: dict[str, float]) -> list[str]:
    """Markdown of where the unpatched decode's time goes: what the patch can address at most."""
    if not shares:
        return []
    return [
        "Where the unpatched (diffusers) decode's time goes: share of its self CPU time by kind of op, "
        "torch.profiler, one profiled decode (GroupNorm, SiLU and attention are what the patch serves; "
        "fastdiff's C++ GroupNorm calls are not profiler-visible ops, so no such split is given for it):",
        "",
        f"| {' | '.join(shares)} |",
        f"|{'---|' * len(shares)}",
        f"| {' | '.join(f'{100 * value:.1f}%' for value in shares.values())} |",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="latents per decode")
    parser.add_argument("--latent-size", type=int, default=32, help="latent side (images are 8x larger)")
    parser.add_argument("--rounds", type=int, default=7, help="paired rounds")
    parser.add_argument("--clock", choices=sorted(CLOCKS), help="cpu (default with 1 torch thread) or wall")
    parser.add_argument("--rss-repeats", type=int, default=3, help="fresh processes per contestant (0: none)")
    parser.add_argument("--out", type=Path, help="write vae_patch.json and vae_patch.md to this folder")
    parser.add_argument("--rss-child", choices=CONTESTANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.latent_size < 1:
        parser.error("--batch and --latent-size must be positive")
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.batch, args.latent_size)))
        return
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the spread needs two rounds)")
    clock_name = args.clock or ("cpu" if torch.get_num_threads() == 1 else "wall")
    if clock_name == "cpu" and torch.get_num_threads() != 1:
        parser.error(f"--clock cpu needs one torch thread (CPU seconds of {torch.get_num_threads()} add up)")
    print(
        f"CPU {cpu_policy.cpu_model()}, {torch.get_num_threads()} thread(s), load {load_average()}",
        flush=True,
    )
    record = measure(args.batch, args.latent_size, args.rounds, clock_name, rss_repeats=args.rss_repeats)
    text = markdown(record)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vae_patch.json").write_text(json.dumps(record, indent=1))
        (args.out / "vae_patch.md").write_text(text)


if __name__ == "__main__":
    main()
