"""Miniature source trees in each official release's format, for the converter tests and for measuring converter
throughput. With the default arguments each tree is the one the converter tests check by hand; ``images`` and
``size`` scale it up with the same label pattern (tiled) and random pixels.

    python -m tests.data.miniature ade20k_full /tmp/mini --images 200 --size 600 800   # then: segrank datasets
    prepare ade20k_full /tmp/mini/ADE20K_2021_17_01 /tmp/out --workers 2
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

COCO_STUFF_NAMES = ["COCO_train2014_000000000009", "COCO_train2014_000000000025", "COCO_train2014_000000000030"]
# COCO ids (91 is unused in COCO-Stuff); the third image gets ids + 1
COCO_STUFF_RAW = np.array([[0, 1, 11, 13], [91, 92, 93, 182]], np.uint8)
PASCAL_NAMES = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007", "2008_000099"]}  # 000099: no label
PASCAL_LABEL_MAP = np.array([[0, 2, 9, 115], [459, 1, 458, 260]], np.uint16)
ADE_CLASSES = np.array([[0, 1, 2, 300], [3, 300, 1, 2]])  # 0 unlabelled, 3 = "thing2" (not an 847 class)


def save_rgb(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def tiled(pattern: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``pattern`` with each cell stretched to a block, filling ``size`` (the pattern itself at its own size)."""
    rows = np.arange(size[0]) * pattern.shape[0] // size[0]
    cols = np.arange(size[1]) * pattern.shape[1] // size[1]
    return pattern[rows[:, None], cols[None, :]]


def coco_stuff_source(src: Path, images: int = 3, size: tuple[int, int] = (2, 4)) -> Path:
    from scipy.io import savemat  # optional dependency (the .mat converters need it)

    names = COCO_STUFF_NAMES + [f"COCO_train2014_{i:012d}" for i in range(100, 100 + images - 3)]
    names = names[:images]
    (src / "imageLists").mkdir(parents=True)
    (src / "imageLists" / "train.txt").write_text("".join(f"{n}\n" for i, n in enumerate(names) if i % 3 != 2))
    (src / "imageLists" / "test.txt").write_text("".join(f"{n}\n" for i, n in enumerate(names) if i % 3 == 2))
    (src / "annotations").mkdir()
    for i, name in enumerate(names):
        save_rgb(src / "images" / f"{name}.jpg", *size, seed=i)
        savemat(src / "annotations" / f"{name}.mat", {"S": tiled(COCO_STUFF_RAW + (i % 3 == 2), size)})
    return src


def pascal_context_source(src: Path, images: int = 4, size: tuple[int, int] = (2, 4)) -> Path:
    """A VOC2010 root with the Pascal-Context release in it; the last name of the val list has no label map."""
    from scipy.io import savemat  # optional dependency (the .mat converters need it)

    names = dict(PASCAL_NAMES)
    if images > 4:
        extra = [f"2009_{i:06d}" for i in range(images - 4)]
        names = {"train": names["train"] + extra[::2], "val": extra[1::2] + names["val"]}
    (src / "ImageSets" / "Main").mkdir(parents=True)
    (src / "trainval").mkdir()
    for split, split_names in names.items():
        (src / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in split_names))
    for i, name in enumerate(names["train"] + names["val"]):
        save_rgb(src / "JPEGImages" / f"{name}.jpg", *size, seed=i)
        if name != names["val"][-1]:
            savemat(src / "trainval" / f"{name}.mat", {"LabelMap": tiled(PASCAL_LABEL_MAP, size)})
    return src


def ade_seg_png(path: Path, class_index: np.ndarray) -> None:
    """The full release's encoding: R = class // 256 * 10, G = class % 256 (B: instances, unused here)."""
    rgb = np.zeros((*class_index.shape, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = class_index // 256 * 10, class_index % 256, 7
    Image.fromarray(rgb).save(path)


def ade20k_full_source(root: Path, images: int = 2, size: tuple[int, int] = (2, 4)) -> Path:
    """``root/ADE20K_2021_17_01`` (returned) with its index; images alternate between training and validation."""
    src = root / "ADE20K_2021_17_01"
    objectnames = [f"thing{i}" for i in range(400)]
    objectnames[0], objectnames[1], objectnames[299] = "wall", "building, edifice", "sky"  # ids 1, 2, 300
    folders = {}
    for i in range(images):
        if i % 2 == 0:
            folders[f"ADE_train_{i // 2 + 1:08d}.jpg"] = "ADE20K_2021_17_01/images/ADE/training/urban/street"
        else:
            folders[f"ADE_val_{i // 2 + 1:08d}.jpg"] = "ADE20K_2021_17_01/images/ADE/validation/home/kitchen"
    index = {"filename": list(folders), "folder": list(folders.values()), "objectnames": objectnames}
    src.mkdir(parents=True)
    (src / "index_ade20k.pkl").write_bytes(pickle.dumps(index))
    for i, (name, folder) in enumerate(folders.items()):
        save_rgb(root / folder / name, *size, seed=i)
        ade_seg_png(root / folder / name.replace(".jpg", "_seg.png"), tiled(ADE_CLASSES, size))
    return src


def coco_lvis_source(src: Path, images: int = 2, size: tuple[int, int] = (6, 8)) -> Path:
    """COCO images, COCO-Stuff-164k maps and two LVIS files; odd image ids are train, even ones val; every train image
    has a large zucchini with a small aerosol can on top (coordinates for 6 x 8, scaled with ``size``)."""
    stuff = np.full((6, 8), 255, np.uint8)  # unlabelled
    stuff[:3] = 93  # COCO id 94 = 'branch' (stuff; 92 banner, 93 blanket)
    stuff[3:, :4] = 0  # COCO id 1 = person (a thing: left to LVIS)
    stuff[3:, 4:] = 164  # COCO id 165 = 'table' (stuff, but also an LVIS name)
    sy, sx = size[0] / 6, size[1] / 8
    split_of = {image_id: "train2017" if image_id % 2 else "val2017" for image_id in range(1, images + 1)}
    for image_id, split in split_of.items():
        save_rgb(src / split / f"{image_id:012d}.jpg", *size, seed=image_id)
        path = src / "stuffthingmaps_trainval2017" / split / f"{image_id:012d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tiled(stuff, size)).save(path)
    categories = [{"id": 1, "name": "aerosol_can"}, {"id": 1203, "name": "zucchini"}]

    def box(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
        return [[x0 * sx, y0 * sy, x1 * sx, y0 * sy, x1 * sx, y1 * sy, x0 * sx, y1 * sy]]

    for name, split in (("lvis_v1_train.json", "train2017"), ("lvis_v1_val.json", "val2017")):
        ids = [i for i, s in split_of.items() if s == split]
        anns = []
        for image_id in ids if split == "train2017" else []:
            anns.append({"id": 9 + 2 * image_id, "image_id": image_id, "category_id": 1, "area": 1.0 * sx * sy,
                         "segmentation": box(2, 2, 3, 3)})  # aerosol_can: x 2..3, y 2..3, on top
            anns.append({"id": 8 + 2 * image_id, "image_id": image_id, "category_id": 1203, "area": 20.0 * sx * sy,
                         "segmentation": box(1, 1, 5, 4)})  # zucchini: x 1..5, y 1..4
        listed = [{"id": i, "height": size[0], "width": size[1],
                   "coco_url": f"http://images.cocodataset.org/{split}/{i:012d}.jpg"} for i in ids]
        (src / name).write_text(json.dumps({"images": listed, "annotations": anns, "categories": categories}))
    return src


SOURCES = {"coco_stuff10k": coco_stuff_source, "pascal_context60": pascal_context_source,
           "ade20k_full": ade20k_full_source, "coco_lvis": coco_lvis_source}


def main() -> None:
    parser = argparse.ArgumentParser(description="write a miniature source tree of an official release")
    parser.add_argument("name", choices=list(SOURCES))
    parser.add_argument("root", type=Path, help="folder to create")
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"))
    args = parser.parse_args()
    print(SOURCES[args.name](args.root, args.images, tuple(args.size)))


if __name__ == "__main__":
    main()
