"""Group ``all_configs``: every config of every launch-layer list (``launch.config_lists()``), forced one at
a time (``launch.force_config``) on each probe that launches that kernel, against float64. A kernel that
no probe reaches fails. --quick runs each list's first config only (the interpreter costs seconds per
probe) and reports the lists its probes do not reach as not run.

Each list's first config runs before any list's second, so a budget cut leaves every list covered."""

import contextlib
import functools
import importlib
from collections.abc import Iterator
from types import ModuleType

import torch

from fastdiff import ops
from fastdiff.selftest.accuracy import _cross_attention_supported, generator
from fastdiff.selftest.cases import OpCase, as_float64, forward_backward
from fastdiff.selftest.compiles import launch_layer, triton_problem
from fastdiff.selftest.records import Check, Options, Result, compare, not_run

GROUP = "all_configs"


def _config_probes(options: Options) -> list[OpCase]:
    """Small cases that between them reach every kernel: GroupNorm fused and split (one large group),
    attention per dtype and head-dim bucket (up to 256, Tq != Tk where supported). --quick: a few bf16
    probes (under the interpreter every probe costs seconds)."""
    norm = [((2, 32, 9, 9), 8), ((1, 4, 40, 40), 1)]
    if options.quick:
        probes = [
            OpCase("group_norm_scale_shift_silu", shape, torch.bfloat16, groups) for shape, groups in norm
        ]
        return probes + [OpCase("flash_attention", (1, 2, 45, d), torch.bfloat16) for d in (16, 64)]
    probes = []
    for dtype in (torch.float32, torch.bfloat16):
        probes += [OpCase("group_norm_scale_shift_silu", shape, dtype, groups) for shape, groups in norm]
        probes += [OpCase("flash_attention", (1, 2, 45, d), dtype) for d in (16, 32, 64, 128, 160, 192, 256)]
        if _cross_attention_supported():
            probes.append(OpCase("flash_attention", (1, 2, 45, 64), dtype, kv_tokens=83))
    return probes


@contextlib.contextmanager
def _recording_launches(launch: ModuleType) -> Iterator[set[str]]:
    """Names of the kernels launched (through ``launch.run``) inside the block."""
    launched: set[str] = set()
    original = launch.run

    def run(kernel, *args, **kwargs):
        launched.add(kernel.name)
        return original(kernel, *args, **kwargs)

    launch.run = run
    try:
        yield launched
    finally:
        launch.run = original


class Probes:
    """The probes' inputs, float64 results, torch-backend baselines, and which probes reach each kernel:
    prepared once, on the first config check (its time is that check's)."""

    def __init__(self, launch: ModuleType, options: Options) -> None:
        self.launch, self.options = launch, options

    @functools.cached_property
    def prepared(self) -> dict[OpCase, tuple]:
        """probe -> (inputs, float64 result, torch-backend baseline, names of the kernels it launches)."""
        found, seed = {}, generator(2, self.options.device)
        for probe in _config_probes(self.options):
            inputs = probe.inputs(self.options.device, seed)
            try:
                with _recording_launches(self.launch) as launched:
                    forward_backward(probe, inputs, "triton")
            except ops.BackendUnavailableError:
                continue  # e.g. a head dim over the Triton kernels' maximum: the accuracy group says so
            expected = forward_backward(probe, as_float64(inputs), "torch")
            found[probe] = (inputs, expected, forward_backward(probe, inputs, "torch"), launched)
        return found

    def reaching(self, name: str) -> list[OpCase]:
        """The first probe of each dtype that launches kernel ``name`` (one with --quick)."""
        probes = [probe for probe, (*_, launched) in self.prepared.items() if name in launched]
        return probes[:1] if self.options.quick else list({p.dtype: p for p in reversed(probes)}.values())


def plan(options: Options) -> list[Check]:
    launch = launch_layer()
    if launch is None or "triton" not in ops.available_backends():
        why = triton_problem() or "Triton cannot run here"
        return [Check("config lists", lambda: not_run(GROUP, "", "unavailable", why))]
    for family in ("group_norm", "attention"):  # their import registers the kernels' lists
        importlib.import_module(f"fastdiff.kernels.{family}")
    lists = launch.config_lists()
    order = sorted(
        ((index, name, config) for name, configs in lists.items() for index, config in enumerate(configs)),
        key=lambda item: item[0] > 0,
    )
    if options.quick:
        order = [item for item in order if item[0] == 0]
    probes = Probes(launch, options)

    def run(index: int, name: str, config) -> Result:
        reached = probes.reaching(name)
        if not reached and options.quick:
            return not_run(GROUP, "", "quick", "--quick's probes do not launch this kernel; a full run does")
        if not reached:
            return Result(GROUP, "", "fail", "no probe launches this kernel")
        return _check_config(f"{name}[{index}]", launch.force_config(name, config), reached, probes.prepared)

    return [
        Check(f"{name}[{index}] {config.tag}", functools.partial(run, index, name, config))
        for index, name, config in order
    ]


def _check_config(
    name: str, forced: contextlib.AbstractContextManager, probes: list[OpCase], prepared: dict
) -> Result:
    """One forced config on each of its probes; a launch that raises (compile error, resources) fails."""
    failures, worst = [], 0.0
    with forced:
        for probe in probes:
            inputs, expected, baseline, _ = prepared[probe]
            try:
                actual = forward_backward(probe, inputs, "triton")
            except Exception as error:  # reported as this config's failure
                failures.append(f"{probe.label}: {type(error).__name__}: {str(error)[:200]}")
                continue
            result = compare(GROUP, name, actual, expected, baseline, probe.dtype)
            worst = max(worst, result.data["worst_ratio"])
            if result.status == "fail":
                failures.append(f"{probe.label}: {result.detail}")
    detail = "; ".join(failures) or f"worst error/bound {worst:.2f} over {len(probes)} probe(s)"
    return Result(GROUP, name, "fail" if failures else "pass", detail, {"worst_ratio": worst})
