"""``Predictor``: a checkpoint (or model) plus its test settings, applied to images in any common form.

It is the one code path of prediction: ``segrank predict`` and ``segrank serve`` call it too. Each image is read as a
viewer shows it (images.py), resized and normalised as the model was tested (settings.py), segmented whole or by
sliding windows, optionally at several scales with flips (inference.py), and returned at its own size.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segrank.checkpoints import load_model, resolve_checkpoint
from segrank.data.transforms import eval_transform
from segrank.engine.images import array_to_rgb, collect_inputs, pil_to_rgb, read_image
from segrank.engine.inference import predict_image
from segrank.engine.prediction import Prediction
from segrank.engine.settings import TestSettings, resolve_settings
from segrank.errors import SegrankError
from segrank.models.segmentor import Segmentor

ImageInput = str | Path | Image.Image | np.ndarray
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | torch.device) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegrankError(f"device {str(device)!r}: no CUDA device available")
    return device


class Predictor:
    """Segment images with a model and the test settings its checkpoint carries.

    ``checkpoint_or_model``: a checkpoint in any layout ``load_model`` reads (file, ``save_pretrained`` folder,
    training run's work dir) or a ``Segmentor``. ``device``: ``auto`` (GPU if any), ``cpu``, ``cuda``...
    ``ms_flip``: multi-scale + flip test (the stored ms-flip scales). ``batch_size``: windows per forward pass.
    ``amp``: None, ``bf16`` or ``fp16`` autocast. ``probabilities``: also return per-class probabilities.
    ``config``, ``mean``, ``std``, ``img_scale``, ``mode``: override the stored settings (a YAML config's dataset,
    normalisation, scale and windows; 0-255 RGB mean/std; (long, short) test scale; ``whole`` or ``slide``).
    Settings that are stored nowhere fall back to defaults, listed in ``settings.notes`` and announced once by a
    warning (``warn=False``: not announced).
    """

    def __init__(self, checkpoint_or_model: str | Path | Segmentor, device: str | torch.device = "auto",
                 ms_flip: bool = False, batch_size: int = 1, amp: str | torch.dtype | None = None, *,
                 probabilities: bool = False, config: str | Path | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, img_scale: Sequence[int] | None = None, mode: str | None = None,
                 warn: bool = True) -> None:
        if isinstance(checkpoint_or_model, Segmentor):
            model, checkpoint = checkpoint_or_model, None
        else:
            checkpoint = resolve_checkpoint(Path(checkpoint_or_model))
            model = load_model(checkpoint)
        if model.needs_present_classes:
            raise SegrankError(f"{checkpoint or 'model'}: a GT-oracle model needs label maps; use segrank eval "
                               "--oracle")
        self.amp = self._amp_dtype(amp)
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.settings: TestSettings = resolve_settings(
            model, checkpoint if checkpoint is not None and checkpoint.is_file() else None, config,
            None if mean is None else list(mean), None if std is None else list(std),
            None if img_scale is None else list(img_scale), mode, batch_size)
        self.ms_flip, self.probabilities = ms_flip, probabilities
        if warn and self.settings.notes:
            warnings.warn("segrank.Predictor: stored nowhere with the model, so defaults are used: "
                          + "; ".join(self.settings.notes) + " (override with config=, mean=, std=, img_scale=, mode=)",
                          stacklevel=2)

    @staticmethod
    def _amp_dtype(amp: str | torch.dtype | None) -> torch.dtype | None:
        if amp is None or amp == "none":
            return None
        if isinstance(amp, torch.dtype) and amp in AMP_DTYPES.values():
            return amp
        if isinstance(amp, str) and amp in AMP_DTYPES:
            return AMP_DTYPES[amp]
        raise SegrankError(f"amp: {amp!r} is not one of None, 'bf16', 'fp16'")

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
        """Segment one (H, W, 3) uint8 RGB image."""
        s, model = self.settings, self.model
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            image = eval_transform(rgb, s.img_scale, s.mean, s.std).to(self.device)
            result = predict_image(model, image, rgb.shape[:2], s.eval, ms_flip=self.ms_flip, img_scale=s.img_scale)
        label = result.label.cpu().numpy()
        ranking = None
        if result.image_scores is not None:
            scores = result.image_scores.float().cpu()
            selected = set(result.selected.tolist())
            area = np.bincount(label.reshape(-1), minlength=model.num_classes)
            ranking = [{"class": c, "name": s.class_names[c], "score": round(float(scores[c]), 6),
                        "selected": c in selected, "pixel_fraction": round(float(area[c]) / label.size, 6)}
                       for c in scores.argsort(descending=True, stable=True).tolist()]
        return Prediction(
            label, s.class_names, s.palette, rgb, source, ranking,
            topk=model.cfg.head.topk if model.cfg.head.type == "rankseg" else None,
            probabilities=result.probs.float().cpu().numpy() if self.probabilities else None,
            probability_classes=result.classes.cpu().numpy() if self.probabilities else None)


def predict(checkpoint_or_model: str | Path | Segmentor, inputs: ImageInput | Sequence[ImageInput],
            **options: object) -> Prediction | list[Prediction]:
    """One call: ``Predictor(checkpoint_or_model, **options)(inputs)``."""
    return Predictor(checkpoint_or_model, **options)(inputs)
