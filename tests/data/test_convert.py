"""Converters on miniature source trees in each release's original format (tests/data/miniature.py), checked
against label maps computed by hand from the spec's mappings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segrank import files
from segrank.cli import main
from segrank.config import DataConfig
from segrank.data import build_dataset, dataset_info
from segrank.data.convert import CONVERTERS, ade20k_full, coco_stuff, common, prepare
from segrank.errors import SegrankError
from tests.data.miniature import ade20k_full_source, coco_lvis_source, coco_stuff_source, pascal_context_source

scipy_io = pytest.importorskip("scipy.io", reason="the .mat converters need the optional scipy extra")


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


# --------------------------------------------------------------------------------------------------------------
# COCO-Stuff-10k


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
    real_save = common.save_label

    def interrupted_save(label, path):
        calls.append(path)
        if len(calls) == 2:  # the second label write dies half way
            files.atomic_write(path, lambda tmp: (tmp.write_bytes(b"half"), (_ for _ in ()).throw(KeyboardInterrupt())))
        real_save(label, path)

    monkeypatch.setattr(coco_stuff, "save_label", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        prepare("coco_stuff10k", src, dst, progress=False)
    assert leftovers(dst) == []
    labels = sorted((dst / "annotations").rglob("*.png"))
    assert len(labels) == 1  # the first one is complete, the second was never renamed into place
    first = labels[0].stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(coco_stuff, "save_label", lambda label, path: (calls.append(path), real_save(label, path)))
    assert prepare("coco_stuff10k", src, dst, progress=False).images == 3
    assert len(calls) == 2 and labels[0] not in calls  # only the missing outputs were written
    assert labels[0].stat().st_mtime_ns == first
    calls.clear()
    assert prepare("coco_stuff10k", src, dst, progress=False).converted == 0
    assert calls == []


# --------------------------------------------------------------------------------------------------------------
# Pascal-Context


def test_pascal_context_converter_and_split_files(tmp_path):
    src, dst = pascal_context_source(tmp_path / "VOC2010"), tmp_path / "out"
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
        common.load_mat(tmp_path / "x.mat", "S")


# --------------------------------------------------------------------------------------------------------------
# ADE20K-Full


def test_ade20k_full_converter(tmp_path):
    src, dst = ade20k_full_source(tmp_path), tmp_path / "out"
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
    assert ade20k_full.id_map(["a"] * 10, cats) == {5: 0, 9: 2}
    assert ade20k_full.resized_size(600, 800) == (512, 683)  # short side 600 > 512 -> 512, 800 * 512 / 600 = 682.7
    assert ade20k_full.resized_size(1000, 700) == (731, 512)
    assert ade20k_full.resized_size(512, 4000) is None


# --------------------------------------------------------------------------------------------------------------
# COCO+LVIS


def test_coco_lvis_converter_paints_instances_over_stuff(tmp_path):
    src, dst = coco_lvis_source(tmp_path / "coco"), tmp_path / "lvis"
    classes = dataset_info("coco_lvis").classes
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


# --------------------------------------------------------------------------------------------------------------
# Help


@pytest.mark.parametrize("name", list(CONVERTERS))
def test_prepare_help_describes_the_converters_inputs_and_outputs(name, capsys):
    """``segrank datasets prepare NAME --help`` prints that converter's description of SRC and DST."""
    with pytest.raises(SystemExit) as stop:
        main(["datasets", "prepare", name, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    doc = " ".join(CONVERTERS[name].__doc__.split())
    assert doc in text
    assert "SRC " in doc and "DST gets " in doc and "data.root" in doc
    if name == "ade20k_full":
        assert "--categories FILE" in text
    else:
        assert "--categories" not in text


def test_prepare_rejects_options_of_other_converters(tmp_path, capsys):
    code = main(["datasets", "prepare", "coco_stuff10k", str(tmp_path), str(tmp_path / "out"), "--categories", "x"])
    assert code == 2 and "--categories" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
