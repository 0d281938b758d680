"""``segrank benchmark train-step``: time and peak memory of one SGD step (forward, loss, backward, update)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from segrank.benchmarks.measure import measure_memory, memory_kind, model_config, time_interleaved
from segrank.models.segmentor import Segmentor


def bench_train_step(device: torch.device, backbone: str, size: int, num_classes: int, batches: list[int],
                     models: list[str], reps: int) -> Iterator[dict[str, Any]]:
    """Time and peak memory of one SGD step (forward, loss, backward, update) per batch size."""
    for batch in batches:
        yield from _train_case(device, backbone, size, num_classes, batch, models, reps)


def _train_setup(backbone: str, head: str, num_classes: int, size: int, batch: int, device: torch.device
                 ) -> Callable[[], None]:
    """One SGD step (forward, loss, backward, momentum update) of a seeded model on a fixed batch."""
    torch.manual_seed(0)
    model = Segmentor(model_config(backbone, head, num_classes, size)).train().to(device)
    optim = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    # a few large regions per image, as in real labels
    coarse = torch.randint(0, num_classes, (batch, 1, 4, 4), generator=gen).float()
    labels = F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long().to(device)

    def step() -> None:
        optim.zero_grad(set_to_none=True)
        model.loss(model(x), labels, ignore_index=-1)["loss"].backward()
        optim.step()

    return step


def _two_train_steps(backbone: str, head: str, num_classes: int, size: int, batch: int, device: torch.device
                     ) -> Callable[[], None]:
    """The memory benchmark's work: two steps, so that the optimiser state exists during the second."""
    step = _train_setup(backbone, head, num_classes, size, batch, device)

    def work() -> None:
        step()
        step()

    return work


def _train_case(device: torch.device, backbone: str, size: int, num_classes: int, batch: int, models: list[str],
                reps: int) -> list[dict]:
    steps = {h: _train_setup(backbone, h, num_classes, size, batch, device) for h in models}
    times = time_interleaved(steps, reps, device)
    records = []
    for h in steps:
        peak, before, _ = measure_memory(device, _two_train_steps, backbone, h, num_classes, size, batch, device)
        records.append({"benchmark": "train-step", "backbone": backbone, "size": size,
                        "classes": num_classes, "batch": batch, "model": h, "step_s": times[h], "peak_mb": peak,
                        "before_steps_mb": before, "memory_kind": memory_kind(device)})
    return records
