"""``python -m segrank.benchmarks.predict_memory``: peak memory of ``segrank.Predictor`` on photo-sized images.

Each record is one image (4:3, ``--megapixels`` of them, random pixels) segmented by a freshly built model (random
weights, a dense Segmenter head of ``--classes`` classes) with the reference's ADE20K test settings (keep-ratio test
scale 2048 x 512, 512-pixel sliding windows): the peak resident memory (VmHWM) of a fresh process that builds the
model, makes the image and predicts it, the same before the prediction, and the prediction's seconds. Without the
bands of inference/tiles.py, every class's probabilities at full resolution made this grow by about 1.2 GB per
megapixel at 150 classes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from segrank.benchmarks.measure import BACKBONES, machine_info, measure_memory, memory_kind, model_config
from segrank.config import EvalConfig
from segrank.config.inference import InferenceConfig
from segrank.data.transforms import rescale_size
from segrank.inference.predictor import Predictor
from segrank.models.segmentor import Segmentor

IMG_SCALE = (2048, 512)
WINDOW = 512


def image_size(megapixels: float) -> tuple[int, int]:
    """(H, W) of a 4:3 landscape image of about ``megapixels``."""
    height = round(math.sqrt(megapixels * 1e6 * 3 / 4))
    return height, round(height * 4 / 3)


def predict_work(backbone: str, num_classes: int, megapixels: float) -> Callable[[], dict[str, Any]]:
    """Build the model and the image; the work is one ``predict_rgb`` (run in a fresh process by measure_memory)."""
    torch.manual_seed(0)
    model = Segmentor(model_config(backbone, "segmenter", num_classes, WINDOW)).eval()
    windows = EvalConfig(mode="slide", crop_size=(WINDOW, WINDOW), stride=(WINDOW, WINDOW))
    model.inference = InferenceConfig(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), img_scale=IMG_SCALE,
                                      eval=windows)
    predictor = Predictor(model, device="cpu", warn=False)
    rgb = np.random.default_rng(0).integers(0, 256, (*image_size(megapixels), 3), dtype=np.uint8)

    def work() -> dict[str, Any]:
        start = time.perf_counter()
        prediction = predictor.predict_rgb(rgb)
        return {"seconds": round(time.perf_counter() - start, 2), "classes_found": len(prediction.legend())}

    return work


def bench_predict_memory(backbone: str, num_classes: int, megapixels: list[float]) -> Iterator[dict[str, Any]]:
    device = torch.device("cpu")
    for mp in megapixels:
        peak, before, result = measure_memory(device, predict_work, backbone, num_classes, mp)
        height, width = image_size(mp)
        yield {"benchmark": "predict-memory", "backbone": backbone, "classes": num_classes, "megapixels": mp,
               "image": [height, width], "test_input": list(rescale_size(height, width, IMG_SCALE)),
               "peak_mb": round(peak), "before_predict_mb": round(before or 0), **result,
               "memory_kind": memory_kind(device), **machine_info(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segrank.benchmarks.predict_memory", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--backbone", default="vit_b16", choices=BACKBONES)
    parser.add_argument("--classes", type=int, default=150, help="number of classes N (default: 150)")
    parser.add_argument("--megapixels", type=float, nargs="+", default=[1, 4, 24], help="image sizes (default: 1 4 24)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for record in bench_predict_memory(args.backbone, args.classes, args.megapixels):
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(f"{record['backbone']} {record['classes']} classes, {record['megapixels']:g} MP "
                  f"({record['image'][0]}x{record['image'][1]}): peak {record['peak_mb']} MB "
                  f"({record['before_predict_mb']} MB before predicting), {record['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
