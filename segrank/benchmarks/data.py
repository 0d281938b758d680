"""``segrank benchmark data``: throughput of the reference train pipeline (resize, cat-max-ratio crop, flip,
photometric, normalise, pad)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from segrank.config import DataConfig
from segrank.data.datasets import build_dataset
from segrank.training.sampling import collate


def bench_data(crop: int = 512, images: int = 64, workers: int = 2, batch_size: int = 8, image_size: int = 512,
               seed: int = 0) -> Iterator[dict[str, Any]]:
    """Images/s of synthetic ``image_size`` scenes through the train pipeline to ``crop`` crops (img_scale
    (4*crop, crop), ratio 0.5-2.0), in this process and through a DataLoader with ``workers`` workers."""
    cfg = DataConfig(dataset="synthetic", img_scale=(4 * crop, crop), crop_size=(crop, crop), workers=workers,
                     options={"image_size": image_size, "train_images": images, "seed": seed})
    dataset = build_dataset(cfg, "train", train=True)
    start = time.perf_counter()
    for i in range(images):
        dataset[(i, seed + i)]
    in_process = images / (time.perf_counter() - start)

    keys = [(i, seed + i) for i in range(images)]
    batches = [keys[i:i + batch_size] for i in range(0, images, batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate)
    start = time.perf_counter()
    count = sum(len(batch["image"]) for batch in loader)
    with_workers = count / (time.perf_counter() - start)  # includes worker start-up
    yield {"benchmark": "data_pipeline", "dataset": "synthetic", "crop": crop, "image_size": image_size,
           "images": images, "images_per_s": round(in_process, 2), "workers": workers, "batch_size": batch_size,
           "dataloader_images_per_s": round(with_workers, 2)}
