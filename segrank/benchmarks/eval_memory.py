"""``segrank benchmark eval-memory``: peak memory and time of one image's sliding-window multi-scale + flip test,
sparse vs dense RankSeg."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from segrank.benchmarks.measure import measure_memory, memory_kind, model_config, time_interleaved
from segrank.config import EvalConfig
from segrank.inference.windows import ImageProbabilities, predict_image
from segrank.models.segmentor import Segmentor


def bench_eval_memory(device: torch.device, backbone: str, classes: list[int], image_size: tuple[int, int],
                      reps: int) -> Iterator[dict[str, Any]]:
    """Peak memory and time of one image's sliding-window multi-scale + flip test: sparse vs dense RankSeg."""
    for num_classes in classes:
        yield from _eval_memory_case(device, backbone, num_classes, image_size, reps)


def _eval_setup(backbone: str, num_classes: int, height: int, width: int, device: torch.device
                ) -> tuple[Segmentor, torch.Tensor, EvalConfig]:
    """A seeded random RankSeg model, one normalised test image and the reference's ms+flip slide settings."""
    torch.manual_seed(0)
    model = Segmentor(model_config(backbone, "rankseg", num_classes, 512)).eval().to(device)
    image = torch.randn(3, height, width, generator=torch.Generator().manual_seed(1)).to(device)
    cfg = EvalConfig(mode="slide", crop_size=(512, 512), stride=(512, 512))
    return model, image, cfg


def _eval_once(model: Segmentor, image: torch.Tensor, cfg: EvalConfig, dense: bool) -> ImageProbabilities:
    """The reference's test: scales of img_scale = (4 * short side, short side), the image's own scale-1 size."""
    size = tuple(image.shape[-2:])
    return predict_image(model, image, size, cfg, ms_flip=True, img_scale=(4 * min(size), min(size)), dense=dense)


def _eval_labels(backbone: str, num_classes: int, height: int, width: int, dense: bool, device: torch.device
                 ) -> Callable[[], Any]:
    """The memory benchmark's work: one evaluation of a fresh model, returning its label map as an array."""
    model, image, cfg = _eval_setup(backbone, num_classes, height, width, device)

    def work() -> Any:
        with torch.inference_mode():
            return _eval_once(model, image, cfg, dense).label.cpu().numpy()

    return work


def _eval_memory_case(device: torch.device, backbone: str, num_classes: int, image_size: tuple[int, int],
                      reps: int) -> list[dict]:
    height, width = image_size
    model, image, cfg = _eval_setup(backbone, num_classes, height, width, device)
    paths = {"sparse": False, "dense": True}
    preds = {}

    def evaluate(path: str) -> None:
        preds[path] = _eval_once(model, image, cfg, paths[path])

    with torch.inference_mode():
        times = time_interleaved({p: (lambda p=p: evaluate(p)) for p in paths}, reps, device)
    labels = [pred.label.cpu() for pred in preds.values()]
    memory = {}
    for path, dense in paths.items():
        peak, before, label = measure_memory(device, _eval_labels, backbone, num_classes, height, width, dense, device)
        memory[path] = {"peak_mb": peak, "before_eval_mb": before}
        labels.append(torch.from_numpy(label))
    identical = all(torch.equal(labels[0], label) for label in labels[1:])
    return [{"benchmark": "eval-memory", "backbone": backbone, "image": [height, width], "classes": num_classes,
             "path": path, "scales": list(cfg.ms_scales), "flip": True, "crop": list(cfg.crop_size),
             "time_s": times[path], "vs_dense_time": times[path] / times["dense"],
             **memory[path], "memory_kind": memory_kind(device),
             "identical_predictions": identical, "union_of_selected_classes": int(preds["sparse"].selected.numel())}
            for path in paths]
