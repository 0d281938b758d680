"""segrank's native checkpoint: one ``.safetensors`` file whose metadata holds everything needed to use it.

Metadata keys: ``segrank_config`` (the ModelConfig as YAML, class names included: the file alone rebuilds the model)
and ``segrank_inference`` (an InferenceConfig as JSON: palette, normalisation, test scale, windows and ms-flip scales;
absent in checkpoints written before it existed, whose users then get announced defaults).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from safetensors.torch import save_file
from torch import Tensor, nn

from segrank import files
from segrank.checkpoints.detect import CheckpointContent
from segrank.checkpoints.shapes import checked_model, safetensors_header
from segrank.config import ConfigError, ModelConfig, from_dict, to_dict
from segrank.config.inference import InferenceConfig
from segrank.errors import CheckpointError
from segrank.models.segmentor import Segmentor

NATIVE_KEY = "segrank_config"
INFERENCE_KEY = "segrank_inference"


def weights(module: nn.Module) -> dict[str, Tensor]:
    """The state dict as contiguous CPU tensors, as safetensors and torch.save want them."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def is_native(content: CheckpointContent) -> bool:
    """A safetensors file whose metadata holds a segrank config."""
    return content.kind == "safetensors" and NATIVE_KEY in content.metadata


def native_metadata(model: Segmentor) -> dict[str, str]:
    metadata = {NATIVE_KEY: yaml.safe_dump(to_dict(model.cfg), sort_keys=False), "format": "segrank"}
    if model.inference is not None:
        metadata[INFERENCE_KEY] = model.inference.to_json()
    return metadata


def save_model(model: Segmentor, path: str | Path) -> Path:
    """Native checkpoint: ``.safetensors`` weights + the ModelConfig and the model's InferenceConfig in the metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: native checkpoints are .safetensors files")
    sd, metadata = weights(model), native_metadata(model)
    files.atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))
    return path


def load_native(path: Path, cfg: ModelConfig | None = None) -> Segmentor:
    """A model from segrank's ``.safetensors``; ``cfg`` overrides the architecture stored in its metadata."""
    shapes, metadata = safetensors_header(path)
    if cfg is None:
        if NATIVE_KEY not in metadata:
            raise CheckpointError(f"{path}: no segrank config in the metadata; pass a config")
        try:
            cfg = from_dict(ModelConfig, yaml.safe_load(metadata[NATIVE_KEY]), "model")
        except (ConfigError, yaml.YAMLError) as err:
            raise CheckpointError(f"{path}: stored config is invalid ({err})") from None
    model = checked_model(cfg, shapes, str(path))
    files.load_state_dict_strict(model, files.read_safetensors(path)[0], str(path))
    if INFERENCE_KEY in metadata:
        try:
            model.inference = InferenceConfig.from_json(metadata[INFERENCE_KEY], INFERENCE_KEY)
        except ConfigError as err:
            raise CheckpointError(f"{path}: stored inference settings are invalid ({err})") from None
    return model
