"""``Predictor``: a checkpoint (or model) plus its test settings, applied to images in any common form.

It is the one code path of prediction: ``segrank predict`` and ``segrank serve`` call it too. Each image is read as a
viewer shows it (images.py), then goes through three stages: ``preprocess`` resizes and normalises it as the model was
tested (settings.py), ``forward`` segments it whole or by sliding windows, optionally at several scales with flips
(windows.py), at its own size, and ``postprocess`` makes the user's ``Prediction`` of it (prediction.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from segrank.checkpoints import load_model, resolve_checkpoint
from segrank.data.transforms import eval_transform
from segrank.errors import SegrankError
from segrank.inference.attention import AttentionOptions, attention_maps, plan_attention
from segrank.inference.compiled import compile_for_inference
from segrank.inference.images import array_to_rgb, collect_inputs, pil_to_rgb, read_image
from segrank.inference.precision import (
    PRECISION_CHOICES,
    inference_copy,
    precision_autocast,
    prepare_for_precision,
    resolve_precision,
)
from segrank.inference.prediction import Prediction, class_ranking
from segrank.inference.settings import PredictSettings, SettingsOverrides, resolve_settings
from segrank.inference.windows import ImageProbabilities, predict_image
from segrank.models.segmentor import Segmentor
from segrank.runtime.devices import PRECISIONS, precision_dtype, resolve_device

ImageInput = str | Path | Image.Image | np.ndarray
PRECISION_NAMES = {dtype: name for name, dtype in PRECISIONS.items() if name != "none"}  # amp's dtypes by name


class Predictor:
    """Segment images with a model and the test settings its checkpoint carries.

    ``checkpoint_or_model``: a checkpoint in any layout ``load_model`` reads (file, ``save_pretrained`` folder,
    training run's work dir) or a ``Segmentor``. ``device``: ``auto`` (GPU if any), ``cpu``, ``cuda``...
    ``ms_flip``: multi-scale + flip test (the stored ms-flip scales). ``batch_size``: windows per forward pass.
    ``precision``: ``auto`` (default: bf16 where the device computes it natively and a probe confirms it is faster,
    else fp32; the choice is logged once, logger ``segrank``), ``fp32``, ``bf16`` or ``fp16``; a lower precision
    converts the matrix layers' weights once (a ``Segmentor`` given is copied first, not changed) and keeps norms,
    logits and probabilities in fp32, so labels may differ from fp32 on a few pixels (docs/performance.md).
    ``amp``: the former name of ``precision`` (None: not given). ``compile``: ``torch.compile`` the model (inductor,
    frozen weights; each new input shape compiles once). ``probabilities``: also return per-class probabilities (a
    (K, H, W) float32 array at the image's size for K classes: unlike the labels' memory, theirs grows with
    the image and the class count; see ``windows.predict_image``).
    ``config``, ``mean``, ``std``, ``img_scale``, ``mode``: override the stored settings (a YAML config's dataset,
    normalisation, scale and windows; 0-255 RGB mean/std; (long, short) test scale; ``whole`` or ``slide``).
    Settings that are stored nowhere fall back to defaults, listed in ``settings.notes`` and announced once by a
    warning (``warn=False``: not announced). ``attention``: True or ``AttentionOptions`` (classes, layers) also
    computes each prediction's ``attention`` maps (docs/attention.md).
    """

    def __init__(  # noqa: PLR0913 - the public API: keyword options that mirror the CLI's flags (pyproject.toml)
            self, checkpoint_or_model: str | Path | Segmentor, device: str | torch.device = "auto",
                 ms_flip: bool = False, batch_size: int = 1, amp: str | torch.dtype | None = None, *,
                 precision: str | None = "auto", compile: bool = False, probabilities: bool = False,
                 config: str | Path | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, img_scale: Sequence[int] | None = None, mode: str | None = None,
                 warn: bool = True, attention: AttentionOptions | bool | None = None) -> None:
        if isinstance(checkpoint_or_model, Segmentor):
            model, checkpoint = checkpoint_or_model, None
        else:
            checkpoint = resolve_checkpoint(Path(checkpoint_or_model))
            model = load_model(checkpoint)
        if model.needs_present_classes:
            raise SegrankError(f"{checkpoint or 'model'}: a GT-oracle model needs label maps; use segrank eval "
                               "--oracle")
        self.device = resolve_device(device)
        self.precision = resolve_precision(self._precision_name(amp, precision), self.device, "segrank.Predictor")
        # A model handed in may still be trained by its owner: a lower precision converts a copy of it.
        prepare = inference_copy if checkpoint is None else prepare_for_precision
        self.model = prepare(model.to(self.device).eval(), self.precision)
        self.runner = compile_for_inference(self.model, self.device) if compile else self.model
        overrides = SettingsOverrides(config=config, mean=mean, std=std, img_scale=img_scale, mode=mode,
                                      batch_size=batch_size, ms_flip=ms_flip)
        self.settings: PredictSettings = resolve_settings(
            model, checkpoint if checkpoint is not None and checkpoint.is_file() else None, overrides=overrides)
        self.ms_flip, self.probabilities = ms_flip, probabilities
        self.attention = plan_attention(attention, self.model, self.settings.class_names)  # its layers are recorded
        if warn and self.settings.notes:
            warnings.warn("segrank.Predictor: stored nowhere with the model, so defaults are used: "
                          + "; ".join(self.settings.notes) + " (override with config=, mean=, std=, img_scale=, mode=)",
                          stacklevel=2)

    @staticmethod
    def _precision_name(amp: str | torch.dtype | None, precision: str | None) -> str:
        """``precision``, or the precision ``amp`` (its former name) names when given."""
        if precision is not None and precision not in PRECISION_CHOICES:
            raise SegrankError(f"precision: {precision!r} is not one of {', '.join(map(repr, PRECISION_CHOICES))}")
        if amp is None:
            return precision or "auto"
        try:
            named = PRECISION_NAMES[precision_dtype(amp)]
        except SegrankError:
            raise SegrankError(f"amp: {amp!r} is not one of None, 'bf16', 'fp16'") from None
        if precision not in (None, "auto", named):
            raise SegrankError(f"amp={amp!r} and precision={precision!r} disagree: give precision only")
        return named

    def __call__(self, inputs: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """One image (a file path, PIL image or array) gives a Prediction; a folder, a glob pattern or a list gives
        a list of them, in order."""
        predictions = list(self.iterate(inputs))
        return predictions[0] if self._is_single(inputs) else predictions

    @staticmethod
    def _is_single(inputs: ImageInput | Sequence[ImageInput]) -> bool:
        return isinstance(inputs, (Image.Image, np.ndarray)) or (isinstance(inputs, (str, Path))
                                                                  and Path(inputs).is_file())

    def iterate(self, inputs: ImageInput | Sequence[ImageInput]) -> Iterator[Prediction]:
        """Predictions one at a time, each image read when its turn comes (for long lists of files). Every named
        file, folder and pattern is checked before the first image is segmented."""
        one = isinstance(inputs, (str, Path, Image.Image, np.ndarray)) or not isinstance(inputs, Iterable)
        items = [inputs] if one else list(inputs)
        expanded: list[Path | Image.Image | np.ndarray] = []
        for item in items:
            if isinstance(item, (str, Path)):
                expanded += collect_inputs([item])
            elif isinstance(item, (Image.Image, np.ndarray)):
                expanded.append(item)
            else:
                raise SegrankError(f"input of type {type(item).__name__}: expected a path, glob pattern, folder, PIL "
                                   "image or numpy array")
        for item in expanded:
            if isinstance(item, Path):
                yield self.predict_rgb(read_image(item), str(item))
            elif isinstance(item, Image.Image):
                yield self.predict_rgb(pil_to_rgb(item), getattr(item, "filename", None) or None)
            else:
                yield self.predict_rgb(array_to_rgb(item))

    def predict_rgb(self, rgb: np.ndarray, source: str | None = None) -> Prediction:
        """Segment one (H, W, 3) uint8 RGB image: ``preprocess``, ``forward``, ``postprocess`` (then, if asked, the
        attention maps: a second pass that records them)."""
        image = self.preprocess(rgb)
        prediction = self.postprocess(self.forward(image, (rgb.shape[0], rgb.shape[1])), rgb, source)
        if self.attention is not None:
            with precision_autocast(self.precision, self.device):  # the matrix layers may hold bf16/fp16 weights
                prediction.attention = attention_maps(self.model, image, prediction.label, self.settings.eval,
                                                      self.attention)
        return prediction

    def preprocess(self, rgb: np.ndarray) -> Tensor:
        """The (3, h, w) input of the model, on its device: ``rgb`` resized to the test scale and normalised."""
        s = self.settings
        return eval_transform(rgb, s.img_scale, s.mean, s.std).to(self.device)

    def forward(self, image: Tensor, size: tuple[int, int]) -> ImageProbabilities:
        """Segment a preprocessed ``image`` by the test settings' windows (and scales and flips with ``ms_flip``);
        the result is at ``size``, the original image's (H, W)."""
        s = self.settings
        with torch.inference_mode(), precision_autocast(self.precision, self.device):
            return predict_image(self.runner, image, size, s.eval, ms_flip=self.ms_flip, img_scale=s.img_scale,
                                 probabilities=self.probabilities)

    def postprocess(self, result: ImageProbabilities, rgb: np.ndarray, source: str | None = None) -> Prediction:
        """The user's ``Prediction`` of ``result``: numpy arrays, names, palette and, when the head gives image-level
        scores (RankSeg), the class ranking."""
        s = self.settings
        label = result.label.cpu().numpy()
        ranking = None
        if result.image_scores is not None:
            ranking = class_ranking(result.image_scores, result.selected, label, s.class_names)
        return Prediction(
            label, s.class_names, s.palette, rgb, source, ranking, topk=self.model.decode_head.topk,
            probabilities=result.probs.float().cpu().numpy() if self.probabilities else None,
            probability_classes=result.classes.cpu().numpy() if self.probabilities else None)


def predict(checkpoint_or_model: str | Path | Segmentor, inputs: ImageInput | Sequence[ImageInput],
            **options: object) -> Prediction | list[Prediction]:
    """One call: ``Predictor(checkpoint_or_model, **options)(inputs)``."""
    return Predictor(checkpoint_or_model, **options)(inputs)
