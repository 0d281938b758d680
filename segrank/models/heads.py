"""The decode heads by name: the one place where ``model.head.type`` becomes a class.

A head class takes ``(HeadConfig, num_classes, backbone embed_dim)`` and is a ``DecodeHead`` (models/output.py): its
forward returns a ``SegOutput`` and its attributes say what that output is, so nothing else looks at the name.
"""

from __future__ import annotations

from segrank.config import ModelConfig
from segrank.models.output import DecodeHead
from segrank.models.rankseg_head import RankSegGTHead, RankSegHead
from segrank.models.segmenter_head import LinearHead, MaskTransformerHead

# Keys: the values of HeadConfig.type (segrank/config/__init__.py), which checks a config's head type when it is read.
HEADS: dict[str, type[DecodeHead]] = {
    "segmenter": MaskTransformerHead,
    "rankseg": RankSegHead,
    "rankseg_gt": RankSegGTHead,
    "linear": LinearHead,
}


def build_head(cfg: ModelConfig) -> DecodeHead:
    """The decode head ``cfg.head.type`` names, freshly initialised."""
    return HEADS[cfg.head.type](cfg.head, cfg.num_classes, cfg.backbone.embed_dim)
