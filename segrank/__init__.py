"""segrank: Segmenter and RankSeg semantic segmentation in plain PyTorch."""

from segrank.checkpoints import from_pretrained, load_model, save_model, save_pretrained
from segrank.config import Config, ModelConfig, load_config
from segrank.config.inference import InferenceConfig
from segrank.inference.prediction import Prediction
from segrank.inference.predictor import Predictor, predict
from segrank.models import Segmentor, SegOutput, build_model

__version__ = "0.1.0"

__all__ = [
    "Config",
    "InferenceConfig",
    "ModelConfig",
    "Prediction",
    "Predictor",
    "SegOutput",
    "Segmentor",
    "__version__",
    "build_model",
    "from_pretrained",
    "load_config",
    "load_model",
    "predict",
    "save_model",
    "save_pretrained",
]
