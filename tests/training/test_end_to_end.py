"""A model-zoo config end to end on a miniature ADE20K tree: train -> checkpoint -> eval -> predict, all via the CLI.

The tree is built in a temp dir from the three real ADE20K validation images in ../shared (used as both splits).
Only sizes are overridden; dataset, head type, top-k, loss and schedule shape are the config's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import segrank
from segrank.cli import main

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO.parent / "shared" / "data" / "ade20k_sample" / "ADEChallengeData2016"
CONFIG = REPO / "configs" / "ade20k" / "rankseg_vit-b16_512x512_160k.yaml"
TINY = [
    "model.backbone.embed_dim=64", "model.backbone.depth=2", "model.backbone.num_heads=2",
    "model.backbone.pos_embed_grid=[4,4]", "model.head.d_model=64", "model.head.n_heads=2", "model.head.d_ff=128",
    "model.head.topk=10", "model.head.downsample=2", "data.img_scale=[256,64]", "data.crop_size=[64,64]",
    "data.workers=0", "eval.crop_size=[64,64]", "eval.stride=[48,48]",
]


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory) -> Path:
    if not SAMPLE.is_dir():
        pytest.fail(f"{SAMPLE} is missing: CI has ../shared beside the checkout")
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        for split in ("training", "validation"):
            shutil.copytree(SAMPLE / kind / "validation", root / kind / split)
    return root


def test_rankseg_config_train_eval_predict(ade_root, tmp_path, capsys):
    work = tmp_path / "run"
    overrides = [*TINY, f"data.root={ade_root}", "train.pretrained=null", "train.max_iters=4",
                 "train.batch_size=2", "train.checkpoint_interval=2", "train.eval_interval=4", "train.log_interval=1"]
    args = ["train", str(CONFIG), "--work-dir", str(work), "--no-progress"]
    assert main([*args, *[a for o in overrides for a in ("--set", o)]]) == 0

    logs = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in logs if r["type"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    assert {"loss", "loss_seg", "loss_img", "pixel_acc", "pixel_recall", "image_recall", "image_precision",
            "lr"} <= set(logs[0])
    assert any(r["type"] == "eval" and 0.0 <= r["mIoU"] <= 1.0 for r in logs)
    checkpoints = sorted((work / "checkpoints").glob("*.safetensors"))
    assert len(checkpoints) == 2  # steps 2 and 4
    model = segrank.load_model(checkpoints[-1])
    assert model.cfg.num_classes == 150 and model.cfg.head.type == "rankseg" and model.cfg.head.topk == 10

    results = tmp_path / "eval.json"
    eval_args = ["eval", str(CONFIG), str(checkpoints[-1]), "--out", str(results), "--no-progress"]
    assert main([*eval_args, *[a for o in [*TINY, f"data.root={ade_root}"] for a in ("--set", o)]]) == 0
    metrics = json.loads(results.read_text())
    assert metrics["num_images"] == 3 and 0.0 <= metrics["mIoU"] <= 1.0 and 0.0 <= metrics["image_recall"] <= 1.0

    out = tmp_path / "pred"
    images = sorted((ade_root / "images" / "validation").glob("*.jpg"))
    assert main(["predict", str(checkpoints[-1]), *map(str, images), "--out", str(out), "--no-progress",
                 "--config", str(work / "config.yaml")]) == 0
    for image in images:
        label = np.asarray(Image.open(out / f"{image.stem}.png"))
        assert label.shape == np.asarray(Image.open(image)).shape[:2]
        assert label.max() < 150
        assert (out / f"{image.stem}_color.png").is_file() and (out / f"{image.stem}_overlay.png").is_file()
        assert json.loads((out / f"{image.stem}.json").read_text())  # RankSeg's image-level class ranking
