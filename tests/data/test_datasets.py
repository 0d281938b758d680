"""Dataset definitions, label decoding, item contract, reproducible augmentation and synthetic scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segrank.config import DataConfig
from segrank.data import DATASETS, build_dataset, dataset_info
from segrank.data.synthetic import synthetic_options, synthetic_scene
from segrank.errors import SegrankError
from tests.data.conftest import ADE_SAMPLE


def save_rgb(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return img


def save_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(path)


# --------------------------------------------------------------------------------------------------------------
# Dataset info


@pytest.mark.parametrize("name, classes, ignore, mean0", [
    ("ade20k", 150, 255, 127.5), ("coco_stuff10k", 171, 255, 123.675), ("pascal_context60", 60, 255, 127.5),
    ("pascal_context59", 59, 255, 127.5), ("ade20k_full", 847, -1, 123.675), ("coco_lvis", 1284, -1, 123.675),
])
def test_dataset_info_classes_ignore_and_normalisation(name, classes, ignore, mean0):
    info = dataset_info(name)
    assert info.num_classes == classes and info.ignore_index == ignore and info.mean[0] == mean0
    assert len(info.palette) == classes and all(len(c) == 3 for c in info.palette)
    assert not 0 <= info.ignore_index < info.num_classes


def test_generated_palette_is_deterministic_for_ade20k_full():
    assert dataset_info("ade20k_full").palette == dataset_info("ade20k_full").palette
    assert len({tuple(c) for c in dataset_info("ade20k_full").palette}) > 800


def test_unknown_dataset_and_split_are_errors(tmp_path):
    with pytest.raises(SegrankError, match="unknown dataset"):
        dataset_info("cityscapes")
    with pytest.raises(SegrankError, match="unknown split"):
        build_dataset(DataConfig(dataset="ade20k", root=str(ADE_SAMPLE)), "bogus", train=False)
    with pytest.raises(SegrankError, match="not found"):
        build_dataset(DataConfig(dataset="ade20k", root=str(tmp_path / "nope")), "val", train=False)
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(SegrankError, match="no images"):
        build_dataset(DataConfig(dataset="ade20k", root=str(tmp_path)), "train", train=True)


# --------------------------------------------------------------------------------------------------------------
# ADE20K sample (real files)


def test_ade20k_sample_validation_items():
    ds = build_dataset(DataConfig(dataset="ade20k", root=str(ADE_SAMPLE)), "val", train=False)
    assert len(ds) == 3
    sizes = {"ADE_val_00000001": (512, 683), "ADE_val_00000002": (364, 500), "ADE_val_00000003": (300, 400)}
    for item in ds:
        stem = Path(item["path"]).stem
        raw = np.asarray(Image.open(ADE_SAMPLE / "annotations" / "validation" / f"{stem}.png")).astype(np.int64)
        expected = np.where(raw == 0, 255, raw - 1)  # zero-label reduction
        assert item["ori_size"] == sizes[stem]
        assert torch.equal(item["label"], torch.from_numpy(expected))
        short = min(item["image"].shape[1:])
        assert short == 512 and item["image"].dtype == torch.float32
        assert float(item["image"].min()) >= -1.01 and float(item["image"].max()) <= 1.01  # mean = std = 127.5


def test_ade20k_sample_train_pipeline_gives_crop_sized_items():
    cfg = DataConfig(dataset="ade20k", root=str(ADE_SAMPLE), crop_size=(256, 320))
    ds = build_dataset(cfg, "val", train=True)
    batch = torch.utils.data.default_collate([ds[(i, 7)] for i in range(3)])
    assert batch["image"].shape == (3, 3, 256, 320) and batch["label"].shape == (3, 256, 320)
    assert set(batch["label"].unique().tolist()) <= set(range(150)) | {255}


def test_explicit_normalization_overrides_the_dataset_default():
    cfg = DataConfig(dataset="ade20k", root=str(ADE_SAMPLE), normalization="imagenet")
    item = build_dataset(cfg, "val", train=False)[0]
    assert float(item["image"].min()) < -1.5  # ImageNet std ~58 reaches about -2.1 for black pixels


# --------------------------------------------------------------------------------------------------------------
# 16-bit datasets and the folder dataset (miniature trees)


def test_ade20k_full_reads_16_bit_tiff_with_65535_as_ignore(tmp_path):
    save_rgb(tmp_path / "val" / "image" / "a.jpg", 4, 3)
    raw = np.array([[0, 846, 65535], [300, 5, 65535], [1, 2, 3], [4, 5, 6]], np.uint16)
    save_label(tmp_path / "val" / "label" / "a.tif", raw)
    item = build_dataset(DataConfig(dataset="ade20k_full", root=str(tmp_path)), "val", train=False)[0]
    assert item["label"].tolist() == [[0, 846, -1], [300, 5, -1], [1, 2, 3], [4, 5, 6]]


def test_coco_lvis_reads_16_bit_png_with_zero_as_ignore(tmp_path):
    save_rgb(tmp_path / "images" / "val2017" / "000000000001.jpg", 2, 3)
    save_label(tmp_path / "lvis_mask" / "val2017" / "000000000001.png",
               np.array([[0, 1, 1284], [700, 1204, 0]], np.uint16))
    cfg = DataConfig(dataset="coco_lvis", root=str(tmp_path), crop_size=(8, 8), img_scale=(6, 4))
    item = build_dataset(cfg, "val", train=False)[0]
    assert item["label"].tolist() == [[-1, 0, 1283], [699, 1203, -1]]
    train_item = build_dataset(cfg, "val", train=True)[(0, 3)]
    assert train_item["label"].shape == (8, 8) and (train_item["label"] == -1).any()  # padded with -1


def write_folder(root: Path, classes: dict, labels: dict[str, np.ndarray], splits: dict | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(yaml.safe_dump(classes))
    for i, (name, label) in enumerate(labels.items()):
        save_rgb(root / "images" / f"{name}.png", *label.shape, seed=i)
        save_label(root / "labels" / f"{name}.png", label)
    for split, names in (splits or {}).items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")


def test_folder_dataset_with_classes_yaml_and_split_lists(tmp_path):
    labels = {"a": np.array([[0, 1], [2, 255]], np.uint8), "b": np.array([[2, 2], [1, 0]], np.uint8)}
    write_folder(tmp_path, {"classes": ["sky", "road", "car"], "ignore_index": 255}, labels,
                 {"train": ["a"], "val": ["b"]})
    info = dataset_info("folder", root=tmp_path)
    assert info.classes == ["sky", "road", "car"] and info.ignore_index == 255 and len(info.palette) == 3
    train = build_dataset(DataConfig(dataset="folder", root=str(tmp_path)), "train", train=False)
    val = build_dataset(DataConfig(dataset="folder", root=str(tmp_path)), "val", train=False)
    assert len(train) == len(val) == 1
    assert train[0]["label"].tolist() == [[0, 1], [2, 255]] and val[0]["label"].tolist() == [[2, 2], [1, 0]]


def test_folder_dataset_zero_label_reduction_and_many_classes(tmp_path):
    write_folder(tmp_path / "r", {"classes": ["a", "b"], "reduce_zero_label": True},
                 {"x": np.array([[0, 1, 2, 255]], np.uint8)})
    item = build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "r")), "val", train=False)[0]
    assert item["label"].tolist() == [[255, 0, 1, 255]]
    # 300 classes: internal ignore -1, 16-bit label files, file value 65535 ignored
    write_folder(tmp_path / "big", {"classes": [f"c{i}" for i in range(300)], "ignore_index": 65535},
                 {"x": np.array([[0, 299, 65535, 255]], np.uint16)})
    info = dataset_info("folder", root=tmp_path / "big")
    item = build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "big")), "val", train=False)[0]
    assert info.ignore_index == -1 and item["label"].tolist() == [[0, 299, -1, 255]]


def test_folder_classes_yaml_errors(tmp_path):
    with pytest.raises(SegrankError, match="classes.yaml"):
        dataset_info("folder", root=tmp_path)
    with pytest.raises(SegrankError, match="needs its root"):
        dataset_info("folder")
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump({"classes": ["a", "b"], "ignore_index": 1}))
    with pytest.raises(SegrankError, match="collides"):
        dataset_info("folder", root=tmp_path)
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump({"classes": ["a"], "colour": 1}))
    with pytest.raises(SegrankError, match="unknown key 'colour'"):
        dataset_info("folder", root=tmp_path)


def test_rgb_label_is_an_error_naming_the_file(tmp_path):
    write_folder(tmp_path, {"classes": ["a", "b"]}, {"x": np.zeros((2, 2), np.uint8)})
    save_rgb(tmp_path / "labels" / "x.png", 2, 2)
    with pytest.raises(SegrankError, match=r"x\.png: label is a RGB colour image"):
        build_dataset(DataConfig(dataset="folder", root=str(tmp_path)), "val", train=False)[0]


# --------------------------------------------------------------------------------------------------------------
# Reproducible augmentation


def test_items_depend_only_on_their_key():
    cfg = DataConfig(dataset="ade20k", root=str(ADE_SAMPLE), crop_size=(128, 128))
    ds = build_dataset(cfg, "val", train=True)
    a, b = ds[(1, 11)], ds[(1, 11)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], ds[(1, 12)]["image"])
    e0 = ds[2]["image"]
    np.random.seed(123)
    torch.manual_seed(123)  # global random state plays no part
    assert torch.equal(ds[2]["image"], e0)


def test_dataloader_workers_give_the_in_process_items():
    cfg = DataConfig(dataset="synthetic", img_scale=(64, 64), crop_size=(64, 64),
                     options={"image_size": 64, "train_images": 6, "num_classes": 40})
    ds = build_dataset(cfg, "train", train=True)
    keys = [[(i, 100 + i) for i in range(0, 3)], [(i, 100 + i) for i in range(3, 6)]]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=keys, num_workers=2)
    batches = list(loader)
    for batch, chunk in zip(batches, keys, strict=True):
        expected = torch.stack([ds[key]["image"] for key in chunk])
        assert torch.equal(batch["image"], expected)


# --------------------------------------------------------------------------------------------------------------
# Synthetic scenes


@pytest.mark.parametrize("num_classes", [150, 1284])
def test_synthetic_scenes_have_2_to_6_large_classes(num_classes):
    opts = synthetic_options({"num_classes": num_classes, "image_size": 96})
    counts = []
    for i in range(30):
        img, label = synthetic_scene(i, "train", opts)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and label.dtype == np.int64
        values, pixels = np.unique(label, return_counts=True)
        assert values.min() >= 0 and values.max() < num_classes
        assert pixels.min() >= 0.04 * 96 * 96  # every region spans several 16-px patches
        counts.append(len(values))
    assert min(counts) >= 2 and max(counts) <= 6 and len(set(counts)) >= 4


def test_synthetic_dataset_is_deterministic_and_seedable():
    def first_item(seed: int, split: str = "val") -> dict:
        cfg = DataConfig(dataset="synthetic", img_scale=(64, 64), options={"seed": seed, "image_size": 64})
        return build_dataset(cfg, split, train=False)[0]

    assert torch.equal(first_item(0)["image"], first_item(0)["image"])
    assert not torch.equal(first_item(0)["image"], first_item(1)["image"])
    assert not torch.equal(first_item(0, "train")["image"], first_item(0, "val")["image"])
    info = dataset_info("synthetic", {"num_classes": 1284})
    assert info.num_classes == 1284 and info.ignore_index == -1 and len(set(info.classes)) == 1284


def test_synthetic_classes_differ_in_appearance():
    # every class of the default vocabulary has its own (colour, pattern, tone) -> distinct local appearance
    from segrank.data.synthetic import class_appearance

    looks = {class_appearance(k)[:4] for k in range(1284)}
    assert len(looks) == 1284


def test_synthetic_options_are_checked():
    with pytest.raises(SegrankError, match="data.options.size"):
        build_dataset(DataConfig(dataset="synthetic", options={"size": 3}), "train", train=True)
    with pytest.raises(SegrankError, match="max_classes"):
        synthetic_options({"max_classes": 9})


def test_every_listed_dataset_has_info():
    for name, spec in DATASETS.items():
        if spec.classes_from is None:  # the others read their classes from their root
            assert dataset_info(name).num_classes >= 2
