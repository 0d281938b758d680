"""Build segrank modules from the reference constructor kwargs stored in the fixture JSON files."""

from __future__ import annotations

import torch

from segrank.checkpoints.mmseg import from_mmseg_name, model_config_from_mmseg
from segrank.config import ModelConfig
from segrank.files import load_state_dict_strict
from segrank.models.segmentor import Segmentor


def model_config(backbone: dict | None, head: dict) -> ModelConfig:
    """A ModelConfig from reference kwargs; a minimal backbone when only a head is under test."""
    if backbone is None:
        backbone = {"embed_dims": head["d_encoder"], "num_layers": 1, "num_heads": 1, "img_size": 16}
        if head.get("cls_emb_from_backbone"):
            backbone.update(with_cls_emb=True, num_classes=head["n_cls"], cls_emb_start_layer=0)
    return model_config_from_mmseg({"backbone": backbone, "decode_head": head})


def backbone_only_config(backbone: dict) -> ModelConfig:
    dim = backbone["embed_dims"]
    head = {"type": "MaskTransformerHead", "n_cls": backbone.get("num_classes", 1), "d_model": dim,
            "n_heads": 1, "d_ff": dim, "n_layers": 1}
    return model_config_from_mmseg({"backbone": backbone, "decode_head": head})


def load_part(model: Segmentor, prefix: str, weights: dict[str, torch.Tensor], exclude=()) -> None:
    """Load reference-named weights of one part (``backbone`` or ``decode_head``); the other part keeps its own."""
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix + ".")}
    for key, value in weights.items():
        if key not in exclude:
            sd[from_mmseg_name(f"{prefix}.{key}")] = value
    load_state_dict_strict(model, sd, prefix)
