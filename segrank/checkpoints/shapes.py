"""A checkpoint's architecture checked against its weights before the model is built.

A config stored beside the weights (native metadata, ``config.json``, a reference checkpoint's config) is believed
only as far as the tensors agree with it: a 1 MB file whose config claims ``embed_dim: 1000000`` would otherwise make
the model allocate terabytes before the mismatch shows. So the model is first built on PyTorch's ``meta`` device
(shapes without memory) and its tensors compared with the file's by name and shape; only a config that fits is built.
For a ``.safetensors`` file the shapes come from its JSON header, before any tensor is read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from segrank import files
from segrank.checkpoints.detect import file_kind
from segrank.config import ModelConfig
from segrank.errors import CheckpointError
from segrank.models.segmentor import Segmentor

Shape = tuple[int, ...]


def safetensors_header(path: Path) -> tuple[dict[str, Shape], dict[str, str]]:
    """(name -> shape of every tensor, metadata) of a ``.safetensors`` file, from its header alone."""
    kind, header = file_kind(path)
    if kind != "safetensors":
        raise CheckpointError(f"{path}: not a .safetensors file")
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise CheckpointError(f"{path}: damaged .safetensors file (tensor {name!r} has no valid shape)")
        shapes[name] = tuple(shape)
    return shapes, header.get("__metadata__") or {}


def tensor_shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, Shape]:
    return {name: tuple(value.shape) for name, value in state_dict.items()}


def check_layer_counts(cfg: ModelConfig, shapes: dict[str, Shape], source: str) -> None:
    """Layer counts the file cannot hold (each layer has tensors of its own) are refused before even the shapes
    are built: on the meta device too a layer takes milliseconds and its Python objects, a million of them hours."""
    for key, count in (("model.backbone.depth", cfg.backbone.depth), ("model.head.n_layers", cfg.head.n_layers)):
        if count > len(shapes):
            raise CheckpointError(f"{source}: does not fit the architecture ({key} is {count}, the file holds "
                                  f"{len(shapes)} tensors in all)")


def checked_model(cfg: ModelConfig, shapes: dict[str, Shape], source: str) -> Segmentor:
    """A new model of architecture ``cfg``, built only once its tensors' names and shapes are those of ``shapes``
    (the weights that will be loaded into it); otherwise the error names the keys with both shapes."""
    check_layer_counts(cfg, shapes, source)
    with torch.device("meta"):
        outline = Segmentor(cfg)
        stored = {name: torch.empty(shape) for name, shape in shapes.items()}
    files.load_state_dict_strict(outline, stored, source)  # raises naming missing, unexpected and mis-shaped keys
    return Segmentor(cfg)
