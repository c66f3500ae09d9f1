"""Where rank 0 reports training: status lines (stdout and log.txt), progress.csv, TensorBoard, tqdm."""

import csv
import os
import sys
from typing import Any

from tqdm.auto import tqdm

LINE_KEYS = ("loss", "mse", "vb")


def format_status(metrics: dict[str, float]) -> str:
    """One line: step, loss terms with their quartiles by timestep, grad norm, speed, data wait, memory, fp16
    state."""
    parts = [f"step {int(metrics['step'])}"]
    for name in LINE_KEYS:
        if name in metrics:
            quartiles = " ".join(
                f"q{q} {metrics[f'{name}_q{q}']:.4g}" for q in range(4) if f"{name}_q{q}" in metrics
            )
            parts.append(
                f"{name} {metrics[name]:.4g} ({quartiles})"
                if name == "loss"
                else f"{name} {metrics[name]:.4g}"
            )
    if "eval_fid" in metrics:
        parts.append(
            f"FID {metrics['eval_fid']:.2f} KID {metrics['eval_kid']:.4f} precision "
            f"{metrics['eval_precision']:.3f} recall {metrics['eval_recall']:.3f}"
            + (" (best)" if metrics.get("eval_best") else "")
        )
    if "grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['grad_norm']:.4g}")
    if "images_per_s" in metrics:
        parts.append(f"{metrics['images_per_s']:.1f} img/s")
    if "data_wait_ms" in metrics:
        parts.append(
            f"data wait {metrics['data_wait_ms']:.1f} ms/step ({100 * metrics['data_wait_share']:.0f}%)"
        )
    if "peak_mem_gib" in metrics:
        parts.append(f"peak mem {metrics['peak_mem_gib']:.2f} GiB")
    if "loss_scale" in metrics:
        parts.append(
            f"loss scale {metrics['loss_scale']:.0f}, skipped {int(metrics.get('skipped_steps', 0))}"
        )
    elif metrics.get("skipped_steps"):
        parts.append(f"skipped {int(metrics['skipped_steps'])}")
    return " | ".join(parts)


class CsvLog:
    """progress.csv: one row per log line; a key not seen before widens the header (the file is rewritten)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.columns: list[str] = []
        if os.path.exists(path):
            with open(path, newline="") as handle:
                reader = csv.reader(handle)
                self.columns = next(reader, [])

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (missing columns left empty)."""
        new = [key for key in row if key not in self.columns]
        if new:
            rows = []
            if os.path.exists(self.path) and self.columns:
                with open(self.path, newline="") as handle:
                    rows = list(csv.DictReader(handle))
            self.columns = self.columns + new
            with open(self.path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(rows)
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow(row)


class TensorBoardLog:
    """Scalars to TensorBoard event files when the ``tensorboard`` package is importable, else nothing."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except (ImportError, ModuleNotFoundError):
            self.writer = None
        else:
            self.writer = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))

    def write(self, metrics: dict[str, float], step: int) -> None:
        """Every metric as scalar ``train/<name>`` at ``step``."""
        if self.writer is None:
            return
        for name, value in metrics.items():
            if name != "step":
                self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Reporter:
    """Rank 0's outputs for the run in ``log_dir``; on other ranks every method does nothing."""

    def __init__(self, log_dir: str, is_main: bool) -> None:
        self.is_main = is_main
        self.log_dir = log_dir
        if is_main:
            os.makedirs(log_dir, exist_ok=True)
        self.csv = CsvLog(os.path.join(log_dir, "progress.csv")) if is_main else None
        self.tensorboard = TensorBoardLog(log_dir) if is_main else None
        self.text_path = os.path.join(log_dir, "log.txt")
        self.bar = None

    def start_progress(self, step: int, total_steps: int | None) -> None:
        """Show a tqdm bar from ``step`` (rank 0, and only when stderr is a terminal)."""
        if self.is_main and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, leave=False)

    def message(self, text: str) -> None:
        """A line for the user: stdout (above the progress bar) and log.txt."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)
        with open(self.text_path, "a") as handle:
            handle.write(text + "\n")

    def metrics(self, metrics: dict[str, float]) -> None:
        """A status line, a progress.csv row and TensorBoard scalars."""
        if not self.is_main:
            return
        self.message(format_status(metrics))
        self.csv.write(metrics)
        self.tensorboard.write(metrics, int(metrics["step"]))

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar."""
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
