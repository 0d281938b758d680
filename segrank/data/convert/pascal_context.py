"""Pascal-Context: the release's 459-id ``LabelMap`` files -> 60-class train-id PNGs and split lists."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from segrank import files
from segrank.data.convert.common import Job, copy_file, load_mat, read_list, save_label
from segrank.errors import SegrankError

# Raw Pascal-Context ids of the 60-class benchmark (mmseg's PascalContextDataset); train id = rank in sorted order.
PASCAL_CONTEXT_60_IDS = (0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162,
                         420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72,
                         458, 34, 207, 80, 355, 85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115)


def pascal_context_lut(max_raw: int = 512) -> np.ndarray:
    """Raw Pascal-Context id -> 60-class train id (rank among the sorted 60 ids); other raw ids -> 0 (background),
    as the detail API's 60-class masks merge the remaining ~400 classes into background."""
    lut = np.zeros(max_raw, np.uint8)
    lut[sorted(PASCAL_CONTEXT_60_IDS)] = np.arange(len(PASCAL_CONTEXT_60_IDS))
    return lut


def plan_pascal_context(src: Path, dst: Path) -> Job:
    """Pascal-Context (pascal_context60 and pascal_context59 read the same files) from VOC2010 + its context labels.

    SRC is a VOC2010 root (VOCtrainval_03-May-2010.tar unpacked: JPEGImages/, ImageSets/Main/{train,val}.txt) with
    the Pascal-Context labels (trainval.tar.gz of the Pascal-Context release) unpacked into it:
    trainval/<name>.mat, key LabelMap, 459 raw class ids.
    DST gets JPEGImages/ (copied, unless DST is SRC), SegmentationClassContext/<name>.png (8-bit, 0..59: the 60 raw
    ids of the benchmark in sorted order, every other raw id becomes background 0) and
    ImageSets/SegmentationContext/{train,val}.txt (the VOC2010 train/val images that have a label map: 4,998 /
    5,105). Use DST as data.root (the configs' default: data/VOCdevkit/VOC2010).
    """
    splits = {split: [n for n in read_list(src / "ImageSets" / "Main" / f"{split}.txt")
                      if (src / "trainval" / f"{n}.mat").is_file()] for split in ("train", "val")}
    copy_images = src.resolve() != dst.resolve()
    tasks = [name for names in splits.values() for name in names]
    return Job("pascal_context", partial(convert_image, src, dst, pascal_context_lut(), copy_images), tasks,
               partial(write_split_lists, dst, splits))


def convert_image(src: Path, dst: Path, lut: np.ndarray, copy_images: bool, name: str) -> bool:
    image_out, label_out = dst / "JPEGImages" / f"{name}.jpg", dst / "SegmentationClassContext" / f"{name}.png"
    wrote = False
    if copy_images and not image_out.exists():
        copy_file(src / "JPEGImages" / f"{name}.jpg", image_out)
        wrote = True
    if not label_out.exists():
        raw = load_mat(src / "trainval" / f"{name}.mat", "LabelMap").astype(np.int64)
        if raw.min() < 0 or raw.max() >= len(lut):
            raise SegrankError(f"{src / 'trainval' / name}.mat: LabelMap values outside 0..{len(lut) - 1}")
        save_label(lut[raw], label_out)
        wrote = True
    return wrote


def write_split_lists(dst: Path, splits: dict[str, list[str]]) -> None:
    for split, names in splits.items():
        files.write_text(dst / "ImageSets" / "SegmentationContext" / f"{split}.txt", "".join(f"{n}\n" for n in names))
