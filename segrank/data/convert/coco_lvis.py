"""COCO+LVIS (1284 classes): LVIS v1 instance polygons painted over the COCO-Stuff-164k stuff maps."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from segrank.data.convert.common import Job, copy_file, save_label
from segrank.data.info import dataset_info
from segrank.errors import SegrankError


def stuff_lut() -> np.ndarray:
    """COCO-Stuff-164k stuffthingmap value (COCO id - 1; 255 unlabelled) -> COCO+LVIS file value (class + 1).

    Stuff ids 92..182 map by name to the 81 stuff classes (indices 1203..1283; some names, e.g. 'branch', also
    exist among the LVIS classes: the stuff entry wins); the 10 stuff names without a stuff entry ('banner',
    'blanket', 'cabinet', 'cupboard', 'curtain', 'napkin', 'pillow', 'salad', 'table', 'towel') map to the LVIS
    class of that name. Thing pixels and unlabelled pixels become 0.
    """
    classes = dataset_info("coco_lvis").classes
    lvis, stuff = classes[:1203], classes[1203:]
    coco171 = dataset_info("coco_stuff10k").classes  # 80 things then the 91 stuff classes in COCO id order
    lut = np.zeros(256, np.uint16)
    for stuff_rank, name in enumerate(coco171[80:]):
        index = 1203 + stuff.index(name) if name in stuff else lvis.index(name)
        lut[91 + stuff_rank] = index + 1  # COCO id 92 + rank, stored as id - 1
    return lut


def paint_lvis(stuff: np.ndarray, annotations: list[dict], category_value: dict[int, int]) -> np.ndarray:
    """LVIS polygons painted over the stuff map, largest area first so smaller instances stay on top (ties: lower
    annotation id first). Polygons are filled with pillow's ImageDraw (pixels whose centres are inside or on the
    outline), which may differ from pycocotools by a boundary pixel."""
    label = stuff.copy()
    h, w = label.shape
    for ann in sorted(annotations, key=lambda a: (-float(a.get("area", 0.0)), int(a.get("id", 0)))):
        segmentation = ann.get("segmentation")
        if not isinstance(segmentation, list):
            raise SegrankError(f"LVIS annotation {ann.get('id')}: only polygon segmentations are supported")
        mask = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        for poly in segmentation:
            if len(poly) >= 6:
                draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)], fill=1)
        label[np.asarray(mask, dtype=bool)] = category_value[int(ann["category_id"])]
    return label


def plan_coco_lvis(src: Path, dst: Path) -> Job:
    """COCO+LVIS (1284 classes: 1203 LVIS + 81 stuff) from COCO 2017, COCO-Stuff-164k and LVIS v1.

    SRC holds the COCO 2017 images (train2017/, val2017/), the COCO-Stuff-164k maps
    (stuffthingmaps_trainval2017/{train2017,val2017}/<id>.png) and the LVIS v1 annotations (lvis_v1_train.json,
    lvis_v1_val.json).
    DST gets images/{train2017,val2017}/<id>.jpg and lvis_mask/{train2017,val2017}/<id>.png (16-bit: 0 = unlabelled,
    c + 1 = class c): the stuff map with its stuff classes kept (thing pixels become 0) and the LVIS polygons painted
    on top, largest first. An image's split is the LVIS file it is listed in; its files are found through its
    coco_url folder (LVIS val includes COCO train2017 images). Use DST as data.root (the configs' default: data/lvis).
    """
    classes = dataset_info("coco_lvis").classes
    tasks: list[tuple[str, dict[str, Any], list[dict], dict[int, int]]] = []
    for json_name, split in (("lvis_v1_train.json", "train2017"), ("lvis_v1_val.json", "val2017")):
        path = src / json_name
        if not path.is_file():
            raise SegrankError(f"{path}: LVIS annotation file not found")
        data = json.loads(path.read_text())
        category_value = {}
        for cat in data["categories"]:
            if cat["name"] not in classes[:1203]:
                raise SegrankError(f"{path}: LVIS category {cat['name']!r} is not in the COCO+LVIS class list")
            category_value[int(cat["id"])] = classes.index(cat["name"]) + 1
        by_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
        # The category map travels with each task: the two LVIS files could number their categories differently.
        tasks += [(split, image, by_image.get(int(image["id"]), []), category_value) for image in data["images"]]
    return Job("coco_lvis", partial(convert_image, src, dst, stuff_lut()), tasks)


def convert_image(src: Path, dst: Path, lut: np.ndarray,
                  task: tuple[str, dict[str, Any], list[dict], dict[int, int]]) -> bool:
    split, image, annotations, category_value = task
    folder, file_name = image["coco_url"].split("/")[-2:]
    stem = Path(file_name).stem
    image_out, label_out = dst / "images" / split / file_name, dst / "lvis_mask" / split / f"{stem}.png"
    if image_out.exists() and label_out.exists():
        return False
    if not image_out.exists():
        copy_file(src / folder / file_name, image_out)
    if not label_out.exists():
        stuff_path = src / "stuffthingmaps_trainval2017" / folder / f"{stem}.png"
        if not stuff_path.is_file():
            raise SegrankError(f"{stuff_path}: COCO-Stuff map not found")
        with Image.open(stuff_path) as im:
            stuff = lut[np.asarray(im)]
        if stuff.shape != (image["height"], image["width"]):
            raise SegrankError(f"{stuff_path}: size {stuff.shape} differs from the LVIS image size")
        save_label(paint_lvis(stuff, annotations, category_value), label_out)
    return True
