"""``segrank datasets check`` on miniature trees: counts, planted defects file by file, exit codes, statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from segrank.cli import main
from segrank.data.check import check_dataset
from tests.data.conftest import ADE_SAMPLE


def image(path: Path, h: int = 4, w: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


def label(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)


def ade_tree(root: Path, defects: bool) -> None:
    two = np.array([[1, 1, 1, 2, 2, 2]] * 4, np.uint8)  # classes 0 and 1 after zero-label reduction
    three = np.array([[0, 1, 3, 3, 3, 3]] * 4, np.uint8)  # ignore, 0, 2
    image(root / "images" / "training" / "a.jpg")
    label(root / "annotations" / "training" / "a.png", two)
    image(root / "images" / "validation" / "v.jpg")
    label(root / "annotations" / "validation" / "v.png", three)
    if defects:
        image(root / "images" / "training" / "no_label.jpg")
        label(root / "annotations" / "training" / "no_image.png", two)
        image(root / "images" / "training" / "small.jpg", 4, 5)
        label(root / "annotations" / "training" / "small.png", two)
        label(root / "annotations" / "training" / "big.png", np.where(two == 2, 200, 1).astype(np.uint8))
        image(root / "images" / "training" / "big.jpg")
        image(root / "images" / "training" / "rgb.jpg")
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(root / "annotations" / "training" / "rgb.png")


def test_clean_tree_passes_with_histogram_and_class_count_distribution(tmp_path, capsys):
    ade_tree(tmp_path, defects=False)
    image(tmp_path / "images" / "training" / ".a.part123.jpg")  # a killed converter's temporary: not a sample
    assert main(["datasets", "check", "ade20k", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "split train: 1 images, 1 labels, 1 pairs" in out and "split val: 1 images, 1 labels, 1 pairs" in out
    assert "no problems found" in out
    assert "2 classes:       2 images (100.0 %)" in out  # a: {0, 1}; v: {0, 2} (0 in v is ignored)
    assert "class histogram (all 3 classes present, largest first;" in out
    assert main(["datasets", "check", "ade20k", str(tmp_path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "class histogram (the 2 largest of 3 classes present, largest first;" in out
    rows = out[out.index("class histogram"):out.index("classes per image")].splitlines()[1:]
    assert len(rows) == 2
    report = check_dataset("ade20k", tmp_path, progress=False)
    assert report.class_pixels[:3].tolist() == [12 + 4, 12, 16] and report.class_images[:3].tolist() == [2, 1, 1]


def test_every_planted_defect_is_reported_file_by_file(tmp_path, capsys):
    ade_tree(tmp_path, defects=True)
    assert main(["datasets", "check", "ade20k", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "split train: 5 images, 5 labels, 4 pairs" in out  # a, no_label, small, big, rgb / a, no_image, ...
    report = check_dataset("ade20k", tmp_path, progress=False)
    problems = {Path(path).name: what for path, what in report.problems}
    assert set(problems) == {"no_label.jpg", "no_image.png", "small.png", "big.png", "rgb.png"}
    assert problems["no_label.jpg"] == "image without label"
    assert problems["no_image.png"] == "label without image"
    assert problems["small.png"] == "label size 6x4 differs from image size 5x4"
    assert problems["big.png"] == "12 pixels with file values outside the 150-class vocabulary: 200"
    assert "RGB colour image" in problems["rgb.png"]
    for name in problems:
        assert name in out


def test_two_workers_give_the_one_worker_report(tmp_path, capsys):
    ade_tree(tmp_path, defects=True)
    for i in range(20):  # enough pairs for several chunks per worker, with varied class sets
        image(tmp_path / "images" / "training" / f"extra{i:02d}.jpg")
        label(tmp_path / "annotations" / "training" / f"extra{i:02d}.png",
              np.array([[1 + i % 5, 1 + i % 7, 2, 3, 150, 151]] * 4, np.uint8))
    outputs = []
    for workers in ("1", "2"):
        assert main(["datasets", "check", "ade20k", str(tmp_path), "--workers", workers]) == 2
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert "split train: 25 images, 25 labels, 24 pairs" in outputs[0]
    assert "extra" in outputs[0] and "151" in outputs[0]  # extra*.png have the out-of-vocabulary value 151
    serial = check_dataset("ade20k", tmp_path, progress=False)
    parallel = check_dataset("ade20k", tmp_path, progress=False, workers=2)
    assert serial.problems == parallel.problems
    assert (serial.class_pixels == parallel.class_pixels).all() and (serial.class_images == parallel.class_images).all()
    assert serial.classes_per_image == parallel.classes_per_image


def test_missing_split_and_split_selection(capsys):
    # the shared sample has only the validation split: checking everything reports the missing training folder
    assert main(["datasets", "check", "ade20k", str(ADE_SAMPLE)]) == 2
    assert "images/training: image folder not found" in capsys.readouterr().out
    assert main(["datasets", "check", "ade20k", str(ADE_SAMPLE), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "split val: 3 images, 3 labels, 3 pairs" in out and "no problems found" in out


def test_split_list_layout_reports_listed_names_without_files(tmp_path):
    lists = tmp_path / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("x\nghost\nnolabel\n")
    (lists / "val.txt").write_text("x\n")
    image(tmp_path / "JPEGImages" / "x.jpg")
    label(tmp_path / "SegmentationClassContext" / "x.png", np.array([[0, 59, 60, 255, 1, 1]] * 4, np.uint8))
    image(tmp_path / "JPEGImages" / "nolabel.jpg")
    report = check_dataset("pascal_context60", tmp_path, progress=False)
    problems = {Path(path).name: what for path, what in report.problems}
    assert problems["ghost"] == "listed in the split file, but neither image nor label exists"
    assert problems["nolabel.jpg"] == "image without label"
    assert problems["x.png"] == "4 pixels with file values outside the 60-class vocabulary: 60"
    assert [(s.split, s.images, s.labels, s.pairs) for s in report.splits] == [("train", 2, 1, 1), ("val", 1, 1, 1)]


def test_folder_dataset_check_with_16_bit_labels(tmp_path):
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump({"classes": [f"c{i}" for i in range(300)],
                                                           "ignore_index": 65535}))
    image(tmp_path / "images" / "a.png", 2, 3)
    label(tmp_path / "labels" / "a.png", np.array([[0, 299, 65535], [300, 300, 5]], np.uint16))
    report = check_dataset("folder", tmp_path, progress=False)
    assert report.info.ignore_index == -1
    assert [(Path(p).name, w) for p, w in report.problems] == \
        [("a.png", "2 pixels with file values outside the 300-class vocabulary: 300")]
    assert report.classes_per_image == {3: 1}
