"""One image's segmentation as a user gets it: the label map at the image's size, the class names, the RankSeg class
ranking, pictures of it, and the files ``segrank predict`` writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from segrank import files
from segrank.inference.attention import AttentionMaps
from segrank.reporting.plots import attention_grid


@dataclass(repr=False)
class Prediction:
    """``label``: (H, W) int64 class ids at the input's size. ``class_names`` and ``palette`` ((N, 3) uint8) cover
    every class of the model. ``image``: the (H, W, 3) uint8 RGB input as it was read. ``ranking`` (RankSeg): every
    class, most likely first, as dicts ``class``, ``name``, ``score`` (mean image-level probability), ``selected``
    (kept in the top-k of some window) and ``pixel_fraction``. ``probabilities`` (when asked for): (K, H, W) float32
    mean softmax of the classes ``probability_classes`` (K,): all N classes for dense heads, the selected ones for
    RankSeg (every other class has a probability below 1e-40). ``attention`` (when asked for): the attention maps of
    the shown classes and of the ViT's class token (``inference.attention.AttentionMaps``)."""

    label: np.ndarray
    class_names: list[str]
    palette: np.ndarray
    image: np.ndarray
    source: str | None = None
    ranking: list[dict[str, Any]] | None = None
    topk: int | None = None
    probabilities: np.ndarray | None = None
    probability_classes: np.ndarray | None = None
    attention: AttentionMaps | None = None

    @property
    def name(self) -> str:
        """The stem the saved files are named after: the input file's, or ``image``."""
        return Path(self.source).stem if self.source else "image"

    def legend(self) -> list[dict[str, Any]]:
        """The classes present in the label map, largest area first: ``class``, ``name``, ``color`` (#rrggbb),
        ``pixel_fraction``."""
        area = np.bincount(self.label.reshape(-1), minlength=len(self.class_names))
        order = np.argsort(-area, kind="stable")
        return [{"class": int(c), "name": self.class_names[c], "color": "#{:02x}{:02x}{:02x}".format(*self.palette[c]),
                 "pixel_fraction": round(float(area[c]) / self.label.size, 6)} for c in order if area[c]]

    def colorize(self) -> Image.Image:
        """The label map in the palette's colours."""
        return Image.fromarray(self.palette[self.label])

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        """The colours laid over the image with opacity ``alpha``."""
        color = self.palette[self.label].astype(np.float64)
        return Image.fromarray((alpha * color + (1 - alpha) * self.image).round().astype(np.uint8))

    def save(self, folder: str | Path, name: str | None = None) -> list[Path]:
        """Write ``<name>.png`` (class ids: 8-bit, 16-bit above 256 classes), ``<name>_color.png``,
        ``<name>_overlay.png``, for RankSeg ``<name>.json`` (the class ranking) and, when attention was computed,
        ``<name>_attention.png`` (the image, then one map per class, a row per layer) into ``folder``: the files
        ``output_files`` lists; returns them. A full or failing disk raises ``files.WriteError`` naming the file."""
        written = output_files(folder, name or self.name, ranking=self.ranking is not None,
                               attention=self.attention is not None)
        ids = self.label.astype(np.uint8 if len(self.class_names) <= 256 else np.uint16)
        for path, image in zip(written[:3], (Image.fromarray(ids), self.colorize(), self.overlay()), strict=True):
            with files.naming_write_errors(path):
                files.atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        if self.ranking is not None:
            with files.naming_write_errors(written[3]):
                files.write_json(written[3], {
                    "image": self.source, "topk": self.topk,
                    "selected_classes": sorted(r["class"] for r in self.ranking if r["selected"]),
                    "ranking": self.ranking}, indent=1)
        if self.attention is not None:
            with files.naming_write_errors(written[-1]):
                attention_grid(self.image, self.attention.panels(), self.attention.extent(), written[-1])
        return written

    def __repr__(self) -> str:
        top = ", ".join(f"{c['name']} {c['pixel_fraction']:.0%}" for c in self.legend()[:3])
        return f"Prediction({self.name!r}, {self.label.shape[0]}x{self.label.shape[1]}, {top})"


def output_files(folder: str | Path, name: str, ranking: bool, attention: bool = False) -> list[Path]:
    """The files ``Prediction.save`` writes for an image called ``name`` (its file's stem), in order: the class ids,
    the colours, the overlay, when the model ranks classes (RankSeg) the ranking JSON and, when attention maps were
    asked for, their grid. ``segrank predict`` checks these names before it writes any."""
    folder = Path(folder)
    return [folder / f"{name}.png", folder / f"{name}_color.png", folder / f"{name}_overlay.png",
            *([folder / f"{name}.json"] if ranking else []), *([folder / f"{name}_attention.png"] if attention else [])]


def class_ranking(image_scores: Tensor, selected: Tensor, label: np.ndarray,
                  class_names: list[str]) -> list[dict[str, Any]]:
    """RankSeg's class ranking (``Prediction.ranking``): every class, the highest mean image-level score
    ``image_scores`` (N,) first (ties: lower id first), with whether it is among the ``selected`` classes and its
    share of the pixels of ``label``."""
    scores = image_scores.float().cpu()
    chosen = set(selected.tolist())
    area = np.bincount(label.reshape(-1), minlength=len(class_names))
    return [{"class": c, "name": class_names[c], "score": round(float(scores[c]), 6), "selected": c in chosen,
             "pixel_fraction": round(float(area[c]) / label.size, 6)}
            for c in scores.argsort(descending=True, stable=True).tolist()]
