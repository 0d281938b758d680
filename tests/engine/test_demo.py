"""``segrank demo`` at a reduced budget: both runs train, evaluate, and the report holds both mIoUs and its charts."""

from __future__ import annotations

import re

from segrank.cli import main


def test_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--iters", "4", "--val-images", "4"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    text = (out / "report.md").read_text()
    rows = {name: re.search(rf"^\| {re.escape(name)} \| [\d.]+ M \| ([\d.]+) \|", text, re.M)
            for name in ("Segmenter", "Segmenter + RankSeg")}
    assert all(rows.values()), text
    assert all(0 <= float(m.group(1)) <= 100 for m in rows.values())
    assert re.search(r"\| [\d.]+ % \(k=\d+\) \|", text)  # RankSeg's image-level recall@k
    for name in ("loss_curves.png", "miou_curves.png", "per_class_iou.png", "predictions.png"):
        assert (out / name).stat().st_size > 1000, name
        assert f"({name})" in text
    assert (out / "segmenter" / "log.jsonl").is_file() and (out / "rankseg" / "config.yaml").is_file()
    # A second run refuses to overwrite the report.
    assert main(["demo", "--out", str(out), "--iters", "4", "--val-images", "4"]) == 2
