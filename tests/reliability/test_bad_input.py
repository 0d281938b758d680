"""Bad input matrix: every case exits 2 with one line on stderr naming the file or key and the problem, prints no
traceback, and leaves every file and folder under the test's tmp dir as it was (nothing written or overwritten)."""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest
import torch
from PIL import Image

import tests.reliability.bad_files  # noqa: F401  (registers the cases of files' structure)
import tests.reliability.bad_images_and_models  # noqa: F401  (hostile checkpoints, test scales, images)
import tests.reliability.bad_outputs  # noqa: F401  (registers the cases of outputs and command-line flags)
import tests.reliability.bad_training  # noqa: F401  (registers the cases of trackers and the work-dir lock)
from segrank import build_model
from segrank.checkpoints import export_checkpoint
from segrank.config import ModelConfig, from_dict
from segrank.training import trackers
from tests.conftest import tiny_run_config
from tests.reliability.bad_destinations import FAULTS  # (and registers the cases of destinations)
from tests.reliability.bad_input import CASES, case, checkpoint, eval_args, eval_setup, run_cli_quiet, train_args
from tests.reliability.bad_training import TRACKER_PACKAGE_MISSING
from tests.reliability.common import folder_config, folder_dataset, run_cli, snapshot, write_config

# --- data files (read by segrank eval, with a worker process) -------------------------------------------------


@case
def truncated_jpeg(tmp):
    config, ckpt, root = eval_setup(tmp, workers=1)  # read in a DataLoader worker: still one line, no traceback
    jpeg = root / "images" / "img1.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    return eval_args(config, ckpt), "img1.jpg: cannot read image"


@case
def non_image_file(tmp):
    config, ckpt, root = eval_setup(tmp)
    (root / "images" / "img1.jpg").write_text("not a picture\n")
    return eval_args(config, ckpt), "img1.jpg: cannot read image"


@case
def label_of_wrong_size(tmp):
    config, ckpt, root = eval_setup(tmp)
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "labels" / "img1.png")
    return eval_args(config, ckpt), "img1.png: label size (30, 40) differs from image size (60, 80)"


@case
def rgb_label(tmp):
    config, ckpt, root = eval_setup(tmp)
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(root / "labels" / "img1.png")
    return eval_args(config, ckpt), "img1.png: label is a RGB colour image"


@case
def label_ids_outside_vocabulary(tmp):
    config, ckpt, root = eval_setup(tmp)
    label = np.array(Image.open(root / "labels" / "img1.png"))
    label[10:20, 10:20] = 9  # 6 classes, 255 = ignore
    Image.fromarray(label).save(root / "labels" / "img1.png")
    return eval_args(config, ckpt), "img1.png: 100 pixels with class ids outside the 6-class vocabulary"


@case
def empty_split(tmp):
    config, ckpt, root = eval_setup(tmp)
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("\n")
    return eval_args(config, ckpt), "split 'val' of dataset 'folder' has no images"


@case
def image_without_label(tmp):
    root = folder_dataset(tmp / "data")
    (root / "labels" / "img1.png").unlink()
    return train_args(tmp, folder_config(root)), "sample 'img1' has no label file"


@case
def missing_dataset_root(tmp):
    cfg = tiny_run_config(data={"dataset": "ade20k", "root": str(tmp / "ADEChallengeData2016"), "options": {}},
                      model={"num_classes": 150})
    return train_args(tmp, cfg), "ADEChallengeData2016: dataset root not found"


# --- configuration ---------------------------------------------------------------------------------------------


@case
def unknown_config_key(tmp):
    return train_args(tmp, tiny_run_config(), "--set", "train.max_iter=5"), \
        "train.max_iter: unknown key (did you mean 'max_iters'?)"


@case
def unknown_key_in_file(tmp):
    cfg = tiny_run_config()
    cfg["model"]["head"]["top_k"] = 3
    return train_args(tmp, cfg), "model.head.top_k: unknown key (did you mean 'topk'?)"


@case
def wrong_value_type(tmp):
    return train_args(tmp, tiny_run_config(), "--set", "train.lr=fast"), "train.lr: expected a number, got 'fast'"


@case
def crop_larger_than_any_image(tmp):
    return train_args(tmp, tiny_run_config(), "--set", "data.crop_size=[64,128]"), "data.crop_size"


@case
def topk_greater_than_classes(tmp):
    return train_args(tmp, tiny_run_config(), "--set", "model.head.topk=7"), \
        "model.head.topk: 7 must be in [1, num_classes=6]"


# --- configuration values: refused when the config is loaded, before the run or evaluation starts --------------


def bad_value(tmp, setting: str) -> list:
    return train_args(tmp, tiny_run_config(), "--set", setting)


@case
def batch_size_zero(tmp):
    return bad_value(tmp, "train.batch_size=0"), "train.batch_size: must be >= 1, got 0"


@case
def negative_batch_size(tmp):
    return bad_value(tmp, "train.batch_size=-4"), "train.batch_size: must be >= 1, got -4"


@case
def grad_accum_zero(tmp):
    return bad_value(tmp, "train.grad_accum=0"), "train.grad_accum: must be >= 1, got 0"


@case
def batch_not_divisible_by_accumulation(tmp):
    return bad_value(tmp, "train.grad_accum=3"), "train.batch_size: 2 is not divisible by grad_accum 3"


@case
def max_iters_zero(tmp):
    return bad_value(tmp, "train.max_iters=0"), "train.max_iters: must be >= 1, got 0"


@case
def negative_learning_rate(tmp):
    return bad_value(tmp, "train.lr=-1"), "train.lr: must be > 0, got -1.0"


@case
def nan_learning_rate(tmp):
    return bad_value(tmp, "train.lr=.nan"), "train.lr: must be a finite number, got nan"


@case
def min_lr_above_lr(tmp):
    return bad_value(tmp, "train.min_lr=0.1"), "train.min_lr: 0.1 is above train.lr 0.01"


@case
def negative_workers(tmp):
    return bad_value(tmp, "data.workers=-1"), "data.workers: must be >= 0, got -1"


@case
def reversed_ratio_range(tmp):
    return bad_value(tmp, "data.ratio_range=[1.5,0.75]"), \
        "data.ratio_range: must be (low, high) with low <= high, got [1.5, 0.75]"


@case
def crop_size_of_three_values(tmp):
    return bad_value(tmp, "data.crop_size=[32,32,3]"), "data.crop_size: expected 2 values, got 3"


@case
def zero_eval_stride(tmp):
    # Refused before training starts, not at the first evaluation after hours of training.
    return bad_value(tmp, "eval.stride=[0,0]"), "eval.stride: every value must be >= 1, got [0, 0]"


@case
def embed_dim_not_divisible_by_heads(tmp):
    return bad_value(tmp, "model.backbone.num_heads=3"), "model.backbone.embed_dim: 32 is not divisible by num_heads 3"


@case
def dropout_of_one(tmp):
    return bad_value(tmp, "model.head.dropout=1"), "model.head.dropout: must be in [0, 1), got 1.0"


@case
def oce_start_beyond_depth(tmp):
    return bad_value(tmp, "model.backbone.oce_start_layer=1"), "model.backbone.oce_start_layer: 1 is outside [0, 1)"


@case
def negative_loss_weight(tmp):
    return bad_value(tmp, "model.loss.image_loss_weight=-1"), \
        "model.loss.image_loss_weight: must be >= 0, got -1.0"


@case
def empty_config_file(tmp):
    (tmp / "empty.yaml").write_text("# nothing set yet\n")
    # train.max_iters=0 keeps a missing emptiness check from starting a full-size default run (the mutation check
    # breaks it): the file's own error must come first.
    return ["train", tmp / "empty.yaml", "--work-dir", tmp / "run", "--no-progress", "--set", "train.max_iters=0"], \
        "empty.yaml: empty config file"


@case
def eval_scale_zero(tmp):
    config, ckpt, _ = eval_setup(tmp)
    return [*eval_args(config, ckpt), "--set", "eval.ms_scales=[0.5,0]", "--ms-flip"], \
        "eval.ms_scales: every value must be > 0, got [0.5, 0.0]"


@case
def config_show_of_bad_value(tmp):
    return ["config", "show", write_config(tmp / "train.yaml", tiny_run_config()), "--set", "train.seed=-1"], \
        "train.seed: must be in [0, 4294967295], got -1"


# --- checkpoints -----------------------------------------------------------------------------------------------


@case
def checkpoint_of_other_class_count(tmp):
    config, _, _ = eval_setup(tmp)
    ckpt = checkpoint(tmp / "other.safetensors", tiny_run_config(), num_classes=5)
    return eval_args(config, ckpt), "other.safetensors: model has 5 classes, dataset 'folder' has 6"


@case
def checkpoint_of_other_architecture(tmp):
    config, _, _ = eval_setup(tmp)
    cfg = tiny_run_config()
    ckpt = checkpoint(tmp / "deeper.safetensors", cfg, backbone={**cfg["model"]["backbone"], "depth": 2})
    return [*eval_args(config, ckpt), "--use-config-model"], "deeper.safetensors: does not fit the architecture"


@case
def truncated_safetensors(tmp):
    ckpt = checkpoint(tmp / "model.safetensors", tiny_run_config())
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return ["info", ckpt], "model.safetensors: not a valid .safetensors file"


@case
def truncated_pth(tmp):
    cfg = tiny_run_config()
    torch.manual_seed(0)
    pth = export_checkpoint(build_model(from_dict(ModelConfig, cfg["model"])), tmp / "mmseg.pth", "mmseg")
    pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    return ["convert", pth, "--out", tmp / "converted.safetensors"], "mmseg.pth: not a loadable checkpoint"


@case
def non_checkpoint_file(tmp):
    notes = tmp / "notes.pth"
    notes.write_text("these are my notes\n")
    return ["info", notes], "notes.pth: a text file, not a checkpoint (it starts with 'these are my notes')"


@case
def training_state_given_as_checkpoint(tmp):
    state = tmp / "iter_0000004.state.pt"
    torch.save({"step": 4, "seed": 0, "optimizer": {"state": {}, "param_groups": []}, "scaler": {}}, state)
    return ["info", state], "iter_0000004.state.pt: a segrank training state (optimizer state and step, read by " \
                            "train --resume), not model weights; the weights are in iter_0000004.safetensors beside it"


@case
def image_folder_given_as_checkpoint(tmp):
    _, _, root = eval_setup(tmp)
    return ["predict", root / "images", root / "images", "--out", tmp / "pred", "--no-progress"], \
        "images: not a checkpoint folder (expected config.json + model.safetensors (save_pretrained)"


@case
def photo_given_as_checkpoint(tmp):
    _, _, root = eval_setup(tmp)
    return ["convert", root / "images" / "img0.jpg", "--out", tmp / "converted.safetensors"], \
        "img0.jpg: a JPEG image, not a checkpoint"


@case
def predict_std_zero(tmp):
    _, ckpt, root = eval_setup(tmp)
    return ["predict", ckpt, root / "images", "--out", tmp / "pred", "--std", "0", "0", "0", "--no-progress"], \
        "argument --std: must be > 0, got 0"  # the flag's type; Predictor(std=...) checks again (test_predictor)


@case
def predict_img_scale_zero(tmp):
    _, ckpt, root = eval_setup(tmp)
    return ["predict", ckpt, root / "images", "--out", tmp / "pred", "--img-scale", "0", "0", "--no-progress"], \
        "argument --img-scale: must be >= 1, got 0"


@case
def serve_without_a_checkpoint(tmp):
    (tmp / "notes.txt").write_text("not a model\n")
    return ["serve", tmp / "notes.txt", "--port", "0"], "notes.txt: a text file, not a checkpoint"


@case
def convert_into_a_non_empty_folder(tmp):
    _, ckpt, _ = eval_setup(tmp)
    (tmp / "hf").mkdir()
    (tmp / "hf" / "keep.txt").write_text("mine\n")
    return ["convert", ckpt, "--out", tmp / "hf"], "hf: already exists and holds other files (keep.txt)"


@case
def resume_checkpoint_of_other_architecture(tmp):
    """A work dir whose latest training checkpoint holds weights of another depth (a file copied by hand)."""
    cfg = tiny_run_config(train={"max_iters": 2, "checkpoint_interval": 1})
    args = train_args(tmp, cfg)
    assert run_cli_quiet(args) == 0
    ckpt_dir = tmp / "run" / "checkpoints"
    other = tiny_run_config()
    checkpoint(ckpt_dir / "iter_0000002.safetensors", other, backbone={**other["model"]["backbone"], "depth": 2})
    return [*args, "--resume", "--set", "train.max_iters=2"], "iter_0000002.safetensors: does not fit the architecture"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name, tmp_path, capsys, monkeypatch):
    args, expected = CASES[name](tmp_path)
    if name == "not_enough_disk_space":
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1024))
    if name in FAULTS:  # a disk that fails during the writes
        FAULTS[name](monkeypatch)
    if name == TRACKER_PACKAGE_MISSING:
        monkeypatch.setattr(trackers, "installed", lambda tracker: tracker != "wandb")
    if os.geteuid() == 0:  # root may write anywhere: answer os.access from the owner's mode bits, as for a user
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: access(path, mode, **kw) and not (
            mode & os.W_OK and not os.stat(path).st_mode & stat.S_IWUSR))
    before = snapshot(tmp_path)
    code, out, err = run_cli(args, capsys)
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err + out
    command = args[:2] if args[0] in ("datasets", "benchmark", "export", "config") else args[:1]
    assert lines[0].startswith(f"segrank {' '.join(command)}: error: "), lines[0]  # e.g. "segrank datasets check"
    assert expected in lines[0]
    assert snapshot(tmp_path) == before


def test_matrix_is_complete():
    assert len(CASES) >= 109
