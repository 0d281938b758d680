"""ADE20K-Full: the full release's ``*_seg.png`` object-class encoding -> 847-class uint16 TIFFs, resized like
MaskFormer's ``prepare_ade20k_full_sem_seg.py``."""

from __future__ import annotations

import json
import pickle
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from segrank import files
from segrank.data.convert.common import Job, save_label
from segrank.data.info import dataset_info
from segrank.data.transforms import resize_image, resize_label
from segrank.errors import SegrankError

MAX_SHORT_SIDE = 512
IGNORE = 65535  # unlabelled, or an object class that is none of the 847


def class_mask(seg_rgb: np.ndarray) -> np.ndarray:
    """ADE20K full-release ``*_seg.png``: object class index = R / 10 * 256 + G (0 = unlabelled)."""
    r, g = seg_rgb[..., 0].astype(np.int64), seg_rgb[..., 1].astype(np.int64)
    return r // 10 * 256 + g


def id_map(objectnames: list[str], categories: Path | None) -> dict[int, int]:
    """Object class index (1-based into the index's ``objectnames``) -> 847-class train id.

    With ``categories`` (a JSON list of ``{"id": ..., "trainId": ...}``, e.g. MaskFormer's
    ADE20K_SEM_SEG_FULL_CATEGORIES) the ids are taken as given. Without it, an object name maps to the first of our
    847 classes equal to its first synonym (the text before the first comma).
    """
    if categories is not None:
        try:
            return {int(c["id"]): int(c["trainId"]) for c in json.loads(categories.read_text())}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SegrankError(f"{categories}: expected a JSON list of {{id, trainId}} ({err})") from None
    first_index: dict[str, int] = {}
    for i, name in enumerate(dataset_info("ade20k_full").classes):
        first_index.setdefault(name, i)
    out = {}
    for i, name in enumerate(objectnames):
        synonym = str(name).split(",")[0].strip()
        if synonym in first_index:
            out[i + 1] = first_index[synonym]
    return out


def resized_size(h: int, w: int) -> tuple[int, int] | None:
    """MaskFormer's rule: shrink so the short side is 512 when it is longer; None = keep the size."""
    m = MAX_SHORT_SIDE
    if w >= h > m:
        return m, round(w / float(h) * m)
    if h >= w > m:
        return round(h / float(w) * m), m
    return None


def resolve(src: Path, folder: str, file_name: str) -> Path:
    """Index folders are relative to the release's parent (``ADE20K_2021_17_01/images/...``) or to SRC."""
    for base in (src.parent, src):
        path = base / folder / file_name
        if path.is_file():
            return path
    parts = Path(folder).parts
    if src.name in parts:
        path = src.joinpath(*parts[parts.index(src.name) + 1:], file_name)
        if path.is_file():
            return path
    raise SegrankError(f"{src / folder / file_name}: image listed in index_ade20k.pkl not found")


def plan_ade20k_full(src: Path, dst: Path, categories: Path | None = None) -> Job:
    """ADE20K-Full (847 classes) from the full ADE20K release (ADE20K_2021_17_01).

    SRC is the release folder: index_ade20k.pkl (with filename, folder, objectnames) and, for every image,
    <name>.jpg with <name>_seg.png beside it (class index of a pixel = R / 10 * 256 + G, into objectnames).
    An object name maps to the first of the 847 classes equal to its first synonym; --categories FILE takes the ids
    from a JSON list of {id, trainId} instead (e.g. MaskFormer's ADE20K_SEM_SEG_FULL_CATEGORIES).
    DST gets {train,val}/image/<name>.jpg and {train,val}/label/<name>.tif (16-bit: 0..846, 65535 = unlabelled or
    not among the 847 classes), shrunk to a short side of at most 512 like MaskFormer's
    prepare_ade20k_full_sem_seg.py (bilinear image, nearest label). ADE_val_* images go to val, the rest to train.
    Use DST as data.root (the configs' default: data/ade20k_full).
    """
    index_path = src / "index_ade20k.pkl"
    if not index_path.is_file():
        raise SegrankError(f"{index_path}: not found (SRC must be the ADE20K full release directory)")
    with open(index_path, "rb") as f:  # the dataset's own index file, trusted like the images themselves
        index = pickle.load(f)
    ids = id_map(list(index["objectnames"]), categories)
    lut = np.full(max(ids, default=0) + 1, IGNORE, np.uint16)
    lut[list(ids)] = list(ids.values())
    tasks = list(zip(index["folder"], index["filename"], strict=True))
    return Job("ade20k_full", partial(convert_image, src, dst, lut), tasks)


def convert_image(src: Path, dst: Path, lut: np.ndarray, task: tuple[str, str]) -> bool:
    folder, file_name = task
    split = "val" if file_name.split("_")[1] == "val" else "train"
    stem = Path(file_name).stem
    image_out, label_out = dst / split / "image" / file_name, dst / split / "label" / f"{stem}.tif"
    if image_out.exists() and label_out.exists():
        return False
    image_path = resolve(src, folder, file_name)
    with Image.open(image_path) as im:
        img = np.array(im.convert("RGB"))
    with Image.open(image_path.with_name(f"{stem}_seg.png")) as im:
        cls = class_mask(np.array(im.convert("RGB")))
    size = resized_size(*img.shape[:2])
    if size is not None:
        img, cls = resize_image(img, size), resize_label(cls, size)
    if cls.max() >= len(lut):  # object classes beyond the mapped ones are not among the 847
        lut = np.concatenate([lut, np.full(int(cls.max()) + 1 - len(lut), IGNORE, np.uint16)])
    if not image_out.exists():
        files.atomic_write(image_out, lambda tmp: Image.fromarray(img).save(tmp, format="JPEG"))
    if not label_out.exists():
        save_label(lut[cls], label_out)
    return True
