"""Official Segmenter checkpoints (checkpoint.pth + variant.yml): bilinear table resize, pad-then-crop output."""

from __future__ import annotations

import re

import pytest
import torch

import segrank

from .common import FIXTURES, assert_close, index_cases, read_json, tensors

FOLDER = FIXTURES / "official_segmenter"


@pytest.mark.parametrize("case", index_cases(FOLDER))
def test_official_checkpoint_logits(case):
    meta = read_json(FOLDER / case / "case.json")
    model = segrank.load_model(FOLDER / meta["checkpoint_file"])
    assert model.cfg.padding == "crop" and model.cfg.backbone.pos_embed_interpolation == "bilinear"
    t = tensors(FOLDER / case / "io.safetensors")
    compared = 0
    with torch.no_grad():
        for key in t:
            m = re.fullmatch(r"out\.(\d+x\d+)\.logits", key)
            if m:
                x = t[f"in.{m[1]}"]
                assert_close(f"official_segmenter/{case}", model.dense_logits(x, tuple(x.shape[2:])), t[key])
                compared += 1
    assert compared
