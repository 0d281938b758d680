"""``segrank demo`` at a reduced budget: the three runs train, evaluate, and the report holds their mIoUs, a verdict
and its charts."""

from __future__ import annotations

import re

import yaml

from segrank.cli import main
from segrank.experiments.recipe import HEAD_SETTINGS, HEAD_SETTINGS_SOURCE, HEADS
from segrank.runtime.precision import fastest_precision


def test_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--iters", "4", "--val-images", "4"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    text = (out / "report.md").read_text()
    rows = {name: re.search(rf"^\| {re.escape(name)} \| [\d.]+ M \| ([\d.]+) \|", text, re.M)
            for name in ("Segmenter", "Segmenter + RankSeg", "RankSeg, ground-truth classes (oracle), upper bound")}
    assert all(rows.values()), text
    miou = {name: float(m.group(1)) for name, m in rows.items()}
    assert all(0 <= v <= 100 for v in miou.values())
    assert re.search(r"\| [\d.]+ % \(k=\d+\) \| [\d.]+ % \|", text)  # RankSeg's image-level and pixel recall
    # The verdict names the leader and the gap the table shows (up to the table's rounding).
    verdict = re.search(r"\*\*(Segmenter \+ RankSeg|Segmenter) is ahead of [^*]+ by ([\d.]+) mIoU\*\*", text)
    assert verdict, text
    gap = miou["Segmenter + RankSeg"] - miou["Segmenter"]
    assert abs(float(verdict.group(2)) - abs(gap)) <= 0.11
    if abs(gap) > 0.1:
        assert verdict.group(1) == ("Segmenter + RankSeg" if gap > 0 else "Segmenter")
    for name in ("loss_curves.png", "miou_curves.png", "recall_curves.png", "per_class_iou.png", "predictions.png"):
        assert (out / name).stat().st_size > 1000, name
        assert f"({name})" in text
    # Every head's own settings and how they were chosen.
    own = re.search(r"own settings \(base lr, lr multiplier of its whole decode head\): (.*)\. How they were chosen: "
                    r"(.+?); the same grid is searched for every head", text)
    assert own, text
    for head, name in HEADS.items():  # the selected settings, each head its own
        lr, mult = HEAD_SETTINGS[head]["lr"], HEAD_SETTINGS[head]["decoder_lr_mult"]
        assert re.search(rf"(^|; ){re.escape(name)}: lr {lr:g}, decode head x{mult:g}(;|$)", own.group(1)), name
    assert own.group(2) == HEAD_SETTINGS_SOURCE
    assert (out / "segmenter" / "log.jsonl").is_file() and (out / "rankseg" / "config.yaml").is_file()
    # --precision auto (the default) reached every stage, and the report says what it chose.
    for stage in ("backbone", "segmenter", "rankseg", "rankseg_gt"):
        assert yaml.safe_load((out / stage / "config.yaml").read_text())["train"]["precision"] == "auto", stage
    assert f"precision {fastest_precision('cpu').reason}" in text
    # Stage 1 never saw the demo's classes: its vocabulary is disjoint.
    stage1 = yaml.safe_load((out / "backbone" / "config.yaml").read_text())["data"]["options"]
    target = yaml.safe_load((out / "rankseg" / "config.yaml").read_text())["data"]["options"]
    assert stage1["class_offset"] >= target.get("class_offset", 0) + target["num_classes"]
    # A second run refuses to overwrite the report.
    assert main(["demo", "--out", str(out), "--iters", "4", "--val-images", "4"]) == 2
