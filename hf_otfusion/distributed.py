"""Data parallelism: calibration and evaluation batches split across the processes of a distributed run.

Under ``accelerate launch`` or ``torchrun`` (or any run with a ``torch.distributed`` process group), every
process walks the same batches and keeps every ``world``-th one, starting at its rank; each statistic a pass
accumulates (activation sums and cross Gram matrices, BatchNorm statistics, REPAIR and refit moments, evaluation
counts) is summed over the processes before it is used, so every process holds the statistics of all the data.
Transport problems are solved on the main process and their couplings broadcast; only the main process writes
the output, pushes and shows progress bars. In a single process every function here is the identity.

Example (two CPU processes; ``python -m accelerate.commands.launch`` avoids the console script's imports):

    ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --multi_gpu --num_processes 2 \\
        -m hf_otfusion.cli merge examples/mnist-otfusion.yml fused-mnist
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .log import get_logger

T = TypeVar("T")
log = get_logger(__name__)


def world() -> tuple[int, int]:
    """``(rank, number of processes)`` of this run; ``(0, 1)`` outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this is the process that writes outputs and shows progress (always, in a single process)."""
    return world()[0] == 0


def launched() -> bool:
    """Whether a launcher (``accelerate launch``, ``torchrun``) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> tuple[int, int]:
    """Join the process group a launcher set up (accelerate's ``PartialState``: gloo on CPU, NCCL on GPUs, one
    device per local rank); nothing outside a launcher. Returns :func:`world`."""
    if launched() and not (dist.is_available() and dist.is_initialized()):
        from accelerate import PartialState

        PartialState()
        if not dist.is_initialized():  # a launcher accelerate does not recognise: the env:// rendezvous still works
            dist.init_process_group("nccl" if torch.cuda.is_available() and not _cpu_only() else "gloo")
    return world()


def _cpu_only() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def shard(batches: Iterable[T], what: str = "calibration", *,
          skipped: Callable[[T], None] | None = None) -> Iterator[T]:
    """This process's share of ``batches``: batch ``i`` goes to rank ``i % world``; ``skipped`` sees the others.

    At the end, every process logs which batches it took (``hf_otfusion.distributed`` logger, level INFO). A process
    may get none (fewer batches than processes): what it adds to the sums is zero.
    """
    rank, size = world()
    if size == 1:
        yield from batches
        return
    taken: list[int] = []
    total = 0
    for i, batch in enumerate(batches):
        total = i + 1
        if i % size == rank:
            taken.append(i)
            yield batch
        elif skipped is not None:
            skipped(batch)
    log.info("rank %d of %d: %s batches %s of %d", rank, size, what, _indices(taken), total)


def _indices(taken: list[int]) -> str:
    if not taken:
        return "none"
    return ",".join(map(str, taken)) if len(taken) <= 64 else f"{taken[0]},{taken[1]},...,{taken[-1]} ({len(taken)})"


def _backend_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective on ``tensor`` runs: NCCL needs the process's GPU, gloo works on CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes (a new tensor on ``tensor``'s device; ``tensor`` itself outside a
    distributed run)."""
    if world()[1] == 1:
        return tensor
    work = tensor.detach().to(_backend_device(tensor), copy=True)
    dist.all_reduce(work)
    return work.to(tensor.device)


def all_reduce_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each of ``tensors`` over the processes, in place."""
    for tensor in tensors:
        if world()[1] > 1:
            tensor.copy_(all_reduce(tensor))


def sum_numbers(*values: float) -> list[float]:
    """Python numbers summed over the processes (counts, losses), in float64."""
    if world()[1] == 1:
        return list(values)
    return all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()


def broadcast(tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """The main process's ``tensor``, as ``dtype`` on ``device``, on every process (the others pass None, with the
    shape); outside a distributed run, ``tensor`` itself."""
    if world()[1] == 1:
        assert tensor is not None
        return tensor
    if tensor is None:
        work = torch.empty(shape, dtype=dtype, device=_backend_device(torch.empty(0)))
    else:
        work = tensor.detach().to(_backend_device(tensor), dtype=dtype, copy=True)
    dist.broadcast(work, src=0)
    return work.to(device)


def all_gather_object(value: Any) -> list[Any]:
    """Every process's ``value`` (any picklable object), in rank order; ``[value]`` in a single process."""
    if world()[1] == 1:
        return [value]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any) -> Any:
    """The main process's ``value`` (any picklable object) on every process."""
    if world()[1] == 1:
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every process (nothing in a single process)."""
    if world()[1] > 1:
        dist.barrier()
