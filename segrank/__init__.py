"""segrank: Segmenter and RankSeg semantic segmentation in plain PyTorch."""

from segrank.config import ModelConfig, load_config
from segrank.models import Segmentor, SegOutput, build_model

__version__ = "0.1.0"

__all__ = ["ModelConfig", "SegOutput", "Segmentor", "build_model", "load_config", "__version__"]
