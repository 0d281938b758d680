"""Reference pipeline transforms on real photos: each test checks the exact property of one transform."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from segrank.data import transforms as T

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def crop_validity(label: np.ndarray, crop: tuple[int, int], ignore: int, max_ratio: float = 0.75) -> np.ndarray:
    """Brute-force validity of every crop offset, from per-class integral images (independent of the code)."""
    ch, cw = crop
    oh, ow = label.shape[0] - ch + 1, label.shape[1] - cw + 1
    counts = []
    for value in np.unique(label):
        if value == ignore:
            continue
        s = np.pad((label == value).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        counts.append(s[ch:ch + oh, cw:cw + ow] - s[:oh, cw:cw + ow] - s[ch:ch + oh, :ow] + s[:oh, :ow])
    counts = np.stack(counts)
    total, present = counts.sum(0), (counts > 0).sum(0)
    return (present >= 2) & (counts.max(0) < max_ratio * np.maximum(total, 1))


def test_crop_never_keeps_a_dominant_class_when_a_valid_crop_exists(photo):
    img, label = photo
    crop = (160, 160)
    valid = crop_validity(label, crop, 255)
    assert valid.mean() > 0.3  # valid crops are common, so 11 draws practically always find one
    for seed in range(40):
        top, left, h, w = T.random_crop_window(label, crop, 0.75, 255, np.random.default_rng(seed))
        assert (h, w) == crop and 0 <= top <= label.shape[0] - h and 0 <= left <= label.shape[1] - w
        values, counts = np.unique(label[top:top + h, left:left + w], return_counts=True)
        assert len(values) >= 2 and counts.max() / counts.sum() < 0.75


def test_crop_counts_only_non_ignored_pixels_with_the_datasets_ignore_value():
    # 90 % ignore (-1) plus two equal classes: valid only if -1 is treated as ignore, as for 1284-class datasets.
    label = np.full((100, 100), -1, np.int64)
    label[:, :5], label[:, 5:10] = 7, 1000
    for seed in range(5):
        top, left, h, w = T.random_crop_window(label, (100, 100), 0.75, -1, np.random.default_rng(seed))
        out = label[top:top + h, left:left + w]
        assert T.crop_is_valid(out, 0.75, -1) and not T.crop_is_valid(out, 0.75, 255)


def test_crop_without_any_valid_window_still_returns_a_crop_clipped_to_the_image():
    label = np.zeros((50, 80), np.int64)
    assert T.random_crop_window(label, (32, 32), 0.75, 255, np.random.default_rng(0))[2:] == (32, 32)
    top, left, h, w = T.random_crop_window(label, (64, 64), 0.75, 255, np.random.default_rng(0))
    assert top == 0 and 0 <= left <= 16 and (h, w) == (50, 64)  # taller than the image: the pad step fills it


def test_flip_flips_image_and_label_together(photo):
    img, label = photo
    flipped_img, flipped_label = T.random_flip(img, label, 1.0, np.random.default_rng(0))
    assert np.array_equal(flipped_img, img[:, ::-1]) and np.array_equal(flipped_label, label[:, ::-1])
    same_img, same_label = T.random_flip(img, label, 0.0, np.random.default_rng(0))
    assert same_img is img and same_label is label
    # Through the whole pipeline (no scale jitter, crop = image): every output pairs image and label the same way.
    h, w = label.shape
    seen = set()
    for seed in range(8):
        aug = T.Augmentation(img_scale=(max(h, w), min(h, w)), ratio_range=(1.0, 1.0), crop_size=(h, w),
                             cat_max_ratio=1.0, flip_prob=0.5, photometric=False)
        image, out = T.train_transform(img, label, np.random.default_rng(seed), aug, mean=MEAN, std=STD,
                                       ignore_index=255)
        flipped = torch.equal(out, torch.from_numpy(label[:, ::-1].copy()))
        assert flipped or torch.equal(out, torch.from_numpy(label))
        expected = img[:, ::-1] if flipped else img
        assert torch.allclose(image, T.normalize(expected, MEAN, STD))
        seen.add(flipped)
    assert seen == {True, False}


def test_keep_ratio_sizes_match_mmcv_imrescale():
    # VOC 375x500 into (2048, 512): factor min(2048/500, 512/375) = 1.3653 -> 512 x 682.67 -> (512, 683)
    assert T.rescale_size(375, 500, (2048, 512)) == (512, 683)
    # a very wide 100x1000 image is limited by the long side: factor 2048/1000 -> (205, 2048)
    assert T.rescale_size(100, 1000, (2048, 512)) == (205, 2048)
    # Pascal (4160, 520): short side 520
    assert T.rescale_size(480, 640, (4160, 520)) == (520, 693)


def test_resize_never_invents_label_values_and_keeps_alignment(photo):
    img, label = photo
    values = set(np.unique(label).tolist())
    for seed in range(6):
        size = T.random_scale(label.shape, (2048, 512), (0.5, 2.0), np.random.default_rng(seed))
        out_label = T.resize_label(label, size)
        assert T.resize_image(img, size).shape[:2] == out_label.shape == size
        assert set(np.unique(out_label).tolist()) <= values
        ratio = out_label.shape[0] / label.shape[0]
        assert 0.5 * 512 / min(label.shape) - 0.01 <= ratio <= 2.0 * 512 / min(label.shape) + 0.01
    # integer up-scaling by 2 repeats every label pixel exactly
    assert np.array_equal(T.resize_label(label, (2 * label.shape[0], 2 * label.shape[1])),
                          label.repeat(2, 0).repeat(2, 1))


def test_resizing_a_window_equals_resizing_everything_then_cropping(photo):
    img, _ = photo
    for size in [(700, 901), (200, 333)]:
        full = T.resize_image(img, size)
        assert np.array_equal(T.resize_image(img, size, (37, 50, 120, 160)), full[37:157, 50:210])


def test_resize_image_is_bilinear_with_half_pixel_centres():
    img = np.array([[[0, 0, 0], [100, 100, 100]]], np.uint8)  # 1x2
    out = T.resize_image(img, (1, 4))[0, :, 0]
    # half-pixel centres: output x in {-0.25, 0.25, 0.75, 1.25} (clamped) -> 0, 25, 75, 100
    assert out.tolist() == [0, 25, 75, 100]


@pytest.mark.parametrize("ignore", [255, -1])
def test_pad_uses_zero_for_the_image_and_the_ignore_value_for_the_label(photo, ignore):
    img, label = photo
    h, w = label.shape
    image, padded = T.pad(T.normalize(img, MEAN, STD), label, (h + 30, w + 50), ignore)
    assert image.shape == (3, h + 30, w + 50) and padded.shape == (h + 30, w + 50)
    assert torch.all(image[:, h:] == 0) and torch.all(image[:, :, w:] == 0)
    assert np.all(padded[h:] == ignore) and np.all(padded[:, w:] == ignore)
    assert np.array_equal(padded[:h, :w], label)
    # the full pipeline on a small image: crop larger than the image -> padded to exactly crop_size
    aug = T.Augmentation(img_scale=(200, 150), ratio_range=(1, 1), crop_size=(256, 256), cat_max_ratio=0.75,
                         flip_prob=0.5, photometric=True)
    image, out = T.train_transform(img, label, np.random.default_rng(0), aug, mean=MEAN, std=STD, ignore_index=ignore)
    rh, rw = T.rescale_size(h, w, (200, 150))
    assert image.shape == (3, 256, 256) and out.shape == (256, 256) and out.dtype == torch.int64
    assert torch.all(out[rh:] == ignore) and torch.all(out[:, rw:] == ignore) and torch.all(out[:rh, :rw] != ignore)


def test_photometric_distortion_changes_pixels_but_never_the_label(photo):
    img, label = photo
    changed = 0
    for seed in range(6):
        on = T.Augmentation(img_scale=(2048, 512), ratio_range=(0.5, 2.0), crop_size=(256, 256), cat_max_ratio=0.75,
                            flip_prob=0.5, photometric=True)
        off = dataclasses.replace(on, photometric=False)
        kwargs = dict(mean=MEAN, std=STD, ignore_index=255)
        image_on, label_on = T.train_transform(img, label, np.random.default_rng(seed), on, **kwargs)
        image_off, label_off = T.train_transform(img, label, np.random.default_rng(seed), off, **kwargs)
        assert torch.equal(label_on, label_off)
        changed += not torch.equal(image_on, image_off)
    assert changed >= 4


def test_hsv_conversion_round_trips_and_matches_matplotlib_hue(photo):
    import matplotlib.colors

    img, _ = photo
    hsv = T.rgb_to_hsv(img)
    assert np.abs(T.hsv_to_rgb(hsv).astype(int) - img).max() <= 4
    ref = matplotlib.colors.rgb_to_hsv(img / 255.0)
    saturated = ref[..., 1] > 0.2
    hue_err = np.abs(hsv[..., 0].astype(float) - np.round(ref[..., 0] * 180) % 180)
    assert np.minimum(hue_err, 180 - hue_err)[saturated].max() <= 1
    assert np.abs(hsv[..., 2].astype(float) - ref[..., 2] * 255).max() <= 0.5
    back = matplotlib.colors.hsv_to_rgb(np.stack([hsv[..., 0] / 180, hsv[..., 1] / 255, hsv[..., 2] / 255], -1))
    assert np.abs(T.hsv_to_rgb(hsv) - back * 255).max() <= 0.5 + 1e-6


def test_eval_transform_resizes_the_image_only(photo):
    img, label = photo
    image = T.eval_transform(img, (2048, 512), MEAN, STD)
    assert image.shape[1:] == T.rescale_size(*img.shape[:2], (2048, 512))
    assert image.dtype == torch.float32
