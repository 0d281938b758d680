"""Evaluation over datasets (metrics, image recall, oracle, sharding), ``segrank eval`` and ``segrank predict``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segrank import build_model
from segrank.checkpoints import save_model
from segrank.cli import main
from segrank.config import EvalConfig, ModelConfig
from segrank.evaluation.evaluate import evaluate
from segrank.evaluation.metrics import confusion_matrix, summarize
from segrank.inference.images import collect_inputs
from segrank.inference.windows import predict_image
from tests.conftest import tiny_model as tiny

NUM_CLASSES, IGNORE = 12, 255


def tiny_model(head: str = "rankseg", num_classes: int = NUM_CLASSES, seed: int = 0):
    return tiny(num_classes, {"type": head, "topk": 3, "downsample": 2, "n_layers": 2, "dropout": 0.0},
                {"pos_embed_grid": [2, 2], "drop_path_rate": 0.0}, seed=seed)


class Scenes(torch.utils.data.Dataset):
    """Items as segrank.data's eval items: test-size image, label at the original size (here 1.25x larger)."""

    def __init__(self, n: int = 3) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        label = torch.randint(0, NUM_CLASSES, (1, 1, 5, 6), generator=g).float()
        label = torch.nn.functional.interpolate(label, size=(50, 60), mode="nearest")[0, 0].long()
        label[:3] = IGNORE
        image = torch.randn(3, 40, 48, generator=g)
        return {"image": image, "label": label, "path": f"img{i}", "ori_size": (50, 60)}


def reference_evaluate(model, dataset, cfg):
    """Confusion-matrix metrics, per-image class recalls and per-image pixel recalls (labelled pixels whose class
    was selected)."""
    hist, recalls, pixel_recalls = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64), [], []
    for i in range(len(dataset)):
        item = dataset[i]
        label = item["label"]
        classes = torch.unique(label[label != IGNORE])
        present = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        present[classes] = True
        pred = predict_image(model, item["image"], label.shape, cfg, dense=True, probabilities=True,
                             present=present if model.needs_present_classes else None)
        hist += confusion_matrix(pred.probs.argmax(0), label, NUM_CLASSES, IGNORE)
        if pred.selected is not None:
            recalls.append(np.isin(classes.numpy(), pred.selected.numpy()).mean())
            labelled = label[label != IGNORE].numpy()
            pixel_recalls.append(np.isin(labelled, pred.selected.numpy()).mean())
    return summarize(hist), recalls, pixel_recalls


@pytest.mark.parametrize("head", ["rankseg", "segmenter", "rankseg_gt"])
def test_evaluate_matches_per_image_dense_reference(head):
    model = tiny_model(head)
    cfg = EvalConfig(mode="slide", crop_size=(32, 32), stride=(24, 24))
    dataset = Scenes()
    res = evaluate(model, dataset, cfg, num_classes=NUM_CLASSES, ignore_index=IGNORE, progress=False,
                   class_names=[f"c{i}" for i in range(NUM_CLASSES)])
    expected, recalls, pixel_recalls = reference_evaluate(model, dataset, cfg)
    assert res["mIoU"] == pytest.approx(expected["mIoU"]) and res["IoU"] == pytest.approx(expected["IoU"], nan_ok=True)
    assert res["aAcc"] == pytest.approx(expected["aAcc"]) and res["num_images"] == len(dataset)
    if head == "segmenter":
        assert "image_recall" not in res
    else:
        assert res["image_recall"] == pytest.approx(float(np.mean(recalls)))
        assert res["pixel_recall"] == pytest.approx(float(np.mean(pixel_recalls)))
    if head == "rankseg_gt":
        assert res["image_recall"] == res["pixel_recall"] == 1.0  # the oracle receives every label class


def test_evaluate_shards_across_processes(tmp_path):
    """Two gloo processes each evaluate half the images; the all-reduced result equals one process."""
    import torch.multiprocessing as mp

    model = tiny_model("rankseg", seed=3)
    cfg = EvalConfig(mode="whole")
    single = evaluate(model, Scenes(3), cfg, num_classes=NUM_CLASSES, ignore_index=IGNORE, progress=False)
    mp.spawn(_shard_worker, args=(str(tmp_path), model.state_dict(), model.cfg), nprocs=2)
    for rank in range(2):
        res = json.loads((tmp_path / f"{rank}.json").read_text())
        assert res["mIoU"] == pytest.approx(single["mIoU"]) and res["aAcc"] == pytest.approx(single["aAcc"])
        assert res["image_recall"] == pytest.approx(single["image_recall"])


def _shard_worker(rank: int, folder: str, state_dict: dict, model_cfg: ModelConfig) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        model = build_model(model_cfg).eval()
        model.load_state_dict(state_dict)
        res = evaluate(model, Scenes(3), EvalConfig(mode="whole"), num_classes=NUM_CLASSES, ignore_index=IGNORE,
                       progress=False)
        with open(f"{folder}/{rank}.json", "w") as f:
            json.dump({k: res[k] for k in ("mIoU", "aAcc", "image_recall")}, f)
    finally:
        dist.destroy_process_group()


def synthetic_config(tmp_path, num_classes=NUM_CLASSES):
    cfg = {"data": {"dataset": "synthetic", "img_scale": [48, 40], "workers": 0,
                    "options": {"num_classes": num_classes, "image_size": 40, "train_images": 2, "val_images": 3}},
           "eval": {"mode": "slide", "crop_size": [32, 32], "stride": [24, 24], "ms_scales": [0.75, 1.0]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_eval_cli_writes_json_and_table(tmp_path, capsys):
    ckpt = save_model(tiny_model(), tmp_path / "model.safetensors")
    config = synthetic_config(tmp_path)
    out = tmp_path / "res.json"
    assert main(["eval", str(config), str(ckpt), "--ms-flip", "--out", str(out), "--no-progress", "--per-class"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert 0 <= res["mIoU"] <= 1 and 0 <= res["image_recall"] <= 1 and res["num_images"] == 3 and res["ms_flip"]
    assert len(res["IoU"]) == NUM_CLASSES and "mIoU" in printed and res["class_names"][0] in printed
    # GT-oracle evaluation: every window receives all label classes; other models cannot do it.
    oracle = save_model(tiny_model("rankseg_gt"), tmp_path / "oracle.safetensors")
    assert main(["eval", str(config), str(oracle), "--oracle", "--out", str(out), "--no-progress", "--force"]) == 0
    assert json.loads(out.read_text())["image_recall"] == 1.0
    assert main(["eval", str(config), str(ckpt), "--oracle", "--out", str(out), "--no-progress", "--force"]) == 2
    assert "has a 'rankseg' head; GT-oracle evaluation needs" in capsys.readouterr().err
    # A model whose class count does not match the dataset is refused with one line.
    other = save_model(tiny_model(num_classes=7), tmp_path / "other.safetensors")
    assert main(["eval", str(config), str(other), "--out", str(out), "--force"]) == 2
    assert "7 classes" in capsys.readouterr().err


def write_images(folder, sizes):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return sorted(folder.iterdir())


def test_predict_cli_outputs(tmp_path, capsys):
    images = write_images(tmp_path / "in", [(30, 50), (45, 40)])
    ckpt = save_model(tiny_model(), tmp_path / "model.safetensors")
    out = tmp_path / "out"
    args = ["predict", str(ckpt), str(tmp_path / "in"), "--out", str(out), "--img-scale", "48", "40",
            "--mean", "127", "127", "127", "--std", "60", "60", "60", "--no-progress"]
    assert main(args) == 0
    assert "2 images" in capsys.readouterr().out
    for path in images:
        label = np.array(Image.open(out / f"{path.stem}.png"))
        rgb = np.array(Image.open(path))
        assert label.dtype == np.uint8 and label.shape == rgb.shape[:2] and label.max() < NUM_CLASSES
        assert np.array(Image.open(out / f"{path.stem}_color.png")).shape == (*rgb.shape[:2], 3)
        assert np.array(Image.open(out / f"{path.stem}_overlay.png")).shape == (*rgb.shape[:2], 3)
        record = json.loads((out / f"{path.stem}.json").read_text())
        scores = [r["score"] for r in record["ranking"]]
        assert len(scores) == NUM_CLASSES and scores == sorted(scores, reverse=True)
        assert set(np.unique(label)) <= set(record["selected_classes"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_predict_16bit_labels_whole_mode_ms_flip(tmp_path):
    images = write_images(tmp_path / "in", [(20, 36)])
    ckpt = save_model(tiny_model("segmenter", num_classes=300), tmp_path / "big.safetensors")
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(tmp_path / "in" / "*.png"), "--out", str(out), "--whole",
                 "--ms-flip", "--img-scale", "48", "32", "--no-progress"]) == 0
    label = np.array(Image.open(out / f"{images[0].stem}.png"))
    assert label.dtype == np.uint16 and label.shape == (20, 36)
    assert not (out / f"{images[0].stem}.json").exists()  # no ranking for a dense Segmenter


def test_predict_bad_inputs(tmp_path, capsys):
    ckpt = save_model(tiny_model(), tmp_path / "model.safetensors")
    write_images(tmp_path / "in", [(20, 20)])
    (tmp_path / "file").write_text("x")
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    cases = {
        "no such file": [str(tmp_path / "missing.png")],
        "no images": [str(tmp_path / "empty")],
        "matches no file": [str(tmp_path / "*.jpg")],
        "cannot read image": [str(tmp_path / "broken.png")],
    }
    for message, inputs in cases.items():
        assert main(["predict", str(ckpt), *inputs, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["predict", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_collect_inputs_collapses_duplicates(tmp_path):
    """(Inputs whose outputs would collide: the bad-input matrix, tests/reliability/bad_destinations.py.)"""
    a, b = write_images(tmp_path / "a", [(8, 8)]), write_images(tmp_path / "b", [(8, 8)])
    assert collect_inputs([str(a[0]), str(a[0])]) == a
    assert collect_inputs([str(a[0]), str(tmp_path / "a"), str(b[0])]) == [*a, *b]


def test_settings_from_mmseg_checkpoint_and_flags():
    from segrank.checkpoints import load_model
    from segrank.inference.settings import SettingsOverrides, resolve_settings
    from tests.parity.common import folder as fixture

    path = fixture("full_model_mmseg") / "rankseg.pth"
    model = load_model(path, format="mmseg")
    settings = resolve_settings(model, path)
    assert settings.eval.mode == "whole"  # the stored config's model.test_cfg
    assert settings.class_names == model.cfg.class_names and len(settings.palette) == model.num_classes
    assert any("mean/std" in note for note in settings.notes)  # no img_norm_cfg stored: the default, announced
    overrides = SettingsOverrides(mean=[1, 2, 3], std=[4, 5, 6], img_scale=[64, 32])
    settings = resolve_settings(model, path, overrides=overrides)
    assert (settings.mean, settings.std, settings.img_scale) == ((1, 2, 3), (4, 5, 6), (64, 32))
    assert not any("mean/std" in note for note in settings.notes)
