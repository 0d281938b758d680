"""What ``segrank eval`` writes and prints (per-class CSV, confusion matrix, chart of the most confused pairs, summary),
what it keeps when the final write fails, and ``segrank info``'s parameters and GFLOPs; ``segrank --version``."""

from __future__ import annotations

import csv
import errno
import json
import math
import re
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from segrank import __version__, files, load_model
from segrank.cli import main as cli_main
from segrank.evaluation.metrics import most_confused
from tests.reliability.bad_input import checkpoint
from tests.reliability.common import folder_config, folder_dataset, write_config


def main(args: list) -> int:
    return cli_main([str(a) for a in args])


@pytest.fixture
def setup(tmp_path):
    """A folder dataset of 3 photos, its config (sliding 32x32 windows) and a RankSeg checkpoint."""
    root = folder_dataset(tmp_path / "data", count=3)
    cfg = folder_config(root, eval={"mode": "slide", "crop_size": [32, 32], "stride": [24, 24]})
    return write_config(tmp_path / "cfg.yaml", cfg), checkpoint(tmp_path / "model.safetensors", cfg)


def test_eval_writes_table_matrix_and_chart(setup, tmp_path, capsys):
    config, ckpt = setup
    out = tmp_path / "results.json"
    assert main(["eval", config, ckpt, "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    hist = np.load(tmp_path / "results.confusion.npy")
    assert hist.shape == (6, 6) and hist.dtype == np.int64 and hist.sum() == results["num_pixels"] > 0
    # The matrix is the one the metrics come from.
    inter, label, pred = np.diag(hist), hist.sum(1), hist.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (label + pred - inter)
    assert np.allclose(np.nan_to_num(iou, nan=-1), [-1 if v is None else v for v in results["IoU"]])
    assert math.isclose(np.nanmean(iou), results["mIoU"])
    with open(tmp_path / "results.per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == results["class_names"] == [f"c{i}" for i in range(6)]
    for i, row in enumerate(rows):
        assert int(row["label_pixels"]) == label[i] and int(row["predicted_pixels"]) == pred[i]
        assert (row["iou"] == "") == math.isnan(iou[i])
        assert row["iou"] == "" or math.isclose(float(row["iou"]), iou[i], abs_tol=1e-6)
    with Image.open(tmp_path / "results.confusion.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 300
    # The default print is a summary naming the worst-confused pair, not the table.
    (a, b, share, _), *_ = most_confused(torch.from_numpy(hist), 1)
    assert re.search(r"aAcc [\d.]+ %  mIoU [\d.]+ %  mAcc [\d.]+ %", printed)
    assert f"most confused: c{a} -> c{b} {100 * share:.1f}%" in printed
    assert not re.search(r"^class +IoU", printed, re.M)
    assert main(["eval", config, ckpt, "--out", out, "--no-progress", "--per-class", "--force"]) == 0
    table = capsys.readouterr().out
    assert all(re.search(rf"^c{i} +(-|[\d.]+) +(-|[\d.]+)$", table, re.M) for i in range(6))


def test_most_confused_ranks_by_share_of_the_label_class():
    hist = torch.tensor([[900, 100, 0, 0],   # 10 % of class 0 -> 1 (100 px)
                         [3, 7, 0, 0],       # 30 % of class 1 -> 0 (3 px)
                         [0, 0, 50, 0],      # class 2: never confused
                         [0, 0, 0, 0]])      # class 3: absent
    assert most_confused(hist, 5) == [(1, 0, 0.3, 3), (0, 1, 0.1, 100)]
    assert most_confused(hist, 1) == [(1, 0, 0.3, 3)]
    assert most_confused(torch.diag(torch.tensor([5, 6])), 3) == []


def test_failed_final_write_keeps_the_results(setup, tmp_path, capsys, monkeypatch):
    """The disk fills up during the evaluation: the results go to a temp folder and the one error line says where."""
    config, ckpt = setup
    out_dir, spare = tmp_path / "out", tmp_path / "spare_tmp"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    real = files.atomic_write

    def disk_full_in_out_dir(path, write):
        if path.parent == out_dir:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write)

    monkeypatch.setattr(files, "atomic_write", disk_full_in_out_dir)
    monkeypatch.setattr(files.writing, "atomic_write", disk_full_in_out_dir)  # behind write_json and write_text
    capsys.readouterr()
    assert main(["eval", config, ckpt, "--out", out_dir / "results.json", "--no-progress"]) == 2
    printed, err = capsys.readouterr()
    kept = next(spare.glob("segrank-eval-*"))
    assert err.strip() == (f"segrank eval: error: {out_dir / 'results.json'}: cannot write (No space left on device); "
                           f"the results are kept in {kept}")
    results = json.loads((kept / "results.json").read_text())
    assert f"mIoU {100 * results['mIoU']:.2f}" in printed  # the summary printed before the write is the kept one
    assert {p.name for p in kept.iterdir()} == {"results.json", "results.per_class.csv", "results.confusion.npy",
                                                "results.confusion.png"}
    assert not out_dir.exists()  # nothing half-written


def test_info_prints_parameters_and_flops_at_the_test_size(setup, tmp_path, capsys):
    config, ckpt = setup
    model = load_model(ckpt)

    def flops(h, w):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.class_map(torch.zeros(1, 3, h, w))
        return counter.get_total_flops() / 1e9

    def info(*extra):
        capsys.readouterr()
        assert main(["info", ckpt, *extra]) == 0
        text = capsys.readouterr().out
        return text, float(re.search(r"GFLOPs: ([\d.e+-]+) for", text).group(1))

    text, default = info()
    total = sum(p.numel() for p in model.parameters())
    assert f"parameters: {total:,} (backbone " in text
    # No config stored with a lone checkpoint: the window is the position table's size (4x4 patches of 8).
    assert "one sliding window of 32x32 pixels" in text and math.isclose(default, flops(32, 32), rel_tol=1e-3)
    _, larger = info("--size", "64", "96")
    assert math.isclose(larger, flops(64, 96), rel_tol=1e-3) and larger > 4 * default  # 6x the pixels
    # A config with whole-image inference: a square image at its test scale (img_scale 64x48 -> 48x48).
    root = tmp_path / "data"
    whole_config = write_config(tmp_path / "whole.yaml", folder_config(root, eval={"mode": "whole"}))
    text, whole = info("--config", whole_config)
    assert "a square image at the test scale of 48x48 pixels" in text
    assert math.isclose(whole, flops(48, 48), rel_tol=1e-3)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"segrank {__version__}"
