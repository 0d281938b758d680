"""Datasets: file listing, label decoding, and items through the reference pipelines.

Items are dicts: ``image`` float32 (3, H, W) normalised; ``label`` int64 (H, W) with the dataset's ignore value;
``path`` (image file, or ``synthetic/<split>/<index>``); ``ori_size`` (H0, W0). Train items are exactly
``crop_size``; eval items hold the keep-ratio resized image and the label at original resolution.

Reproducible augmentation: ``dataset[(index, seed)]`` draws every random choice of that item from
``numpy.random.default_rng(seed)``; ``dataset[index]`` uses the seed ``index``. No global random state is read, so an
item depends only on its key: DataLoader workers, process counts and resumed runs all see the same samples.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from segrank.config import DataConfig
from segrank.data import transforms
from segrank.data.huggingface import NAME as HF_NAME
from segrank.data.huggingface import HFRows, hf_options
from segrank.data.info import (
    NORMALIZATIONS,
    DatasetInfo,
    Layout,
    dataset_info,
    dataset_spec,
    folder_layout,
    huggingface_layout,
)
from segrank.data.synthetic import synthetic_options, synthetic_scene
from segrank.errors import SegrankError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Sample:
    name: str
    image: Path | None  # None: missing
    label: Path | None


def _split_dir(template: str, layout: Layout, split: str) -> str:
    return template.format(split=layout.splits.get(split, split))


def check_split(layout: Layout, split: str, name: str) -> None:
    if layout.splits and split not in layout.splits:
        raise SegrankError(f"dataset {name!r}: unknown split {split!r} (known: {', '.join(layout.splits)})")


def _find_image(img_dir: Path, stem: str, suffix: str) -> Path | None:
    if suffix:
        path = img_dir / f"{stem}{suffix}"
        return path if path.is_file() else None
    for ext in IMAGE_EXTENSIONS:
        for path in (img_dir / f"{stem}{ext}", img_dir / f"{stem}{ext.upper()}"):
            if path.is_file():
                return path
    return None


def list_samples(layout: Layout, root: Path, split: str) -> tuple[list[Sample], list[Path]]:
    """The split's samples (image/label paths, None where missing) and label files that no image claims
    (only for layouts without split lists, whose label folders belong to one split)."""
    img_dir, ann_dir = root / _split_dir(layout.img_dir, layout, split), root / _split_dir(layout.ann_dir, layout,
                                                                                            split)
    orphans: list[Path] = []
    if layout.split_file is not None:
        list_path = root / _split_dir(layout.split_file, layout, split)
        if not list_path.is_file():
            raise SegrankError(f"{list_path}: split list not found")
        names = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
    else:
        if not img_dir.is_dir():
            raise SegrankError(f"{img_dir}: image folder not found")
        suffixes = (layout.img_suffix,) if layout.img_suffix else IMAGE_EXTENSIONS
        # hidden files are skipped: they include the temporaries of a killed converter
        names = sorted({p.name[: len(p.name) - len(s)] for p in img_dir.iterdir() for s in suffixes
                        if p.name.lower().endswith(s.lower()) and len(p.name) > len(s) and p.name[0] != "."})
        if ann_dir.is_dir():
            claimed = {f"{n}{layout.seg_suffix}" for n in names}
            orphans = sorted(p for p in ann_dir.iterdir() if p.name.endswith(layout.seg_suffix)
                             and p.name not in claimed and p.name[0] != ".")
    samples = []
    for name in names:
        label = ann_dir / f"{name}{layout.seg_suffix}"
        samples.append(Sample(name, _find_image(img_dir, name, layout.img_suffix), label if label.is_file() else None))
    return samples, orphans


def read_image(path: Path | IO[bytes], where: str | None = None) -> np.ndarray:
    """An image file (or an open encoded image, named ``where`` in errors) as uint8 RGB."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except OSError as err:
        raise SegrankError(f"{where or path}: cannot read image ({err})") from None


def read_label_file(path: Path | IO[bytes], where: str | None = None) -> np.ndarray:
    """The stored label values (8- or 16-bit, palette indices for mode P); RGB/RGBA labels are an error. ``path``
    may be an open encoded image, named ``where`` in errors."""
    try:
        with Image.open(path) as img:
            if img.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                raise SegrankError(f"{where or path}: label is a {img.mode} colour image, expected one class index "
                                   "per pixel")
            return np.asarray(img)
    except OSError as err:
        raise SegrankError(f"{where or path}: cannot read label ({err})") from None


def decode_label(raw: np.ndarray, layout: Layout, ignore_index: int) -> np.ndarray:
    """File values -> int64 class ids (mmseg ``LoadAnnotations``): zero-label reduction, file ignore value."""
    raw = raw.astype(np.int64)
    ignored = raw == layout.file_ignore if layout.file_ignore is not None else np.zeros(raw.shape, bool)
    if layout.reduce_zero_label:
        ignored |= raw == 0
        raw = raw - 1
    raw[ignored] = ignore_index
    return raw


class SegDataset(torch.utils.data.Dataset):
    """Base: subclasses implement ``__len__`` and ``load(index) -> (uint8 RGB image, int64 label, path)``."""

    def __init__(self, info: DatasetInfo, cfg: DataConfig, split: str, train: bool) -> None:
        self.info, self.cfg, self.split, self.train = info, cfg, split, train
        self.mean, self.std = NORMALIZATIONS[cfg.normalization] if cfg.normalization else (info.mean, info.std)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not 0 <= index < len(self):
            raise IndexError(index)
        img, label, path = self.load(index)
        ori_size = tuple(label.shape)
        cfg = self.cfg
        if self.train:
            rng = np.random.default_rng(seed if seed is not None else index)
            aug = transforms.Augmentation(cfg.img_scale, cfg.ratio_range, cfg.crop_size, cfg.cat_max_ratio,
                                          cfg.flip_prob, cfg.photometric)
            image, label_t = transforms.train_transform(img, label, rng, aug, mean=self.mean, std=self.std,
                                                        ignore_index=self.info.ignore_index)
        else:
            image = transforms.eval_transform(img, cfg.img_scale, self.mean, self.std)
            label_t = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
        return {"image": image, "label": label_t, "path": path, "ori_size": ori_size}


class FileDataset(SegDataset):
    def __init__(self, info: DatasetInfo, cfg: DataConfig, split: str, train: bool, layout: Layout,
                 root: Path) -> None:
        super().__init__(info, cfg, split, train)
        self.layout = layout
        samples, _ = list_samples(layout, root, split)
        if not samples:
            raise SegrankError(f"{root}: split {split!r} of dataset {info.name!r} has no images")
        for s in samples:
            if s.image is None or s.label is None:
                what = "image" if s.image is None else "label"
                raise SegrankError(f"{root}: {split} sample {s.name!r} has no {what} file "
                                   f"(run `segrank datasets check {info.name} {root}`)")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        s = self.samples[index]
        img = read_image(s.image)
        label = decode_label(read_label_file(s.label), self.layout, self.info.ignore_index)
        check_label(label, img, self.info, str(s.label))
        return img, label, str(s.image)


def check_label(label: np.ndarray, img: np.ndarray, info: DatasetInfo, where: str) -> None:
    """A decoded label has the image's size and only class ids of the vocabulary (or the ignore value)."""
    if label.shape != img.shape[:2]:
        raise SegrankError(f"{where}: label size {label.shape} differs from image size {img.shape[:2]}")
    outside = (label != info.ignore_index) & ((label < 0) | (label >= info.num_classes))
    if outside.any():
        raise SegrankError(f"{where}: {int(outside.sum())} pixels with class ids outside the "
                           f"{info.num_classes}-class vocabulary (e.g. {int(label[outside][0])})")


class HuggingFaceDataset(SegDataset):
    """A Hugging Face dataset on disk (segrank.data.huggingface): rows read on demand, labels decoded as a folder
    dataset's."""

    def __init__(self, info: DatasetInfo, cfg: DataConfig, split: str, train: bool, root: Path) -> None:
        super().__init__(info, cfg, split, train)
        self.layout = huggingface_layout(cfg.options, info.num_classes)
        self.rows = HFRows(root, split, hf_options(cfg.options))
        if not len(self.rows):
            raise SegrankError(f"{root}: split {split!r} of dataset {info.name!r} has no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        image, label, where = self.rows.encoded(index)
        img = read_image(io.BytesIO(image), f"{where} ({self.rows.columns[0]})")
        raw = read_label_file(io.BytesIO(label), f"{where} ({self.rows.columns[1]})")
        label = decode_label(raw, self.layout, self.info.ignore_index)
        check_label(label, img, self.info, f"{where} ({self.rows.columns[1]})")
        return img, label, where


class SyntheticDataset(SegDataset):
    def __init__(self, info: DatasetInfo, cfg: DataConfig, split: str, train: bool) -> None:
        super().__init__(info, cfg, split, train)
        self.opts = synthetic_options(cfg.options)
        self.length = self.opts["train_images"] if split == "train" else self.opts["val_images"]

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        img, label = synthetic_scene(index, self.split, self.opts)
        return img, label, f"synthetic/{self.split}/{index:06d}"


def dataset_root(cfg: DataConfig) -> Path:
    """``data.root``, which must be a folder."""
    if cfg.root is None:
        raise SegrankError(f"data.root: dataset {cfg.dataset!r} needs its root directory")
    root = Path(cfg.root)
    if not root.is_dir():
        raise SegrankError(f"{root}: dataset root not found (data.root of dataset {cfg.dataset!r})")
    return root


def build_dataset(cfg: DataConfig, split: str, train: bool) -> SegDataset:
    """Dataset ``cfg.dataset`` at ``cfg.root``, split ``split``; ``train`` selects the augmenting pipeline."""
    spec = dataset_spec(cfg.dataset)
    if cfg.dataset == "synthetic":
        return SyntheticDataset(dataset_info("synthetic", cfg.options), cfg, split, train)
    if cfg.dataset == HF_NAME:
        root = dataset_root(cfg)
        return HuggingFaceDataset(dataset_info(cfg.dataset, cfg.options, root), cfg, split, train, root)
    if cfg.options:
        raise SegrankError(f"data.options: dataset {cfg.dataset!r} takes no options, got {sorted(cfg.options)}")
    root = dataset_root(cfg)
    layout = folder_layout(root) if cfg.dataset == "folder" else spec.layout
    check_split(layout, split, cfg.dataset)
    info = dataset_info(cfg.dataset, None, root)
    return FileDataset(info, cfg, split, train, layout, root)
