"""Hugging Face datasets on disk (``data.dataset: huggingface``): Parquet shards and save_to_disk folders written here
with pyarrow, read lazily, with the folder datasets' label conventions, through check, training and DataLoader
workers, and one line for every bad input."""

from __future__ import annotations

import copy
import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from segrank.config import ConfigError, DataConfig, load_config
from segrank.data import build_dataset, dataset_info
from segrank.data.check import check_dataset
from segrank.data.huggingface import pyarrow_modules, split_of
from segrank.errors import SegrankError
from tests.conftest import tiny_run_config
from tests.reliability.common import run_cli

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["wall", "floor", "sky", "tree"]
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FEATURES = {"image": {"_type": "Image"}, "annotation": {"_type": "Image"},
            "scene": {"names": ["indoor", "outdoor"], "_type": "ClassLabel"},
            "pixel_classes": {"feature": {"names": CLASSES, "_type": "ClassLabel"}, "_type": "Sequence"}}


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def sample(i: int, size: tuple[int, int] = (24, 32)) -> tuple[np.ndarray, np.ndarray]:
    """Image i and its label file values: 0 ("other", ignored with reduce_zero_label) and classes 1..4."""
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    raw = np.zeros(size, np.uint8)
    raw[:, : size[1] // 2] = 1 + i % 4
    raw[size[0] // 2:, size[1] // 2:] = 1 + (i + 1) % 4
    return image, raw


def table(indices: range, size: tuple[int, int] = (24, 32), label_size: tuple[int, int] | None = None) -> pa.Table:
    rows = [sample(i, size) for i in indices]
    labels = [raw if label_size is None else np.zeros(label_size, np.uint8) for _, raw in rows]
    schema = pa.schema([("image", IMAGE), ("annotation", IMAGE), ("scene", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})
    images = [{"bytes": png(img), "path": f"{i}.png"} for i, (img, _) in zip(indices, rows, strict=True)]
    return pa.table({"image": images,
                     "annotation": [{"bytes": png(lab), "path": None} for lab in labels],
                     "scene": [i % 2 for i in indices]}, schema=schema)


def parquet_dataset(root: Path, **bad: tuple[int, int]) -> Path:
    """scene_parse_150's Hub layout: data/<split>-0000k-of-0000n.parquet, two train shards of row groups of 2."""
    (root / "data").mkdir(parents=True)
    pq.write_table(table(range(0, 3)), root / "data" / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(table(range(3, 5), **bad), root / "data" / "train-00001-of-00002.parquet", row_group_size=2)
    pq.write_table(table(range(10, 12)), root / "data" / "validation-00000-of-00001.parquet", row_group_size=2)
    return root


def write_arrow_stream(folder: Path, data: pa.Table, name: str = "data-00000-of-00001.arrow") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_stream(folder / name, data.schema) as writer:
        for batch in data.to_batches(max_chunksize=2):  # several record batches, as datasets writes them
            writer.write_batch(batch)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}], "_split": folder.name}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": FEATURES}))


def saved_dataset_dict(root: Path) -> Path:
    """``DatasetDict.save_to_disk``: dataset_dict.json and one folder per split."""
    write_arrow_stream(root / "train", table(range(0, 5)))
    write_arrow_stream(root / "validation", table(range(10, 12)))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    return root


def data_cfg(root: Path, **options) -> DataConfig:
    options = {"classes": CLASSES, "reduce_zero_label": True, **options}
    return DataConfig(dataset="huggingface", root=str(root), options=options, img_scale=(64, 32), crop_size=(16, 16),
                      workers=0)


@pytest.fixture(params=["parquet", "save_to_disk"])
def hf_root(request, tmp_path):
    return (parquet_dataset if request.param == "parquet" else saved_dataset_dict)(tmp_path / request.param)


def test_rows_decode_like_a_folder_dataset(hf_root):
    train, val = (build_dataset(data_cfg(hf_root), split, train=False) for split in ("train", "val"))
    assert (len(train), len(val)) == (5, 2)  # "val" is the Hub's "validation"
    for dataset, indices in ((train, range(5)), (val, range(10, 12))):
        for index, i in enumerate(indices):
            item = dataset.load(index)
            image, raw = sample(i)
            assert np.array_equal(item[0], image)
            assert np.array_equal(item[1], np.where(raw == 0, 255, raw.astype(np.int64) - 1))  # reduce_zero_label
            assert "row" in item[2]
    batch = build_dataset(data_cfg(hf_root), "train", train=True)[(3, 7)]
    assert batch["image"].shape == (3, 16, 16) and batch["label"].shape == (16, 16)


def test_rows_are_read_on_demand(tmp_path):
    dataset = build_dataset(data_cfg(parquet_dataset(tmp_path / "p")), "train", train=False)
    assert dataset.rows.opened == {}  # building the dataset reads only metadata
    dataset.load(4)  # second shard, second row group
    assert list(dataset.rows.opened) == [1] and list(dataset.rows.opened[1].groups) == [0]
    for index in (0, 1, 2, 3):  # a shard keeps at most two decoded row groups
        dataset.load(index)
    assert len(dataset.rows.opened[0].groups) == 2


def test_dataloader_workers_open_their_own_files(hf_root):
    dataset = build_dataset(data_cfg(hf_root), "train", train=False)
    expected = [dataset[i]["label"] for i in range(len(dataset))]  # the main process has its files open now
    assert len(dataset.rows.opened) > 0
    assert pickle.loads(pickle.dumps(dataset)).rows.opened == {}  # spawned workers get no open files
    forked = copy.copy(dataset.rows)
    forked.opened, forked.pid = dict(dataset.rows.opened), -1  # as a forked worker sees it: another process's files
    forked.encoded(0)
    assert list(forked.opened) == [0] and forked.opened[0] is not dataset.rows.opened[0]
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    assert all(torch.equal(a["label"], b) for a, b in zip(loader, expected, strict=True))


def test_class_names_from_options_bundled_lists_or_features(hf_root):
    assert dataset_info("huggingface", {"classes": ["a", "b"]}, hf_root).classes == ["a", "b"]
    ade = dataset_info("huggingface", {"classes": "ade20k"}, hf_root)
    assert ade.num_classes == 150 and ade.classes == dataset_info("ade20k").classes and ade.palette[0] != [0, 0, 0]
    assert dataset_info("huggingface", {"class_feature": "pixel_classes"}, hf_root).classes == CLASSES
    with pytest.raises(SegrankError, match=r"^data\.options\.classes: .* needs class names: .*ClassLabel features: "
                                           r"scene, pixel_classes\)$"):
        dataset_info("huggingface", {}, hf_root)
    with pytest.raises(SegrankError, match=r"^data\.options\.class_feature: .* has no ClassLabel feature 'image'"):
        dataset_info("huggingface", {"class_feature": "image"}, hf_root)
    with pytest.raises(SegrankError, match=r"^data\.options\.classes: 'ade21k' is not a bundled class list"):
        dataset_info("huggingface", {"classes": "ade21k"}, hf_root)
    with pytest.raises(SegrankError, match=r"^data\.options\.class_feature: give the class names by classes or by "):
        dataset_info("huggingface", {"classes": ["a"], "class_feature": "pixel_classes"}, hf_root)


def test_a_single_saved_dataset_serves_every_split(tmp_path):
    write_arrow_stream(tmp_path / "one", table(range(3)))
    assert [len(build_dataset(data_cfg(tmp_path / "one"), s, train=False)) for s in ("train", "val")] == [3, 3]
    report = check_dataset("huggingface", tmp_path / "one", options={"classes": CLASSES, "reduce_zero_label": True},
                           progress=False)
    assert [(s.split, s.pairs) for s in report.splits] == [("all", 3)] and not report.problems


@pytest.mark.parametrize(("options", "message"), [
    ({"label_column": "label"}, r"^\S+train-00000-of-00002\.parquet: no column 'label' \(data\.options\.label_column; "
                                r"columns: image, annotation, scene\)$"),
    ({"image_colum": "img"}, r"^data\.options\.image_colum: unknown key \(did you mean 'image_column'\?\)$"),
    ({"reduce_zero_label": "yes"}, r"^data\.options\.reduce_zero_label: expected true/false"),
    ({"reduce_zero_label": False, "ignore_index": 2}, r"^data\.options\.ignore_index: 2 collides with class id 2"),
])
def test_bad_options_give_one_line(tmp_path, options, message):
    root = parquet_dataset(tmp_path / "p")
    with pytest.raises(SegrankError, match=message):
        build_dataset(data_cfg(root, **options), "train", train=False)


@pytest.mark.parametrize(("path", "split"), [
    ("data/train-00000-of-00002.parquet", "train"), ("train-00001-of-00003-a09b74b3ef9c3b56.parquet", "train"),
    ("scene_parse_150-validation.parquet", "validation"), ("scene_parse_150-test-00000-of-00001.parquet", "test"),
    ("scene_parsing/validation/0000.parquet", "validation"), ("train.parquet", "train")])
def test_parquet_splits_come_from_the_file_names(path, split):
    assert split_of(Path(path)) == split


def test_unknown_split_and_folders_that_are_not_datasets(tmp_path):
    root = parquet_dataset(tmp_path / "p")
    with pytest.raises(SegrankError, match=r"unknown split 'test' \(known: train, validation\)"):
        build_dataset(data_cfg(root), "test", train=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegrankError, match=r"empty: not a Hugging Face dataset \(no dataset_dict\.json, state\.json"):
        build_dataset(data_cfg(tmp_path / "empty"), "train", train=False)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text('{"_split": "train"}')
    with pytest.raises(SegrankError, match=r"broken/state\.json: lists no _data_files$"):
        build_dataset(data_cfg(tmp_path / "broken"), "train", train=False)
    (tmp_path / "broken" / "dataset_dict.json").write_text("[1, 2")
    with pytest.raises(SegrankError, match=r"broken/dataset_dict\.json: cannot read \(Expecting"):
        build_dataset(data_cfg(tmp_path / "broken"), "train", train=False)


def test_a_label_of_the_wrong_size_is_one_line(tmp_path):
    root = parquet_dataset(tmp_path / "p", label_size=(20, 32))
    dataset = build_dataset(data_cfg(root), "train", train=False)
    dataset.load(2)
    with pytest.raises(SegrankError, match=r"^\S+train-00001-of-00002\.parquet row 0 \(annotation\): label size "
                                           r"\(20, 32\) differs from image size \(24, 32\)$"):
        dataset.load(3)


def test_check_reports_every_row(tmp_path, capsys):
    root = parquet_dataset(tmp_path / "p", label_size=(20, 32))
    args = ["datasets", "check", "huggingface", root, "--option", "classes=[wall, floor, sky]", "--option",
            "reduce_zero_label=true", "--workers", "1"]
    code, out, _ = run_cli(args, capsys)
    assert code == 2
    assert "split train: 5 images, 5 labels, 5 pairs" in out and "split validation: 2 images" in out
    assert "train-00001-of-00002.parquet row 1 (annotation): label size 32x20 differs from image size 32x24" in out
    assert "(annotation): 384 pixels with file values outside the 3-class vocabulary: 4" in out
    args = [*args[:5], "classes=[wall, floor, sky, tree]", *args[6:-1], "2", "--split", "validation"]
    code, out, _ = run_cli(args, capsys)  # two worker processes, each opening the file
    assert code == 0 and "no problems found" in out and "split train" not in out


@pytest.mark.slow
def test_check_and_train_on_a_saved_dataset(tmp_path, capsys):
    root = saved_dataset_dict(tmp_path / "hf")
    options = {"class_feature": "pixel_classes", "reduce_zero_label": True}
    code, out, _ = run_cli(["datasets", "check", "huggingface", root, "--option", "class_feature=pixel_classes",
                            "--option", "reduce_zero_label=true"], capsys)
    assert code == 0 and "4 classes" in out and "no problems found" in out
    cfg = tiny_run_config(train={"max_iters": 2, "checkpoint_interval": 2, "eval_interval": 2})
    cfg["model"]["num_classes"], cfg["model"]["head"]["topk"] = 4, 2
    cfg["data"] |= {"dataset": "huggingface", "root": str(root), "options": options, "val_split": "val"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["train", tmp_path / "cfg.yaml", "--work-dir", tmp_path / "run", "--no-progress"], capsys)
    assert code == 0, err
    results = json.loads(next((tmp_path / "run" / "eval").glob("*.json")).read_text())
    assert results["num_images"] == 2 and results["class_names"] == CLASSES


def test_the_scene_parse_150_base_config_reads_the_hub_layout(tmp_path):
    root = parquet_dataset(tmp_path / "scene_parse_150")
    cfg = load_config(REPO / "configs" / "_base_" / "datasets" / "scene_parse_150.yaml", [f"data.root={root}"])
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    assert len(dataset) == 2 and dataset.info.num_classes == cfg.model.num_classes == 150
    assert np.array_equal(dataset.load(0)[1], np.where(sample(10)[1] == 0, 255, sample(10)[1].astype(np.int64) - 1))


def test_cells_may_hold_a_path_instead_of_bytes(tmp_path):
    """Image features written from files keep only their path; a relative one is read from the dataset's root."""
    root = tmp_path / "paths"
    (root / "images").mkdir(parents=True)
    image, raw = sample(0)
    Image.fromarray(image).save(root / "images" / "0.png")
    cells = pa.array([{"bytes": None, "path": "images/0.png"}, {"bytes": None, "path": "images/gone.png"}], IMAGE)
    labels = pa.array([{"bytes": png(raw), "path": None}] * 2, IMAGE)
    pq.write_table(pa.table({"image": cells, "annotation": labels}), root / "train.parquet")
    dataset = build_dataset(data_cfg(root), "train", train=False)
    assert np.array_equal(dataset.load(0)[0], image)
    with pytest.raises(SegrankError, match=r"^\S+train\.parquet row 1: column 'image' names \S+gone\.png, which "
                                           r"cannot be read \(No such file or directory\)$"):
        dataset.load(1)


def test_without_pyarrow_one_line_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SegrankError, match=r"^dataset 'huggingface' reads .* pip install 'segrank\[hf\]'$"):
        pyarrow_modules()


def test_options_are_refused_by_the_other_datasets(tmp_path):
    with pytest.raises(SegrankError, match=r"--option: dataset 'folder' takes no options"):
        check_dataset("folder", tmp_path, options={"classes": ["a"]})
    with pytest.raises(ConfigError, match=r"data\.options\.classes: expected"):
        dataset_info("huggingface", {"classes": 3}, tmp_path)
