"""The Hugging Face folder layout: ``config.json`` (``id2label``/``label2id`` and segrank's own configs) beside
``model.safetensors`` (a complete native checkpoint, so the weights file alone also works).

As in Hugging Face, ``config.json`` is what ``from_pretrained`` reads: renaming a class in ``id2label`` renames it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segrank import files
from segrank.checkpoints.detect import PRETRAINED_FILES, CheckpointContent, pretrained_folder
from segrank.checkpoints.native import save_model
from segrank.checkpoints.shapes import checked_model, safetensors_header
from segrank.config import ConfigError, ModelConfig, from_dict, to_dict
from segrank.config.inference import InferenceConfig
from segrank.errors import CheckpointError
from segrank.models.segmentor import Segmentor

CONFIG_FILE, WEIGHTS_FILE = PRETRAINED_FILES
MODEL_TYPE = "segrank"


def is_pretrained(content: CheckpointContent) -> bool:
    """A ``save_pretrained`` folder."""
    return content.kind == "folder" and pretrained_folder(content.path)


def save_pretrained(model: Segmentor, folder: str | Path) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors``; returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder")
    cfg = model.cfg
    names = cfg.class_names or [str(i) for i in range(cfg.num_classes)]
    config = {
        "model_type": MODEL_TYPE,
        "architectures": ["Segmentor"],
        "num_labels": cfg.num_classes,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "segrank": {"model": to_dict(cfg) | {"class_names": None},
                    "inference": None if model.inference is None else to_dict(model.inference)},
    }
    save_model(model, folder / WEIGHTS_FILE)
    files.write_json(folder / CONFIG_FILE, config, indent=2)
    return folder


def from_pretrained(folder: str | Path, cfg: ModelConfig | None = None) -> Segmentor:
    """A model (eval mode) from a ``save_pretrained`` folder; ``cfg`` overrides the stored architecture."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    stored_cfg, inference = read_pretrained_config(config_path)
    weights = folder / WEIGHTS_FILE
    model = checked_model(cfg or stored_cfg, safetensors_header(weights)[0], str(weights))
    files.load_state_dict_strict(model, files.read_safetensors(weights)[0], str(weights))
    model.inference = inference
    return model.eval()


def read_pretrained_config(path: Path) -> tuple[ModelConfig, InferenceConfig | None]:
    try:
        data: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("segrank"), dict):
        kind = data.get("model_type") if isinstance(data, dict) else None
        raise CheckpointError(f"{path}: not a segrank model (no 'segrank' section"
                              f"{f'; model_type {kind!r}' if kind else ''})")
    section = data["segrank"]
    try:
        cfg = from_dict(ModelConfig, section.get("model"), "segrank.model")
        names = _class_names(data.get("id2label"), cfg.num_classes)
        cfg.class_names = None if names == [str(i) for i in range(cfg.num_classes)] else names
        inference = section.get("inference")
        return cfg, None if inference is None else from_dict(InferenceConfig, inference, "segrank.inference")
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _class_names(id2label: Any, num_classes: int) -> list[str]:
    keys = [str(i) for i in range(num_classes)]
    if not isinstance(id2label, dict) or sorted(id2label, key=str) != sorted(keys):
        raise ConfigError(f"id2label: needs one name for each class id 0..{num_classes - 1}")
    return [str(id2label[k]) for k in keys]
