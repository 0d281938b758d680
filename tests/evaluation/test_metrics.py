"""Metrics equal the reference's (fixtures/miou) on every scenario; confusion-matrix edge cases."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from segrank.data.datasets import decode_label
from segrank.data.info import Layout
from segrank.evaluation.metrics import confusion_matrix, format_table, summarize
from segrank.files import json_safe

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("SEGRANK_FIXTURES_DIR", REPO.parent / "shared" / "fixtures"))


def reduce_zero_label(label: np.ndarray, ignore_index: int) -> np.ndarray:
    """mmseg ``reduce_zero_label`` through the datasets' label decoding: 0 and the ignore value become ignore, class c
    becomes c - 1."""
    return decode_label(label, Layout({}, "", "", "", "", reduce_zero_label=True, file_ignore=ignore_index),
                        ignore_index)


def miou_fixture() -> tuple[dict, dict]:
    folder = FIXTURES / "miou"
    if not folder.is_dir():
        pytest.fail(f"fixture folder {folder} is absent (the golden files live in ../shared/fixtures; "
                    "set SEGRANK_FIXTURES_DIR to read them elsewhere)")
    with np.load(folder / "miou_cases.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads((folder / "miou.json").read_text()), arrays


def assert_nan_close(actual, expected, name):
    actual = np.array(actual.tolist() if isinstance(actual, torch.Tensor) else actual, dtype=np.float64)
    expected = np.array([math.nan if v is None else v for v in np.atleast_1d(expected)], dtype=np.float64)
    np.testing.assert_allclose(actual, expected.reshape(actual.shape), rtol=1e-12, atol=1e-12, err_msg=name)


def test_matches_reference_scenarios():
    meta, arrays = miou_fixture()
    n = meta["num_classes"]
    assert meta["scenarios"]
    for name, sc in meta["scenarios"].items():
        ignore = sc["ignore_index"]
        hist = torch.zeros(n, n, dtype=torch.int64)
        for i in range(sc["n_images"]):
            label = arrays[f"{name}.label{i}"]
            assert str(label.dtype) == sc["label_dtype"]
            if sc["reduce_zero_label"]:
                label = reduce_zero_label(label, ignore)
            pred = torch.from_numpy(arrays[f"{name}.pred{i}"])
            one = confusion_matrix(pred, torch.from_numpy(label.astype(np.int64)), n, ignore)
            # Per-image areas as the reference's histc computes them.
            assert_nan_close(one.diag(), arrays[f"{name}.img{i}.area_intersect"], f"{name} img{i} intersect")
            assert_nan_close(one.sum(1), arrays[f"{name}.img{i}.area_label"], f"{name} img{i} label")
            assert_nan_close(one.sum(0), arrays[f"{name}.img{i}.area_pred_label"], f"{name} img{i} pred")
            hist += one
        res = summarize(hist)
        assert hist.dtype == torch.int64
        assert_nan_close(res["aAcc"], sc["aAcc"], f"{name} aAcc")
        assert_nan_close(res["IoU"], sc["IoU"], f"{name} IoU")
        assert_nan_close(res["Acc"], sc["Acc"], f"{name} Acc")
        assert_nan_close(res["mIoU"], sc["mIoU_nanmean"], f"{name} mIoU")
        assert_nan_close(res["mAcc"], sc["mAcc_nanmean"], f"{name} mAcc")
        # The reference's evaluate() output: percent rounded to 2 decimals.
        out = sc["dataset_evaluate_output"]
        for key in ("aAcc", "mIoU", "mAcc"):
            assert round(100 * res[key], 2) == pytest.approx(100 * out[key], abs=1e-9), (name, key)


def test_reduce_zero_label_both_dtypes():
    uint8 = np.array([[0, 1, 2, 255]], np.uint8)
    assert reduce_zero_label(uint8, 255).tolist() == [[255, 0, 1, 255]]
    int16 = np.array([[0, 1, 300, -1]], np.int16)
    assert reduce_zero_label(int16, -1).tolist() == [[-1, 0, 299, -1]]


def test_confusion_matrix_ignores_and_class_255_with_minus1_ignore():
    # 300 classes with ignore -1: class 255 is an ordinary class (the reference's float histc would need the
    # ignore value outside [0, N-1]; bincount over valid pixels does not).
    label = torch.tensor([255, 255, -1, 3])
    pred = torch.tensor([255, 2, 7, 3])
    hist = confusion_matrix(pred, label, 300, -1)
    assert hist.sum() == 3 and hist[255, 255] == 1 and hist[255, 2] == 1 and hist[3, 3] == 1
    res = summarize(hist)
    assert res["IoU"][255] == 0.5 and res["IoU"][2] == 0.0 and math.isnan(res["IoU"][7])
    assert res["aAcc"] == pytest.approx(2 / 3)


def test_table_and_json():
    hist = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 0, 0]])
    res = summarize(hist)
    text = format_table(res, ["sky", "tree", "road"])
    assert "sky" in text and "75.00" in text and "road" in text
    assert "IoU (%)" in text and "aAcc 75.00 %  mIoU 37.50 %  mAcc 75.00 %" in text
    assert json.loads(json.dumps(json_safe(res)))["IoU"][2] is None
