"""Property-based fuzzing (hypothesis) of label decoding and the train/test transforms: labels stay inside the
vocabulary or the ignore value, image and label stay aligned pixel for pixel, and broken files raise only segrank's
own errors (SegrankError, one line naming the file)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from segrank.config import DataConfig
from segrank.data import build_dataset
from segrank.data.info import ignore_for
from segrank.data.transforms import (
    Augmentation,
    eval_transform,
    photometric_distortion,
    rescale_size,
    train_transform,
)
from segrank.errors import SegrankError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sides = st.integers(2, 120)
scales = st.tuples(st.integers(8, 160), st.integers(8, 160))
ratios = st.tuples(st.floats(0.5, 2.0), st.floats(0.5, 2.0)).map(sorted).map(tuple)
crops = st.tuples(st.integers(1, 96), st.integers(1, 96))


@FUZZ
@given(h=sides, w=sides, img_scale=scales, ratio_range=ratios, crop=crops, seed=st.integers(0, 2**32 - 1),
       cat_max_ratio=st.sampled_from([0.75, 1.0]), flip_prob=st.sampled_from([0.0, 0.5, 1.0]))
def test_train_transform_keeps_image_and_label_aligned(h, w, img_scale, ratio_range, crop, seed, cat_max_ratio,
                                                        flip_prob):
    """The image encodes each pixel's source position (R = row, G = column); the label holds row * W + column.
    After resize, crop, flip and pad, every labelled pixel's image position is within interpolation distance of its
    label position (a flip or shift of one but not the other is off by up to the image size)."""
    rows, cols = np.mgrid[:h, :w]
    img = np.stack([rows, cols, np.full_like(rows, 7)], -1).astype(np.uint8)
    label = (rows * w + cols).astype(np.int64)
    aug = Augmentation(img_scale, ratio_range, crop, cat_max_ratio, flip_prob, photometric=False)
    image, out = train_transform(img, label, np.random.default_rng(seed), aug, mean=(0.0, 0.0, 0.0),
                                 std=(1.0, 1.0, 1.0), ignore_index=-1)
    image, out = image.numpy(), out.numpy()
    assert image.shape == (3, *crop) and out.shape == crop
    valid = out != -1
    assert valid.any() and set(np.unique(out[valid])) <= set(label.ravel())
    # Padding is a bottom/right band: valid pixels form the top-left rectangle.
    vh, vw = valid.any(1).sum(), valid.any(0).sum()
    assert valid[:vh, :vw].all() and valid.sum() == vh * vw
    r_label, c_label = out[:vh, :vw] // w, out[:vh, :vw] % w
    r_image, c_image = image[0, :vh, :vw], image[1, :vh, :vw]
    assert (image[2, :vh, :vw] == 7).all()
    # One output pixel spans `step` source pixels (most at the smallest scale): bilinear taps and the nearest label
    # pixel differ by less than step/2 + 1.
    smallest = rescale_size(h, w, (int(img_scale[0] * ratio_range[0]), int(img_scale[1] * ratio_range[0])))
    step_r, step_c = max(1.0, h / smallest[0]), max(1.0, w / smallest[1])
    assert np.abs(r_image - r_label).max() <= step_r / 2 + 1.5
    assert np.abs(c_image - c_label).max() <= step_c / 2 + 1.5


@st.composite
def class_labels(draw):
    n = draw(st.integers(1, 300))
    ignore = ignore_for(n)
    h, w = draw(sides), draw(sides)
    dtype = draw(st.sampled_from([np.int32, np.int64] + ([np.uint8, np.uint16] if ignore >= 0 else [])))
    values = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=5)) + [ignore]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    label = rng.choice(np.array(values), (h, w)).astype(dtype)
    return n, ignore, label


@FUZZ
@given(labels=class_labels(), img_scale=scales, ratio_range=ratios, crop=crops, seed=st.integers(0, 2**32 - 1),
       photometric=st.booleans(), cat_max_ratio=st.floats(0.05, 1.0))
def test_train_and_test_transforms_keep_labels_in_the_vocabulary(labels, img_scale, ratio_range, crop, seed,
                                                                 photometric, cat_max_ratio):
    n, ignore, label = labels
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    aug = Augmentation(img_scale, ratio_range, crop, cat_max_ratio, 0.5, photometric)
    image, out = train_transform(img, label, rng, aug, mean=mean, std=std, ignore_index=ignore)
    assert out.dtype == torch_int64() and tuple(out.shape) == crop and tuple(image.shape) == (3, *crop)
    assert set(np.unique(out.numpy())) <= set(np.unique(label).astype(np.int64)) | {ignore}
    assert np.isfinite(image.numpy()).all()
    test_image = eval_transform(img, img_scale, mean, std)
    assert tuple(test_image.shape) == (3, *rescale_size(*label.shape, img_scale))
    assert np.isfinite(test_image.numpy()).all()
    distorted = photometric_distortion(img, rng)
    assert distorted.shape == img.shape and distorted.dtype == np.uint8


def torch_int64():
    import torch

    return torch.int64


# --- label files and broken files, through the folder dataset --------------------------------------------------

LABEL_MODES = ["L", "P", "I;16", "I", "F", "1", "RGB", "RGBA", "LA"]


def encode(array: np.ndarray, mode: str, fmt: str) -> bytes:
    """``array`` (H, W) written as a ``mode`` image (colour modes repeat it over the channels) in format ``fmt``."""
    if mode in ("RGB", "RGBA", "LA"):
        channels = len(mode)
        image = Image.fromarray(np.repeat(array.astype(np.uint8)[..., None], channels, -1), mode)
    elif mode == "1":
        image = Image.fromarray((array % 2).astype(bool))
    elif mode == "P":
        image = Image.fromarray(array.astype(np.uint8), "L").convert("P")
    else:
        dtype = {"L": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        image = Image.fromarray(array.astype(dtype))  # Pillow infers the mode from the dtype
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def damage(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["none"] * 4 + ["truncate", "flip", "garbage"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "garbage":
        return draw(st.binary(max_size=64))
    return data


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), num_classes=st.integers(1, 20), reduce_zero_label=st.booleans(),
       file_ignore=st.sampled_from([255, None, 65535]), mode=st.sampled_from(LABEL_MODES),
       h=st.integers(1, 40), w=st.integers(1, 40), label_h=st.integers(1, 40),
       same_size=st.sampled_from([True, True, False]), high=st.sampled_from([0, 0, 25, 300, 70000]))
def test_label_files_decode_into_the_vocabulary_or_raise_segrank_errors(data, num_classes, reduce_zero_label,
                                                                        file_ignore, mode, h, w, label_h, same_size,
                                                                        high):
    """high: label file values are drawn below it (0: the vocabulary's file values, so most files are valid)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    label_shape = (h, w) if same_size else (label_h, w)
    raw = rng.integers(0, high or num_classes + reduce_zero_label, label_shape)
    image_bytes = data.draw(damage(encode(rng.integers(0, 256, (h, w)), "RGB", "JPEG")))
    label_bytes = data.draw(damage(encode(raw, mode, "TIFF" if mode in ("I", "F") else "PNG")))  # any name works
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        (root / "labels").mkdir()
        (root / "images" / "a.jpg").write_bytes(image_bytes)
        (root / "labels" / "a.png").write_bytes(label_bytes)
        (root / "classes.yaml").write_text(yaml.safe_dump({
            "classes": [f"c{i}" for i in range(num_classes)], "reduce_zero_label": reduce_zero_label,
            "ignore_index": file_ignore}))
        cfg = DataConfig(dataset="folder", root=str(root), img_scale=(32, 24), crop_size=(16, 16), workers=0)
        for train in (False, True):
            try:
                dataset = build_dataset(cfg, "val", train=train)
                item = dataset[(0, 1)]
            except SegrankError as err:
                assert "\n" not in str(err) and str(root) in str(err)
                event("refused: " + str(err).split(": ", 1)[-1][:40])
                continue
            event("decoded")
            ignore = ignore_for(num_classes)
            values = set(np.unique(item["label"].numpy()).tolist())
            assert values <= set(range(num_classes)) | {ignore}
            assert item["ori_size"] == (h, w)
