"""Checkpoints: segrank's native format, and the reference layouts read and written through one ``load_model``.

Native: ``.safetensors`` weights whose metadata holds the ModelConfig as YAML, so the file alone rebuilds the model.
Foreign layouts (``format``), one module each:
- ``mmseg`` (mmseg.py): RankSeg fork / mmseg 0.17 ``.pth``; architecture from ``meta.config``, parsed, never run.
- ``segmenter`` (segmenter.py): the official Segmenter ``checkpoint.pth`` with its ``variant.yml`` beside it.
- ``npz`` / ``timm`` (vit_weights.py): ViT backbone weights; the head is freshly initialised from ``config``.
Pickled files are always read with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from segrank import files
from segrank.checkpoints.mmseg import load_mmseg, mmseg_checkpoint
from segrank.checkpoints.segmenter import load_segmenter, segmenter_checkpoint
from segrank.checkpoints.vit_weights import load_backbone_checkpoint, state_dict_to_npz
from segrank.config import ConfigError, ModelConfig, from_dict, model_config_from, to_dict
from segrank.errors import CheckpointError
from segrank.models.segmentor import Segmentor

FORMATS = ("native", "mmseg", "segmenter", "npz", "timm")
NATIVE_KEY = "segrank_config"

__all__ = ["FORMATS", "CheckpointError", "describe", "detect_format", "export_checkpoint", "load_model",
           "save_model"]


def detect_format(path: Path) -> str:
    if path.is_dir() or path.name == "variant.yml" or (path.parent / "variant.yml").is_file():
        return "segmenter"
    if path.suffix == ".npz":
        return "npz"
    if path.suffix == ".safetensors":
        _, metadata = files.read_safetensors(path)
        return "native" if NATIVE_KEY in metadata else "timm"
    obj = files.read_torch(path)
    if isinstance(obj, dict) and "state_dict" in obj:
        return "mmseg"
    return "timm"


def load_model(
    path: str | Path, format: str = "auto", config: ModelConfig | dict | str | Path | None = None
) -> Segmentor:
    """Load a model in eval mode from any supported checkpoint layout (see module docstring).

    ``config`` (a ModelConfig, a dict in segrank's schema, or a YAML path) gives the architecture for formats
    that do not carry it (npz, timm), and overrides the one stored in mmseg/official checkpoints.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if format not in FORMATS + ("auto",):
        raise CheckpointError(f"unknown checkpoint format {format!r} (choose from {', '.join(FORMATS)})")
    fmt = detect_format(path) if format == "auto" else format
    cfg = model_config_from(config) if config is not None else None
    if fmt == "native":
        model = load_native(path, cfg)
    elif fmt == "mmseg":
        model = load_mmseg(path, cfg)
    elif fmt == "segmenter":
        model = load_segmenter(path, cfg)
    else:
        model = load_backbone_checkpoint(path, cfg, fmt)
    return model.eval()


def load_native(path: Path, cfg: ModelConfig | None = None) -> Segmentor:
    """A model from segrank's ``.safetensors``; ``cfg`` overrides the architecture stored in its metadata."""
    sd, metadata = files.read_safetensors(path)
    if cfg is None:
        if NATIVE_KEY not in metadata:
            raise CheckpointError(f"{path}: no segrank config in the metadata; pass a config")
        try:
            cfg = from_dict(ModelConfig, yaml.safe_load(metadata[NATIVE_KEY]), "model")
        except (ConfigError, yaml.YAMLError) as err:
            raise CheckpointError(f"{path}: stored config is invalid ({err})") from None
    model = Segmentor(cfg)
    files.load_state_dict_strict(model, sd, str(path))
    return model


def save_model(model: Segmentor, path: str | Path) -> Path:
    """Native checkpoint: ``.safetensors`` weights + the ModelConfig as YAML in the metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: native checkpoints are .safetensors files")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {NATIVE_KEY: yaml.safe_dump(to_dict(model.cfg), sort_keys=False), "format": "segrank"}
    files.atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))
    return path


def export_checkpoint(model: Segmentor, path: str | Path, format: str) -> Path:
    """Write ``model`` in a foreign layout: mmseg .pth, official Segmenter folder, npz or timm (backbones only)."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if format == "mmseg":
        ckpt = mmseg_checkpoint(model.cfg, sd)
        files.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    elif format == "segmenter":
        ckpt, variant = segmenter_checkpoint(model.cfg, sd)
        files.atomic_write(path / "checkpoint.pth", lambda tmp: torch.save(ckpt, tmp))
        files.write_text(path / "variant.yml", variant)
    elif format == "npz":
        arrays = state_dict_to_npz(backbone, model.cfg.backbone.num_heads)
        files.atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
    elif format == "timm":
        files.atomic_write(path, lambda tmp: save_file(backbone, tmp))
    else:
        raise CheckpointError(f"cannot export to format {format!r}")
    return path


def describe(model: Segmentor) -> str:
    """One line: backbone, head, classes, parameters."""
    cfg = model.cfg
    b, h = cfg.backbone, cfg.head
    head = h.type if h.type != "rankseg" else f"rankseg (top-{h.topk}, {h.multilabel_head})"
    params = sum(p.numel() for p in model.parameters())
    oce = ", OCE" if b.oce_start_layer is not None else ""
    return (f"ViT {b.embed_dim}d x {b.depth} (patch {b.patch_size}{oce}) + {head} head, "
            f"{cfg.num_classes} classes, {params / 1e6:.2f} M parameters")
