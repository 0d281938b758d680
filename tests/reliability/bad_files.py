"""Bad-input cases of the files' structure: config files (``_base_`` cycles and values, encodings, folders, missing
bases, duplicate keys, YAML 1.2 numbers), the other YAML files segrank reads, zip archives that would inflate far
beyond their size, and ``latest`` pointers that name no checkpoint of their own folder."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import yaml

from segrank import build_model
from segrank.checkpoints import export_checkpoint
from segrank.config import ModelConfig, from_dict
from tests.conftest import tiny_run_config
from tests.reliability.bad_input import CASES, case, checkpoint, eval_args, eval_setup, run_cli_quiet, train_args
from tests.reliability.common import write_config

# --- config files: _base_ -------------------------------------------------------------------------------------


def config_text(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


def train_file(tmp: Path, config: Path, *extra) -> list:
    # train.max_iters=0 keeps a missing check from starting a long run: the file's own error must come first.
    return ["train", config, "--work-dir", tmp / "run", "--no-progress", "--set", "train.max_iters=0", *extra]


@case
def base_cycle(tmp):
    config_text(tmp, "a.yaml", "_base_: b.yaml\ntrain: {lr: 0.1}\n")
    config_text(tmp, "b.yaml", "_base_: [a.yaml]\ntrain: {lr: 0.2}\n")
    return train_file(tmp, tmp / "a.yaml"), f"b.yaml: _base_ cycle: {tmp}/a.yaml -> {tmp}/b.yaml -> {tmp}/a.yaml"


@case
def base_self_reference(tmp):
    config_text(tmp, "a.yaml", "_base_: ./a.yaml\ntrain: {lr: 0.1}\n")
    return train_file(tmp, tmp / "a.yaml"), f"a.yaml: _base_ cycle: {tmp}/a.yaml -> {tmp}/a.yaml"


# (_base_ value, the expected end of the error line)
WRONG_BASES = {
    "base_number": ("5", "_base_ must be a file name or a list of file names, got 5"),
    "base_null": ("null", "_base_ must be a file name or a list of file names, got null"),
    "base_mapping": ("{file: a.yaml}", "_base_ must be a file name or a list of file names, got {'file': 'a.yaml'}"),
    "base_list_of_numbers": ("[5]", "_base_[0] must be a file name, got 5"),
    "base_nested_list": ("[x.yaml, [a.yaml]]", "_base_[1] must be a file name, got ['a.yaml']"),
    "base_empty_name": ("['']", "_base_[0] must be a file name, got ''"),
}
for _name, (_value, _expected) in WRONG_BASES.items():
    assert _name not in CASES, _name
    CASES[_name] = lambda tmp, value=_value, expected=_expected: (
        train_file(tmp, config_text(tmp, "cfg.yaml", f"_base_: {value}\ntrain: {{lr: 0.1}}\n")),
        f"cfg.yaml: {expected}")


@case
def missing_base_file(tmp):
    config_text(tmp, "cfg.yaml", "_base_: [models/vit.yaml]\ntrain: {lr: 0.1}\n")
    return train_file(tmp, tmp / "cfg.yaml"), f"cfg.yaml: _base_ models/vit.yaml: config file not found ({tmp}/models"


# --- config files: bytes and folders --------------------------------------------------------------------------


@case
def config_not_utf8(tmp):
    (tmp / "cfg.yaml").write_bytes("# réglages\ntrain: {lr: 0.1}\n".encode("latin-1"))
    return train_file(tmp, tmp / "cfg.yaml"), "cfg.yaml: not UTF-8 text (byte 0xe9 at line 1); save it as UTF-8"


@case
def checkpoint_given_as_config(tmp):
    ckpt = checkpoint(tmp / "model.safetensors", tiny_run_config())
    return train_file(tmp, ckpt), "model.safetensors: a binary file, not text"


@case
def config_is_a_folder(tmp):
    (tmp / "cfg.yaml").mkdir()
    return train_file(tmp, tmp / "cfg.yaml"), "cfg.yaml: is a folder, not a config file"


@case
def base_is_a_folder(tmp):
    (tmp / "models").mkdir()
    return train_file(tmp, config_text(tmp, "cfg.yaml", "_base_: models\n")), "models: is a folder, not a config file"


@case
def config_nested_too_deeply(tmp):
    return train_file(tmp, config_text(tmp, "cfg.yaml", "data: {options: " + "[" * 200 + "]" * 200 + "}\n")), \
        "cfg.yaml: not valid YAML (nested deeper than 64 levels at line 1"


@case
def config_tag_that_cannot_hold_its_value(tmp):
    return train_file(tmp, config_text(tmp, "cfg.yaml", "train: {lr: !!float fast}\n")), \
        "cfg.yaml: not valid YAML (a value its tag cannot hold"


# --- duplicate keys -------------------------------------------------------------------------------------------


@case
def duplicate_section(tmp):
    text = yaml.safe_dump(tiny_run_config(), sort_keys=False) + "train:\n  max_iters: 2\n"
    line = text.splitlines().index("train:") + 1
    return train_file(tmp, config_text(tmp, "cfg.yaml", text)), \
        f"cfg.yaml: not valid YAML (duplicate key 'train' at line {len(text.splitlines()) - 1}, first at line {line})"


@case
def duplicate_nested_key(tmp):
    text = "model:\n  head:\n    type: rankseg\n    topk: 3\n    downsample: 2\n    topk: 5\n"
    return train_file(tmp, config_text(tmp, "cfg.yaml", text)), \
        "cfg.yaml: not valid YAML (duplicate key 'topk' at line 6, first at line 4)"


@case
def duplicate_key_in_base_file(tmp):
    config_text(tmp, "base.yaml", "train: {lr: 0.1, batch_size: 2, lr: 0.2}\n")
    return train_file(tmp, config_text(tmp, "cfg.yaml", "_base_: base.yaml\n")), \
        "base.yaml: not valid YAML (duplicate key 'lr' at line 1, first at line 1)"


@case
def duplicate_key_in_set(tmp):
    return train_args(tmp, tiny_run_config(), "--set", "eval={mode: whole, mode: slide}"), \
        "--set eval={mode: whole, mode: slide}: duplicate key 'mode'"


@case
def duplicate_key_in_classes_yaml(tmp):
    config, ckpt, root = eval_setup(tmp)
    (root / "classes.yaml").write_text((root / "classes.yaml").read_text() + "classes: [a, b]\n")
    return eval_args(config, ckpt), "classes.yaml: not valid YAML (duplicate key 'classes' at line 8, first at line 1)"


@case
def duplicate_key_in_official_variant(tmp):
    torch.manual_seed(0)
    head = {"type": "segmenter", "n_layers": 1}
    model = build_model(from_dict(ModelConfig, {**tiny_run_config()["model"], "head": head}))
    folder = export_checkpoint(model, tmp / "official", "segmenter")
    variant = folder / "variant.yml"
    variant.write_text(variant.read_text() + "net_kwargs: {}\n")
    return ["info", folder], "variant.yml: invalid YAML (duplicate key 'net_kwargs' at line"


# --- YAML 1.2 numbers -----------------------------------------------------------------------------------------


@case
def underscored_integer(tmp):
    # YAML 1.1 read 1_000 as 1000; in YAML 1.2 it is the text '1_000', which no integer key takes.
    return train_args(tmp, tiny_run_config(), "--set", "train.max_iters=1_000"), \
        "train.max_iters: expected an integer, got '1_000'"


@case
def exponent_learning_rate_out_of_range(tmp):
    # 1e-3 is a number (YAML 1.2), so the error is the value's range, not "expected a number, got '1e3'".
    return (train_args(tmp, tiny_run_config(), "--set", "train.min_lr=1e3"),
            "train.min_lr: 1000.0 is above train.lr 0.01")


# --- zip archives: sizes checked before anything is inflated ---------------------------------------------------

MIB = 2**20


def deflated_zeros(mib: int, prefix: bytes = b"") -> bytes:
    """A raw deflate stream of ``prefix`` then ``mib`` MiB of zeros, built in milliseconds: after a full flush
    deflate starts afresh, so every MiB of zeros compresses to the same ~1 kB block."""
    first, block = zlib.compressobj(9, zlib.DEFLATED, -15), zlib.compressobj(9, zlib.DEFLATED, -15)
    head = first.compress(prefix) + first.flush(zlib.Z_FULL_FLUSH) if prefix else b""
    return head + (block.compress(bytes(MIB)) + block.flush(zlib.Z_FULL_FLUSH)) * mib + block.flush()


def write_zip(path: Path, members: list[tuple[str, bytes, int, bool]]) -> Path:
    """A zip of (name, stored bytes, declared size, deflated) members, written field by field so that a deflated
    member needs no inflating. CRCs are left 0: segrank must refuse the file from its table of contents alone."""
    local, central = b"", b""
    for name, data, size, deflated in members:
        method = 8 if deflated else 0
        crc = 0 if deflated else zlib.crc32(data)
        fields = (20, 0, method, 0, 0, crc, len(data), size, len(name.encode()), 0)
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, *fields[:-1], 0, 0, 0, 0, 0, len(local))
        central += name.encode()
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields) + name.encode() + data
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


@case
def pth_zip_bomb(tmp):
    """A 1.5 MB .pth whose data.pkl inflates to 1.5 GB: torch.load would inflate it before failing."""
    data = deflated_zeros(1500)
    bomb = write_zip(tmp / "bomb.pth", [("archive/version", b"3\n", 2, False),
                                        ("archive/data.pkl", data, 1500 * MIB, True)])
    size = bomb.stat().st_size
    return ["info", bomb], f"bomb.pth: archive member archive/data.pkl would inflate {len(data):,} bytes to " \
                           f"{1500 * MIB:,} (all members: {1500 * MIB + 2:,} bytes from a {size:,}-byte file); " \
                           "refusing a possible zip bomb"


@case
def npz_zip_bomb(tmp):
    """An .npz whose member's header declares a 1.5 GB array of zeros that np.load would allocate and inflate."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (1500 * MIB // 8,)})
    data = deflated_zeros(1500, header.getvalue())
    bomb = write_zip(tmp / "vit.npz", [("embedding/kernel.npy", data, len(header.getvalue()) + 1500 * MIB, True)])
    config = write_config(tmp / "cfg.yaml", tiny_run_config())
    return ["convert", bomb, "--config", config, "--out", tmp / "m.safetensors"], \
        "vit.npz: archive member embedding/kernel.npy would inflate"


@case
def repacked_pth_with_compressed_tensors(tmp):
    """torch.save stores tensors uncompressed; a file whose tensors are deflated was re-packed or crafted."""
    cfg = tiny_run_config()
    torch.manual_seed(0)
    pth = export_checkpoint(build_model(from_dict(ModelConfig, cfg["model"])), tmp / "mmseg.pth", "mmseg")
    with zipfile.ZipFile(pth) as original:
        members = [(info.filename, original.read(info)) for info in original.infolist()]
    with zipfile.ZipFile(tmp / "repacked.pth", "w", zipfile.ZIP_DEFLATED) as repacked:
        for name, data in members:
            repacked.writestr(name, data)
    pth.unlink()
    tensor = next(name for name, _ in members if "/data/" in name)
    return ["info", tmp / "repacked.pth"], f"repacked.pth: archive member {tensor} is a compressed tensor, which " \
                                           "torch.save never writes"


# --- the 'latest' pointer of a run ----------------------------------------------------------------------------


def run_with_pointer(tmp: Path, pointer: bytes) -> Path:
    """A run folder with one checkpoint whose ``latest`` pointer holds ``pointer``; a model outside it."""
    folder = tmp / "run" / "checkpoints"
    folder.mkdir(parents=True)
    checkpoint(folder / "iter_0000001.safetensors", tiny_run_config())
    (tmp / "outside").mkdir()
    checkpoint(tmp / "outside" / "model.safetensors", tiny_run_config())
    (folder / "latest").write_bytes(pointer)
    return tmp / "run"


@case
def latest_pointer_not_utf8(tmp):
    return ["info", run_with_pointer(tmp, b"iter_\xff\xfe\n")], "checkpoints/latest: not a checkpoint pointer"


@case
def latest_pointer_empty(tmp):
    return ["info", run_with_pointer(tmp, b"\n")], "checkpoints/latest: empty; it should name the newest checkpoint"


@case
def latest_pointer_outside_its_run(tmp):
    return ["info", run_with_pointer(tmp, b"../../outside/model\n")], \
        "checkpoints/latest: names '../../outside/model', a path; a pointer may only name a checkpoint in its own"


@case
def latest_pointer_of_two_lines(tmp):
    return ["info", run_with_pointer(tmp, b"iter_0000001\niter_0000002\n")], \
        "checkpoints/latest: not a checkpoint pointer"


@case
def resume_from_pointer_outside_its_run(tmp):
    cfg = tiny_run_config(train={"max_iters": 1, "checkpoint_interval": 1})
    args = train_args(tmp, cfg)
    assert run_cli_quiet(args) == 0
    (tmp / "outside").mkdir()
    checkpoint(tmp / "outside" / "model.safetensors", cfg)
    (tmp / "run" / "checkpoints" / "latest").write_text("../../outside/model\n")
    return [*args, "--resume"], "checkpoints/latest: names '../../outside/model', a path"
