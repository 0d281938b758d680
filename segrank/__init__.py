"""segrank: Segmenter and RankSeg semantic segmentation in plain PyTorch."""

from segrank.checkpoints import load_model, save_model
from segrank.config import Config, ModelConfig, load_config
from segrank.models import Segmentor, SegOutput, build_model

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ModelConfig",
    "SegOutput",
    "Segmentor",
    "__version__",
    "build_model",
    "load_config",
    "load_model",
    "save_model",
]
