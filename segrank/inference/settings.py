"""The test settings a prediction uses: normalisation, test scale, windows, class names and palette.

Each value comes from the first of these that has it: the caller's ``SettingsOverrides`` (the CLI's flags, the
Predictor's arguments), a config file given for the purpose (``--config``), what the checkpoint carries
(``model.inference``: written by training and by ``convert`` from the reference's own records), the ``config.yaml`` of
the training run a checkpoint without stored settings sits in, and finally defaults, which are listed in ``notes`` so
that a guess is never silent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segrank.config import Config, EvalConfig, load_config, load_yaml
from segrank.config.inference import MAX_TEST_SIDE, InferenceConfig
from segrank.data.info import NORMALIZATIONS, DatasetInfo, dataset_info, generated_palette
from segrank.errors import ConfigError, SegrankError
from segrank.models.segmentor import Segmentor

DEFAULT_NORMALIZATION = "half"
DEFAULT_IMG_SCALE = (2048, 512)


@dataclass
class PredictSettings:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_scale: tuple[int, int]
    eval: EvalConfig
    class_names: list[str]
    palette: np.ndarray  # (N, 3) uint8
    notes: list[str] = field(default_factory=list)  # the values that are defaults, not found anywhere


def test_scale(img_scale: Sequence[int], key: str) -> tuple[int, int]:
    """``img_scale`` of a config as a test scale, refused (naming ``key``) beyond ``MAX_TEST_SIDE`` a side."""
    if max(img_scale) > MAX_TEST_SIDE:
        raise ConfigError(f"{key}: {list(img_scale)} is above the largest test scale, {MAX_TEST_SIDE} pixels a side")
    return (img_scale[0], img_scale[1])


def run_inference_config(cfg: Config, info: DatasetInfo) -> InferenceConfig:
    """What a training run's checkpoints carry: its dataset's palette and normalisation, its test scale and windows."""
    mean, std = NORMALIZATIONS[cfg.data.normalization] if cfg.data.normalization else (info.mean, info.std)
    return InferenceConfig(palette=[list(c) for c in info.palette], mean=tuple(mean), std=tuple(std),
                           img_scale=test_scale(cfg.data.img_scale, "data.img_scale"),
                           eval=dataclasses.replace(cfg.eval))


def config_file_settings(path: Path) -> tuple[InferenceConfig, list[str] | None]:
    """(settings, class names) a YAML config gives. When its dataset cannot be read (a folder dataset that moved),
    what the config states by itself is still used."""
    cfg = load_config(path)
    test_scale(cfg.data.img_scale, f"{path}: data.img_scale")
    try:
        info = dataset_info(cfg.data.dataset, cfg.data.options, cfg.data.root)
    except SegrankError:
        mean, std = NORMALIZATIONS[cfg.data.normalization] if cfg.data.normalization else (None, None)
        return InferenceConfig(mean=mean, std=std, img_scale=tuple(cfg.data.img_scale), eval=cfg.eval), None
    return run_inference_config(cfg, info), list(info.classes)


def adopt_config_settings(model: Segmentor, path: Path) -> bool:
    """Give ``model`` the test settings and class names of a config file with a ``data`` section (they win over the
    ones it carries), so that a converted checkpoint carries them; False (nothing done) for a config that has only a
    model section."""
    if "data" not in load_yaml(path):
        return False
    settings, names = config_file_settings(path)
    given = {name: value for name, value in vars(settings).items() if value is not None}
    model.inference = dataclasses.replace(model.inference or InferenceConfig(), **given)
    if names is not None and len(names) == model.num_classes:
        model.cfg = dataclasses.replace(model.cfg, class_names=names)
    return True


def run_config_of(checkpoint: Path) -> Path | None:
    """The ``config.yaml`` of the training run holding ``checkpoint`` (work_dir/checkpoints/iter_*.safetensors)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


@dataclass(frozen=True, kw_only=True)
class SettingsOverrides:
    """What the caller says, winning over every stored setting (None: not said). ``config``: a YAML config whose
    dataset, normalisation, scale and windows to use; ``mean``/``std``: 0-255 RGB normalisation; ``img_scale``:
    (long, short) test scale; ``mode``: ``whole`` or ``slide`` windows; ``batch_size``: windows per forward pass;
    ``ms_flip``: the multi-scale + flip test will be used (its scales are checked too)."""

    config: str | Path | None = None
    mean: Sequence[float] | None = None  # mean, std and img_scale are kept as tuples
    std: Sequence[float] | None = None
    img_scale: Sequence[int] | None = None
    mode: str | None = None
    batch_size: int | None = None
    ms_flip: bool = False

    def __post_init__(self) -> None:
        for name in ("mean", "std", "img_scale"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))


NO_OVERRIDES = SettingsOverrides()


def given_settings(overrides: SettingsOverrides) -> InferenceConfig:
    """The overrides' normalisation and scale, checked against the bounds of their config fields; the error names
    the argument (``std: must be > 0``)."""
    if overrides.mode not in (None, "whole", "slide"):
        raise SegrankError(f"mode: {overrides.mode!r} is not one of 'whole', 'slide'")
    try:
        return InferenceConfig(mean=overrides.mean, std=overrides.std, img_scale=overrides.img_scale)
    except ConfigError as err:
        raise SegrankError(str(err).removeprefix(f"{InferenceConfig.key}.")) from None


def setting_sources(model: Segmentor, checkpoint: Path | None,
                    overrides: SettingsOverrides) -> tuple[list[InferenceConfig], list[list[str] | None]]:
    """Settings and class-name lists, the first that has a value wins: the overrides (with the model's own names),
    ``overrides.config``, what the model carries or else the config.yaml of the run ``checkpoint`` sits in."""
    sources, names = [given_settings(overrides)], [model.cfg.class_names]
    if overrides.config is not None:
        settings, config_names = config_file_settings(Path(overrides.config))
        sources.append(settings)
        names.append(config_names)
    if model.inference is not None:
        sources.append(model.inference)
    elif checkpoint is not None and (run_config := run_config_of(checkpoint)) is not None:
        settings, run_names = config_file_settings(run_config)
        sources.append(settings)
        names.append(run_names)
    return sources, names


def fill_defaults(found: dict[str, Any], model: Segmentor) -> list[str]:
    """Put the defaults into ``found`` where no source had a value; returns a note for each."""
    notes = []
    if found["mean"] is None or found["std"] is None:
        found["mean"], found["std"] = NORMALIZATIONS[DEFAULT_NORMALIZATION]
        notes.append(f"normalisation mean/std {found['mean']}")
    if found["img_scale"] is None:
        found["img_scale"] = DEFAULT_IMG_SCALE
        notes.append(f"test scale {DEFAULT_IMG_SCALE}")
    if found["eval"] is None:
        # The training crop: the size the position table was learned at.
        crop = tuple(g * model.patch_size for g in model.cfg.backbone.pos_embed_grid)
        found["eval"] = EvalConfig(mode="slide", crop_size=crop, stride=crop)
        notes.append(f"sliding {crop[0]}x{crop[1]} windows, stride {crop[0]}x{crop[1]} (the training crop)")
    return notes


def check_test_scales(img_scale: Sequence[int], test: EvalConfig, ms_flip: bool) -> None:
    """The largest test input a prediction asks for (img_scale times the largest scale ratio in use) must be within
    ``MAX_TEST_SIDE`` a side; refused before any image is read."""
    name = "ms_scales" if ms_flip else "scales"
    ratio = max(getattr(test, name))
    side = int(max(img_scale) * ratio)
    if side > MAX_TEST_SIDE:
        raise SegrankError(f"eval.{name}: scale {ratio:g} of img_scale {list(img_scale)} asks for test inputs of up to "
                           f"{side} pixels a side, above the limit of {MAX_TEST_SIDE}")


def resolve_settings(model: Segmentor, checkpoint: Path | None = None, *,
                     overrides: SettingsOverrides = NO_OVERRIDES) -> PredictSettings:
    """The settings to segment with ``model`` (``checkpoint``: the file it was loaded from, if any): each from the
    first of ``setting_sources`` that has it, else a default named in ``notes``."""
    sources, names = setting_sources(model, checkpoint, overrides)
    found = {name: next((getattr(s, name) for s in sources if getattr(s, name) is not None), None)
             for name in ("palette", "mean", "std", "img_scale", "eval")}
    notes = fill_defaults(found, model)
    n = model.num_classes
    class_names = next((list(c) for c in names if c is not None and len(c) == n), None)
    if class_names is None:
        class_names = [str(i) for i in range(n)]
        notes.append("class names: numbers 0..N-1")
    palette = found["palette"]
    if palette is None or len(palette) < n:
        palette = generated_palette(n)
    mode, batch_size = overrides.mode, overrides.batch_size
    try:
        test = dataclasses.replace(found["eval"], **({"mode": mode} if mode is not None else {}),
                                   **({"batch_size": batch_size} if batch_size is not None else {}))
    except ConfigError as err:
        raise SegrankError(str(err).removeprefix(f"{EvalConfig.key}.")) from None
    check_test_scales(found["img_scale"], test, overrides.ms_flip)
    return PredictSettings(tuple(found["mean"]), tuple(found["std"]), tuple(found["img_scale"]), test, class_names,
                           np.asarray(palette, dtype=np.uint8)[:n], notes)
