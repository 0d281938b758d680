"""Checkpoints: segrank's native format, the Hugging Face folder layout, and the reference layouts, read and written
through one ``load_model``.

Native (native.py): ``.safetensors`` weights whose metadata holds the ModelConfig and the InferenceConfig, so the file
alone rebuilds the model and predicts as it did where it was trained. ``pretrained`` (pretrained.py): a folder with
``config.json`` + ``model.safetensors`` (``save_pretrained``). Foreign layouts (``format``), one module each:
- ``mmseg`` (mmseg.py): RankSeg fork / mmseg 0.17 ``.pth``; architecture from ``meta.config``, parsed, never run.
- ``segmenter`` (segmenter.py): the official Segmenter ``checkpoint.pth`` with its ``variant.yml`` beside it.
- ``npz`` / ``timm`` (vit_weights.py): ViT backbone weights; the head is freshly initialised from ``config``.
Each layout is a record of the table in formats.py (how to detect, load and export it). A path may also be a folder
that stands for a checkpoint (detect.py), and the layout is judged by content, never by the file name. Pickled files
are always read with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

from pathlib import Path

from segrank.checkpoints.detect import resolve_checkpoint
from segrank.checkpoints.formats import FORMATS, checkpoint_format, detect_format, exporter, format_of
from segrank.checkpoints.native import save_model
from segrank.checkpoints.pretrained import from_pretrained, save_pretrained
from segrank.config import ModelConfig, model_config_from
from segrank.errors import CheckpointError
from segrank.models.segmentor import Segmentor

__all__ = ["FORMATS", "CheckpointError", "describe", "detect_format", "export_checkpoint", "from_pretrained",
           "load_model", "resolve_checkpoint", "save_model", "save_pretrained"]


def load_model(
    path: str | Path, format: str = "auto", config: ModelConfig | dict | str | Path | None = None
) -> Segmentor:
    """Load a model for inference (eval mode, ``requires_grad`` off) from any supported checkpoint layout (see the
    module docstring): a file, a ``save_pretrained`` folder, or a training run's work dir (its latest checkpoint).

    ``config`` (a ModelConfig, a dict in segrank's schema, or a YAML path) gives the architecture for formats
    that do not carry it (npz, timm), and overrides the one stored in the others. To fine-tune a loaded model,
    call ``model.train().requires_grad_(True)``.
    """
    named = checkpoint_format(format) if format != "auto" else None
    path = resolve_checkpoint(Path(path))
    fmt = named or format_of(path)
    cfg = model_config_from(config) if config is not None else None
    return fmt.load(path, cfg).eval().requires_grad_(False)


def export_checkpoint(model: Segmentor, path: str | Path, format: str) -> Path:
    """Write ``model`` in a foreign layout: mmseg .pth, official Segmenter folder, npz or timm (backbones only)."""
    path = Path(path)
    exporter(format)(model, path)
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
