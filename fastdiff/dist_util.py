"""Process groups for one process per device, launched by torchrun or as a plain single process.

torchrun (one node or many) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup_dist` reads them. Without them the process is rank 0 of 1 and joins a
single-member group (an in-memory store: no port), so the same collective calls work either way.
Backend: NCCL when the process drives a CUDA device, gloo on CPU. Device: ``cuda:LOCAL_RANK`` when CUDA is
available, else the CPU.
"""

import io
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place: global ``rank`` of ``world_size``, ``local_rank`` on its node, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


_owned_group = {"created": False}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from error


def pick_device(local_rank: int, device: str = "auto") -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (or asked for), else the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: this node has {count}; lower --nproc_per_node")
    return torch.device("cuda", local_rank)


def _restart_attempt() -> int | None:
    """torchrun's restart count of this worker group (0 on the first attempt), None outside torchrun."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return None if value in (None, "") else _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def _elastic_store(rank: int, world_size: int) -> dist.Store:
    """The rendezvous store of this torchrun attempt: torchrun's TCP store under a per-attempt prefix.

    After a restart (``--max-restarts``), the workers of the new attempt meet in the same store as the
    failed one, where gloo's connection keys of the previous attempt still sit: plain ``env://`` workers then
    dial the dead workers' addresses and hang in ``init_process_group``. Keying every name by
    ``TORCHELASTIC_RESTART_COUNT`` gives each attempt a fresh namespace.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        _env_int("MASTER_PORT", 0),
        world_size,
        is_master=rank == 0 and not agent_hosts_store,
        timeout=timedelta(minutes=30),
        multi_tenant=True,
    )
    return dist.PrefixStore(f"fastdiff/attempt{_restart_attempt()}", store)


def setup_dist(device: str = "auto") -> DistContext:
    """Join (or create) the default process group and return this process's :class:`DistContext`."""
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    chosen = pick_device(local_rank, device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ and _restart_attempt() is not None:
            store = _elastic_store(rank, world_size)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        elif "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
        elif world_size == 1:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            raise ValueError(
                f"WORLD_SIZE={world_size} but MASTER_ADDR/RANK are not set: launch with torchrun "
                "(e.g. torchrun --nproc_per_node=N -m fastdiff.train ...)"
            )
        _owned_group["created"] = True
    else:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
    return DistContext(rank, world_size, local_rank, chosen, backend)


def cleanup_dist() -> None:
    """Leave the process group if :func:`setup_dist` created it."""
    if _owned_group["created"] and dist.is_initialized():
        dist.destroy_process_group()
    _owned_group["created"] = False


def world_size() -> int:
    """Number of processes in the default group (1 when there is none)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 when there is no group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks, in place; returns it."""
    return all_reduce_sum_(tensor).div_(world_size())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def sync_params(tensors) -> None:
    """Copy rank 0's values of ``tensors`` (parameters, buffers) to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, 0)


def _read_on_rank0(path: str) -> bytes:
    """The bytes of ``path`` as rank 0 reads them, on every rank (``FileNotFoundError`` on all if not)."""
    payload: bytes | None = None
    error = ""
    if rank() == 0:
        try:
            with open(path, "rb") as handle:
                payload = handle.read()
        except OSError as problem:
            error = f"cannot read {path!r}: {problem}"
    payload, error = broadcast_object((payload, error))
    if error:
        raise FileNotFoundError(error)
    return payload


def load_file(path: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` of a file only rank 0 needs to see (nodes need no shared file system); any object."""
    return torch.load(io.BytesIO(_read_on_rank0(path)), map_location=map_location, weights_only=False)


def load_state_dict(path: str, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A plain state_dict (tensors only) from ``path``, read on rank 0 and shared with every rank."""
    return torch.load(io.BytesIO(_read_on_rank0(path)), map_location=map_location, weights_only=True)
