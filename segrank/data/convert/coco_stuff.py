"""COCO-Stuff-10k: ``.mat`` label maps with raw COCO ids -> 171-class train-id PNGs."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from segrank.data.convert.common import Job, copy_file, load_mat, read_list, save_label

# COCO ids 1..182 that COCO-Stuff never uses (11 thing ids); the other 171 map in order to train ids 1..171.
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)


def coco_stuff_lut() -> np.ndarray:
    """Raw COCO id (0..255) -> train id: 0 -> 0 (unlabelled), used ids 1..182 -> 1..171, anything else -> 0."""
    lut = np.zeros(256, np.uint8)
    used = [i for i in range(1, 183) if i not in COCO_UNUSED_IDS]
    lut[used] = np.arange(1, len(used) + 1)
    return lut


def plan_coco_stuff10k(src: Path, dst: Path) -> Job:
    """COCO-Stuff-10k (171 classes) from the COCO-Stuff 10k release (cocostuff-10k-v1.1.zip, unzipped).

    SRC holds imageLists/train.txt and imageLists/test.txt (one image name per line), images/<name>.jpg and
    annotations/<name>.mat (key S: raw COCO ids per pixel, 0 = unlabelled).
    DST gets images/{train2014,test2014}/<name>.jpg and annotations/{train2014,test2014}/<name>_labelTrainIds.png
    (8-bit: 0 = unlabelled, 1..171 = the classes; the raw COCO ids map in order to 1..171, skipping the 11 ids
    COCO-Stuff does not use). test2014 is segrank's val split.
    Use DST as data.root of the coco_stuff10k configs (their default: data/coco_stuff10k).
    """
    tasks = [(Path(name).stem, split) for list_name, split in (("train", "train2014"), ("test", "test2014"))
             for name in read_list(src / "imageLists" / f"{list_name}.txt")]
    return Job("coco_stuff10k", partial(convert_image, src, dst, coco_stuff_lut()), tasks)


def convert_image(src: Path, dst: Path, lut: np.ndarray, task: tuple[str, str]) -> bool:
    name, split = task
    image_out = dst / "images" / split / f"{name}.jpg"
    label_out = dst / "annotations" / split / f"{name}_labelTrainIds.png"
    if image_out.exists() and label_out.exists():
        return False
    if not image_out.exists():
        copy_file(src / "images" / f"{name}.jpg", image_out)
    if not label_out.exists():
        raw = load_mat(src / "annotations" / f"{name}.mat", "S").astype(np.int64)
        save_label(lut[np.clip(raw, 0, 255)], label_out)
    return True
