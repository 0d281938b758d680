"""Floating-point operations of one forward pass at the size a prediction feeds the model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from segrank.inference.settings import PredictSettings
from segrank.models.segmentor import Segmentor


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flops_input_size(settings: PredictSettings) -> tuple[tuple[int, int], str]:
    """The input one forward pass sees at test time, and what it is: the sliding window or, for whole-image
    inference, a square image at the test scale, as ``segrank predict`` would find them."""
    if settings.eval.mode == "slide":
        return tuple(settings.eval.crop_size), "one sliding window"
    short = min(settings.img_scale)
    return (short, short), "a square image at the test scale"


def class_map_flops(model: Segmentor, size: tuple[int, int]) -> int:
    """FLOPs of one image of ``size`` to the class map."""
    images = torch.zeros(1, 3, *size)
    # A GT-oracle head takes the image's classes: count it with as many as its top-k slots.
    present = (torch.arange(model.num_classes) < model.cfg.head.topk)[None] if model.needs_present_classes else None
    with torch.no_grad():
        return count_flops(lambda: model.class_map(images, present=present))
