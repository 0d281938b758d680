"""Bad-input cases of destinations: no output replaces an input (even with --force) or an existing file (without
--force), the outputs are checked as a set before anything is written, and a disk that fails during the writes is
one line that names the file. ``FAULTS``: the cases that run with a failing disk (test_bad_input.py applies them
after the case's setup)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segrank import files, load_model, save_pretrained
from tests.reliability.bad_input import case, eval_args, eval_setup, read_only

# --- eval: the checkpoint, the config and the dataset are never outputs ------------------------------------------


@case
def eval_out_is_the_checkpoint(tmp):
    config, ckpt, _ = eval_setup(tmp)
    return [*eval_args(config, ckpt), "--out", ckpt, "--force"], \
        "model.safetensors: is an input of this command; an output never replaces an input, even with --force"


@case
def eval_out_is_the_config(tmp):
    config, ckpt, _ = eval_setup(tmp)
    return [*eval_args(config, ckpt), "--out", config, "--force"], "cfg.yaml: is an input of this command"


@case
def eval_out_is_a_hard_link_to_the_checkpoint(tmp):
    config, ckpt, _ = eval_setup(tmp)
    os.link(ckpt, tmp / "results.json")
    return [*eval_args(config, ckpt), "--force"], "results.json: is the same file as the input"


@case
def eval_out_is_an_image_of_the_dataset(tmp):
    config, ckpt, root = eval_setup(tmp)
    return [*eval_args(config, ckpt), "--out", root / "images" / "img0.jpg", "--force"], \
        f"images: is inside the input folder {root} of this command"


@case
def eval_out_exists_without_force(tmp):
    config, ckpt, _ = eval_setup(tmp)
    (tmp / "results.json").write_text('{"mIoU": 0.5}\n')
    return eval_args(config, ckpt), "results.json: already exists (use --force to overwrite)"


@case
def eval_chart_of_an_earlier_run_without_force(tmp):
    """Each of the files eval writes beside its JSON is checked, not only the JSON."""
    config, ckpt, _ = eval_setup(tmp)
    (tmp / "results.confusion.png").write_bytes(b"an earlier chart")
    return eval_args(config, ckpt), "results.confusion.png: already exists (use --force to overwrite)"


@case
def eval_default_out_exists_without_force(tmp):
    config, ckpt, _ = eval_setup(tmp)
    (tmp / "model.eval.json").write_text('{"mIoU": 0.5}\n')
    return ["eval", config, ckpt, "--no-progress"], "model.eval.json: already exists"


@case
def eval_out_exists_in_read_only_folder_with_force(tmp):
    config, ckpt, _ = eval_setup(tmp)
    (tmp / "ro").mkdir()
    (tmp / "ro" / "r.json").write_text("{}\n")
    return [*eval_args(config, ckpt), "--out", read_only(tmp / "ro") / "r.json", "--force"], "ro/r.json: cannot write, "


# --- predict: never into the folder of its photos, every output name checked as a set ----------------------------


def predict_args(ckpt: Path, *inputs, out: Path) -> list:
    return ["predict", ckpt, *inputs, "--out", out, "--no-progress"]


@case
def predict_out_is_the_input_folder(tmp):
    _, ckpt, root = eval_setup(tmp)
    return [*predict_args(ckpt, root / "images", out=root / "images"), "--force"], \
        f"images: holds the input {root / 'images' / 'img0.jpg'}; write the outputs to another folder"


@case
def predict_out_is_a_link_to_the_folder_of_an_input(tmp):
    _, ckpt, root = eval_setup(tmp)
    (tmp / "link").symlink_to(root / "images")
    return [*predict_args(ckpt, root / "images" / "img1.jpg", out=tmp / "link"), "--force"], "link: holds the input"


@case
def predict_out_inside_the_checkpoint_folder(tmp):
    _, ckpt, root = eval_setup(tmp)
    hf = save_pretrained(load_model(ckpt), tmp / "hf")
    return predict_args(hf, root / "images", out=hf / "pred"), f"pred: is inside the input folder {hf}"


@case
def predict_outputs_exist_without_force(tmp):
    _, ckpt, root = eval_setup(tmp)
    (tmp / "pred").mkdir()
    (tmp / "pred" / "img0.png").write_bytes(b"an earlier label map")
    (tmp / "pred" / "img1_color.png").write_bytes(b"an earlier colour map")
    return predict_args(ckpt, root / "images", out=tmp / "pred"), \
        "pred/img0.png: already exists, and 1 more of the outputs (use --force to overwrite)"


@case
def predict_ranking_json_exists_without_force(tmp):
    _, ckpt, root = eval_setup(tmp)  # a RankSeg model: its outputs include <name>.json
    (tmp / "pred").mkdir()
    (tmp / "pred" / "img1.json").write_text("{}\n")
    return predict_args(ckpt, root / "images", out=tmp / "pred"), "pred/img1.json: already exists (use --force"


@case
def predict_output_is_a_folder(tmp):
    _, ckpt, root = eval_setup(tmp)
    (tmp / "pred" / "img0_overlay.png").mkdir(parents=True)
    return [*predict_args(ckpt, root / "images", out=tmp / "pred"), "--force"], \
        "img0_overlay.png: is a folder, expected a file name"


def photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(path)
    return path


@case
def predict_outputs_collide_a_png_and_a_color_png(tmp):
    """a.png's colour map would be a_color.png, the label map of a_color.png: the names are checked, not the stems."""
    _, ckpt, _ = eval_setup(tmp)
    a, a_color = photo(tmp / "photos" / "a.png"), photo(tmp / "photos" / "a_color.png")
    return predict_args(ckpt, tmp / "photos", out=tmp / "pred"), \
        f"a_color.png: would be written for both {a} and {a_color}, one replacing the other"


@case
def predict_same_name_in_two_folders(tmp):
    _, ckpt, _ = eval_setup(tmp)
    photo(tmp / "a" / "x.png"), photo(tmp / "b" / "x.jpg")
    return predict_args(ckpt, tmp / "a" / "x.png", tmp / "b" / "x.jpg", out=tmp / "pred"), \
        "pred/x.png: would be written for both"


@case
def predict_folder_of_hidden_files_only(tmp):
    """macOS's ``._`` copies and killed runs' temp files are not images to segment."""
    _, ckpt, _ = eval_setup(tmp)
    (tmp / "photos").mkdir()
    (tmp / "photos" / "._IMG_0001.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp / "photos" / ".IMG_0002.k2j4_x9q.tmp.png").write_bytes(b"half a png")
    return predict_args(ckpt, tmp / "photos", out=tmp / "pred"), "photos: folder holds no images"


# --- export and convert: never over their source ------------------------------------------------------------------


@case
def export_out_is_the_checkpoint(tmp):
    _, ckpt, _ = eval_setup(tmp)
    named_onnx = shutil.copy(ckpt, tmp / "model.onnx")  # a checkpoint is told by its content, not its name
    return ["export", "onnx", named_onnx, "--out", named_onnx, "--force"], "model.onnx: is an input of this command"


@case
def export_out_is_a_link_to_the_checkpoint(tmp):
    _, ckpt, _ = eval_setup(tmp)
    (tmp / "m.onnx").symlink_to(ckpt)
    return ["export", "onnx", ckpt, "--out", tmp / "m.onnx", "--force"], "m.onnx: is the same file as the input"


@case
def export_out_exists_without_force(tmp):
    _, ckpt, _ = eval_setup(tmp)
    (tmp / "m.onnx").write_bytes(b"an earlier export")
    return ["export", "onnx", ckpt, "--out", tmp / "m.onnx"], "m.onnx: already exists (use --force to overwrite)"


@case
def convert_out_is_the_source(tmp):
    _, ckpt, _ = eval_setup(tmp)
    return ["convert", ckpt, "--out", ckpt, "--force"], "model.safetensors: is an input of this command"


@case
def convert_out_is_the_source_folder(tmp):
    _, ckpt, _ = eval_setup(tmp)
    hf = save_pretrained(load_model(ckpt), tmp / "hf")
    return ["convert", hf, "--out", hf, "--force"], "hf: is an input folder of this command"


@case
def convert_force_into_a_folder_of_other_files(tmp):
    """--force replaces a checkpoint folder, never a folder of someone's files."""
    _, ckpt, _ = eval_setup(tmp)
    hf = save_pretrained(load_model(ckpt), tmp / "hf")
    (hf / "notes.txt").write_text("mine\n")
    return ["convert", ckpt, "--out", hf, "--force"], \
        "hf: already exists and holds other files (notes.txt); choose a new or empty folder (--force replaces only"


@case
def convert_into_a_checkpoint_folder_without_force(tmp):
    _, ckpt, _ = eval_setup(tmp)
    hf = save_pretrained(load_model(ckpt), tmp / "hf")
    return ["convert", ckpt, "--out", hf], "hf: already exists (use --force to overwrite)"


@case
def convert_out_exists_without_force(tmp):
    _, ckpt, _ = eval_setup(tmp)
    (tmp / "m.safetensors").write_bytes(b"an earlier conversion")
    return ["convert", ckpt, "--out", tmp / "m.safetensors"], "m.safetensors: already exists (use --force"


# --- a disk that fails during the writes: one line naming the file, nothing half-written -------------------------

FAULTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {}


def failing_disk(code: int) -> Callable[[pytest.MonkeyPatch], None]:
    """Every atomic write fails with ``code`` after writing part of its temp file."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        real = files.atomic_write

        def write(path: Path, writer: Callable[[Path], object]) -> None:
            def fail(tmp: Path) -> None:
                tmp.write_bytes(b"the first bytes")
                raise OSError(code, os.strerror(code))

            real(path, fail)

        monkeypatch.setattr(files, "atomic_write", write)

        monkeypatch.setattr(files.writing, "atomic_write", write)  # behind write_json and write_text

    return patch


def with_fault(code: int) -> Callable:
    def register(func: Callable) -> Callable:
        FAULTS[func.__name__] = failing_disk(code)
        return case(func)

    return register


@with_fault(errno.ENOSPC)
def predict_disk_full(tmp):
    _, ckpt, root = eval_setup(tmp)
    (tmp / "pred").mkdir()  # an existing empty folder: fine, and left empty
    return predict_args(ckpt, root / "images", out=tmp / "pred"), \
        "pred/img0.png: cannot write (No space left on device); 0 of 2 images done"


@with_fault(errno.EROFS)
def predict_on_a_read_only_file_system(tmp):
    _, ckpt, root = eval_setup(tmp)
    (tmp / "pred").mkdir()
    return predict_args(ckpt, root / "images", out=tmp / "pred"), "pred/img0.png: cannot write (Read-only file system)"


@with_fault(errno.ENOSPC)
def convert_disk_full(tmp):
    _, ckpt, _ = eval_setup(tmp)
    return ["convert", ckpt, "--out", tmp / "m.safetensors"], \
        "m.safetensors: cannot write (No space left on device); nothing was written"


@with_fault(errno.EDQUOT)
def convert_over_quota_replacing_a_folder(tmp):
    """The checkpoint folder that --force would replace stays as it was, file for file."""
    _, ckpt, _ = eval_setup(tmp)
    hf = save_pretrained(load_model(ckpt), tmp / "hf")
    return ["convert", ckpt, "--out", hf, "--force"], "hf: cannot write (Disk quota exceeded); nothing was written"
