"""What each dataset is: classes, palette, normalisation, on-disk layout and label encoding (as the RankSeg
fork's dataset classes and configs).

Internal label convention: int64 label maps, class ids ``0..N-1`` and one ignore value per dataset: 255 when
N <= 255 (ADE20K, COCO-Stuff-10k, Pascal-Context), -1 otherwise (ADE20K-Full, COCO+LVIS), so no class id can equal it.
"""

from __future__ import annotations

import colorsys
import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from segrank import files
from segrank.data import huggingface
from segrank.data.synthetic import synthetic_classes
from segrank.errors import SegrankError

IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
HALF_MEAN, HALF_STD = (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": (HALF_MEAN, HALF_STD)}


@dataclass
class DatasetInfo:
    name: str
    classes: list[str]
    palette: list[list[int]]
    ignore_index: int
    mean: tuple[float, float, float]  # 0-255 scale, RGB
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Layout:
    """Where one split's files live and how label files encode classes.

    A sample is ``img_dir/<name><img_suffix>`` + ``ann_dir/<name><seg_suffix>``; names come from ``split_file``
    (one per line) when given, else from listing ``img_dir``. Decoding: ``reduce_zero_label`` maps file value 0 to
    ignore and c to c-1; file value ``file_ignore`` (if any) maps to ignore.
    """

    splits: dict[str, str]  # our split name -> the dataset's folder/list name
    img_dir: str  # "{split}" is replaced by the dataset's split name
    ann_dir: str
    img_suffix: str
    seg_suffix: str
    split_file: str | None = None
    reduce_zero_label: bool = False
    file_ignore: int | None = 255


@dataclass
class DatasetSpec:
    name: str
    description: str
    normalization: str  # the reference config's img_norm_cfg
    layout: Layout | None  # None: not read from files (synthetic)
    classes_file: str | None = None  # segrank/resources/classes/<file>.json
    classes_from: str | None = None  # where a dataset read from its root finds its classes (segrank datasets list)
    extra: dict[str, Any] = field(default_factory=dict)


_ADE_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
_PASCAL = dict(splits={"train": "train", "val": "val"}, img_dir="JPEGImages", ann_dir="SegmentationClassContext",
               img_suffix=".jpg", seg_suffix=".png", split_file="ImageSets/SegmentationContext/{split}.txt")

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec("ade20k", "ADE20K SceneParsing, 150 classes (ADEChallengeData2016)", "half",
                    Layout(_ADE_SPLITS, "images/{split}", "annotations/{split}", ".jpg", ".png",
                           reduce_zero_label=True), "ade20k"),
        DatasetSpec("coco_stuff10k", "COCO-Stuff-10k, 171 classes", "imagenet",
                    Layout({"train": "train2014", "val": "test2014", "test": "test2014"}, "images/{split}",
                           "annotations/{split}", ".jpg", "_labelTrainIds.png", reduce_zero_label=True),
                    "coco_stuff10k"),
        DatasetSpec("pascal_context60", "Pascal-Context, 60 classes with background (VOC2010 root)", "half",
                    Layout(**_PASCAL), "pascal_context60"),
        DatasetSpec("pascal_context59", "Pascal-Context, 59 classes, background ignored (VOC2010 root)", "half",
                    Layout(**_PASCAL, reduce_zero_label=True), "pascal_context59"),
        DatasetSpec("ade20k_full", "ADE20K-Full, 847 classes, 16-bit TIFF labels (65535 = ignore)", "imagenet",
                    Layout({"train": "train", "val": "val"}, "{split}/image", "{split}/label", ".jpg", ".tif",
                           file_ignore=65535), "ade20k_full"),
        DatasetSpec("coco_lvis", "COCO+LVIS, 1284 classes (1203 LVIS + 81 stuff), 16-bit PNG labels (0 = unlabelled)",
                    "imagenet", Layout({"train": "train2017", "val": "val2017"}, "images/{split}", "lvis_mask/{split}",
                                       ".jpg", ".png", reduce_zero_label=True, file_ignore=None), "coco_lvis"),
        DatasetSpec("folder", "your own data: ROOT/images, ROOT/labels, ROOT/classes.yaml, optional ROOT/splits/*.txt",
                    "imagenet", None, classes_from="classes.yaml"),
        DatasetSpec(huggingface.NAME, "a Hugging Face dataset on disk: save_to_disk folder or Parquet shards (options: "
                    "image_column, label_column, classes, class_feature, reduce_zero_label, ignore_index)", "imagenet",
                    None, classes_from="data.options"),
        DatasetSpec("synthetic", "built-in on-the-fly scenes: many classes, 2-6 per image (options: num_classes, "
                    "image_size, train_images, val_images, seed, min_classes, max_classes, class_offset, rare_classes, "
                    "rare_ratio)", "half", None),
    ]
}


def ignore_for(num_classes: int) -> int:
    """The internal ignore value: 255 while it cannot be a class id, else -1."""
    return 255 if num_classes <= 255 else -1


def generated_palette(num_classes: int, seed_hue: float = 0.0) -> list[list[int]]:
    """Deterministic distinct-enough colours: golden-angle hues over three saturation/value rings."""
    out = []
    for i in range(num_classes):
        hue = (seed_hue + i * 0.618033988749895) % 1.0
        sat, val = (0.9, 0.65, 0.45)[i % 3], (0.95, 0.75, 0.55)[(i // 3) % 3]
        out.append([int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    return out


@functools.cache
def _bundled_classes(file: str) -> tuple[list[str], list[list[int]]]:
    text = resources.files("segrank").joinpath("resources", "classes", f"{file}.json").read_text()
    data = json.loads(text)
    classes = list(data["classes"])
    palette = data.get("palette") or generated_palette(len(classes))
    return classes, [list(map(int, c)) for c in palette]


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise SegrankError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_info(name: str, options: dict | None = None, root: str | Path | None = None) -> DatasetInfo:
    """Classes, palette, ignore value and default normalisation of dataset ``name``.

    ``synthetic`` reads its class count from ``options["num_classes"]`` (default 150); ``folder`` reads
    ``<root>/classes.yaml``, so it needs ``root`` (the config's ``data.root``).
    """
    spec = dataset_spec(name)
    options = options or {}
    if name == "synthetic":
        classes = synthetic_classes(int(options.get("num_classes", 150)), int(options.get("class_offset", 0)))
        palette, norm = generated_palette(len(classes)), spec.normalization
    elif name == "folder":
        if root is None:
            raise SegrankError("dataset 'folder': needs its root directory (data.root) to read classes.yaml")
        folder = read_folder_classes(Path(root))
        classes, palette, norm = folder.classes, folder.palette, folder.normalization
    elif name == huggingface.NAME:
        classes, palette = huggingface_classes(root, options)
        norm = spec.normalization
    else:
        classes, palette = (list(x) for x in _bundled_classes(spec.classes_file))
        norm = spec.normalization
    mean, std = NORMALIZATIONS[norm]
    return DatasetInfo(name, classes, palette, ignore_for(len(classes)), mean, std)


def huggingface_classes(root: str | Path | None, options: dict) -> tuple[list[str], list[list[int]]]:
    """Class names and palette of a Hugging Face dataset: ``options["classes"]`` (names, or the name of a bundled
    list, whose palette comes with it), else the ClassLabel feature ``options["class_feature"]`` of the dataset."""
    opts = huggingface.hf_options(options)
    if opts.classes is not None and opts.class_feature is not None:
        raise SegrankError("data.options.class_feature: give the class names by classes or by class_feature, not both")
    if isinstance(opts.classes, str):
        folder = resources.files("segrank").joinpath("resources", "classes")
        bundled = sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))
        if opts.classes not in bundled:
            raise SegrankError(f"data.options.classes: {opts.classes!r} is not a bundled class list (bundled: "
                               f"{', '.join(bundled)}); give the names as a list")
        classes, palette = _bundled_classes(opts.classes)
        return list(classes), [list(c) for c in palette]
    if opts.classes is not None:
        if not opts.classes:
            raise SegrankError("data.options.classes: needs at least one class name")
        return list(opts.classes), generated_palette(len(opts.classes))
    if root is None:
        raise SegrankError(f"dataset {huggingface.NAME!r}: needs its root directory (data.root)")
    classes = huggingface.feature_classes(Path(root), opts.class_feature)
    return classes, generated_palette(len(classes))


def huggingface_layout(options: dict, num_classes: int) -> Layout:
    """How a Hugging Face dataset's label values decode (as a folder dataset's classes.yaml says it)."""
    opts = huggingface.hf_options(options)
    if not opts.reduce_zero_label and opts.ignore_index is not None and 0 <= opts.ignore_index < num_classes:
        raise SegrankError(f"data.options.ignore_index: {opts.ignore_index} collides with class id "
                           f"{opts.ignore_index} (set reduce_zero_label, or another ignore_index)")
    return Layout({}, "", "", "", "", reduce_zero_label=opts.reduce_zero_label, file_ignore=opts.ignore_index)


@dataclass
class FolderClasses:
    """Contents of a folder dataset's ``classes.yaml``."""

    classes: list[str]
    palette: list[list[int]]
    file_ignore: int | None = 255  # the label-file value meaning "not labelled" (null: none)
    reduce_zero_label: bool = False
    normalization: str = "imagenet"


FOLDER_KEYS = {"classes", "palette", "ignore_index", "reduce_zero_label", "normalization"}


def read_folder_classes(root: Path) -> FolderClasses:
    """Parse ``root/classes.yaml``: ``classes`` (list of names, required), ``palette`` (list of [r,g,b]),
    ``ignore_index`` (label-file value to ignore, default 255, null for none), ``reduce_zero_label`` (bool,
    default false: file value 0 -> ignore and c -> c-1), ``normalization`` (imagenet | half, default imagenet)."""
    path = root / "classes.yaml"
    if not path.is_file():
        raise SegrankError(f"{path}: not found (a folder dataset needs classes.yaml listing its class names)")
    data = files.read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
        raise SegrankError(f"{path}: needs a non-empty list under 'classes'")
    unknown = set(data) - FOLDER_KEYS
    if unknown:
        raise SegrankError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(FOLDER_KEYS))})")
    classes = [str(c) for c in data["classes"]]
    palette = data.get("palette") or generated_palette(len(classes))
    if len(palette) != len(classes) or any(not isinstance(c, list) or len(c) != 3 for c in palette):
        raise SegrankError(f"{path}: 'palette' needs one [r, g, b] per class ({len(classes)})")
    norm = data.get("normalization", "imagenet")
    if norm not in NORMALIZATIONS:
        raise SegrankError(f"{path}: normalization {norm!r} is not one of {list(NORMALIZATIONS)}")
    file_ignore = data.get("ignore_index", 255)
    if file_ignore is not None and not isinstance(file_ignore, int):
        raise SegrankError(f"{path}: ignore_index must be an integer or null, got {file_ignore!r}")
    reduce = data.get("reduce_zero_label", False)
    if not isinstance(reduce, bool):
        raise SegrankError(f"{path}: reduce_zero_label must be true or false, got {reduce!r}")
    if not reduce and file_ignore is not None and 0 <= file_ignore < len(classes):
        raise SegrankError(f"{path}: ignore_index {file_ignore} collides with class id {file_ignore}")
    return FolderClasses(classes, [list(map(int, c)) for c in palette], file_ignore, reduce, norm)


def folder_layout(root: Path) -> Layout:
    """``images/<name>.<ext>`` + ``labels/<name>.png``; split lists ``splits/<split>.txt`` when present, else every
    image is in every split (a single-split folder)."""
    cls = read_folder_classes(root)
    split_file = "splits/{split}.txt" if (root / "splits").is_dir() else None
    return Layout({}, "images", "labels", "", ".png", split_file, cls.reduce_zero_label, cls.file_ignore)
