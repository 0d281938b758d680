"""Segmenter and RankSeg models."""

from segrank.models.output import SegOutput
from segrank.models.segmentor import Segmentor, build_model

__all__ = ["SegOutput", "Segmentor", "build_model"]
