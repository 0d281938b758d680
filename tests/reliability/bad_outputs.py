"""Bad-input cases of the outputs (every command checks its destinations before it starts the work) and of the
command-line flags (every numeric flag has a type that refuses out-of-range and non-finite values)."""

from __future__ import annotations

import torch

from segrank import build_model
from segrank.checkpoints import export_checkpoint
from segrank.config import ModelConfig, from_dict
from tests.conftest import tiny_run_config
from tests.reliability.bad_input import CASES, case, eval_args, eval_setup, read_only, train_args
from tests.reliability.common import write_config

# --- outputs ---------------------------------------------------------------------------------------------------


@case
def unwritable_work_dir(tmp):
    (tmp / "a_file").write_text("")
    return ["train", write_config(tmp / "train.yaml", tiny_run_config()), "--work-dir", tmp / "a_file" / "run",
            "--no-progress"], "a_file/run: cannot be created, "


@case
def existing_work_dir_without_resume(tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "notes.txt").write_text("an earlier run\n")
    return train_args(tmp, tiny_run_config()), "run: work directory exists and is not empty (pass --resume"


@case
def predict_output_is_a_file(tmp):
    _, ckpt, root = eval_setup(tmp)
    (tmp / "out").write_text("")
    return ["predict", ckpt, root / "images", "--out", tmp / "out", "--no-progress"], "out: exists and is not a folder"


@case
def not_enough_disk_space(tmp):
    """The run's first checkpoint would not fit (disk_usage reports 1 KiB free): refused before anything is written."""
    return train_args(tmp, tiny_run_config()), "MiB free, a checkpoint needs"


@case
def eval_out_under_a_file(tmp):
    config, ckpt, _ = eval_setup(tmp)
    (tmp / "a_file").write_text("")
    return [*eval_args(config, ckpt), "--out", tmp / "a_file" / "results.json"], "results.json: cannot be created, "


@case
def eval_out_is_a_folder(tmp):
    config, ckpt, _ = eval_setup(tmp)
    (tmp / "results.json").mkdir()
    return eval_args(config, ckpt), "results.json: is a folder, expected a file name"


@case
def eval_chart_path_is_a_folder(tmp):
    """Every output eval writes beside its JSON is checked before the evaluation, not only the JSON."""
    config, ckpt, _ = eval_setup(tmp)
    (tmp / "results.confusion.png").mkdir()
    return eval_args(config, ckpt), "results.confusion.png: is a folder, expected a file name"


@case
def eval_out_in_read_only_folder(tmp):
    config, ckpt, _ = eval_setup(tmp)
    return [*eval_args(config, ckpt), "--out", read_only(tmp / "ro") / "r.json"], "ro/r.json: cannot write, "


@case
def predict_out_in_read_only_folder(tmp):
    _, ckpt, root = eval_setup(tmp)
    return ["predict", ckpt, root / "images", "--out", read_only(tmp / "ro") / "pred", "--no-progress"], \
        "ro/pred: cannot write, "


@case
def convert_out_in_read_only_folder(tmp):
    cfg = tiny_run_config()
    torch.manual_seed(0)
    pth = export_checkpoint(build_model(from_dict(ModelConfig, cfg["model"])), tmp / "mmseg.pth", "mmseg")
    return ["convert", pth, "--out", read_only(tmp / "ro") / "m.safetensors"], "ro/m.safetensors: cannot write, "


@case
def export_out_in_read_only_folder(tmp):
    _, ckpt, _ = eval_setup(tmp)
    return ["export", "onnx", ckpt, "--out", read_only(tmp / "ro") / "m.onnx"], "ro/m.onnx: cannot write, "


@case
def train_work_dir_in_read_only_folder(tmp):
    return ["train", write_config(tmp / "train.yaml", tiny_run_config()), "--work-dir", read_only(tmp / "ro") / "run",
            "--no-progress"], "ro/run: cannot write, "


@case
def demo_out_under_a_file(tmp):
    (tmp / "a_file").write_text("")
    return ["demo", "--out", tmp / "a_file" / "report", "--iters", "1"], "a_file/report: cannot be created, "


@case
def prepare_dst_under_a_file(tmp):
    (tmp / "release").mkdir()
    (tmp / "a_file").write_text("")
    return ["datasets", "prepare", "coco_stuff10k", tmp / "release", tmp / "a_file" / "out"], \
        "a_file/out: cannot be created, "


# --- command-line flags ----------------------------------------------------------------------------------------


@case
def eval_set_model_value_the_checkpoint_contradicts(tmp):
    config, ckpt, _ = eval_setup(tmp)
    return [*eval_args(config, ckpt), "--set", "model.head.topk=2"], \
        "--set model.head.topk=2: the checkpoint's model has model.head.topk = 3"


@case
def oracle_flag_on_model_without_oracle_head(tmp):
    config, ckpt, _ = eval_setup(tmp)
    return [*eval_args(config, ckpt), "--oracle"], \
        "--oracle: " + str(ckpt) + " has a 'rankseg' head; GT-oracle evaluation needs a model whose head type is"


# Refused by the flag's type, before the command runs: (arguments, with {t} for the tmp dir; expected text).
FLAG_CASES = {
    "predict_mean_nan": ("predict {t}/m.safetensors {t}/a.jpg --out {t}/o --mean nan 0 0",
                         "argument --mean: expected a finite number, got 'nan'"),
    "predict_without_out": ("predict {t}/m.safetensors {t}/a.jpg", "the following arguments are required: --out"),
    "eval_batch_size_zero": ("eval {t}/c.yaml {t}/m.safetensors --batch-size 0",
                             "argument --batch-size: must be >= 1, got 0"),
    "info_size_not_a_number": ("info {t}/m.safetensors --size 512 x", "argument --size: expected an integer, got 'x'"),
    "demo_negative_seed": ("demo --out {t}/d --seed -1", "argument --seed: must be >= 0, got -1"),
    "check_top_zero": ("datasets check ade20k {t}/ade --top 0", "argument --top: must be >= 1, got 0"),
    "benchmark_zero_classes": ("benchmark forward --classes 0,150", "argument --classes: must be >= 1, got 0"),
    "benchmark_image_size_one_value": ("benchmark eval-memory --image-size 32",
                                       "argument --image-size: expected 2 comma-separated integers, got '32'"),
    "benchmark_negative_workers": ("benchmark data --workers -1", "argument --workers: must be >= 0, got -1"),
    "train_unknown_flag": ("train {t}/c.yaml --max-iters 5", "unrecognized arguments: --max-iters 5"),
    "export_tol_zero": ("export onnx {t}/m.safetensors --out {t}/m.onnx --tol 0", "argument --tol: must be > 0, got 0"),
    "serve_port_out_of_range": ("serve {t}/m.safetensors --port 70000", "argument --port: must be <= 65535, got 70000"),
    "serve_upload_limit_inf": ("serve {t}/m.safetensors --max-upload-mb inf",
                               "argument --max-upload-mb: expected a finite number, got 'inf'"),
}
for _name, (_line, _expected) in FLAG_CASES.items():
    assert _name not in CASES, _name
    CASES[_name] = lambda tmp, line=_line, expected=_expected: (line.format(t=tmp).split(), expected)
