"""Bad-input cases of hostile models and settings: a checkpoint whose stored config claims an architecture its
weights do not have (refused before the model is allocated) and test scales beyond the limit (flag, stored, config).
Also ``damaged_exif_jpeg``, a photo whose EXIF block breaks Pillow's orientation code (test_hostile_images.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.reliability.bad_input import case, eval_setup


def damaged_exif_jpeg(rgb: np.ndarray) -> bytes:
    """A JPEG of ``rgb`` whose EXIF says 'rotate 90' and holds an ImageWidth tag of text: Pillow reads the block, but
    writing it back after the turn (``ImageOps.exif_transpose``) fails with struct.error."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    exif[0x0131] = "soft"  # Software, a text tag ...
    raw = exif.tobytes()
    software = raw.index(b"\x01\x31\x00\x02")  # tag 0x0131, type 2 (ASCII), big-endian as Pillow writes it
    damaged = raw[:software] + b"\x01\x00" + raw[software + 2:]  # ... renumbered as ImageWidth (0x0100, a number)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", exif=damaged)
    return buffer.getvalue()


def with_stored(ckpt: Path, out: Path, *, model: dict | None = None, inference: dict | None = None) -> Path:
    """A copy of native checkpoint ``ckpt`` whose stored model config / inference settings are updated (the weights
    stay as they are)."""
    with safe_open(str(ckpt), "pt") as f:
        metadata = dict(f.metadata())
    if model is not None:
        stored = yaml.safe_load(metadata["segrank_config"])
        for section, values in model.items():
            stored[section] = {**stored[section], **values} if isinstance(values, dict) else values
        metadata["segrank_config"] = yaml.safe_dump(stored)
    if inference is not None:
        stored = json.loads(metadata.get("segrank_inference", "{}"))
        metadata["segrank_inference"] = json.dumps({**stored, **inference})
    save_file(load_file(str(ckpt)), str(out), metadata=metadata)
    return out


def predict_args(tmp: Path, ckpt: Path, images: Path, *extra) -> list:
    return ["predict", ckpt, images, "--out", tmp / "pred", "--no-progress", *extra]


# --- checkpoints whose stored config does not fit their weights (refused before allocation) ----------------------


@case
def checkpoint_config_claims_huge_width(tmp):
    """embed_dim 1000000 over weights of width 32: the model would need terabytes; refused from the header."""
    _, ckpt, _ = eval_setup(tmp)
    huge = with_stored(ckpt, tmp / "huge.safetensors", model={"backbone": {"embed_dim": 1_000_000, "num_heads": 1}})
    return ["info", huge], "huge.safetensors: does not fit the architecture (mis-shaped: backbone.blocks.0.attn.proj." \
                           "bias (32,) vs model (1000000,)"


@case
def checkpoint_config_claims_thousands_of_layers(tmp):
    """Refused from the layer count alone: even the shapes of 2000 layers take seconds to build (a million, hours)."""
    _, ckpt, root = eval_setup(tmp)
    deep = with_stored(ckpt, tmp / "deep.safetensors", model={"backbone": {"depth": 2000}})
    return predict_args(tmp, deep, root / "images"), \
        "deep.safetensors: does not fit the architecture (model.backbone.depth is 2000, the file holds"


@case
def checkpoint_config_over_unrelated_tensors(tmp):
    """A file of a few unrelated tensors with a stored config of a huge model: no tensor matches."""
    _, ckpt, _ = eval_setup(tmp)
    with safe_open(str(ckpt), "pt") as f:
        metadata = dict(f.metadata())
    stored = yaml.safe_load(metadata["segrank_config"])
    stored["backbone"] = {**stored["backbone"], "embed_dim": 1_000_000, "num_heads": 1}
    save_file({"weights": torch.zeros(4), "bias": torch.zeros(2)}, str(tmp / "other.safetensors"),
              metadata={**metadata, "segrank_config": yaml.safe_dump(stored)})
    return ["info", tmp / "other.safetensors"], \
        "other.safetensors: does not fit the architecture (missing: backbone.blocks.0.attn.proj.bias"


# --- test scales ---------------------------------------------------------------------------------------------------


@case
def predict_img_scale_beyond_limit(tmp):
    _, ckpt, root = eval_setup(tmp)
    return predict_args(tmp, ckpt, root / "images", "--img-scale", "100000", "100000"), \
        "img_scale: every value must be in [1, 8192], got [100000, 100000]"


@case
def stored_img_scale_beyond_limit(tmp):
    _, ckpt, root = eval_setup(tmp)
    stored = with_stored(ckpt, tmp / "scaled.safetensors", inference={"img_scale": [100000, 100000]})
    return predict_args(tmp, stored, root / "images"), \
        "scaled.safetensors: stored inference settings are invalid (inference.img_scale: every value must be in " \
        "[1, 8192], got [100000, 100000])"


@case
def stored_ms_scale_beyond_limit(tmp):
    """A stored ms-flip scale of 100 times a test scale of 64: a 6400-pixel side is fine, 100 x 96 is not."""
    _, ckpt, root = eval_setup(tmp)
    stored = with_stored(ckpt, tmp / "ms.safetensors", inference={"img_scale": [96, 64], "eval": {
        "mode": "whole", "crop_size": [32, 32], "stride": [32, 32], "scales": [1.0], "flip": False,
        "ms_scales": [1.0, 100.0], "batch_size": 1}})
    return predict_args(tmp, stored, root / "images", "--ms-flip"), \
        "eval.ms_scales: scale 100 of img_scale [96, 64] asks for test inputs of up to 9600 pixels a side, above the " \
        "limit of 8192"


@case
def config_img_scale_beyond_limit(tmp):
    config, ckpt, root = eval_setup(tmp)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["img_scale"] = [9000, 9000]
    config.write_text(yaml.safe_dump(cfg))
    return predict_args(tmp, ckpt, root / "images", "--config", config), \
        "cfg.yaml: data.img_scale: [9000, 9000] is above the largest test scale, 8192 pixels a side"
