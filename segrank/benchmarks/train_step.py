"""``segrank benchmark train-step``: time and peak memory of one SGD step (forward, loss, backward, update), in each
precision asked for, timed interleaved in one run so that their ratio holds on a busy machine too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from segrank.benchmarks.measure import (
    YARDSTICK_PRECISIONS,
    matmul_yardstick,
    measure_memory,
    memory_kind,
    model_config,
    time_interleaved,
)
from segrank.models.segmentor import Segmentor
from segrank.runtime.precision import PrecisionChoice


def bench_train_step(device: torch.device, backbone: str, size: int, num_classes: int, batches: list[int],
                     models: list[str], reps: int, precisions: list[PrecisionChoice]) -> Iterator[dict[str, Any]]:
    """Time and peak memory of one SGD step (forward, loss, backward, update) per batch size, model and precision,
    with the machine's matrix-multiply rates (fp32 and bf16) measured in the same run."""
    rates = {name: matmul_yardstick(device, name)[0] for name in YARDSTICK_PRECISIONS}
    for batch in batches:
        yield from _train_case(device, backbone, size, num_classes, batch, models, reps, precisions, rates)


def _train_setup(backbone: str, head: str, num_classes: int, size: int, batch: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """One SGD step (forward, loss, backward, momentum update) of a seeded model on a fixed batch; as training does,
    fp32 master weights and, for bf16/fp16, the forward and loss under autocast."""
    torch.manual_seed(0)
    model = Segmentor(model_config(backbone, head, num_classes, size)).train().to(device)
    optim = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    # a few large regions per image, as in real labels
    coarse = torch.randint(0, num_classes, (batch, 1, 4, 4), generator=gen).float()
    labels = F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long().to(device)

    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        optim.zero_grad(set_to_none=True)
        with autocast:
            loss = model.loss(model(x), labels, ignore_index=-1)["loss"]
        loss.backward()
        optim.step()

    return step


def _two_train_steps(backbone: str, head: str, num_classes: int, size: int, batch: int, device: torch.device,
                     dtype: torch.dtype) -> Callable[[], None]:
    """The memory benchmark's work: two steps, so that the optimiser state exists during the second."""
    step = _train_setup(backbone, head, num_classes, size, batch, device, dtype)

    def work() -> None:
        step()
        step()

    return work


def _train_case(device: torch.device, backbone: str, size: int, num_classes: int, batch: int, models: list[str],
                reps: int, precisions: list[PrecisionChoice], rates: dict[str, float]) -> list[dict]:
    cases = {(h, p.name): (h, p) for h in models for p in precisions}
    steps = {f"{h}/{p.name}": _train_setup(backbone, h, num_classes, size, batch, device, p.dtype)
             for h, p in cases.values()}
    times = time_interleaved(steps, reps, device)
    records = []
    for h, p in cases.values():
        peak, before, _ = measure_memory(device, _two_train_steps, backbone, h, num_classes, size, batch, device,
                                         p.dtype)
        step_s, fp32_s = times[f"{h}/{p.name}"], times.get(f"{h}/fp32")
        records.append({"benchmark": "train-step", "backbone": backbone, "size": size,
                        "classes": num_classes, "batch": batch, "model": h, "precision": p.name,
                        "precision_reason": p.reason, "step_s": step_s,
                        "step_vs_fp32": None if fp32_s is None else step_s / fp32_s,
                        **{f"matmul_{name}_gflops_per_s": rate for name, rate in rates.items()},
                        "peak_mb": peak, "before_steps_mb": before, "memory_kind": memory_kind(device)})
    return records
