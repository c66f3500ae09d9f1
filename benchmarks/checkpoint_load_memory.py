"""Peak resident memory of each of 2 gloo ranks while they load one large checkpoint.

    python -m benchmarks.checkpoint_load_memory --gib 1.0 [--not-shared] [--dist-util OTHER/dist_util.py]

Writes a state-like file (a dict of fp32 tensors, ``--gib`` GiB) to a temporary directory, starts 2 gloo
ranks, and has each load it with ``dist_util.load_file`` and touch every byte (as a resume copies them into
the model). ``--not-shared`` gives rank 1 a path it cannot read, so rank 0 sends the file in pieces.
``--dist-util`` loads another version of fastdiff/dist_util.py instead (e.g. main's, from
``git show main:fastdiff/dist_util.py``), to compare. Prints each rank's peak RSS (VmHWM, Linux) before and
after loading. Memory-heavy: about 2-4x the file size per rank with whole-file broadcasting.
"""

import argparse
import importlib.util
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _load_dist_util(path: str | None):
    if path is None:
        from fastdiff import dist_util

        return dist_util
    spec = importlib.util.spec_from_file_location("other_dist_util", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peak_gib() -> float:
    """This process's peak resident set (VmHWM: anonymous and file-backed pages, reset at exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _rank(rank: int, store: str, file_path: str, shared: bool, dist_util_path: str | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    dist_util = _load_dist_util(dist_util_path)
    before = _peak_gib()
    path = file_path if shared or rank == 0 else file_path + ".absent"
    state = dist_util.load_file(path)
    checksum = sum(float(tensor.double().sum()) for tensor in state["tensors"].values())
    dist.barrier()
    after = _peak_gib()
    print(f"rank {rank}: peak RSS {before:.2f} GiB before loading, {after:.2f} GiB after ({checksum:.3e})")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB")
    parser.add_argument("--not-shared", action="store_true", help="rank 1 cannot read the file")
    parser.add_argument("--dist-util", default=None, help="another dist_util.py to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        file_path = os.path.join(directory, "state.pt")
        count = int(args.gib * 2**30 / 4 / 64)
        generator = torch.Generator().manual_seed(0)
        state = {"tensors": {f"t{i}": torch.randn(count, generator=generator) for i in range(64)}, "step": 1}
        torch.save(state, file_path)
        del state  # the ranks start from a small parent
        print(f"checkpoint: {os.path.getsize(file_path) / 2**30:.2f} GiB, shared path: {not args.not_shared}")
        store = os.path.join(directory, "store")
        mp.spawn(_rank, args=(store, file_path, not args.not_shared, args.dist_util), nprocs=2)


if __name__ == "__main__":
    main()
