"""Issue 20's loader figure: items per second per loader core, for each kind of training source at 64x64
from 256-pixel JPEG sources, with improved-diffusion's own ``ImageDataset`` as the anchor.

    python -m benchmarks.loader_throughput --improved-diffusion PATH [--images 512] [--rounds 5]

One process, one thread (``torch.set_num_threads(1)``): what one ``--num_workers`` loader process does.
Each contestant loads every item of the same images by index, ``dataset[i]`` -> float32 ``[3, 64, 64]`` in
[-1, 1], in rounds that alternate the contestants (the order rotates each round); a round repeats the pass
over the items until it has lasted ``--min-seconds``. Both clocks are kept: items per wall second and items
per CPU second of the process (the second is steadier on a machine other jobs load).

Contestants:

* ``improved-diffusion``: its ``image_datasets.ImageDataset`` over the JPEG folder, imported from PATH (a
  clone of github.com/openai/improved-diffusion: ``PATH/improved_diffusion/image_datasets.py``). That
  module imports ``blobfile`` (``pip install blobfile``; it opens the files) and ``mpi4py`` (unused by
  ``ImageDataset``): when mpi4py is not installed, a stand-in module whose ``MPI.COMM_WORLD`` is rank 0 of
  1 is supplied for the import. Left out when no PATH is given.
* ``folder``: fastdiff's image folder (``ImageFolderDataset``) over the same JPEG folder.
* ``zip``: a dataset ZIP holding the same JPEG files (stored), decoded from the ZIP per item.
* ``zip-png64``: a dataset ZIP as EDM's ``dataset_tool.py --resolution 64`` writes it (64x64 PNGs).
* ``prepared``: the prepared dataset ``fastdiff.prepare_data`` writes from the folder.

Writes ``--out``.json (every round) and ``--out``.md (the table, machine, load average before and after).
"""

import argparse
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.machine import load_average
from fastdiff.data import ImageFolderDataset, ItemKey
from fastdiff.data.dataset_zip import ZipDataset
from fastdiff.data.prepared import PreparedDataset
from fastdiff.ops import cpu_policy
from fastdiff.prepare_data import prepare, usable_cpus

BASELINE = "folder"
TARGET_RATIO = 20.0
"""The issue's bar: the prepared path loads at least this many times the folder's items per core."""


def natural_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A uint8 ``[size, size, 3]`` image with smooth structure and grain (compresses like a photograph)."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size, 3))
    for _ in range(6):
        fx, fy, phase = rng.uniform(0.5, 6.0), rng.uniform(0.5, 6.0), rng.uniform(0, 2 * np.pi)
        image += rng.uniform(-1, 1, 3) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)[..., None]
    image = 128 + 40 * image + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_sources(root: Path, count: int, source_size: int, size: int) -> dict[str, Path]:
    """The JPEG folder, both ZIPs and the prepared dataset under ``root``; returns their paths."""
    rng = np.random.default_rng(0)
    folder, paths = root / "jpeg", {}
    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(natural_image(rng, source_size)).save(folder / f"img{index:06d}.jpg", quality=90)
    paths["folder"] = folder
    paths["zip"] = root / "jpeg.zip"
    with zipfile.ZipFile(paths["zip"], "w", zipfile.ZIP_STORED) as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"{index_folder(file)}/{file.name}")
        archive.writestr("dataset.json", json.dumps({"labels": None}))
    small = ImageFolderDataset(str(folder), size)
    paths["zip-png64"] = root / "png64.zip"
    with zipfile.ZipFile(paths["zip-png64"], "w", zipfile.ZIP_STORED) as archive:
        for index in range(count):
            encoded = io.BytesIO()
            Image.fromarray(small_item(small, index)).save(encoded, format="png", compress_level=0)
            archive.writestr(f"{index // 1000:05d}/img{index:08d}.png", encoded.getvalue())
        archive.writestr("dataset.json", json.dumps({"labels": None}))
    paths["prepared"] = root / "prepared"
    prepare(str(folder), str(paths["prepared"]), size, workers=usable_cpus(), progress=False)
    return paths


def index_folder(file: Path) -> str:
    """EDM's dataset_tool layout: members in folders of 1000 (``00000/``, ``00001/``, ...)."""
    return f"{int(file.stem[3:]) // 1000:05d}"


def small_item(dataset: ImageFolderDataset, index: int) -> np.ndarray:
    """Item ``index`` of fastdiff's folder as uint8 ``[H, W, 3]``."""
    image = dataset[index][0]
    return ((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def import_image_datasets(repo: str) -> types.ModuleType:
    """improved-diffusion's ``image_datasets`` module from the clone at ``repo`` (see the module docstring
    for the mpi4py stand-in)."""
    path = Path(repo) / "improved_diffusion" / "image_datasets.py"
    if not path.is_file():
        raise SystemExit(f"--improved-diffusion {repo}: no improved_diffusion/image_datasets.py there")
    previous = sys.modules.get("mpi4py", sys)  # `sys`: no entry
    stand_in = None
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        world = types.SimpleNamespace(Get_rank=lambda: 0, Get_size=lambda: 1)
        stand_in = types.ModuleType("mpi4py")
        stand_in.MPI = types.SimpleNamespace(COMM_WORLD=world)
        sys.modules["mpi4py"] = stand_in
    try:
        spec = importlib.util.spec_from_file_location("improved_diffusion_image_datasets", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if stand_in is not None:  # the stand-in served this import only
            if previous is sys:
                del sys.modules["mpi4py"]
            else:
                sys.modules["mpi4py"] = previous
    return module


def contestants(paths: dict[str, Path], size: int, repo: str | None) -> dict[str, Callable[[int], Any]]:
    """Each contestant's ``load(index)`` -> its item (float32 ``[3, size, size]`` in [-1, 1], label)."""
    loaders: dict[str, Callable[[int], Any]] = {}
    files = sorted(str(path) for path in paths["folder"].iterdir())
    if repo:
        reference = import_image_datasets(repo).ImageDataset(size, files)
        loaders["improved-diffusion"] = reference.__getitem__
    folder = ImageFolderDataset(str(paths["folder"]), size)
    loaders["folder"] = lambda index: folder[ItemKey(index, 0)]
    for name in ("zip", "zip-png64"):
        dataset = ZipDataset(str(paths[name]), size)
        loaders[name] = lambda index, dataset=dataset: dataset[ItemKey(index, 0)]
    prepared = PreparedDataset(str(paths["prepared"]), size, 3)
    loaders["prepared"] = lambda index: prepared[ItemKey(index, 0)]
    return loaders


def check_same_items(loaders: dict[str, Callable[[int], Any]], count: int) -> dict[str, float]:
    """Largest absolute difference of each contestant's items from the folder's (all in [-1, 1]): the
    contestants must load the same images (PNG and prepared are exact; JPEG paths decode the same file)."""
    worst = {}
    for name, load in loaders.items():
        worst[name] = max(
            float((torch.as_tensor(load(i)[0]) - loaders[BASELINE](i)[0]).abs().max()) for i in range(count)
        )
    return worst


def one_round(load: Callable[[int], Any], count: int, passes: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``passes`` passes over items ``0 .. count - 1``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(passes):
        for index in range(count):
            load(index)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(
    loaders: dict[str, Callable[[int], Any]], count: int, rounds: int, min_seconds: float
) -> dict[str, dict[str, Any]]:
    """Interleaved rounds (the order rotates); per contestant the passes per round and every round's
    items/s by wall and by CPU time."""
    names = list(loaders)
    passes = {}
    for name in names:  # one warm pass, which also sets the passes a round needs to last min_seconds
        wall, _ = one_round(loaders[name], count, 1)
        passes[name] = max(1, math.ceil(min_seconds / max(wall, 1e-6)))
    results = {name: {"passes": passes[name], "wall": [], "cpu": []} for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = one_round(loaders[name], count, passes[name])
            items = count * passes[name]
            results[name]["wall"].append(items / wall)
            results[name]["cpu"].append(items / max(cpu, 1e-9))
    for entry in results.values():
        entry["median_wall"] = statistics.median(entry["wall"])
        entry["median_cpu"] = statistics.median(entry["cpu"])
    return results


def render(data: dict[str, Any]) -> str:
    """The markdown table of a run."""
    results, base = data["results"], data["results"][BASELINE]
    lines = [
        "# Loader throughput: items/s per loader core (issue 20)",
        "",
        f"Machine: {data['cpu_model']} ({data['usable_cpus']} usable cores), torch {data['torch']}, one "
        f"process, 1 torch thread. Load average before {data['load_before']}, after {data['load_after']} "
        "(the machine is shared with other jobs: wall-clock rates vary with the load; CPU-time rates less).",
        f"{data['images']} JPEG sources {data['source_size']}x{data['source_size']} (quality 90) -> "
        f"{data['size']}x{data['size']}, {data['rounds']} interleaved rounds, medians. Ratios are against "
        f"fastdiff's folder path (`{BASELINE}`).",
        "",
        "| source | items/s (wall) | items/s (CPU time) | x folder (wall) | x folder (CPU) "
        "| max diff vs folder |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        wall, cpu = entry["median_wall"], entry["median_cpu"]
        lines.append(
            f"| {name} | {wall:.0f} | {cpu:.0f} | {wall / base['median_wall']:.2f} | "
            f"{cpu / base['median_cpu']:.2f} | {data['max_diff'][name]:.3g} |"
        )
    ratio = results["prepared"]["median_cpu"] / base["median_cpu"]
    verdict = "reaches" if ratio >= TARGET_RATIO else "does NOT reach"
    lines += [
        "",
        f"The prepared path {verdict} {TARGET_RATIO:.0f}x the folder path per core: {ratio:.0f}x (CPU time).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loader_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--improved-diffusion", default="", metavar="PATH", help="a clone of improved-diffusion"
    )
    parser.add_argument("--images", type=int, default=512, help="JPEG sources (default: 512)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the sources (default: 256)")
    parser.add_argument("--size", type=int, default=64, help="training size (default: 64)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="least duration of a round")
    parser.add_argument("--out", default="benchmarks/results/loader_throughput", help="output stem")
    parser.add_argument("--workdir", default="", help="where the sources go (default: a temporary dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.workdir or None) as scratch:
        paths = write_sources(Path(scratch), args.images, args.source_size, args.size)
        loaders = contestants(paths, args.size, args.improved_diffusion or None)
        load_before = load_average()
        results = measure(loaders, args.images, args.rounds, args.min_seconds)
        load_after = load_average()
        max_diff = check_same_items(loaders, min(args.images, 32))
    data = {
        "cpu_model": cpu_policy.cpu_model(),
        "usable_cpus": usable_cpus(),
        "torch": torch.__version__,
        "images": args.images,
        "source_size": args.source_size,
        "size": args.size,
        "rounds": args.rounds,
        "load_before": load_before,
        "load_after": load_after,
        "max_diff": max_diff,
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(f"{args.out}.json", "w") as handle:
        json.dump(data, handle, indent=1)
    text = render(data)
    with open(f"{args.out}.md", "w") as handle:
        handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
