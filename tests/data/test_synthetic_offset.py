"""Synthetic ``class_offset``: label k is drawn with the appearance of class k + offset, so two vocabularies whose
offsets are at least their sizes apart share no class."""

from __future__ import annotations

import numpy as np
import pytest

from segrank.data.info import dataset_info
from segrank.data.synthetic import COLOURS, class_appearance, synthetic_classes, synthetic_options, synthetic_scene
from segrank.errors import SegrankError


def test_offset_vocabulary_is_the_shifted_one():
    assert synthetic_classes(20, 150) == synthetic_classes(170)[150:]
    assert dataset_info("synthetic", {"num_classes": 20, "class_offset": 150}).classes == synthetic_classes(20, 150)
    assert not set(synthetic_classes(150)) & set(synthetic_classes(150, 150))


def test_scene_regions_wear_the_shifted_classes_colours():
    opts = synthetic_options({"num_classes": 20, "image_size": 64, "class_offset": 300})
    image, label = synthetic_scene(3, "train", opts)
    assert label.min() >= 0 and label.max() < 20
    palette = np.array(list(COLOURS.values()), np.float32)
    for k in np.unique(label):
        first, second, *_ = class_appearance(int(k) + 300)
        pixels = image[label == k].astype(np.float32)
        # Every pixel is one of the two colours plus noise (std 6): the nearer of the two is within 4 std.
        distance = np.minimum(np.abs(pixels - palette[first]).max(1), np.abs(pixels - palette[second]).max(1))
        assert np.mean(distance < 24) > 0.99, k


def test_negative_offset_is_refused():
    with pytest.raises(SegrankError, match="class_offset"):
        synthetic_options({"class_offset": -1})
