"""The head table and what each head declares: ``HEADS`` covers every ``model.head.type``, and a head's attributes
(``needs_present_classes``, ``topk``, ``output_names``) describe the ``SegOutput`` it really returns."""

from __future__ import annotations

import typing

import pytest
import torch

from segrank import build_model
from segrank.config import HeadConfig, ModelConfig, from_dict
from segrank.models import HEADS, DecodeHead


def test_heads_table_covers_every_configurable_type():
    assert set(HEADS) == set(typing.get_args(typing.get_type_hints(HeadConfig)["type"]))
    assert all(issubclass(head, DecodeHead) for head in HEADS.values())


@pytest.mark.parametrize("head_type", sorted(HEADS))
def test_head_attributes_describe_its_output(head_type):
    cfg = from_dict(ModelConfig, {"num_classes": 9, "backbone": {"embed_dim": 32, "depth": 1, "num_heads": 2,
                                                                  "pos_embed_grid": [3, 3]},
                                  "head": {"type": head_type, "topk": 4, "downsample": 2, "n_layers": 2}})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    head = model.decode_head
    assert isinstance(head, HEADS[head_type])
    present = torch.zeros(2, 9, dtype=torch.bool)
    present[:, [1, 5, 6]] = True
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 48), present if model.needs_present_classes else None)
    fields = {"logits": out.mask_logits, "class_index": out.class_index, "image_logits": out.image_logits}
    assert head.output_names[0] == "logits"
    assert {name for name, value in fields.items() if value is not None} == set(head.output_names)
    assert out.mask_logits.shape[1] == (head.topk or (3 if head.needs_present_classes else 9))
    if head.topk is not None:
        assert out.class_index.shape == (2, head.topk)
    if head.needs_present_classes:
        assert out.class_index.tolist() == [[1, 5, 6]] * 2
        with pytest.raises(ValueError, match="classes present"):
            model(torch.randn(1, 3, 48, 48))
