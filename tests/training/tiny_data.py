"""A tiny in-memory dataset for engine-mechanics tests, patched in as ``segrank.data``'s dataset source.

Like segrank's datasets, ``dataset[(index, seed)]`` draws its train-time flip from ``default_rng(seed)``.
"""

from __future__ import annotations

import numpy as np
import torch

import segrank.data
import segrank.training.loop
import segrank.training.run
from segrank.data.info import HALF_MEAN, HALF_STD, DatasetInfo, generated_palette

NUM_CLASSES = 12
IGNORE = 255


class TinyScenes(torch.utils.data.Dataset):
    def __init__(self, num_images: int, size: int, train: bool) -> None:
        self.num_images, self.size, self.train = num_images, size, train
        self.colors = np.random.default_rng(0).uniform(-1, 1, (NUM_CLASSES, 3)).astype(np.float32)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng(index + (0 if self.train else 10_000))
        classes = rng.choice(NUM_CLASSES, 3, replace=False)
        label = np.full((self.size, self.size), classes[0], np.int64)
        label[: self.size // 2, : self.size // 2] = classes[1]
        label[self.size // 2:, self.size // 3:] = classes[2]
        label[0, 0] = IGNORE
        image = self.colors[np.where(label == IGNORE, 0, label)].transpose(2, 0, 1)
        image = image + rng.normal(0, 0.2, image.shape).astype(np.float32)
        if self.train and np.random.default_rng(seed).random() < 0.5:
            image, label = image[:, :, ::-1], label[:, ::-1]
        return {"image": torch.from_numpy(image.copy()), "label": torch.from_numpy(label.copy()), "path": str(index),
                "ori_size": (self.size, self.size)}


def build_dataset(cfg, split: str, train: bool) -> TinyScenes:
    return TinyScenes(cfg.options.get("num_images", 16), cfg.options.get("size", 32), train)


def dataset_info(name: str, options: dict, root: str | None = None) -> DatasetInfo:
    return DatasetInfo("tiny", [f"class{i}" for i in range(NUM_CLASSES)], generated_palette(NUM_CLASSES), IGNORE,
                       HALF_MEAN, HALF_STD)


def install(monkeypatch=None) -> None:
    """Route ``build_dataset``/``dataset_info`` of ``segrank.data`` and of the training engine to this module
    (pytest monkeypatch, or for good)."""
    for module in (segrank.data, segrank.training.run, segrank.training.loop):
        for name, value in (("build_dataset", build_dataset), ("dataset_info", dataset_info)):
            if monkeypatch is not None:
                monkeypatch.setattr(module, name, value, raising=False)
            else:
                setattr(module, name, value)
