"""End-to-end benchmarks: a training step and DDIM sampling of a whole UNet.

Contestants, all the same model object: ``fastdiff`` (its default kernels: backend ``auto``, which is
``triton`` on CUDA and on CPU the picks of ``fastdiff.ops.cpu_policy``), ``torch`` (fastdiff's ``torch``
reference backend) and ``eager`` (the fused modules swapped for improved-diffusion's eager code,
``fastdiff.selftest.eager.eager_modules``: what the same UNet costs without fastdiff). Groups: training in
fp32 and bf16 autocast, with and without gradient checkpointing (``use_checkpoint``); sampling in fp32 and
bf16. Reported: images/s from the median step (or sampling loop) time, peak memory of the first step above
the resting model (each contestant has its own AdamW, whose state that step creates), and for the headline
group (training, fp32, no checkpointing) a torch.profiler breakdown of one step per contestant.
"""

import contextlib
from dataclasses import dataclass

import pytest
import torch

from benchmarks.configs import END_TO_END_CONFIGS, YARDSTICK, UNetConfig, unet_kernel_calls
from benchmarks.machine import load_average
from benchmarks.session import BenchRun
from benchmarks.timing import Contestant, PairedResult, feed_benchmark, measure_paired, smoke_run
from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.selftest.eager import eager_modules

CONTESTANTS = ("fastdiff", "torch", "eager")
BACKENDS = {"fastdiff": "auto", "torch": "torch", "eager": "torch"}
HEADLINE_GOAL = 1.5
PROFILE_TOP_OPS = 12
CATEGORIES = (  # (category, substrings of profiler op names), first match wins
    ("group norm", ("group_norm",)),
    ("attention", ("attention", "bmm", "softmax", "einsum", "baddbmm")),
    ("convolution", ("conv",)),
    ("linear / matmul", ("addmm", "mm", "linear")),
    ("activation", ("silu", "sigmoid")),
    ("copies / casts", ("copy", "_to_copy", "contiguous", "clone", "cat")),
    ("elementwise", ("add", "mul", "sub", "div", "pow", "exp", "log", "where", "neg", "sum", "mean", "fill")),
)


@dataclass(frozen=True)
class Scenario:
    """One end-to-end group: what runs (train/sample), in which precision, with checkpointing or not."""

    mode: str
    dtype: str
    checkpoint: bool

    @property
    def id(self) -> str:
        return f"{self.mode}-{self.dtype}" + ("-ckpt" if self.checkpoint else "")


SCENARIOS = (
    Scenario("train", "fp32", False),
    Scenario("train", "fp32", True),
    Scenario("train", "bf16", False),
    Scenario("train", "bf16", True),
    Scenario("sample", "fp32", False),
    Scenario("sample", "bf16", False),
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "scenario" not in metafunc.fixturenames:
        return
    from benchmarks.conftest import bench_run

    device = bench_run(metafunc.config).settings.device
    configs = END_TO_END_CONFIGS[device.type]
    metafunc.parametrize("config", configs, ids=[c.name for c in configs])
    metafunc.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
    metafunc.parametrize("contestant", CONTESTANTS)


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def _contestant(name: str, model: torch.nn.Module):
    """The backend of contestant ``name`` in force, and for ``eager`` the model's eager modules."""
    with ops.use_backend(BACKENDS[name]):
        if name == "eager":
            with eager_modules(model):
                yield
        else:
            yield


def _is_headline(config: UNetConfig, scenario: Scenario) -> bool:
    return config is YARDSTICK and scenario == Scenario("train", "fp32", False)


def _runners(config: UNetConfig, scenario: Scenario, run: BenchRun) -> tuple[dict, dict, torch.Tensor]:
    """(contestant name -> one-iteration callable, facts about the setup, the model input x)."""
    settings = run.settings
    device = settings.device
    gen = torch.Generator().manual_seed(0)
    batch = config.batch(device)
    torch.manual_seed(0)
    if scenario.mode == "train":
        model, diffusion = config.create(use_checkpoint=scenario.checkpoint)
    else:
        model, diffusion = config.create(timestep_respacing=f"ddim{settings.sampling_steps}")
    model.to(device).train(scenario.mode == "train")
    x, kwargs = config.model_inputs(batch, "cpu", generator=gen)
    x, kwargs = x.to(device), {k: v.to(device) for k, v in kwargs.items()}
    facts = {"batch": batch, "parameters": sum(p.numel() for p in model.parameters())}

    if scenario.mode == "train":
        t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=gen).to(device)
        noise = torch.randn(x.shape, generator=gen).to(device)

        def one(name: str):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # its state is part of the peak

            def step():
                optimizer.zero_grad(set_to_none=True)
                # The backward stays inside the contestant's context: with use_checkpoint it recomputes
                # the forward, which must run on the same backend (and the same eager modules).
                with _contestant(name, model):
                    with _autocast(device, scenario.dtype):
                        losses = diffusion.training_losses(model, x, t, model_kwargs=kwargs, noise=noise)
                    losses["loss"].mean().backward()
                optimizer.step()
                # Free the gradients now, not at the next step: memory freed in a step but allocated
                # before it is invisible to the CPU peak-memory measurement.
                optimizer.zero_grad(set_to_none=True)

            return step
    else:
        facts["sampling_steps"] = diffusion.num_timesteps
        noise = torch.randn(x.shape, generator=gen).to(device)

        def one(name: str):
            def sample():
                with _contestant(name, model), _autocast(device, scenario.dtype):
                    return diffusion.ddim_sample_loop(model, tuple(x.shape), noise=noise, model_kwargs=kwargs)

            return sample

    return {name: one(name) for name in CONTESTANTS}, facts, x


def _backends(name: str, config: UNetConfig, x: torch.Tensor) -> dict[str, str]:
    """What serves contestant ``name``'s GroupNorm and attention calls (per head dim) on x's device."""
    if name == "eager":
        return {
            "group_norm": "eager (fastdiff.selftest.eager)",
            "attention": "eager (fastdiff.selftest.eager)",
        }
    backend = BACKENDS[name]
    head_dims = sorted(
        {c.shape[0] // (3 * c.heads) for c in unet_kernel_calls(config) if c.kernel == "qkv_attention"}
    )
    with ops.use_backend(backend):
        resolved = {"group_norm": backends.resolve_group_norm(x)}
        for head_dim in head_dims:
            resolved[f"attention_d{head_dim}"] = backends.resolve_attention(x, head_dim)
    return resolved


def _category(name: str) -> str:
    lowered = name.lower()
    for category, keys in CATEGORIES:
        if any(key in lowered for key in keys):
            return category
    return "other"


def _phase(event) -> str:
    """forward, backward (run by the autograd engine) or optimizer (inside ``Optimizer.step``)."""
    node = event
    phase = "forward"
    while node is not None:
        if node.name.startswith("Optimizer.step"):
            return "optimizer"
        if node.name.startswith("autograd::engine::evaluate_function"):
            phase = "backward"
        node = node.cpu_parent
    return phase


def _shares(totals: dict[str, float]) -> dict[str, float]:
    whole = sum(totals.values()) or 1.0
    return {k: 100.0 * v / whole for k, v in sorted(totals.items(), key=lambda kv: kv[1], reverse=True)}


def profile_step(step, device: torch.device) -> dict:
    """One call of ``step`` under torch.profiler: the top ops by self time (device time on CUDA), and the
    CPU self time split by phase (forward / backward / optimizer) and by kind of op."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in averages) or 1.0
    phases: dict[str, float] = {}
    kinds: dict[str, float] = {}
    for event in prof.events():
        if event.self_cpu_time_total <= 0 or event.device_type.name != "CPU":
            continue
        phase = _phase(event)
        phases[phase] = phases.get(phase, 0.0) + event.self_cpu_time_total
        kind = "optimizer" if phase == "optimizer" else _category(event.name)
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total
    top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:PROFILE_TOP_OPS]
    return {
        "total_ms": total / 1e3,
        "phases": _shares(phases),
        "categories": _shares(kinds),
        "top_ops": [
            {
                "name": e.key,
                "calls": e.count,
                "self_ms": getattr(e, key) / 1e3,
                "percent": 100.0 * getattr(e, key) / total,
            }
            for e in top
        ],
    }


def measure_group(config: UNetConfig, scenario: Scenario, run: BenchRun) -> dict:
    settings = run.settings
    runners, facts, x = _runners(config, scenario, run)
    contestants = [
        Contestant(name, runners[name], {"backends": _backends(name, config, x)}) for name in CONTESTANTS
    ]
    if settings.smoke:
        result = smoke_run(contestants, settings.device)
    else:
        result = measure_paired(
            contestants, settings.device, settings.e2e_rounds, warmup=1, min_round_s=0.0, with_memory=True
        )
    record = _record(config, scenario, run, result, facts)
    if _is_headline(config, scenario):
        record["target"] = {
            "description": f"{config.name} training step, fastdiff default vs torch backend, fp32, images/s",
            "goal": HEADLINE_GOAL,
            "measured": record.get("speedup"),
            "measured_vs_eager": record.get("speedup_vs_eager"),
        }
        if settings.profile and not settings.smoke:
            record["profile"] = {c.name: profile_step(c.run, settings.device) for c in contestants}
    run.data["end_to_end"].append(record)
    return record


def _record(config: UNetConfig, scenario: Scenario, run: BenchRun, result: PairedResult, facts: dict) -> dict:
    batch = facts["batch"]
    contestants = result.contestant_records()
    for name in result.samples:
        contestants[name]["images_per_s"] = batch / result.median(name)
    speedup = result.speedup("fastdiff", "torch") if "fastdiff" in result.samples else None
    speedup_vs_eager = result.speedup("fastdiff", "eager") if "fastdiff" in result.samples else None
    return {
        "config": config.name,
        "description": config.description,
        "mode": scenario.mode,
        "dtype": scenario.dtype,
        "checkpoint": scenario.checkpoint,
        "device": str(run.settings.device),
        "smoke": run.settings.smoke,
        "load_after": load_average(),
        "memory_method": result.memory_method,
        "speedup": speedup,
        "speedup_vs_eager": speedup_vs_eager,
        "contestants": contestants,
        **facts,
    }


def test_end_to_end(benchmark, bench: BenchRun, config: UNetConfig, scenario: Scenario, contestant: str):
    group = f"end-to-end {config.name} {scenario.id}"
    benchmark.group = group
    record = bench.paired(group, lambda: measure_group(config, scenario, bench))
    entry = record["contestants"][contestant]
    if "error" in entry:
        pytest.fail(f"{contestant} failed on its first call: {entry['error']}")
    benchmark.extra_info.update(
        images_per_s=entry["images_per_s"],
        peak_memory_mib=None if entry["peak_memory_bytes"] is None else entry["peak_memory_bytes"] / 2**20,
        speedup_fastdiff_vs_torch=record["speedup"],
        speedup_fastdiff_vs_eager=record["speedup_vs_eager"],
        batch=record["batch"],
        **entry["info"],
    )
    feed_benchmark(benchmark, entry["samples_s"])
