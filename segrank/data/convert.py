"""``segrank datasets prepare NAME SRC DST``: official releases -> the layouts of ``segrank.data.info``.

Every converter shows a progress bar, skips outputs that already exist (a re-run continues an interrupted one) and
writes each file to a temporary name in its folder before renaming it, so an interrupted run leaves no half-written
file. Reading ``.mat`` files needs scipy (``pip install 'segrank[convert]'``).
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from segrank import files
from segrank.data.info import dataset_info
from segrank.data.transforms import resize_image, resize_label
from segrank.errors import SegrankError

# COCO ids 1..182 that COCO-Stuff never uses (11 thing ids); the other 171 map in order to train ids 1..171.
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
# Raw Pascal-Context ids of the 60-class benchmark (mmseg's PascalContextDataset); train id = rank in sorted order.
PASCAL_CONTEXT_60_IDS = (0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162,
                         420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72,
                         458, 34, 207, 80, 355, 85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115)
ADE_FULL_MAX_SHORT_SIDE = 512


def copy_file(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise SegrankError(f"{src}: file not found")
    files.atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def save_label(label: np.ndarray, path: Path) -> None:
    """uint8 or uint16 label map as PNG/TIFF (pillow writes uint16 as 16-bit)."""
    fmt = "TIFF" if path.suffix in (".tif", ".tiff") else "PNG"
    files.atomic_write(path, lambda tmp: Image.fromarray(label).save(tmp, format=fmt))


def load_mat(path: Path, key: str) -> np.ndarray:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise SegrankError("reading .mat files needs scipy: pip install 'segrank[convert]'") from None
    try:
        data = loadmat(str(path))
    except (OSError, ValueError) as err:
        raise SegrankError(f"{path}: cannot read .mat file ({err})") from None
    if key not in data:
        raise SegrankError(f"{path}: no key {key!r} (keys: {', '.join(k for k in data if not k.startswith('__'))})")
    return np.asarray(data[key])


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise SegrankError(f"{path}: list file not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _progress(items: Iterable, desc: str, total: int | None = None) -> Iterable:
    return tqdm(items, desc=desc, total=total, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------------------
# COCO-Stuff-10k


def coco_stuff_lut() -> np.ndarray:
    """Raw COCO id (0..255) -> train id: 0 -> 0 (unlabelled), used ids 1..182 -> 1..171, anything else -> 0."""
    lut = np.zeros(256, np.uint8)
    used = [i for i in range(1, 183) if i not in COCO_UNUSED_IDS]
    lut[used] = np.arange(1, len(used) + 1)
    return lut


def prepare_coco_stuff10k(src: Path, dst: Path) -> int:
    """SRC: the 10k release (``imageLists/{train,test}.txt``, ``images/<name>.jpg``, ``annotations/<name>.mat`` with
    key ``S``). DST: ``images/{train2014,test2014}/<name>.jpg``, ``annotations/<split>/<name>_labelTrainIds.png``
    (uint8; 0 = unlabelled, 1..171 = classes). Returns the number of images."""
    lut, count = coco_stuff_lut(), 0
    for list_name, split in (("train", "train2014"), ("test", "test2014")):
        names = _read_list(src / "imageLists" / f"{list_name}.txt")
        for name in _progress(names, f"coco_stuff10k {split}"):
            name = Path(name).stem
            copy_out = dst / "images" / split / f"{name}.jpg"
            if not copy_out.exists():
                copy_file(src / "images" / f"{name}.jpg", copy_out)
            label_out = dst / "annotations" / split / f"{name}_labelTrainIds.png"
            if not label_out.exists():
                raw = load_mat(src / "annotations" / f"{name}.mat", "S").astype(np.int64)
                save_label(lut[np.clip(raw, 0, 255)], label_out)
            count += 1
    return count


# --------------------------------------------------------------------------------------------------------------
# Pascal-Context


def pascal_context_lut(max_raw: int = 512) -> np.ndarray:
    """Raw Pascal-Context id -> 60-class train id (rank among the sorted 60 ids); other raw ids -> 0 (background),
    as the detail API's 60-class masks merge the remaining ~400 classes into background."""
    lut = np.zeros(max_raw, np.uint8)
    lut[sorted(PASCAL_CONTEXT_60_IDS)] = np.arange(len(PASCAL_CONTEXT_60_IDS))
    return lut


def prepare_pascal_context(src: Path, dst: Path) -> int:
    """SRC: a VOC2010 root (``JPEGImages/``, ``ImageSets/Main/{train,val}.txt``) with the Pascal-Context release
    unpacked in it (``trainval/<name>.mat``, key ``LabelMap``, 459 raw ids). DST: VOC2010-style root with
    ``JPEGImages/`` (copied unless DST is SRC), ``SegmentationClassContext/<name>.png`` (uint8, 0..59) and
    ``ImageSets/SegmentationContext/{train,val}.txt`` (the VOC2010 split images that have a label map: 4998 / 5105).
    The same files serve ``pascal_context60`` and ``pascal_context59``. Returns the number of images."""
    lut, count = pascal_context_lut(), 0
    same_root = src.resolve() == dst.resolve()
    for split in ("train", "val"):
        names = [n for n in _read_list(src / "ImageSets" / "Main" / f"{split}.txt")
                 if (src / "trainval" / f"{n}.mat").is_file()]
        for name in _progress(names, f"pascal_context {split}"):
            if not same_root and not (dst / "JPEGImages" / f"{name}.jpg").exists():
                copy_file(src / "JPEGImages" / f"{name}.jpg", dst / "JPEGImages" / f"{name}.jpg")
            label_out = dst / "SegmentationClassContext" / f"{name}.png"
            if not label_out.exists():
                raw = load_mat(src / "trainval" / f"{name}.mat", "LabelMap").astype(np.int64)
                if raw.min() < 0 or raw.max() >= len(lut):
                    raise SegrankError(f"{src / 'trainval' / name}.mat: LabelMap values outside 0..{len(lut) - 1}")
                save_label(lut[raw], label_out)
            count += 1
        list_out = dst / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        files.atomic_write(list_out, lambda tmp, names=names: tmp.write_text("".join(f"{n}\n" for n in names)))
    return count


# --------------------------------------------------------------------------------------------------------------
# ADE20K-Full


def ade_full_class_mask(seg_rgb: np.ndarray) -> np.ndarray:
    """ADE20K full-release ``*_seg.png``: object class index = R / 10 * 256 + G (0 = unlabelled)."""
    r, g = seg_rgb[..., 0].astype(np.int64), seg_rgb[..., 1].astype(np.int64)
    return r // 10 * 256 + g


def ade_full_id_map(objectnames: list[str], categories: Path | None) -> dict[int, int]:
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


def _ade_full_size(h: int, w: int) -> tuple[int, int] | None:
    """MaskFormer's rule: shrink so the short side is 512 when it is longer; None = keep the size."""
    m = ADE_FULL_MAX_SHORT_SIDE
    if w >= h > m:
        return m, round(w / float(h) * m)
    if h >= w > m:
        return round(h / float(w) * m), m
    return None


def _resolve(src: Path, folder: str, file_name: str) -> Path:
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


def prepare_ade20k_full(src: Path, dst: Path, categories: Path | None = None) -> int:
    """SRC: the ADE20K full release (``ADE20K_2021_17_01``: ``index_ade20k.pkl`` with ``filename``, ``folder``,
    ``objectnames``; per image ``<name>.jpg`` + ``<name>_seg.png``). DST: ``{train,val}/image/<name>.jpg``,
    ``{train,val}/label/<name>.tif`` (uint16, 0..846, 65535 = unlabelled or not among the 847 classes), resized and
    re-encoded like MaskFormer's ``prepare_ade20k_full_sem_seg.py`` (short side <= 512, bilinear / nearest).
    The split is ``val`` for ``ADE_val_*`` files, else ``train``. Returns the number of images."""
    index_path = src / "index_ade20k.pkl"
    if not index_path.is_file():
        raise SegrankError(f"{index_path}: not found (SRC must be the ADE20K full release directory)")
    with open(index_path, "rb") as f:  # the dataset's own index file, trusted like the images themselves
        index = pickle.load(f)
    id_map = ade_full_id_map(list(index["objectnames"]), categories)
    lut_size = max(id_map, default=0) + 1
    count = 0
    for folder, file_name in _progress(list(zip(index["folder"], index["filename"], strict=True)), "ade20k_full"):
        split = "val" if file_name.split("_")[1] == "val" else "train"
        stem = Path(file_name).stem
        image_out, label_out = dst / split / "image" / file_name, dst / split / "label" / f"{stem}.tif"
        count += 1
        if image_out.exists() and label_out.exists():
            continue
        image_path = _resolve(src, folder, file_name)
        with Image.open(image_path) as im:
            img = np.array(im.convert("RGB"))
        with Image.open(image_path.with_name(f"{stem}_seg.png")) as im:
            cls = ade_full_class_mask(np.array(im.convert("RGB")))
        size = _ade_full_size(*img.shape[:2])
        if size is not None:
            img, cls = resize_image(img, size), resize_label(cls, size)
        lut = np.full(max(lut_size, int(cls.max()) + 1), 65535, np.uint16)
        for obj, train_id in id_map.items():
            lut[obj] = train_id
        if not image_out.exists():
            files.atomic_write(image_out, lambda tmp, img=img: Image.fromarray(img).save(tmp, format="JPEG"))
        if not label_out.exists():
            save_label(lut[cls], label_out)
    return count


# --------------------------------------------------------------------------------------------------------------
# COCO+LVIS


def coco_lvis_stuff_lut() -> np.ndarray:
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


def prepare_coco_lvis(src: Path, dst: Path) -> int:
    """SRC: COCO-2017 images (``train2017/``, ``val2017/``), COCO-Stuff-164k maps
    (``stuffthingmaps_trainval2017/{train2017,val2017}/<id>.png``) and LVIS v1 (``lvis_v1_train.json``,
    ``lvis_v1_val.json``). DST: ``images/{train2017,val2017}/<id>.jpg`` and ``lvis_mask/{train2017,val2017}/<id>.png``
    (uint16: 0 = unlabelled, c + 1 = class c of ``coco_lvis.json``). The output split is the LVIS file's; each image
    is found through its ``coco_url`` folder (LVIS val includes COCO train2017 images). Returns the image count."""
    classes = dataset_info("coco_lvis").classes
    stuff_lut, count = coco_lvis_stuff_lut(), 0
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
        for image in _progress(data["images"], f"coco_lvis {split}"):
            folder, file_name = image["coco_url"].split("/")[-2:]
            stem = Path(file_name).stem
            image_out, label_out = dst / "images" / split / file_name, dst / "lvis_mask" / split / f"{stem}.png"
            count += 1
            if not image_out.exists():
                copy_file(src / folder / file_name, image_out)
            if label_out.exists():
                continue
            stuff_path = src / "stuffthingmaps_trainval2017" / folder / f"{stem}.png"
            if not stuff_path.is_file():
                raise SegrankError(f"{stuff_path}: COCO-Stuff map not found")
            with Image.open(stuff_path) as im:
                stuff = stuff_lut[np.asarray(im)]
            if stuff.shape != (image["height"], image["width"]):
                raise SegrankError(f"{stuff_path}: size {stuff.shape} differs from the LVIS image size")
            save_label(paint_lvis(stuff, by_image.get(int(image["id"]), []), category_value), label_out)
    return count


CONVERTERS: dict[str, Callable[..., int]] = {
    "coco_stuff10k": prepare_coco_stuff10k,
    "pascal_context60": prepare_pascal_context,
    "pascal_context59": prepare_pascal_context,
    "ade20k_full": prepare_ade20k_full,
    "coco_lvis": prepare_coco_lvis,
}
