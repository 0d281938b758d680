"""``segrank benchmark learn`` at a tiny budget: every head trains in its own process and is recorded with its
curves (against iterations and training seconds), time to accuracy, timing and memory; the equal-wall-clock
Segmenter gets the iterations RankSeg's time bought; seeds give a spread; ``--tune`` searches the same grid for every
head on the tune split and trains each with its selection; ``--json`` prints one JSON object per line."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from segrank.cli import build_parser, main
from segrank.cli.run.benchmark import learn_plan
from segrank.errors import SegrankError
from segrank.experiments.curves import time_to_miou, training_seconds_at
from segrank.experiments.learn import LONG_ITERS, LearnPlan, run_learn
from segrank.experiments.recipe import HEAD_SETTINGS, HEADS, Setup, head_config, regime_for
from segrank.models.segmentor import Segmentor
from segrank.reporting import plots as report


def test_learn_records_every_head(tmp_path):
    plan = LearnPlan([40], [0, 1], iters=3, pretrain_iters=2, val_images=3, threads=1, image_prior_prob=0.01,
                     image_loss_weight=2.0, data_options={"max_classes": 4, "train_images": 100}, precision="fp32")
    result = run_learn(plan, work_dir=tmp_path / "runs")
    json.dumps(result)  # plain JSON types only
    assert [c["seed"] for c in result["cases"]] == [0, 1]
    case = result["cases"][0]
    heads = case["heads"]
    assert list(heads) == ["segmenter", "rankseg", "rankseg_gt", "segmenter_equal_time"]
    ratio = heads["rankseg"]["s_per_iter"] / heads["segmenter"]["s_per_iter"]
    assert heads["segmenter_equal_time"]["iters"] == max(1, round(3 * ratio))
    for name, run in heads.items():
        assert 0 <= run["mIoU"] <= 1 and 0 <= run["aAcc"] <= 1, name
        assert run["s_per_iter"] > 0 and run["peak_memory_mb"] >= run["memory_before_training_mb"] > 0
        assert [r["step"] for r in run["eval_curve"]] == list(range(1, run["iters"] + 1))  # one evaluation per step
        seconds = [r["train_seconds"] for r in run["eval_curve"]]
        assert all(0 < a < b for a, b in zip(seconds, seconds[1:], strict=False)), name
        assert set(run["time_to_miou"]) == {"5", "10", "20"}
    rank = heads["rankseg"]
    assert 0 <= rank["image_recall"] <= 1 and 0 <= rank["pixel_recall"] <= 1
    assert all("image_recall" in r and "pixel_recall" in r for r in rank["train_curve"])
    assert heads["rankseg_gt"]["image_recall"] == 1.0 and "image_recall" not in heads["segmenter"]
    summary = result["summary"]["40"]
    per_seed = [c["heads"]["rankseg"]["mIoU"] for c in result["cases"]]
    spread = summary["mIoU_spread"]["rankseg"]
    assert spread["min"] == min(per_seed) and spread["max"] == max(per_seed)
    assert math.isclose(spread["std"], abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
    assert summary["regime"]["name"] == "small" and summary["regime"]["topk"] == 30
    assert result["settings"]["head_settings"] == HEAD_SETTINGS
    # The options reached the RankSeg run's config.
    cfg = yaml.safe_load((tmp_path / "runs" / "n40_seed0" / "rankseg" / "config.yaml").read_text())
    assert cfg["model"]["head"]["image_prior_prob"] == 0.01 and cfg["model"]["loss"]["image_loss_weight"] == 2.0
    assert cfg["data"]["options"]["max_classes"] == 4 and cfg["data"]["options"]["train_images"] == 100
    stage1 = yaml.safe_load((tmp_path / "runs" / "n40_seed0" / "backbone" / "config.yaml").read_text())
    assert cfg["train"]["precision"] == "fp32" and stage1["train"]["precision"] == "fp32"
    # Stage 1 trained on classes 40.. (disjoint from the 40 targets).
    assert (tmp_path / "runs" / "n40_seed0" / "backbone" / "backbone.safetensors").is_file()
    for x in ("step", "train_seconds"):
        assert report.learning_curves(case, tmp_path / f"curves_{x}.png", 30, x=x).stat().st_size > 1000


def test_tune_searches_one_grid_and_json_lines(capsys):
    assert main(["benchmark", "learn", "--classes", "40", "--iters", "2", "--pretrain-iters", "2", "--val-images",
                 "2", "--threads", "1", "--tune", "--tune-iters", "1", "--tune-lrs", "1e-3",
                 "--tune-decoder-mults", "1,3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # every line is one JSON object
    kinds = [line["type"] for line in lines]
    assert kinds == ["grid_point"] * 6 + ["head"] * 4 + ["summary"]
    grid = {head: {(p["lr"], p["decoder_lr_mult"]) for p in lines if p["type"] == "grid_point" and p["head"] == head}
            for head in HEADS}
    assert all(points == {(1e-3, 1.0), (1e-3, 3.0)} for points in grid.values())  # the same grid for every head
    selected = lines[-1]["selected"]["40"]
    for head in HEADS:
        best = max((p for p in lines if p["type"] == "grid_point" and p["head"] == head), key=lambda p: p["tune_mIoU"])
        assert selected[head] == {"lr": best["lr"], "decoder_lr_mult": best["decoder_lr_mult"]}
    assert lines[-1]["settings"]["head_settings_source"].startswith("selected by this run's --tune")


def test_probe_mode(capsys):
    assert main(["benchmark", "learn", "--classes", "40", "--seeds", "0", "--pretrain-iters", "2", "--val-images",
                 "4", "--train-images", "70", "--threads", "1", "--probe", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["type"] for line in lines] == ["probe", "summary"]
    probe = lines[0]
    assert probe["train_images"] == 70 and probe["val_images"] == 4 and 0 <= probe["image_recall"] <= 1
    assert probe["chance"] == 30 / 40 and len(probe["curve"]) >= 2
    assert lines[1]["summary"]["40"]["probe_image_recall"]["mean"] == probe["image_recall"]


def test_heads_flag_trains_only_those_heads(tmp_path, capsys):
    assert main(["benchmark", "learn", "--classes", "40", "--iters", "2", "--pretrain-iters", "2", "--val-images",
                 "2", "--threads", "1", "--heads", "rankseg", "--plots", str(tmp_path), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["type"], line.get("head")) for line in lines] == [("head", "rankseg"), ("summary", None)]
    summary = lines[-1]["summary"]["40"]
    assert set(summary["mIoU"]) == {"rankseg"} and "rankseg_image_recall" in summary
    assert "rankseg_minus_segmenter_equal_wall_clock" not in summary  # no Segmenter run to compare with
    assert (tmp_path / "learn_n40_seed0.png").stat().st_size > 1000
    assert main(["benchmark", "learn", "--heads", "rankseg,segmentr"]) == 2
    assert "--heads: expected comma-separated heads among segmenter, rankseg, rankseg_gt" in capsys.readouterr().err


def test_precision_flag_reaches_the_plan():
    assert learn_plan(build_parser().parse_args(["benchmark", "learn", "--precision", "bf16"])).precision == "bf16"
    assert learn_plan(build_parser().parse_args(["benchmark", "learn"])).precision == "auto"


def test_regimes():
    assert regime_for("auto", 150).name == "small"
    for n, weight in ((847, 100.0), (1284, 300.0)):
        regime = regime_for("auto", n)
        assert (regime.topk, regime.image_loss_weight, regime.image_reduction) == (100, weight, "mean")
        cfg = head_config("rankseg", n, 0, 10, 2, None, setup=LearnPlan([n], [0]).setup(n))
        assert cfg.model.head.topk == 100 and cfg.model.head.downsample is None
        assert cfg.model.loss.image_loss_weight == weight and cfg.model.loss.image_reduction == "mean"
    assert regime_for("reference", 847, topk=30).topk == 30
    with pytest.raises(SegrankError, match="reference has many-class settings"):
        regime_for("reference", 150)
    plan = learn_plan(build_parser().parse_args(["benchmark", "learn", "--long", "--classes", "847"]))
    assert plan.iters == LONG_ITERS and plan.evals > 6


def test_prior_probability_init():
    cfg = head_config("rankseg", 40, 0, 10, 2, None, setup=Setup(image_prior_prob=0.01))
    bias = Segmentor(cfg.model).decode_head.ml_fc.b.detach()
    assert bias.allclose(bias.new_full((1, 40), math.log(0.01 / 0.99)))
    default = Segmentor(head_config("rankseg", 40, 0, 10, 2, None).model).decode_head.ml_fc.b.detach()
    assert default.std() > 0  # the reference's uniform init otherwise


def test_curve_helpers():
    train = [{"step": 2, "time_s": 1.0}, {"step": 4, "time_s": 3.0}]
    assert training_seconds_at(train, 2) == 2.0 and training_seconds_at(train, 3) == 5.0
    assert training_seconds_at(train, 4) == 8.0
    curve = [{"step": 1, "mIoU": 0.04, "train_seconds": 1.0}, {"step": 2, "mIoU": 0.12, "train_seconds": 2.0}]
    assert time_to_miou(curve) == {"5": {"step": 2, "seconds": 2.0}, "10": {"step": 2, "seconds": 2.0}, "20": None}


def test_learn_rejects_bad_input(tmp_path, capsys):
    assert main(["benchmark", "learn", "--classes", "150,10"]) == 2
    assert "segrank benchmark learn: error: --classes: every N must be >= 30" in capsys.readouterr().err
    assert main(["benchmark", "learn", "--classes", "150", "--regime", "reference"]) == 2
    assert "--regime reference: the reference has many-class settings for N in [847, 1284]" in \
        capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["benchmark", "learn", "--plots", str(tmp_path / "file" / "plots")]) == 2
    assert "cannot create the plots folder" in capsys.readouterr().err
    assert main(["benchmark", "learn", "--iters", "0"]) == 2  # argparse errors are one line too
    assert "--iters: must be >= 1" in capsys.readouterr().err
