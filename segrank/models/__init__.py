"""Segmenter and RankSeg models."""

from segrank.models.heads import HEADS
from segrank.models.output import DecodeHead, SegOutput
from segrank.models.segmentor import Segmentor, build_model

__all__ = ["HEADS", "DecodeHead", "SegOutput", "Segmentor", "build_model"]
