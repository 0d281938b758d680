"""The reference (mmseg 0.x) train and test pipelines on numpy arrays (the configs of the RankSeg fork).

Images are uint8 RGB (H, W, 3) until ``normalize``; labels are int64 (H, W) with the dataset's ignore value.
Every random choice draws from the ``numpy.random.Generator`` passed in, never from global state, so an item is a
pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def rescale_size(h: int, w: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv ``imrescale``: the largest keep-ratio size with long side <= max(scale) and short side <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    # At least one pixel: a very elongated image would otherwise lose a side (mmcv/cv2 then fail).
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _linear_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of half-pixel-centre linear interpolation (edge-clamped)."""
    x = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0)
    x0 = np.minimum(np.floor(x).astype(np.int64), n_in - 1)
    x1 = np.minimum(x0 + 1, n_in - 1)
    w1 = (x - x0).astype(np.float32)
    return x0, x1, w1


def resize_image(img: np.ndarray, size: tuple[int, int],
                 window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Bilinear with half-pixel centres and no antialias (cv2 INTER_LINEAR), rounded back to uint8.

    ``window`` (top, left, height, width) computes only that part of the ``size`` output, bit-identical to
    resizing everything and cropping. Plain numpy: the result does not depend on the thread count.
    """
    top, left, height, width = window or (0, 0, *size)
    if img.shape[:2] == tuple(size):
        return img[top:top + height, left:left + width]
    y0, y1, wy = (t[top:top + height] for t in _linear_taps(size[0], img.shape[0]))
    x0, x1, wx = (t[left:left + width] for t in _linear_taps(size[1], img.shape[1]))
    src = img.astype(np.float32)
    rows = src[y0] * (1 - wy)[:, None, None] + src[y1] * wy[:, None, None]
    out = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour with cv2 INTER_NEAREST's source index floor(dst * src / dst_size): only existing values."""
    h, w = label.shape
    rows = np.minimum((np.arange(size[0]) * (h / size[0])).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(size[1]) * (w / size[1])).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def random_scale(shape: tuple[int, int], img_scale: tuple[int, int], ratio_range: tuple[float, float],
                 rng: np.random.Generator) -> tuple[int, int]:
    """mmseg Resize(img_scale, ratio_range, keep_ratio): scale = int(img_scale * U(ratio_range)), then the
    keep-ratio size of an image of ``shape`` (H, W) for that scale."""
    ratio = rng.uniform(*ratio_range)
    return rescale_size(shape[0], shape[1], (int(img_scale[0] * ratio), int(img_scale[1] * ratio)))


def crop_is_valid(crop: np.ndarray, cat_max_ratio: float, ignore_index: int) -> bool:
    """At least two non-ignored classes and none above ``cat_max_ratio`` of the non-ignored pixels."""
    values, counts = np.unique(crop, return_counts=True)
    counts = counts[values != ignore_index]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop_window(label: np.ndarray, crop_size: tuple[int, int], cat_max_ratio: float, ignore_index: int,
                       rng: np.random.Generator) -> tuple[int, int, int, int]:
    """mmseg RandomCrop on ``label``: up to 10 re-draws while the crop is not valid; the 11th draw is kept unchecked.
    Returns (top, left, height, width), clipped to the label.

    Unlike the reference (which always ignores 255), the dataset's own ignore value is excluded from the counts.
    """
    h, w = min(crop_size[0], label.shape[0]), min(crop_size[1], label.shape[1])

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, label.shape[0] - h + 1)), int(rng.integers(0, label.shape[1] - w + 1))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            if crop_is_valid(label[y:y + h, x:x + w], cat_max_ratio, ignore_index):
                break
            y, x = draw()
    return y, x, h, w


def random_flip(img: np.ndarray, label: np.ndarray, prob: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if rng.random() < prob:  # copies: a flipped view of width 1 looks contiguous to numpy, not to torch.from_numpy
        return img[:, ::-1].copy(), label[:, ::-1].copy()
    return img, label


# ---------------------------------------------------------------------------------------------------------------
# PhotoMetricDistortion (mmseg defaults): uint8 in, uint8 out, with OpenCV's 8-bit HSV (H in [0, 180)).


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    """OpenCV COLOR_RGB2HSV for uint8: H = hue/2 in [0, 180), S and V in [0, 255], rounded."""
    rgb = img.astype(np.float32)
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta * 255 / np.maximum(v, 1e-6), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-6)
    h = np.where(v == r, 60 * (g - b) / safe, np.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    h = np.where(delta > 0, h, 0)
    h = np.where(h < 0, h + 360, h) / 2
    return np.stack([np.round(h) % 180, np.round(s), v], -1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """OpenCV COLOR_HSV2RGB for uint8 (H in [0, 180)): channel n = V - V*S*clip(min(k, 4 - k), 0, 1) with
    k = (n + H/30) mod 6 for n = 5, 3, 1 (R, G, B)."""
    h = hsv[..., 0].astype(np.float32) / 30
    s = hsv[..., 1].astype(np.float32) / 255
    v = hsv[..., 2].astype(np.float32)
    out = np.empty((*hsv.shape[:-1], 3), np.float32)
    for c, n in enumerate((5, 3, 1)):
        k = (n + h) % 6
        out[..., c] = v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg PhotoMetricDistortion: brightness, contrast first or last (random), saturation, hue; each with p=0.5."""

    def contrast(x: np.ndarray) -> np.ndarray:
        return _convert(x, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else x

    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180
        img = hsv_to_rgb(hsv)
    if mode == 0:
        img = contrast(img)
    return img


# ---------------------------------------------------------------------------------------------------------------


def normalize(img: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W), (x - mean) / std on the 0-255 scale."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def pad(image: torch.Tensor, label: np.ndarray, size: tuple[int, int],
        ignore_index: int) -> tuple[torch.Tensor, np.ndarray]:
    """Pad bottom/right to ``size``: image with 0 (after normalisation, as mmseg), label with the ignore value."""
    dh, dw = size[0] - image.shape[1], size[1] - image.shape[2]
    if dh <= 0 and dw <= 0:
        return image, label
    image = F.pad(image, (0, max(dw, 0), 0, max(dh, 0)), value=0.0)
    label = np.pad(label, ((0, max(dh, 0)), (0, max(dw, 0))), constant_values=ignore_index)
    return image, label


@dataclass(frozen=True)
class Augmentation:
    """The training pipeline's random steps, as the data section of a config sets them (mmseg 0.x names)."""

    img_scale: tuple[int, int]
    ratio_range: tuple[float, float]
    crop_size: tuple[int, int]
    cat_max_ratio: float
    flip_prob: float
    photometric: bool


def train_transform(img: np.ndarray, label: np.ndarray, rng: np.random.Generator, aug: Augmentation, *,
                    mean: tuple[float, ...], std: tuple[float, ...], ignore_index: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize -> RandomCrop -> RandomFlip -> PhotoMetricDistortion -> Normalize -> Pad (as mmseg 0.x).

    The crop is chosen on the resized label; only the cropped part of the image is resized (same pixels, less work).
    """
    size = random_scale(label.shape, aug.img_scale, aug.ratio_range, rng)
    label = resize_label(label, size)
    top, left, h, w = random_crop_window(label, aug.crop_size, aug.cat_max_ratio, ignore_index, rng)
    img, label = resize_image(img, size, (top, left, h, w)), label[top:top + h, left:left + w]
    img, label = random_flip(img, label, aug.flip_prob, rng)
    if aug.photometric:
        img = photometric_distortion(img, rng)
    image, label = pad(normalize(img, mean, std), label, aug.crop_size, ignore_index)
    return image, torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))


def eval_transform(img: np.ndarray, img_scale: tuple[int, int], mean: tuple[float, ...],
                   std: tuple[float, ...]) -> torch.Tensor:
    """Keep-ratio resize into ``img_scale`` (bilinear) and normalise; the label stays at the original size."""
    return normalize(resize_image(img, rescale_size(*img.shape[:2], img_scale)), mean, std)
