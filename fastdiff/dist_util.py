"""Process groups for one process per device, launched by torchrun or as a plain single process.

torchrun (one node or many) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup_dist` reads them. Without them the process is rank 0 of 1 and joins a
single-member group (an in-memory store: no port), so the same collective calls work either way.
Backend: NCCL when the process drives a CUDA device, gloo on CPU. Device: ``cuda:LOCAL_RANK`` when CUDA is
available, else the CPU.
"""

import gc
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

if dist.is_available():  # before any group exists: see destroy_group
    import torch.distributed.nn


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
        destroy_group()
    _owned_group["created"] = False


def destroy_group() -> None:
    """Destroy the default process group and free it now, while the interpreter is still whole.

    ``destroy_process_group`` only unregisters the group; gloo's worker threads run until its last reference
    goes. A worker that drops a finished collective's tensors once interpreter shutdown has begun must take
    the GIL, which ends the thread and aborts the process ("terminate called without an active exception":
    seen at exit under torchrun on loaded CPUs). Collecting garbage frees the group, and the DDP wrappers in
    reference cycles that hold it, which joins those threads here. ``torch.distributed.nn`` takes
    ``group.WORLD`` as default arguments when first imported, which would pin the group for good: this
    module imports it before any group exists, and DDP's import of it later finds it imported.
    """
    dist.destroy_process_group()
    gc.collect()


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


CHUNK_BYTES = 64 * 2**20
"""Largest piece of a tensor rank 0 sends at once when the other ranks cannot read a checkpoint themselves
(tests lower it)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint that only loads through arbitrary unpickling (which can run code), refused."""


@dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor sat in a checkpoint sent piecewise: its index in the send order, shape and dtype."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _torch_load_local(path: str, trust: bool) -> Any:
    """``torch.load`` of ``path`` on this rank (CPU, memory-mapped), ``weights_only`` unless ``trust``."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=not trust)  # a legacy-format file
    except pickle.UnpicklingError as error:
        if not trust and "weights only load failed" in str(error).lower():
            raise UnsafeCheckpointError(
                f"{path} holds objects that load only through arbitrary unpickling, which can run code: "
                "refused. If you trust this file (you wrote it, or know who did), pass --trust_checkpoint"
            ) from None
        raise ValueError(f"{path} is not a readable checkpoint: {_first_line(error)}") from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {_first_line(error)}"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _file_size(path: str) -> int:
    """Size of ``path`` in bytes as this rank sees it, -1 when it cannot read it."""
    try:
        return os.path.getsize(path) if os.access(path, os.R_OK) and os.path.isfile(path) else -1
    except OSError:
        return -1


def _split_tensors(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by a :class:`_TensorSlot`; the tensors appended to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorSlot(len(tensors) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {key: _split_tensors(value, tensors) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        parts = [_split_tensors(value, tensors) for value in obj]
        return parts if isinstance(obj, list) else tuple(parts)
    return obj


def _fill_slots(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of :func:`_split_tensors`."""
    if isinstance(obj, _TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {key: _fill_slots(value, tensors) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        parts = [_fill_slots(value, tensors) for value in obj]
        return parts if isinstance(obj, list) else tuple(parts)
    return obj


def _broadcast_in_pieces(tensor: torch.Tensor, chunk_bytes: int) -> None:
    """Rank 0's bytes of contiguous CPU ``tensor`` into every rank's ``tensor``, ``chunk_bytes`` at a time.

    gloo broadcasts each piece in place (straight into the tensor); NCCL through one staging buffer of at
    most ``chunk_bytes`` on this rank's GPU.
    """
    flat = tensor.reshape(-1).view(torch.uint8)
    on_gpu = dist.get_backend() == "nccl"
    for start in range(0, flat.numel(), chunk_bytes):
        piece = flat[start : start + chunk_bytes]
        if on_gpu:
            staging = piece.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(staging, 0)
            piece.copy_(staging)
        else:
            dist.broadcast(piece, 0)


def _receive_from_rank0(path: str, trust: bool, chunk_bytes: int) -> Any:
    """Rank 0 loads ``path``; its structure goes to every rank as one small object, then each tensor in
    pieces of at most ``chunk_bytes`` straight into tensors allocated for it (no rank holds a second copy)."""
    skeleton, error, tensors = None, None, []
    if rank() == 0:
        try:
            skeleton = _split_tensors(_torch_load_local(path, trust), tensors)
        except (ValueError, OSError) as problem:
            error = problem
    skeleton, error = broadcast_object((skeleton, error))
    if error is not None:
        raise error
    if rank() == 0:
        tensors = [tensor.contiguous() for tensor in tensors]
    else:
        slots: list[_TensorSlot] = []
        _collect_slots(skeleton, slots)
        tensors = [torch.empty(slot.shape, dtype=slot.dtype) for slot in sorted(slots, key=lambda s: s.index)]
    for tensor in tensors:
        _broadcast_in_pieces(tensor, chunk_bytes)
    return _fill_slots(skeleton, tensors)


def _collect_slots(obj: Any, slots: list[_TensorSlot]) -> None:
    if isinstance(obj, _TensorSlot):
        slots.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _collect_slots(value, slots)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _collect_slots(value, slots)


def load_file(path: str, trust: bool = False, chunk_bytes: int | None = None) -> Any:
    """A checkpoint on every rank (CPU tensors), loaded with ``weights_only=True`` unless ``trust``.

    Every rank checks once whether it sees ``path`` with rank 0's size: if all do (a shared file system),
    each reads the file itself; else rank 0 reads it and sends it in pieces of at most ``chunk_bytes``
    (default :data:`CHUNK_BYTES`) straight into the tensors. Errors, the same on every rank: FileNotFoundError
    when rank 0 cannot read the file, :class:`UnsafeCheckpointError` when it needs arbitrary unpickling,
    ValueError when it is truncated or corrupt; each names the file.
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    sizes = all_gather_object(_file_size(path))
    if sizes[0] < 0:
        raise FileNotFoundError(f"cannot read {path!r} (on rank 0)")
    if all(size == sizes[0] for size in sizes):
        return _torch_load_local(path, trust)
    return _receive_from_rank0(path, trust, chunk_bytes)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A plain state_dict (tensors only, ``weights_only=True``) from ``path``, on every rank."""
    return load_file(path)
