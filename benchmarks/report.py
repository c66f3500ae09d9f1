"""Summary writer: the results of a benchmark run as JSON, a markdown report and a PNG plot.

    python -m benchmarks.report [RESULTS_JSON] [--out DIR]

The pytest run calls :func:`write_summary` when the session ends (``conftest.py``); the command above
re-renders the markdown and the plot from a saved JSON. Files, in the results folder:

* ``latest.json``: everything measured, with every round's time;
* ``latest.md``: the tables (kernels, end-to-end, traffic, compile report) under the machine they came from;
* ``latest.png``: fastdiff against the alternatives (kernel speedups over eager PyTorch, end-to-end
  images/s, bytes moved relative to the floor).

Ratios are medians over paired, interleaved rounds: ``speedup = median(eager) / median(contestant)``.
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from benchmarks import training_quality
from benchmarks.compile_summary import family_summary

JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "latest.json", "latest.md", "latest.png"
BASELINE = "eager"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g}" if seconds * 1e3 < 100 else f"{seconds * 1e3:.0f}"


def _ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _met(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "**no**")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _header(data: dict[str, Any]) -> list[str]:
    machine, run = data["machine"], data["run"]
    loads = [
        r["load_after"][0]
        for key in ("kernels", "end_to_end")
        for r in data.get(key, [])
        if r.get("load_after")
    ]
    during = f"; 1-min load after each group {min(loads):.1f} to {max(loads):.1f}" if loads else ""
    gpu = machine.get("gpu")
    lines = [
        "# fastdiff benchmarks",
        "",
        f"- machine: {machine['cpu_model']}, {machine['usable_cpus']} usable cores "
        f"({machine['logical_cpus']} logical), torch threads {machine['torch_threads']}, "
        f"ISA {machine['cpu_capability']}"
        + (f"; GPU {gpu['name']} ({gpu['capability']}, CUDA {gpu['cuda']})" if gpu else ""),
        f"- software: Python {machine['python']}, torch {machine['torch']}, triton {machine['triton']}, "
        f"pytest-benchmark {machine['pytest_benchmark']}; fastdiff backends {machine['fastdiff_backends']}, "
        f"C++ extension {machine['cpp_extension']}; commit {machine['git_commit']}",
        f"- run: `{run['command']}` on {run['device']}, started {run['started']}, "
        f"took {run.get('duration_s', 0):.0f} s; load average before {run['load_before']}, "
        f"after {run.get('load_after')}{during} "
        f"(a run keeps about {machine['torch_threads']} threads busy itself)"
        + (" — **smoke run (one call each, not timings)**" if run["smoke"] else ""),
        "- ratios: medians of paired, interleaved rounds; speedup = median(baseline) / median(contestant), "
        "above 1 is faster",
        "",
    ]
    return lines


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    return "error" if "error" in entry else _ms(entry["median_s"])


def _kernel_section(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    names: list[str] = []
    for record in records:
        names += [n for n in record["contestants"] if n not in names]
    others = [n for n in names if n != BASELINE]
    header = ["op", "pass", "shape (model)", "dtype", *[f"{n} ms" for n in names]]
    header += [f"{n} vs eager" for n in others]
    compiled = "torch.compile" in names
    if compiled:
        header.append("torch.compile first call s")
    rows = []
    for r in records:
        contestants = r["contestants"]
        row = [r["kernel"], r["pass"], f"{r['label']} ({r['config']})", r["dtype"]]
        row += [_cell(contestants.get(n)) for n in names]
        row += [_ratio(contestants[n].get("speedup_vs_eager")) if n in contestants else "-" for n in others]
        if compiled:
            first = contestants.get("torch.compile", {}).get("first_call_s")
            row.append("-" if first is None else f"{first:.1f}")
        rows.append(row)
    lines = [
        "## Kernels",
        "",
        "Median time per call; ratios against eager PyTorch (improved-diffusion's code).",
        "",
    ]
    lines += _table(header, rows)
    backends = sorted(
        {
            f"{n}: {c['info'].get('backend')}"
            for r in records
            for n, c in r["contestants"].items()
            if c["info"].get("backend")
        }
    )
    if backends:
        lines += ["", "Backends that served fastdiff's contestants: " + "; ".join(backends)]
    return [*lines, ""]


E2E_CONTESTANTS = ("fastdiff", "torch", "eager")


def _end_to_end_section(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    names = [n for n in E2E_CONTESTANTS if any(n in r["contestants"] for r in records)]
    header = ["model", "mode", "dtype", "checkpointing", *[f"{n} img/s" for n in names]]
    header += ["fastdiff vs torch", "fastdiff vs eager", *[f"{n} peak MiB" for n in names]]
    rows = []
    for r in records:
        entries = [r["contestants"].get(n, {}) for n in names]
        mode = r["mode"] + (f" ({r['sampling_steps']} DDIM steps)" if r["mode"] == "sample" else "")
        row = [f"{r['config']} N{r['batch']}", mode, r["dtype"], "on" if r["checkpoint"] else "off"]
        row += ["error" if "error" in e else f"{e.get('images_per_s', 0):.2f}" for e in entries]
        row += [_ratio(r.get("speedup")), _ratio(r.get("speedup_vs_eager"))]
        row += [_mib(e.get("peak_memory_bytes")) for e in entries]
        rows.append(row)
    lines = [
        "## End to end",
        "",
        "One model object, three ways: fastdiff (its default kernels, backend `auto`), torch (fastdiff's "
        "`torch` reference backend) and eager (the fused modules swapped for improved-diffusion's eager "
        "code). img/s from the median time; peak memory of the first call, "
        + records[0].get("memory_method", "")
        + ".",
        "",
    ]
    lines += _table(header, rows)
    backends = {
        json.dumps(r["contestants"]["fastdiff"]["info"].get("backends"), sort_keys=True)
        for r in records
        if "fastdiff" in r["contestants"]
    }
    lines += ["", "fastdiff's `auto` resolved to: " + "; ".join(sorted(backends))]
    for r in records:
        if r.get("target"):
            t = r["target"]
            verdict = (
                "reached" if t["measured"] is not None and t["measured"] >= t["goal"] else "**not reached**"
            )
            lines += [
                "",
                f"Target: {t['description']}: goal {t['goal']}x, "
                f"measured {_ratio(t['measured'])} ({verdict}); against the same UNet running "
                f"improved-diffusion's eager code: {_ratio(t.get('measured_vs_eager'))}.",
            ]
        if r.get("profile"):
            lines += _profile_lines(r)
    return [*lines, ""]


def _diffusers_section(records: list[dict[str, Any]]) -> list[str]:
    """The diffusers integration benchmarks (``test_bench_diffusers.py``, ``test_bench_vae.py``), when
    they ran."""
    if not records:
        return []
    header = [
        "model",
        "batch",
        "diffusers",
        "diffusers ms",
        "fastdiff ms",
        "speedup",
        "diffusers peak MiB",
        "fastdiff peak MiB",
    ]
    rows = []
    for r in records:
        base, patched = r["contestants"].get("diffusers", {}), r["contestants"].get("fastdiff", {})
        rows.append(
            [
                r["model"],
                r["batch"],
                r["diffusers_version"],
                _cell(base),
                _cell(patched),
                _ratio(r.get("speedup")),
                _mib(base.get("peak_memory_bytes")),
                _mib(patched.get("peak_memory_bytes")),
            ]
        )
    lines = [
        "## diffusers integration",
        "",
        "A diffusers UNet's training step, or a VAE's decode under no_grad, as built and after "
        "`fastdiff.integrations.diffusers.apply_fastdiff` (same weights, backend `auto`).",
        "",
    ]
    return [*lines, *_table(header, rows), ""]


def _group_norm_cpu_section(records: list[dict[str, Any]]) -> list[str]:
    """Issue 3's CPU figure (``test_bench_group_norm_cpu.py``), when it ran."""
    if not records:
        return []
    names = ("fastdiff", "kernels", "eager")
    header = [
        "op",
        "shape",
        "calls",
        "dtype",
        *[f"{n} ms" for n in names],
        "fastdiff vs eager",
        "kernels vs eager",
    ]
    rows, weighted = [], {}
    for r in records:
        c = r["contestants"]
        rows.append(
            [r["kernel"], r["label"], r["calls_per_forward"], r["dtype"], *[_cell(c.get(n)) for n in names]]
            + [_ratio(c.get(n, {}).get("speedup_vs_eager")) for n in ("fastdiff", "kernels")]
        )
        totals = weighted.setdefault((r["kernel"], r["dtype"]), dict.fromkeys(names, 0.0))
        for n in names:
            totals[n] += r["calls_per_forward"] * c[n]["median_s"]
    lines = [
        "## GroupNorm on CPU at the 64x64 UNet's shapes (issue 3's figure)",
        "",
        "Forward+backward, batch 8, every GroupNorm+SiLU and scale-shift shape of improved-diffusion's 64x64 "
        "UNet. fastdiff: `fastdiff.ops` (default backend: cpp), autograd included; kernels: the C++ forward "
        "and backward called directly; eager: improved-diffusion's code. Target: 1.5x faster than eager.",
        "",
        *_table(header, rows),
        "",
        "Weighted by calls per UNet forward (sum of calls x median):",
        "",
    ]
    summary = [
        [
            kernel,
            dtype,
            *(f"{t[n] * 1e3:.1f}" for n in names),
            _ratio(t["eager"] / t["fastdiff"]),
            _ratio(t["eager"] / t["kernels"]),
        ]
        for (kernel, dtype), t in weighted.items()
    ]
    head = ["op", "dtype", *[f"{n} ms" for n in names], "fastdiff vs eager", "kernels vs eager"]
    return [*lines, *_table(head, summary), ""]


MEMORY_RATIOS = (
    ("step_peak_vs_einsum", "step: fastdiff / einsum"),
    ("step_attention_share_vs_einsum", "step: attention's share"),
    ("process_peak_vs_einsum", "process: fastdiff / einsum"),
    ("process_attention_share_vs_einsum", "process: attention's share"),
)


def _attention_memory_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Issue 4's memory figure (``test_bench_attention_memory.py``), when it ran."""
    from benchmarks.attention_memory_step import ratios

    if not runs:
        return []
    rows, summary = [], []
    for precision, modes in runs.items():
        for mode, r in modes.items():
            step_s = f"{r['first_step_s']:.1f}"
            rows.append([precision, mode, _mib(r["step_peak_bytes"]), _mib(r["peak_bytes"]), step_s])
        if {"none", "einsum", "fastdiff"} <= modes.keys():
            found = ratios(modes)
            summary.append([precision, *(_ratio(found[key], 3) for key, _ in MEMORY_RATIOS)])
    header = ["precision", "attention", "step peak MiB", "process peak MiB", "first step s"]
    lines = [
        "## Attention memory: 64x64 UNet train step (issue 4's figure)",
        "",
        "improved-diffusion's 64x64 UNet (128 channels, attention at 32/16/8, 4 heads, learn_sigma), "
        "batch 8, AdamW, one process per run. Step peak: bytes the step allocates above the weights and "
        "optimizer state; process peak: resident memory. `none`: attention that keeps nothing, the floor "
        "for any attention. Target: fastdiff at most 0.6x of einsum.",
        "",
        *_table(header, rows),
        "",
    ]
    if summary:
        lines += [*_table(["precision", *(label for _, label in MEMORY_RATIOS)], summary), ""]
    return lines


def _profile_lines(record: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Where the time goes ({record['mode']}, {record['dtype']}, one step under torch.profiler):",
        "",
    ]
    for name, profile in record["profile"].items():
        phases = ", ".join(f"{k} {v:.0f}%" for k, v in profile.get("phases", {}).items())
        categories = ", ".join(f"{k} {v:.0f}%" for k, v in profile["categories"].items())
        lines += [
            f"**{name}** — total self time {profile['total_ms']:.0f} ms; CPU time by phase: {phases}; "
            f"by kind: {categories}",
            "",
        ]
        rows = [
            [op["name"], op["calls"], f"{op['self_ms']:.1f}", f"{op['percent']:.1f}"]
            for op in profile["top_ops"]
        ]
        lines += [*_table(["op", "calls", "self ms", "%"], rows), ""]
    return lines


def _quality_section(record: dict[str, Any] | None) -> list[str]:
    """Issue 12's quality-parity figure (``test_bench_quality.py``), when it ran."""
    if not record:
        return []
    return [
        "## Quality parity: fastdiff's kernels vs eager PyTorch (issue 12)",
        "",
        f"On {record['device']}. " + training_quality.markdown(record),
        "",
    ]


def _traffic_section(traffic: dict[str, Any] | None) -> list[str]:
    if not traffic:
        return []
    header = [
        "op",
        "pass",
        "dtype",
        "case",
        "path",
        "kernel KiB",
        "floor KiB",
        "eager KiB",
        "kernel/floor",
        "target",
        "met",
        "eager/kernel",
        "target",
        "met",
    ]
    rows = []
    for r in traffic["rows"]:
        ratio = r.get("kernel_over_tiled_model", r["kernel_over_floor"])
        rows.append(
            [
                r["kernel"],
                r["pass"],
                r["dtype"],
                r["case"],
                r["path"],
                f"{r['kernel_bytes'] / 1024:.0f}",
                f"{r['floor_bytes'] / 1024:.0f}",
                f"{r['eager_bytes'] / 1024:.0f}",
                _ratio(ratio, 3) + (" (tiled model)" if "kernel_over_tiled_model" in r else ""),
                _ratio(r["floor_target"]) if r["floor_target"] else "",
                _met(r["floor_target_met"]),
                _ratio(r["eager_over_kernel"]),
                _ratio(r["eager_target"], 1) if r["eager_target"] else "",
                _met(r["eager_target_met"]),
            ]
        )
    lines = [
        "## Memory traffic (Triton interpreter)",
        "",
        "Bytes of the active lanes of every load and store of fastdiff's Triton kernels; floor: each input "
        "read once and each output written once; eager: improved-diffusion's code, bytes in and out of "
        "each aten op. Attention forward is judged against q + out + lse + ceil(T/BLOCK_M) x (k + v).",
        "",
    ]
    lines += _table(header, rows)
    for r in traffic["rows"]:
        if "no_txt_store" in r:
            lines += [
                "",
                f"Attention forward ({r['dtype']}): bytes written beyond out and lse: "
                f"{r['writes_beyond_outputs']} (the fp32 T x T scores of all heads would be "
                f"{r['score_matrix_bytes']}) "
                f"— no T x T store: {_met(r['no_txt_store'])}",
            ]
    return [*lines, "", f"Report time: {traffic.get('seconds', 0):.0f} s.", ""]


def _compile_section(compiled: dict[str, Any] | None) -> list[str]:
    if not compiled:
        return []
    rows = [
        [
            f["family"],
            f["arch"],
            f["configs"],
            f["failed"],
            f["max_registers"],
            f["max_spill_bytes"],
            f["with_spills"],
            f["max_shared_bytes"],
            f["max_local_bytes"],
        ]
        for f in family_summary(compiled["rows"])
    ]
    lines = [
        "## Compile report (fastdiff.kernels.report)",
        "",
        "Every Triton kernel configuration compiled for GPUs this machine may not have; "
        f"{compiled['source']}.",
        "",
    ]
    lines += _table(
        [
            "kernel",
            "arch",
            "configs",
            "failed",
            "max regs",
            "max spill B",
            "configs spilling",
            "max smem B",
            "max local B",
        ],
        rows,
    )
    bad = [r for r in compiled["rows"] if r.get("error") or r.get("spills")]
    if bad:
        lines += ["", "Failed or spilling configurations:", ""]
        lines += [
            f"- {r['kernel']} {r['arch']}: " + (r["error"] or f"{r['spills']} spill bytes") for r in bad
        ]
    return [*lines, ""]


def _skipped_section(skipped: list[dict[str, str]]) -> list[str]:
    if not skipped:
        return []
    reasons: dict[str, int] = {}
    for entry in skipped:
        reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    return ["## Skipped", "", *[f"- {count} x {reason}" for reason, count in reasons.items()], ""]


def render_markdown(data: dict[str, Any]) -> str:
    """The whole report as markdown."""
    lines = _header(data)
    lines += _kernel_section(data.get("kernels", []))
    lines += _end_to_end_section(data.get("end_to_end", []))
    lines += _diffusers_section(data.get("diffusers", []))
    lines += _group_norm_cpu_section(data.get("group_norm_cpu", []))
    lines += _attention_memory_section(data.get("attention_memory", {}))
    lines += _quality_section(data.get("quality"))
    lines += _traffic_section(data.get("traffic"))
    lines += _compile_section(data.get("compile"))
    lines += _skipped_section(data.get("skipped", []))
    return "\n".join(lines)


def render_plot(data: dict[str, Any], path: Path) -> bool:
    """Write the PNG; False (nothing written) when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels, e2e = data.get("kernels", []), data.get("end_to_end", [])
    traffic = [  # GroupNorm forward+backward totals and both attention passes keep the plot readable
        r
        for r in (data.get("traffic") or {}).get("rows", [])
        if r["pass"] == "forward+backward" or r["kernel"] == "qkv_attention"
    ]
    panels = [p for p, present in (("kernels", kernels), ("e2e", e2e), ("traffic", traffic)) if present]
    if not panels:
        return False
    heights = {
        "kernels": max(3.0, 0.32 * len(kernels) + 1),
        "e2e": max(2.5, 0.45 * len(e2e) + 1),
        "traffic": max(3.0, 0.22 * len(traffic) + 1),
    }
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, sum(heights[p] for p in panels)),
        squeeze=False,
        gridspec_kw={"height_ratios": [heights[p] for p in panels]},
    )
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        if panel == "kernels":
            _plot_kernels(ax, kernels)
        elif panel == "e2e":
            _plot_end_to_end(ax, e2e)
        else:
            _plot_traffic(ax, traffic)
    fig.suptitle(
        f"fastdiff benchmarks — {data['machine']['cpu_model']}"
        + (" (smoke run)" if data["run"]["smoke"] else "")
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _barh_groups(ax, labels: list[str], series: dict[str, list[float | None]], log: bool) -> None:
    count = max(1, len(series))
    height = 0.8 / count
    for index, (name, values) in enumerate(series.items()):
        ys = [i + (index - (count - 1) / 2) * height for i in range(len(labels))]
        ax.barh(ys, [v if v is not None else 0 for v in values], height=height, label=name)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.legend(fontsize=7, loc="lower right")


SHORT_NAMES = {
    "group_norm": "GN",
    "group_norm_silu": "GN+SiLU",
    "group_norm_scale_shift_silu": "ss-GN+SiLU",
    "qkv_attention": "attention",
    "forward": "fwd",
    "backward": "bwd",
    "forward+backward": "fwd+bwd",
    "group fits one program": "fits",
    "group split over programs": "split",
}


def _short(*words: str) -> str:
    return " ".join(SHORT_NAMES.get(w, w) for w in words)


def _plot_kernels(ax, records: list[dict[str, Any]]) -> None:
    names: list[str] = []
    for r in records:
        names += [n for n in r["contestants"] if n != BASELINE and n not in names]
    labels = [_short(r["kernel"], r["pass"], r["label"], r["dtype"]) for r in records]
    series = {n: [r["contestants"].get(n, {}).get("speedup_vs_eager") for r in records] for n in names}
    _barh_groups(ax, labels, series, log=True)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup over eager PyTorch (median time ratio; >1 is faster)")
    ax.set_title("Kernels", fontsize=9)


def _plot_end_to_end(ax, records: list[dict[str, Any]]) -> None:
    labels = [
        f"{r['config']} {r['mode']} {r['dtype']} ckpt={'on' if r['checkpoint'] else 'off'}" for r in records
    ]
    series = {n: [r["contestants"].get(n, {}).get("images_per_s") for r in records] for n in E2E_CONTESTANTS}
    _barh_groups(ax, labels, series, log=False)
    ax.set_xlabel("images / s")
    ax.set_title("End to end: fastdiff default kernels vs its torch backend vs eager code", fontsize=9)


def _plot_traffic(ax, rows: list[dict[str, Any]]) -> None:
    labels = [_short(r["kernel"], r["pass"], r["dtype"], r["case"]) for r in rows]
    series = {
        "kernel / floor": [r["kernel_bytes"] / r["floor_bytes"] for r in rows],
        "eager / floor": [r["eager_bytes"] / r["floor_bytes"] for r in rows],
    }
    _barh_groups(ax, labels, series, log=True)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("bytes moved / floor")
    ax.set_title("Memory traffic (Triton interpreter)", fontsize=9)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``latest.json``, ``latest.md`` and ``latest.png`` into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / JSON_NAME
    json_path.write_text(json.dumps(_json_safe(data), indent=1))
    written = [json_path]
    markdown = out_dir / MARKDOWN_NAME
    markdown.write_text(render_markdown(data))
    written.append(markdown)
    plot = out_dir / PLOT_NAME
    if render_plot(data, plot):
        written.append(plot)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    default = Path(__file__).resolve().parent / "results" / JSON_NAME
    parser.add_argument("results", nargs="?", type=Path, default=default, help="a latest.json of a run")
    parser.add_argument("--out", type=Path, help="folder for the markdown and PNG (default: beside the JSON)")
    args = parser.parse_args(argv)
    if not args.results.exists():
        parser.error(f"no results file at {args.results}; run `pytest benchmarks/ --benchmark-only` first")
    data = json.loads(args.results.read_text())
    out_dir = args.out or args.results.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKDOWN_NAME).write_text(render_markdown(data))
    render_plot(data, out_dir / PLOT_NAME)
    print(f"wrote {out_dir / MARKDOWN_NAME} and {out_dir / PLOT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
