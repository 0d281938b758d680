"""Converters on miniature source trees built here in each release's original format, checked against label maps
computed by hand from the spec's mappings."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segrank import files
from segrank.cli import main
from segrank.config import DataConfig
from segrank.data import build_dataset, dataset_info
from segrank.data import convert as C
from segrank.errors import SegrankError

scipy_io = pytest.importorskip("scipy.io", reason="the .mat converters need the optional scipy extra")


def save_rgb(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


# --------------------------------------------------------------------------------------------------------------
# COCO-Stuff-10k


def coco_stuff_source(src: Path) -> None:
    (src / "imageLists").mkdir(parents=True)
    (src / "imageLists" / "train.txt").write_text("COCO_train2014_000000000009\nCOCO_train2014_000000000025\n")
    (src / "imageLists" / "test.txt").write_text("COCO_train2014_000000000030\n")
    raw = np.array([[0, 1, 11, 13], [91, 92, 93, 182]], np.uint8)  # COCO ids (91 is unused in COCO-Stuff)
    for i, name in enumerate(["COCO_train2014_000000000009", "COCO_train2014_000000000025",
                              "COCO_train2014_000000000030"]):
        save_rgb(src / "images" / f"{name}.jpg", 2, 4, seed=i)
        (src / "annotations").mkdir(exist_ok=True)
        scipy_io.savemat(src / "annotations" / f"{name}.mat", {"S": raw + (i == 2)})  # third image: ids + 1


def test_coco_stuff10k_converter(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    coco_stuff_source(src)
    assert main(["datasets", "prepare", "coco_stuff10k", str(src), str(dst)]) == 0
    # ids 1..11 keep their value, 13 -> 12 (12 unused), 92 (first stuff) -> 81, 93 -> 82, 182 -> 171, unused -> 0
    label = read(dst / "annotations" / "train2014" / "COCO_train2014_000000000009_labelTrainIds.png")
    assert label.dtype == np.uint8 and label.tolist() == [[0, 1, 11, 12], [0, 81, 82, 171]]
    # raw + 1: 1 -> 1, 2 -> 2, 12 (unused) -> 0, 14 -> 13, 92 -> 81, 93 -> 82, 94 -> 83, 183 (not COCO) -> 0
    test = read(dst / "annotations" / "test2014" / "COCO_train2014_000000000030_labelTrainIds.png")
    assert test.tolist() == [[1, 2, 0, 13], [81, 82, 83, 0]]
    assert (dst / "images" / "train2014" / "COCO_train2014_000000000025.jpg").read_bytes() == \
        (src / "images" / "COCO_train2014_000000000025.jpg").read_bytes()
    item = build_dataset(DataConfig(dataset="coco_stuff10k", root=str(dst)), "train", train=False)[0]
    assert item["label"].tolist() == [[255, 0, 10, 11], [255, 80, 81, 170]]  # zero-label reduction


def test_rerun_skips_finished_files_and_interrupted_run_leaves_no_partial_file(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    coco_stuff_source(src)
    calls = []
    real_save = C.save_label

    def interrupted_save(label, path):
        calls.append(path)
        if len(calls) == 2:  # the second label write dies half way
            files.atomic_write(path, lambda tmp: (tmp.write_bytes(b"half"), (_ for _ in ()).throw(KeyboardInterrupt())))
        real_save(label, path)

    monkeypatch.setattr(C, "save_label", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        C.prepare_coco_stuff10k(src, dst)
    assert leftovers(dst) == []
    labels = sorted((dst / "annotations").rglob("*.png"))
    assert len(labels) == 1  # the first one is complete, the second was never renamed into place
    first = labels[0].stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(C, "save_label", lambda label, path: (calls.append(path), real_save(label, path)))
    assert C.prepare_coco_stuff10k(src, dst) == 3
    assert len(calls) == 2 and labels[0] not in calls  # only the missing outputs were written
    assert labels[0].stat().st_mtime_ns == first
    calls.clear()
    C.prepare_coco_stuff10k(src, dst)
    assert calls == []


# --------------------------------------------------------------------------------------------------------------
# Pascal-Context


def test_pascal_context_converter_and_split_files(tmp_path):
    src, dst = tmp_path / "VOC2010", tmp_path / "out"
    (src / "ImageSets" / "Main").mkdir(parents=True)
    (src / "ImageSets" / "Main" / "train.txt").write_text("2008_000002\n2008_000003\n")
    (src / "ImageSets" / "Main" / "val.txt").write_text("2008_000007\n2008_000099\n")  # 000099 has no label map
    (src / "trainval").mkdir()
    label_map = np.array([[0, 2, 9, 115], [459, 1, 458, 260]], np.uint16)
    for i, name in enumerate(["2008_000002", "2008_000003", "2008_000007", "2008_000099"]):
        save_rgb(src / "JPEGImages" / f"{name}.jpg", 2, 4, seed=i)
        if name != "2008_000099":
            scipy_io.savemat(src / "trainval" / f"{name}.mat", {"LabelMap": label_map})
    assert main(["datasets", "prepare", "pascal_context60", str(src), str(dst)]) == 0
    # sorted 60 raw ids: 0, 2 (aeroplane), 9 (bag), 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80,
    # 85, 98, 104, 105, 113, 115 (-> 24, door), 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259 (mountain),
    # 260 (-> 36, mouse), ..., 458 (-> 59, wood); 459 and 1 are not among them -> background 0
    label = read(dst / "SegmentationClassContext" / "2008_000007.png")
    assert label.tolist() == [[0, 1, 2, 24], [0, 0, 59, 36]]
    names = dataset_info("pascal_context60").classes
    assert [names[i] for i in (1, 2, 24, 36, 59)] == ["aeroplane", "bag", "door", "mouse", "wood"]
    assert (dst / "ImageSets" / "SegmentationContext" / "train.txt").read_text() == "2008_000002\n2008_000003\n"
    assert (dst / "ImageSets" / "SegmentationContext" / "val.txt").read_text() == "2008_000007\n"
    pc60 = build_dataset(DataConfig(dataset="pascal_context60", root=str(dst)), "val", train=False)
    pc59 = build_dataset(DataConfig(dataset="pascal_context59", root=str(dst)), "val", train=False)
    assert pc60[0]["label"].tolist() == [[0, 1, 2, 24], [0, 0, 59, 36]]
    assert pc59[0]["label"].tolist() == [[255, 0, 1, 23], [255, 255, 58, 35]]


def test_mat_file_without_the_key_is_an_error(tmp_path):
    scipy_io.savemat(tmp_path / "x.mat", {"T": np.zeros((2, 2))})
    with pytest.raises(SegrankError, match="no key 'S'"):
        C.load_mat(tmp_path / "x.mat", "S")


# --------------------------------------------------------------------------------------------------------------
# ADE20K-Full


def ade_seg_png(path: Path, class_index: np.ndarray) -> None:
    """The full release's encoding: R = class // 256 * 10, G = class % 256 (B: instances, unused here)."""
    rgb = np.zeros((*class_index.shape, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = class_index // 256 * 10, class_index % 256, 7
    Image.fromarray(rgb).save(path)


def test_ade20k_full_converter(tmp_path):
    src, dst = tmp_path / "ADE20K_2021_17_01", tmp_path / "out"
    objectnames = [f"thing{i}" for i in range(400)]
    objectnames[0], objectnames[1], objectnames[299] = "wall", "building, edifice", "sky"  # ids 1, 2, 300
    folders = {"ADE_train_00000001.jpg": "ADE20K_2021_17_01/images/ADE/training/urban/street",
               "ADE_val_00000001.jpg": "ADE20K_2021_17_01/images/ADE/validation/home/kitchen"}
    index = {"filename": list(folders), "folder": list(folders.values()), "objectnames": objectnames}
    src.mkdir()
    (src / "index_ade20k.pkl").write_bytes(pickle.dumps(index))
    classes = np.array([[0, 1, 2, 300], [3, 300, 1, 2]])  # 0 unlabelled, 3 = "thing2" (not an 847 class)
    for i, (name, folder) in enumerate(folders.items()):
        image_dir = tmp_path / folder
        save_rgb(image_dir / name, 2, 4, seed=i)
        ade_seg_png(image_dir / name.replace(".jpg", "_seg.png"), classes)
    assert main(["datasets", "prepare", "ade20k_full", str(src), str(dst)]) == 0
    for split, name in (("train", "ADE_train_00000001"), ("val", "ADE_val_00000001")):
        label = read(dst / split / "label" / f"{name}.tif")
        assert label.dtype == np.uint16
        assert label.tolist() == [[65535, 0, 1, 2], [65535, 2, 0, 1]]  # wall 0, building 1, sky 2
        assert (dst / split / "image" / f"{name}.jpg").is_file()
    item = build_dataset(DataConfig(dataset="ade20k_full", root=str(dst)), "val", train=False)[0]
    assert item["label"].tolist() == [[-1, 0, 1, 2], [-1, 2, 0, 1]]


def test_ade20k_full_categories_file_and_resize_rule(tmp_path):
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps([{"name": "wall", "id": 5, "trainId": 0}, {"name": "sky", "id": 9, "trainId": 2}]))
    assert C.ade_full_id_map(["a"] * 10, cats) == {5: 0, 9: 2}
    assert C._ade_full_size(600, 800) == (512, 683)  # short side 600 > 512 -> 512, 800 * 512 / 600 = 682.7
    assert C._ade_full_size(1000, 700) == (731, 512)
    assert C._ade_full_size(512, 4000) is None


# --------------------------------------------------------------------------------------------------------------
# COCO+LVIS


def test_coco_lvis_converter_paints_instances_over_stuff(tmp_path):
    src, dst = tmp_path / "coco", tmp_path / "lvis"
    classes = dataset_info("coco_lvis").classes
    stuff = np.full((6, 8), 255, np.uint8)  # unlabelled
    stuff[:3] = 93  # COCO id 94 = 'branch' (stuff; 92 banner, 93 blanket)
    stuff[3:, :4] = 0  # COCO id 1 = person (a thing: left to LVIS)
    stuff[3:, 4:] = 164  # COCO id 165 = 'table' (stuff, but also an LVIS name)
    for split, image_id in (("train2017", 1), ("val2017", 2)):
        save_rgb(src / split / f"{image_id:012d}.jpg", 6, 8, seed=image_id)
        path = src / "stuffthingmaps_trainval2017" / split / f"{image_id:012d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(stuff).save(path)
    big = {"id": 10, "image_id": 1, "category_id": 1203, "area": 20.0,  # zucchini: x 1..5, y 1..4
           "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]}
    small = {"id": 11, "image_id": 1, "category_id": 1, "area": 1.0,  # aerosol_can: x 2..3, y 2..3, on top
             "segmentation": [[2, 2, 3, 2, 3, 3, 2, 3]]}
    categories = [{"id": 1, "name": "aerosol_can"}, {"id": 1203, "name": "zucchini"}]
    for name, split, image_id, anns in (("lvis_v1_train.json", "train2017", 1, [small, big]),
                                        ("lvis_v1_val.json", "val2017", 2, [])):
        image = {"id": image_id, "height": 6, "width": 8,
                 "coco_url": f"http://images.cocodataset.org/{split}/{image_id:012d}.jpg"}
        (src / name).write_text(json.dumps({"images": [image], "annotations": anns, "categories": categories}))
    assert main(["datasets", "prepare", "coco_lvis", str(src), str(dst)]) == 0

    # 'branch' is both an LVIS and the first stuff class: the stuff entry (1203 -> value 1204) wins; 'table' has no
    # stuff entry and maps to the LVIS 'table'
    assert classes[1203] == "branch" and "table" not in classes[1203:]
    branch, table = 1204, classes.index("table") + 1
    expected = np.zeros((6, 8), np.int64)
    expected[:3], expected[3:, 4:] = branch, table
    val = read(dst / "lvis_mask" / "val2017" / "000000000002.png")
    assert val.dtype == np.uint16 and val.tolist() == expected.tolist()
    expected[1:5, 1:6] = 1203  # zucchini polygon, outline included
    expected[2:4, 2:4] = 1  # the smaller aerosol can stays on top
    assert read(dst / "lvis_mask" / "train2017" / "000000000001.png").tolist() == expected.tolist()
    item = build_dataset(DataConfig(dataset="coco_lvis", root=str(dst)), "train", train=False)[0]
    assert item["label"][5, 0] == -1 and item["label"][2, 2] == 0 and item["label"][0, 7] == branch - 1
