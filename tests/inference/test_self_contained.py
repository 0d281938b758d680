"""A checkpoint carries its test settings: ``segrank predict`` gives the same files from the training run's work dir,
from a copy of the checkpoint alone (the run deleted), from a run whose folder dataset moved, and through
``segrank.Predictor``; an old checkpoint without stored settings still loads, with its defaults announced once."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

import segrank
from segrank import files
from segrank.checkpoints import export_checkpoint
from segrank.cli import main
from segrank.data import dataset_info
from segrank.data.info import IMAGENET_MEAN
from tests.conftest import tiny_run_config
from tests.reliability.common import folder_config, folder_dataset, run_cli, voc_photo, write_config

# Test settings unlike the defaults an unknown checkpoint gets (mean/std 127.5, scale (2048, 512), the training crop
# as window): predictions that ignored the stored ones would differ.
SETTINGS = {"data": {"normalization": "imagenet", "img_scale": [48, 40]},
            "eval": {"mode": "slide", "crop_size": [24, 24], "stride": [16, 16]}}


def photos(folder):
    """Two photo crops of different sizes."""
    rgb, _ = voc_photo()
    folder.mkdir()
    Image.fromarray(rgb[100:150, 180:250]).save(folder / "street.png")
    Image.fromarray(rgb[200:260, 250:290]).save(folder / "corner.png")
    return folder


def train_run(tmp, cfg):
    cfg["train"] |= {"max_iters": 2, "checkpoint_interval": 1, "eval_interval": -1}
    args = ["train", write_config(tmp / "train.yaml", cfg), "--work-dir", tmp / "run", "--no-progress"]
    assert main([str(a) for a in args]) == 0
    return tmp / "run"


def predict_files(checkpoint, images, out, capsys, *extra):
    code, stdout, err = run_cli(["predict", checkpoint, images, "--out", out, "--no-progress", *extra], capsys)
    assert code == 0, err
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}, stdout


def strip_settings(path):
    """Rewrite a checkpoint as segrank wrote them before checkpoints carried their test settings."""
    sd, metadata = files.read_safetensors(path)
    metadata.pop("segrank_inference")
    save_file(sd, path, metadata=metadata)


def test_checkpoint_alone_predicts_as_in_its_work_dir(tmp_path, capsys):
    run = train_run(tmp_path, {**tiny_run_config(), **{k: {**tiny_run_config()[k], **v} for k, v in SETTINGS.items()}})
    images = photos(tmp_path / "photos")
    checkpoint = run / "checkpoints" / "iter_0000002.safetensors"
    in_run, stdout = predict_files(checkpoint, images, tmp_path / "in_run", capsys)
    assert "no setting stored" not in stdout
    assert {"street.png", "street.json", "corner_overlay.png"} <= set(in_run)
    assert predict_files(run, images, tmp_path / "from_work_dir", capsys)[0] == in_run

    # A checkpoint written before checkpoints carried settings, still in its run: the run's config.yaml is used.
    old_run = tmp_path / "old_run"
    shutil.copytree(run, old_run)
    strip_settings(old_run / "checkpoints" / checkpoint.name)
    old, stdout = predict_files(old_run, images, tmp_path / "old", capsys)
    assert old == in_run and "no setting stored" not in stdout

    # Only the file, elsewhere, and no run left on the machine: the same bytes, written by the CLI and by Predictor.
    alone = tmp_path / "elsewhere" / "model.safetensors"
    alone.parent.mkdir()
    shutil.copy(checkpoint, alone)
    stripped = tmp_path / "elsewhere" / "stripped.safetensors"
    shutil.copy(alone, stripped)
    shutil.rmtree(run)
    shutil.rmtree(old_run)
    moved, stdout = predict_files(alone, images, tmp_path / "moved", capsys)
    assert moved == in_run and "no setting stored" not in stdout
    predictor = segrank.Predictor(alone)
    for prediction in predictor(images):
        assert np.array_equal(prediction.label, np.array(Image.open(tmp_path / "in_run" / f"{prediction.name}.png")))
        assert prediction.class_names == dataset_info("synthetic", {"num_classes": 6}).classes

    # Without stored settings, alone: it still loads, the defaults are announced once (not once per image), and they
    # change the result, which is why a checkpoint must carry its own.
    strip_settings(stripped)
    defaults, stdout = predict_files(stripped, images, tmp_path / "defaults", capsys, "--batch-size", "128")
    assert stdout.count("no setting stored with the checkpoint, using normalisation mean/std (127.5") == 1
    assert stdout.count("test scale (2048, 512)") == 1 and stdout.count("sliding 32x32 windows") == 1
    assert defaults["street.json"] != in_run["street.json"]
    with pytest.warns(UserWarning, match="defaults are used: normalisation mean/std"):
        segrank.Predictor(stripped)


def test_folder_dataset_run_predicts_after_the_dataset_moved(tmp_path, capsys):
    root = folder_dataset(tmp_path / "data", count=2)
    cfg = folder_config(root)
    cfg["eval"] = {"mode": "slide", "crop_size": [32, 32], "stride": [24, 24]}
    run = train_run(tmp_path, cfg)
    images = photos(tmp_path / "photos")
    before, _ = predict_files(run, images, tmp_path / "before", capsys)
    root.rename(tmp_path / "moved_data")  # the run's config.yaml now names a folder that is gone
    after, stdout = predict_files(run, images, tmp_path / "after", capsys)
    assert after == before and "no setting stored" not in stdout
    ranking = (tmp_path / "after" / "street.json").read_text()
    assert '"name": "c0"' in ranking  # the class names of classes.yaml, from the checkpoint
    root = (tmp_path / "moved_data").rename(root)  # back, for an evaluation of the run's latest checkpoint
    for source in (run, segrank.save_pretrained(segrank.load_model(run), tmp_path / "hf")):
        code, out, err = run_cli(["eval", tmp_path / "train.yaml", source, "--out", tmp_path / "eval.json",
                                  "--no-progress", "--force"], capsys)
        assert code == 0 and "mIoU" in out, err
    code, _, err = run_cli(["eval", tmp_path / "train.yaml", run, "--no-progress"], capsys)
    assert code == 0 and (run / "checkpoints" / "iter_0000002.eval.json").is_file(), err


def test_convert_with_a_config_makes_a_backbone_self_contained(tmp_path, capsys):
    cfg = tiny_run_config(data={"normalization": "imagenet", "img_scale": [48, 40]}, eval={"mode": "whole"})
    model = segrank.build_model(cfg["model"])
    npz = export_checkpoint(model, tmp_path / "backbone.npz", "npz")
    config = write_config(tmp_path / "cfg.yaml", cfg)
    code, out, err = run_cli(["convert", "--from", "npz", npz, "--config", config, "--out", tmp_path / "m"], capsys)
    assert code == 0 and "test settings and class names from" in out, err
    loaded = segrank.load_model(tmp_path / "m")  # a save_pretrained folder: --out without .safetensors
    assert (loaded.inference.mean, loaded.inference.img_scale) == (IMAGENET_MEAN, (48, 40))
    assert loaded.inference.eval.mode == "whole"
    assert loaded.cfg.class_names == dataset_info("synthetic", {"num_classes": 6}).classes
    model_only = write_config(tmp_path / "model.yaml", {"model": cfg["model"]})
    code, out, err = run_cli(["convert", "--from", "npz", npz, "--config", model_only, "--out",
                              tmp_path / "bare.safetensors"], capsys)
    assert code == 0 and "records no mean, std, img_scale, eval" in out  # announced, and nothing invented
    assert segrank.load_model(tmp_path / "bare.safetensors").inference is None
