"""Several processes sharing one training run (`torchrun`, `accelerate launch`): who they are, and the few
collective steps the recipe needs.

A launcher starts N copies of the recipe with WORLD_SIZE, RANK and LOCAL_RANK set; `init` joins them into
one process group through accelerate (gloo on CPU, NCCL on GPUs). Then the copies split the work that
divides well (embedding the queries, the training batches, the validation loss) and leave to the main
process (rank 0) the work done once (calibration, evaluation, the export, the on-disk caches and resume
state), the others waiting at a barrier. With one process, or inside `on_main`, every collective
here is a no-op, so single-process code paths stay exactly as they were.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

WAIT_TIMEOUT = timedelta(hours=24)
"""How long a process waits at a collective step, e.g. for the main process's calibration to end."""

T = TypeVar("T")
_alone = False  # inside `on_main`: collectives are skipped
_threads: int | None = None  # torch threads per process set by `init` in a multi-process CPU run


def launched() -> bool:
    """Whether a launcher started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def init(threads: int | None = None) -> None:
    """Join the process group of a multi-process launch (nothing to do for one process) and set torch's
    CPU threads: `threads` when given, else in a multi-process CPU run the cores divided among the
    processes of this machine (launchers default to 1 thread each, which starves a many-core machine)."""
    global _threads
    if launched() and not dist.is_initialized():
        from accelerate import PartialState

        check_gpus_per_process()

        # cpu=True on a CUDA-less machine: accelerate then makes it a MULTI_CPU (gloo) run; without it
        # accelerate leaves a torchrun launch single-process and every copy does all the work
        PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT_TIMEOUT)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    elif active() and not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        _threads = max(1, local_cores() // local)
        torch.set_num_threads(_threads)


def check_gpus_per_process() -> None:
    """Refuse a multi-process launch with more processes on this machine than GPUs it sees: NCCL needs a GPU
    per process, and would otherwise stop every process with "Duplicate GPU detected" deep inside torch.
    The launchers (torchrun, accelerate launch) say how many processes share the machine in
    LOCAL_WORLD_SIZE; without it nothing is checked (WORLD_SIZE may count several machines)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if gpus and local > gpus:
        raise ValueError(
            f"{local} processes on this machine but {gpus} GPU(s) visible: a GPU run needs one GPU per process; "
            f"launch at most {gpus} (torchrun --nproc_per_node, accelerate launch --num_processes), or train on "
            "the CPUs with CUDA_VISIBLE_DEVICES=''"
        )


def active() -> bool:
    """Whether collectives are on: several processes in a process group, outside `on_main`."""
    return not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes sharing the run (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's index among them (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this is the process that writes files and does the work done once."""
    return rank() == 0


def _device() -> torch.device:
    """Where the backend wants the tensors of a collective: the process's GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here."""
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """The sums over all processes of each of `values` (the values themselves when alone); every process
    gets the same numbers, so decisions taken on them (early stopping) agree."""
    if not active():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    return total.tolist()


def shard(n: int) -> slice:
    """This process's share of n items: every world_size-th one from its rank (all of them when alone)."""
    return slice(rank(), n, world_size()) if active() else slice(0, n)


def gather_shards(local: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble n rows from each process's `local` rows of its `shard(n)`: (n, ...) on the CPU, the same
    on every process; `local` itself when alone."""
    if not active():
        return local
    size, device = world_size(), _device()
    longest = -(-n // size)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        count = len(range(r, n, size))
        out[r::size] = part[:count].cpu()
    return out


def on_main(work: Callable[[], T]) -> T | None:
    """Run `work()` on the main process alone while the others wait at a barrier after it; returns its
    result there and None elsewhere. Collectives are off inside (code shared with the collective phases
    runs locally), and on a CPU run the main process uses the cores of the waiting ones."""
    global _alone
    result = None
    if is_main():
        if _threads is not None:
            torch.set_num_threads(_threads * int(os.environ.get("LOCAL_WORLD_SIZE", world_size())))
        was, _alone = _alone, True
        try:
            result = work()
        finally:
            _alone = was
            if _threads is not None:
                torch.set_num_threads(_threads)
    barrier()
    return result
