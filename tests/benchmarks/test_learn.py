"""``segrank benchmark learn`` at a tiny budget: every head trains in its own process and is recorded with its
curves, timing and memory; the equal-wall-clock Segmenter gets the iterations RankSeg's time bought."""

from __future__ import annotations

import json

from segrank.benchmarks.learn import run_learn
from segrank.cli import main
from segrank.engine import report


def test_learn_records_every_head(tmp_path):
    result = run_learn([40], [0], iters=3, pretrain_iters=2, val_images=3, threads=1, work_dir=tmp_path / "runs")
    json.dumps(result)  # plain JSON types only
    case = result["cases"][0]
    heads = case["heads"]
    assert list(heads) == ["segmenter", "rankseg", "rankseg_gt", "segmenter_equal_time"]
    ratio = heads["rankseg"]["s_per_iter"] / heads["segmenter"]["s_per_iter"]
    assert heads["segmenter_equal_time"]["iters"] == max(1, round(3 * ratio))
    for name, run in heads.items():
        assert 0 <= run["mIoU"] <= 1 and 0 <= run["aAcc"] <= 1, name
        assert run["s_per_iter"] > 0 and run["peak_memory_mb"] >= run["memory_before_training_mb"] > 0
        assert [r["step"] for r in run["eval_curve"]] == list(range(1, run["iters"] + 1))  # one evaluation per step
    rank = heads["rankseg"]
    assert 0 <= rank["image_recall"] <= 1 and 0 <= rank["pixel_recall"] <= 1
    assert all("image_recall" in r and "pixel_recall" in r for r in rank["train_curve"])
    assert heads["rankseg_gt"]["image_recall"] == 1.0 and "image_recall" not in heads["segmenter"]
    summary = result["summary"]["40"]
    assert summary["rankseg_minus_segmenter_equal_iterations"] == rank["mIoU"] - heads["segmenter"]["mIoU"]
    assert summary["rankseg_s_per_iter_vs_segmenter"] == ratio
    assert summary["rankseg_minus_segmenter_equal_wall_clock"] == \
        rank["mIoU"] - heads["segmenter_equal_time"]["mIoU"]
    # Stage 1 trained on classes 40.. (disjoint from the 40 targets).
    assert (tmp_path / "runs" / "n40_seed0" / "backbone" / "backbone.safetensors").is_file()
    path = report.learning_curves(case, tmp_path / "curves.png", 30)
    assert path.stat().st_size > 1000


def test_learn_rejects_bad_input(tmp_path, capsys):
    assert main(["benchmark", "learn", "--classes", "150,10"]) == 2
    assert "segrank benchmark learn: error: --classes: every N must be >= 30" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["benchmark", "learn", "--plots", str(tmp_path / "file" / "plots")]) == 2
    assert "cannot create the plots folder" in capsys.readouterr().err
    assert main(["benchmark", "learn", "--iters", "0"]) == 2  # argparse errors are one line too
    assert "--iters: must be >= 1" in capsys.readouterr().err
