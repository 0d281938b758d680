"""What tests across the folders share: tiny models (a ViT of a few thousand parameters with any head) and tiny
training runs on built-in synthetic scenes. Plain functions, so that module-level code can build one, and fixtures
that hand them to a test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from segrank.config import ModelConfig, from_dict
from segrank.models import Segmentor, build_model

# A 1-block ViT of width 32: a forward pass takes milliseconds on a CPU.
TINY_BACKBONE: dict[str, Any] = {"embed_dim": 32, "depth": 1, "num_heads": 2, "pos_embed_grid": [4, 4]}
TINY_RUN_CLASSES = 6


def tiny_model_config(num_classes: int, head: dict[str, Any], backbone: dict[str, Any] | None = None,
                      **model: Any) -> ModelConfig:
    """A ModelConfig with ``head`` (its ``type`` and options), ``TINY_BACKBONE`` updated by ``backbone``."""
    return from_dict(ModelConfig, {"num_classes": num_classes, "backbone": {**TINY_BACKBONE, **(backbone or {})},
                                   "head": head, **model})


def tiny_model(num_classes: int, head: dict[str, Any], backbone: dict[str, Any] | None = None, seed: int = 0,
               **model: Any) -> Segmentor:
    """A tiny model in eval mode, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return build_model(tiny_model_config(num_classes, head, backbone, **model)).eval()


def tiny_run_config(**sections: dict[str, Any]) -> dict[str, Any]:
    """A training run of a RankSeg model small enough that a step takes milliseconds on a CPU, on built-in
    synthetic scenes, as a config dict; ``sections`` update its sections. Dropout and drop path stay on: resumed and
    repeated runs must reproduce the model's random numbers too."""
    cfg: dict[str, Any] = {
        "model": {"num_classes": TINY_RUN_CLASSES,
                  "backbone": {**TINY_BACKBONE, "patch_size": 8, "drop_path_rate": 0.1},
                  "head": {"type": "rankseg", "n_layers": 2, "topk": 3, "downsample": 2, "dropout": 0.1}},
        "data": {"dataset": "synthetic", "img_scale": [32, 32], "crop_size": [32, 32], "ratio_range": [0.75, 1.5],
                 "workers": 0, "options": {"num_classes": TINY_RUN_CLASSES, "image_size": 32, "train_images": 12,
                                           "val_images": 3, "max_classes": 3}},
        "train": {"max_iters": 12, "batch_size": 2, "lr": 0.01, "log_interval": 1, "checkpoint_interval": 1,
                  "eval_interval": -1, "keep_checkpoints": 2},
        "eval": {"mode": "whole"},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values}
    return cfg


@pytest.fixture
def make_tiny_model() -> Callable[..., Segmentor]:
    """``tiny_model`` for a test to call with its own head and sizes."""
    return tiny_model


@pytest.fixture
def make_tiny_run_config() -> Callable[..., dict[str, Any]]:
    """``tiny_run_config`` for a test to call with its own section updates."""
    return tiny_run_config
