"""``python -m segrank.benchmarks.losses`` at toy length: its records, and the imbalance and weights it relies on (no
result is asserted: the measured gain is in the benchmark's output, docs/losses.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segrank.benchmarks.losses import imbalanced_config, main, median_frequency_weights


def test_rare_classes_are_rare_and_weigh_more():
    cfg = imbalanced_config(iters=2, seed=0, num_classes=6, rare_classes=2, rare_ratio=10)
    weights = np.array(median_frequency_weights(cfg))
    assert weights[:4].max() < 1.5 and weights[4:].min() > 5


@pytest.mark.slow
def test_prints_one_json_record_per_run_and_a_summary(capsys):
    assert main(["--json", "--iters", "2", "--images", "16", "8"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["benchmark"] for r in records] == ["losses", "losses", "losses_summary"]
    plain, weighted, summary = records
    assert (plain["loss"], weighted["loss"]) == ("cross_entropy", "cross_entropy+class_weight")
    assert len(weighted["class_weight"]) == len(plain["IoU"]) == 8
    assert {"mIoU", "rare_IoU", "frequent_IoU", "seconds"} <= set(plain)
    assert summary["rare_IoU_gain"] == round(weighted["rare_IoU"] - plain["rare_IoU"], 4)
