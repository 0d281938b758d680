"""The ``model.loss`` section: RankSeg's image-level loss and the pixel loss, either the reference cross-entropy
(``seg_reduction``) or a weighted sum of ``pixel_terms`` (docs/losses.md).

A term's ``class_weight`` may name a file (.json list, or .txt with one number per line, relative to the working
directory); it is read when the config loads, so the resolved config and every checkpoint carry the numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from segrank.config.fields import NON_NEGATIVE, POSITIVE, PROBABILITY, Section, field_problems, setting
from segrank.errors import ConfigError

CLASS_WEIGHT_FILES = (".json", ".txt")


@dataclass
class PixelTermConfig:
    """One pixel loss term. Not a Section: LossConfig checks each term, so that errors name its position."""

    type: Literal["cross_entropy", "dice", "focal", "lovasz"] = setting(
        "cross_entropy", "cross_entropy, dice (soft Dice), focal (softmax focal) or lovasz (Lovász-softmax)")
    weight: float = setting(1.0, "factor of this term in the pixel loss", NON_NEGATIVE)
    class_weight: list[float] | str | None = setting(
        None, "one factor per class (model.num_classes of them), or a .json list / .txt file (one per line) read when "
              "the config loads; null: all 1", NON_NEGATIVE)
    avg_non_ignore: bool = setting(False, "cross_entropy and focal: divide the summed pixel losses by the labelled "
                                          "pixels (mmseg's avg_non_ignore) instead of all pixels")
    gamma: float = setting(2.0, "focal: focusing exponent (0: cross-entropy)", NON_NEGATIVE)
    smooth: float = setting(1.0, "dice: added to numerator and denominator of each class's Dice score", POSITIVE)


def read_class_weight(value: list[float] | str | None, key: str) -> list[float] | None:
    """A class_weight as numbers: a list stays, a file name is read (.json: a list; .txt: one number per line)."""
    if not isinstance(value, str):
        return value
    path = Path(value)
    if path.suffix.lower() not in CLASS_WEIGHT_FILES:
        raise ConfigError(f"{key}: {path}: expected a .json or .txt file of numbers, or a list")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: {path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    if path.suffix.lower() == ".json":
        try:
            numbers = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: {path}: not valid JSON ({err})") from None
        if not isinstance(numbers, list):
            raise ConfigError(f"{key}: {path}: expected a JSON list of numbers")
        entries = [(f"entry {i}", v) for i, v in enumerate(numbers)]
    else:
        entries = [(f"line {n}", line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    out = []
    for where, number in entries:
        try:
            if isinstance(number, bool):
                raise ValueError
            out.append(float(number))
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {path}: {where} is not a number: {number!r}") from None
    return out


def pixel_terms_valid(loss: LossConfig) -> str | None:
    """pixel_terms, when given, holds at least one term, each within the ranges of model.loss.pixel_terms[]; it
    replaces seg_reduction, so seg_reduction stays all_pixels (a term's avg_non_ignore: true is valid_pixels)."""
    if loss.pixel_terms is None:
        return None
    if not loss.pixel_terms:
        return f"{loss.key}.pixel_terms: needs at least one term (null: the reference cross-entropy)"
    for i, term in enumerate(loss.pixel_terms):
        problems = field_problems(term)
        if problems:
            name, problem = problems[0]
            return f"{loss.key}.pixel_terms[{i}].{name}: {problem}"
    if loss.seg_reduction != "all_pixels":
        return (f"{loss.key}.seg_reduction: {loss.seg_reduction} applies without pixel_terms only; set "
                "avg_non_ignore: true in the terms instead")
    return None


@dataclass
class LossConfig(Section):
    key: ClassVar[str] = "model.loss"
    rules: ClassVar[tuple[Callable[[Any], str | None], ...]] = (pixel_terms_valid,)
    image_loss: Literal["bce", "asl"] = setting("bce", "RankSeg image-level loss: binary cross-entropy or asymmetric")
    image_loss_weight: float = setting(10.0, "weight of the image-level loss", NON_NEGATIVE)
    asl_gamma_neg: float = setting(2.0, "asymmetric loss: focusing exponent of absent classes", NON_NEGATIVE)
    asl_gamma_pos: float = setting(0.0, "asymmetric loss: focusing exponent of present classes", NON_NEGATIVE)
    asl_clip: float = setting(0.05, "asymmetric loss: probability margin taken off absent classes", PROBABILITY)
    asl_eps: float = setting(1e-5, "asymmetric loss: smallest probability inside the log", POSITIVE)
    image_reduction: Literal["mean", "sum_classes"] = setting(
        "mean", "image-level loss: mean = sum / (batch x num_classes) (the reference); sum_classes = sum over "
                "classes / batch, whose pull on the shared layers does not shrink as the vocabulary grows")
    seg_reduction: Literal["all_pixels", "valid_pixels"] = setting(
        "all_pixels", "all_pixels: sum over valid pixels / all pixels (mmseg 0.17 reference); valid_pixels: mean "
                      "over valid pixels")
    pixel_terms: list[PixelTermConfig] | None = setting(
        None, "the pixel loss as a weighted sum of terms (each: see model.loss.pixel_terms[]; docs/losses.md); "
              "null: the reference cross-entropy with seg_reduction")

    def __post_init__(self) -> None:
        for i, term in enumerate(self.pixel_terms or []):
            term.class_weight = read_class_weight(term.class_weight, f"{self.key}.pixel_terms[{i}].class_weight")
        super().__post_init__()


def class_weights_fit(num_classes: int, loss: LossConfig) -> str | None:
    """A pixel term's class_weight has num_classes entries (ModelConfig's rule: the count lives there)."""
    for i, term in enumerate(loss.pixel_terms or []):
        if term.class_weight is not None and len(term.class_weight) != num_classes:
            return (f"{loss.key}.pixel_terms[{i}].class_weight: {len(term.class_weight)} weights for "
                    f"num_classes={num_classes}")
    return None
