"""``segrank benchmark forward``: latency of the decode head + full-resolution class map, and end to end, with
FLOPs and the achieved fraction of this machine's matrix-multiply rate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from segrank.benchmarks.measure import AMP_DTYPES, count_flops, matmul_gflops, model_config, time_interleaved
from segrank.models.segmentor import Segmentor
from segrank.models.vit import BackboneOutput


def class_map_from_features(model: Segmentor, features: BackboneOutput, size: tuple[int, int]) -> torch.Tensor:
    """Decode head + full-resolution class map, given backbone features (the part RankSeg changes)."""
    return model.output_to_class_map(model.decode_head(features.feature_map, features.class_tokens), size)


def bench_forward(device: torch.device, backbone: str, size: int, classes: list[int], models: list[str],
                  reps: int, amp: str) -> Iterator[dict[str, Any]]:
    """Latency of the decode head + full-resolution class map, and end to end, with FLOPs."""
    mm = matmul_gflops(device)
    for num_classes in classes:
        yield from _forward_case(device, backbone, size, num_classes, models, reps, amp, mm)


def _forward_case(device: torch.device, backbone: str, side: int, num_classes: int, heads: list[str], reps: int,
                  amp: str, mm: float) -> list[dict]:
    models = {h: Segmentor(model_config(backbone, h, num_classes, side)).eval().to(device) for h in heads}
    x = torch.randn(1, 3, side, side, device=device)
    size = (side, side)
    records = []
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "none")
    with torch.inference_mode(), autocast:
        features = {h: m.backbone(x) for h, m in models.items()}
        head_fns = {h: (lambda m=m, f=features[h]: class_map_from_features(m, f, size)) for h, m in models.items()}
        e2e_fns = {h: (lambda m=m: m.class_map(x)) for h, m in models.items()}
        head_times = time_interleaved(head_fns, reps, device)
        e2e_times = time_interleaved(e2e_fns, reps, device)
        for h in models:
            flops = count_flops(e2e_fns[h])
            achieved = flops / e2e_times[h] / 1e9
            records.append({
                "benchmark": "forward", "backbone": backbone, "size": side, "classes": num_classes,
                "model": h, "amp": amp, "head_and_map_s": head_times[h], "end_to_end_s": e2e_times[h],
                "gflops": flops / 1e9, "achieved_gflops_per_s": achieved, "matmul_gflops_per_s": mm,
                "fraction_of_matmul": achieved / mm,
                "head_vs_segmenter": head_times[h] / head_times.get("segmenter", head_times[h]),
                "end_to_end_vs_segmenter": e2e_times[h] / e2e_times.get("segmenter", e2e_times[h]),
            })
    return records
