"""What a checkpoint carries for inference besides its architecture: palette, normalisation, test scale and windows.

Every field may be unknown (None): a converted reference checkpoint stores what the reference recorded, an old segrank
checkpoint nothing. Whoever predicts fills the gaps with defaults and says so (``segrank.inference.settings``).
Class names are part of the ModelConfig (``model.class_names``), so they are not repeated here. The values are
checked like every config section (segrank.config.fields) whenever one is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from segrank.config import EvalConfig
from segrank.config.build import from_dict, to_dict
from segrank.config.fields import POSITIVE, Bound, Section, setting, within
from segrank.errors import ConfigError

# Pixels a side of the test-scale resize target: beyond it, one image's model input and merged outputs (and the time to
# compute them) would be unbounded, whatever a checkpoint or a flag asks for.
MAX_TEST_SIDE = 8192


def _palette_is_rgb(cfg: InferenceConfig) -> str | None:
    """palette: one [r, g, b] per class, each value in 0..255."""
    if cfg.palette is not None and any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in cfg.palette):
        return "inference.palette: needs one [r, g, b] (0..255) per class"
    return None


@dataclass
class InferenceConfig(Section):
    key: ClassVar[str] = "inference"
    rules: ClassVar[tuple[Callable[[Any], str | None], ...]] = (_palette_is_rgb,)
    palette: list[list[int]] | None = setting(None, "one [r, g, b] per class")
    mean: tuple[float, float, float] | None = setting(None, "normalisation mean, RGB on the 0-255 scale", Bound())
    std: tuple[float, float, float] | None = setting(None, "normalisation std, RGB on the 0-255 scale", POSITIVE)
    img_scale: tuple[int, int] | None = setting(None, "(long, short) keep-ratio test scale",
                                                within(1, MAX_TEST_SIDE))
    eval: EvalConfig | None = setting(None, "whole/slide, windows, test scales and the --ms-flip scales")

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in to_dict(self).items() if v is not None})

    @staticmethod
    def from_json(text: str, source: str) -> InferenceConfig:
        """Strict: an unknown key, a wrong type or a value out of range raises ConfigError naming the key."""
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}: not valid JSON ({err.msg})") from None
        return from_dict(InferenceConfig, data, source)

    def missing(self) -> list[str]:
        """Names of the fields that are unknown."""
        return [name for name, value in vars(self).items() if value is None]
