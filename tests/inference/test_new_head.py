"""A decode head added as docs/architecture.md ("A decode head") says: a ``DecodeHead`` returning a ``SegOutput``, its
class in ``HEADS`` and a ``HeadConfig.type`` value. ``segrank.Predictor``, ``segrank predict`` (through a saved
checkpoint), the class ranking and the ONNX graph's outputs then work with no other change."""

from __future__ import annotations

import json
import typing
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

import segrank
from segrank.cli import main
from segrank.config import EvalConfig, HeadConfig, ModelConfig, from_dict
from segrank.deploy.onnx_export import graph_outputs, output_names
from segrank.models import HEADS, DecodeHead, SegOutput

NAMES = ["sky", "tree", "road", "car", "person"]
IMAGE_BIAS = [0.0, 3.0, 1.0, 2.0, -1.0]  # image-level scores: ranking 1, 3, 2, 0, 4; top-2 selects {1, 3}
MASK_BIAS = [9.0, 1.0, 8.0, 2.0, 0.0]  # pixel scores: class 3 wins among the selected, 0 and 2 would win outside


class TopKToyHead(DecodeHead):
    """Scores every class from the mean patch feature, keeps the top k, and gives each kept class a 1x1-conv mask."""

    output_names = ("logits", "class_index", "image_logits")

    def __init__(self, cfg: HeadConfig, num_classes: int, d_encoder: int) -> None:
        super().__init__()
        self.num_classes, self.topk = num_classes, cfg.topk
        self.score = nn.Linear(d_encoder, num_classes)
        self.masks = nn.Conv2d(d_encoder, num_classes, 1)

    def forward(self, feature_map: Tensor, class_tokens: Tensor | None = None) -> SegOutput:
        image_logits = self.score(feature_map.mean((2, 3)))
        class_index = image_logits.topk(self.topk, dim=1).indices
        dense = self.masks(feature_map)
        slots = dense.gather(1, class_index[:, :, None, None].expand(-1, -1, *dense.shape[2:]))
        return SegOutput(slots, self.num_classes, class_index, image_logits)


@pytest.fixture
def toy_head(monkeypatch):
    """Register the head for this test: its class in HEADS, its name among HeadConfig.type's values."""
    monkeypatch.setitem(HEADS, "toy", TopKToyHead)
    types = typing.get_args(typing.get_type_hints(HeadConfig)["type"])
    monkeypatch.setitem(HeadConfig.__annotations__, "type", Literal[(*types, "toy")])


def toy_model() -> segrank.Segmentor:
    cfg = from_dict(ModelConfig, {
        "num_classes": len(NAMES), "class_names": NAMES,
        "backbone": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8, "pos_embed_grid": [4, 4]},
        "head": {"type": "toy", "topk": 2}})
    torch.manual_seed(0)
    model = segrank.build_model(cfg).eval()
    with torch.no_grad():  # constant scores, so that the expected labels and ranking are known
        for layer, bias in ((model.decode_head.score, IMAGE_BIAS), (model.decode_head.masks, MASK_BIAS)):
            layer.weight.zero_()
            layer.bias.copy_(torch.tensor(bias))
    model.inference = segrank.InferenceConfig(mean=(120.0, 115.0, 100.0), std=(60.0, 58.0, 57.0), img_scale=(64, 48),
                                              eval=EvalConfig(mode="slide", crop_size=(32, 32), stride=(24, 24)))
    return model


def test_predict_with_a_new_head(toy_head, tmp_path, capsys):
    model = toy_model()
    assert isinstance(model.decode_head, TopKToyHead)
    photo = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    prediction = segrank.Predictor(model, probabilities=True)(photo)
    assert prediction.label.shape == photo.shape[:2] and (prediction.label == 3).all()
    assert prediction.topk == 2
    ranking = prediction.ranking
    assert [r["class"] for r in ranking] == [1, 3, 2, 0, 4]
    assert [r["name"] for r in ranking if r["selected"]] == ["tree", "car"]
    assert [r["score"] for r in ranking] == [round(float(torch.tensor(b).sigmoid()), 6)
                                             for b in sorted(IMAGE_BIAS, reverse=True)]
    assert [r["pixel_fraction"] for r in ranking] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert sorted(prediction.probability_classes.tolist()) == [1, 3]

    checkpoint = segrank.save_model(model, tmp_path / "toy.safetensors")
    Image.fromarray(photo).save(tmp_path / "photo.png")
    assert main(["predict", str(checkpoint), str(tmp_path / "photo.png"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert (np.array(Image.open(tmp_path / "out" / "photo.png")) == 3).all()
    written = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert written["topk"] == 2 and written["selected_classes"] == [1, 3] and written["ranking"] == ranking

    with torch.no_grad():
        outputs = graph_outputs(model, model(torch.randn(1, 3, 32, 40)), (32, 40), labels=False)
    assert output_names(model, labels=False) == ["logits", "class_index", "image_logits"]
    assert [tuple(t.shape) for t in outputs] == [(1, 2, 32, 40), (1, 2), (1, 5)]
