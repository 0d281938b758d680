"""What a checkpoint carries for inference besides its architecture: palette, normalisation, test scale and windows.

Every field may be unknown (None): a converted reference checkpoint stores what the reference recorded, an old segrank
checkpoint nothing. Whoever predicts fills the gaps with defaults and says so (``segrank.engine.settings``).
Class names are part of the ModelConfig (``model.class_names``), so they are not repeated here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from segrank.config import ConfigError, EvalConfig, from_dict, to_dict


@dataclass
class InferenceConfig:
    palette: list[list[int]] | None = None  # one [r, g, b] per class
    mean: tuple[float, float, float] | None = None  # 0-255 scale, RGB
    std: tuple[float, float, float] | None = None
    img_scale: tuple[int, int] | None = None  # (long, short) keep-ratio test scale
    eval: EvalConfig | None = None  # whole/slide, windows, test scales and the --ms-flip scales

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in to_dict(self).items() if v is not None})

    @staticmethod
    def from_json(text: str, source: str) -> InferenceConfig:
        """Strict: an unknown key or a wrong type raises ConfigError naming ``source`` and the key."""
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}: not valid JSON ({err.msg})") from None
        return from_dict(InferenceConfig, data, source)

    def missing(self) -> list[str]:
        """Names of the fields that are unknown."""
        return [name for name, value in vars(self).items() if value is None]
