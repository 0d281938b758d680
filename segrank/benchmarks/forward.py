"""``segrank benchmark forward``: latency of the decode head + full-resolution class map, and end to end, with
FLOPs and the achieved fraction of this machine's matrix-multiply rate in the precision the model ran in."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from segrank.benchmarks.measure import YARDSTICK_PRECISIONS, matmul_yardstick, model_config, time_interleaved
from segrank.inference.compiled import compile_for_inference
from segrank.inference.flops import count_flops
from segrank.inference.precision import precision_autocast, prepare_for_precision
from segrank.models.segmentor import Segmentor
from segrank.models.vit import BackboneOutput
from segrank.runtime.precision import PrecisionChoice


def class_map_from_features(model: Segmentor, features: BackboneOutput, size: tuple[int, int]) -> torch.Tensor:
    """Decode head + full-resolution class map, given backbone features (the part RankSeg changes)."""
    return model.output_to_class_map(model.decode_head(features.feature_map, features.class_tokens), size)


class HeadAndMap(nn.Module):
    """``class_map_from_features`` as a module, so that ``--compile`` compiles it."""

    def __init__(self, model: Segmentor, size: tuple[int, int]) -> None:
        super().__init__()
        self.model, self.size = model, size

    def forward(self, feature_map: torch.Tensor, class_tokens: torch.Tensor | None) -> torch.Tensor:
        return class_map_from_features(self.model, BackboneOutput(feature_map, class_tokens), self.size)


class EndToEnd(nn.Module):
    """``Segmentor.class_map`` as a module, so that ``--compile`` compiles it."""

    def __init__(self, model: Segmentor) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.class_map(images)


def matmul_rates(device: torch.device, choice: PrecisionChoice) -> dict[str, float]:
    """The yardsticks' rates (fp32, bf16) and the rate of the precision the model runs in."""
    names = dict.fromkeys((*YARDSTICK_PRECISIONS, choice.name))
    return {name: matmul_yardstick(device, name)[0] for name in names}


def bench_forward(device: torch.device, backbone: str, size: int, classes: list[int], models: list[str],
                  reps: int, choice: PrecisionChoice, compile: bool = False) -> Iterator[dict[str, Any]]:
    """Latency of the decode head + full-resolution class map, and end to end, with FLOPs, in ``choice``'s
    precision (eager or compiled)."""
    rates = matmul_rates(device, choice)
    for num_classes in classes:
        yield from _forward_case(device, backbone, size, num_classes, models, reps, choice, compile, rates)


def first_call_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of ``fn``'s first call (compiling included, with ``--compile``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _forward_case(device: torch.device, backbone: str, side: int, num_classes: int, heads: list[str], reps: int,
                  choice: PrecisionChoice, compile: bool, rates: dict[str, float]) -> list[dict]:
    models = {h: prepare_for_precision(Segmentor(model_config(backbone, h, num_classes, side)).eval().to(device),
                                       choice) for h in heads}
    maybe_compiled = (lambda m: compile_for_inference(m, device)) if compile else (lambda m: m)
    x = torch.randn(1, 3, side, side, device=device)
    records = []
    with torch.inference_mode(), precision_autocast(choice, device):
        features = {h: m.backbone(x) for h, m in models.items()}
        heads_run = {h: maybe_compiled(HeadAndMap(m, (side, side))) for h, m in models.items()}
        ends_run = {h: maybe_compiled(EndToEnd(m)) for h, m in models.items()}
        head_fns = {h: (lambda f=features[h], r=heads_run[h]: r(f.feature_map, f.class_tokens)) for h in models}
        e2e_fns = {h: (lambda r=ends_run[h]: r(x)) for h in models}
        first = {h: first_call_seconds(e2e_fns[h], device) for h in models}
        head_times = time_interleaved(head_fns, reps, device)
        e2e_times = time_interleaved(e2e_fns, reps, device)
        for h, model in models.items():
            flops = count_flops(lambda m=model: m.class_map(x))  # counted eagerly: the same arithmetic
            achieved = flops / e2e_times[h] / 1e9
            records.append({
                "benchmark": "forward", "backbone": backbone, "size": side, "classes": num_classes,
                "model": h, "precision": choice.name, "precision_reason": choice.reason, "compile": compile,
                "first_call_s": first[h],
                "head_and_map_s": head_times[h], "end_to_end_s": e2e_times[h],
                "gflops": flops / 1e9, "achieved_gflops_per_s": achieved,
                "matmul_gflops_per_s": rates[choice.name], "fraction_of_matmul": achieved / rates[choice.name],
                **{f"fraction_of_{name}_matmul": achieved / rates[name] for name in YARDSTICK_PRECISIONS},
                "head_vs_segmenter": head_times[h] / head_times.get("segmenter", head_times[h]),
                "end_to_end_vs_segmenter": e2e_times[h] / e2e_times.get("segmenter", e2e_times[h]),
            })
    return records
