"""Where a run executes: device, torchrun process group, graceful stop on signals, peak memory."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from segrank.errors import SegrankError
from segrank.runtime.devices import resolve_device

DEFAULT_RUN_ID = "none"  # torchrun's --rdzv-id when none is given


@dataclass
class Dist:
    """This process in the run: its rank, the number of processes and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> Dist:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    device = resolve_device(device).type
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(0, 1, torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=attempt_store(rank, world), rank=rank, world_size=world)
        else:
            dist.init_process_group(backend)
    rank, world = rank_and_world()
    return Dist(rank, world, torch.device(device, local_rank) if device == "cuda" else torch.device("cpu"))


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, as the process group has them; (0, 1) outside one. The
    one place a rank is read (torchrun's environment variables only serve to create the group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def process_group(device: str | None) -> Iterator[Dist]:
    """``setup_distributed`` for the length of a command or run: a process group created here is destroyed on the
    way out, also when the command fails (one that existed before is left to its owner)."""
    created = not (dist.is_available() and dist.is_initialized())
    try:
        yield setup_distributed(device)
    finally:
        if created and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def attempt_store(rank: int, world: int, timeout: timedelta = default_pg_timeout) -> dist.Store:
    """torchrun's key-value store, narrowed to a namespace of this attempt of the worker group.

    torchrun keeps one store for all attempts of a job (pytorch/pytorch#135712): a group restarted after a failure
    would read the failed attempt's connection keys and hang. Restart counts are kept per node and may differ, so
    rank 0 numbers the attempt, and every other rank asks for that number under a fresh random key that no earlier
    attempt can have answered."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    if rank == 0:
        attempt = store.add("segrank/attempts", 1)
        waiting, deadline = set(range(1, world)), time.monotonic() + timeout.total_seconds()
        while waiting:  # answer every rank's request (a stale one too: harmless) until each has joined
            for other in sorted(waiting):
                if store.check([f"segrank/request/{other}"]):
                    nonce = store.get(f"segrank/request/{other}").decode()
                    store.set(f"segrank/reply/{nonce}", str(attempt))
                if store.check([f"segrank/{attempt}/joined/{other}"]):
                    waiting.discard(other)
            if waiting and time.monotonic() > deadline:
                raise SegrankError(f"torchrun: ranks {sorted(waiting)} did not join within {timeout}")
            time.sleep(0.01)
    else:
        nonce = uuid.uuid4().hex
        store.set(f"segrank/request/{rank}", nonce)
        attempt = int(store.get(f"segrank/reply/{nonce}"))  # waits for rank 0's answer (up to the timeout)
        store.set(f"segrank/{attempt}/joined/{rank}", "1")
    return dist.PrefixStore(f"segrank/{attempt}/", store)


def agree(env: Dist, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank: a decision taken from files or the environment must not differ by rank."""
    if env.world == 1:
        return flag
    value = torch.tensor([float(flag)], device=env.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def any_rank(env: Dist, *flags: bool) -> list[bool]:
    """Whether each flag is set on some rank: decisions every rank must take at the same step (skip, stop)."""
    values = torch.tensor([float(f) for f in flags], dtype=torch.float32, device=env.device)
    if env.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def mean_over_ranks(env: Dist, values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor of the same shape on every rank."""
    if env.world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= env.world
    return values


def elastic_restart() -> int:
    """How often this node's torchrun has restarted its workers (``--max-restarts``): 0 on the first attempt and
    outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def launch_id() -> str | None:
    """The torchrun job this process belongs to (``--rdzv-id``; a fresh id with ``--standalone``), None outside
    torchrun. All attempts of a job share it."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def continues_job(recorded: str | None) -> bool:
    """Whether this process is a later start of the torchrun job that created a work dir (``recorded``: the job id
    stored there): a restart after a failure, or the job requeued with the same ``--rdzv-id``. With torchrun's
    default id ("none", shared by every job that does not set one) only a restart counts."""
    current = launch_id()
    if current is None or recorded != current:
        return False
    return current != DEFAULT_RUN_ID or elastic_restart() > 0


class GracefulStop:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 0. Second: exit at once (not under torchrun). Under
    torchrun every process gets the signal; only the one that ``announce``s (rank 0) says so."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            # Under torchrun a second signal is usually the launcher passing on the one SLURM sent to every process
            # of the job: keep saving. torchrun kills its workers itself after --shutdown-timeout.
            if launch_id() is None:
                os._exit(128 + signum)
            return
        self.requested = True
        if self.announce:
            then = "send it again to exit at once" if launch_id() is None else "torchrun's --shutdown-timeout applies"
            print(f"\nsegrank train: {signal.Signals(signum).name} received, saving a checkpoint after this step "
                  f"({then})", flush=True)


def barrier(env: Dist) -> None:
    if env.world > 1:
        dist.barrier()


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
