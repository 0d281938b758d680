"""Whole mmseg checkpoints through the public path: ``segrank convert --from mmseg`` then ``load_model``."""

from __future__ import annotations

import re

import pytest
import torch

import segrank
from segrank.cli import main

from .common import FIXTURES, LOSS_TOL, assert_close, assert_equal, index_cases, read_json, reference_term, tensors

FOLDER = FIXTURES / "full_model_mmseg"


@pytest.mark.parametrize("case", index_cases(FOLDER))
def test_converted_checkpoint_reproduces_reference(case, tmp_path):
    meta = read_json(FOLDER / f"{case}.json")
    out = tmp_path / f"{case}.safetensors"
    assert main(["convert", "--from", "mmseg", str(FOLDER / meta["checkpoint_file"]), "--out", str(out)]) == 0
    model = segrank.load_model(out)
    assert not model.training
    t = tensors(FOLDER / f"{case}.safetensors")
    name = f"full_model_mmseg/{case}"
    with torch.no_grad():
        for key in t:
            m = re.fullmatch(r"out\.(\d+x\d+)\.(patch_logits|logits|seg_pred)", key)
            if not m:
                continue
            x = t[f"in.{m[1]}"]
            if m[2] == "patch_logits":
                assert_close(name, model.dense_logits(x), t[key])
            elif m[2] == "logits":
                assert_close(name, model.dense_logits(x, tuple(x.shape[2:])), t[key])
            else:
                pred = model.dense_logits(x, tuple(t[key].shape[1:])).softmax(1).argmax(1)
                assert_equal(f"{name} seg_pred", pred, t[key])
    loss_keys = [k for k in t if k.startswith("loss.")]
    if loss_keys:
        labels = t["in.seg_label"].long()[:, 0]
        size = "x".join(map(str, labels.shape[1:]))
        model.train()
        losses = model.loss(model(t[f"in.{size}"]), labels, meta["model_cfg"]["decode_head"].get("ignore_index", 255))
        for key in loss_keys:
            term = "loss" if key == "loss.total" else key.split(".")[-1]
            assert_close(f"{name} {term}", reference_term(losses, term), t[key], LOSS_TOL)
