"""Where a run executes: device, torchrun process group, graceful stop on signals, peak memory."""

from __future__ import annotations

import os
import resource
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from segrank.errors import SegrankError


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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SegrankError("--device cuda: no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(rank, world, torch.device(device, local_rank) if device == "cuda" else torch.device("cpu"))


class GracefulStop:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 0. Second: exit at once."""

    def __init__(self) -> None:
        self.requested = False
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
            os._exit(128 + signum)
        self.requested = True
        print(f"\nsegrank train: {signal.Signals(signum).name} received, saving a checkpoint after this step "
              "(send it again to exit at once)", flush=True)


def barrier(env: Dist) -> None:
    if env.world > 1:
        dist.barrier()


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
