"""Built-in synthetic scenes: a large vocabulary with only 2-6 classes per image, generated on the fly.

Class ``k`` has a fixed appearance: a texture pattern (8 kinds, then coarser periods for large vocabularies) drawn in
two colours of a 12-colour palette, and a shape family. The colour pair alone separates the first 132 classes (12
first colours x 11 second colours), so a patch's colours carry most of the identity and its texture the rest.
Scenes are one background class plus 1-5 shapes (ellipse, rectangle, triangle, diamond) of 35-65 % of the image
side, so every region spans several 16-pixel patches. A scene is a pure function of (seed, split, index); no files
are read or written.

``class_offset`` shifts the vocabulary: label ``k`` is drawn with the appearance of class ``k + class_offset``. Two
datasets whose offsets are at least their class counts apart share no class, only the colours, textures and shapes
the classes are made of: the demo pre-trains its backbone on such a disjoint vocabulary, as ImageNet pre-training
precedes fine-tuning on a segmentation dataset's own classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from segrank.errors import SegrankError

COLOURS = {
    "red": (220, 40, 40), "orange": (240, 140, 20), "yellow": (230, 220, 40), "lime": (140, 220, 40),
    "green": (30, 150, 60), "teal": (30, 170, 160), "cyan": (70, 200, 240), "blue": (40, 70, 210),
    "purple": (130, 50, 200), "magenta": (220, 50, 190), "brown": (130, 80, 40), "grey": (128, 128, 128),
}
PATTERNS = ["speckle", "hstripes", "vstripes", "diagonal", "antidiagonal", "checker", "dots", "grid"]
SHAPES = ["ellipse", "rectangle", "triangle", "diamond"]
OPTIONS = {"num_classes": 150, "image_size": 128, "train_images": 1000, "val_images": 100, "seed": 0,
           "min_classes": 2, "max_classes": 6, "class_offset": 0, "rare_classes": 0, "rare_ratio": 10}
MIN_CLASS_FRACTION = 0.04  # a class that ends up smaller than this (occluded) triggers a redraw of the layout
NOISE_STD = 6.0


def synthetic_options(options: dict[str, Any]) -> dict[str, int]:
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise SegrankError(f"data.options.{sorted(unknown)[0]}: unknown synthetic option "
                           f"(known: {', '.join(OPTIONS)})")
    out = {**OPTIONS, **options}
    for key, value in out.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise SegrankError(f"data.options.{key}: expected an integer, got {value!r}")
    if out["class_offset"] < 0:
        raise SegrankError(f"data.options.class_offset: must be >= 0, got {out['class_offset']}")
    if not 0 <= out["rare_classes"] < out["num_classes"] or out["rare_ratio"] < 1:
        raise SegrankError(f"data.options: need 0 <= rare_classes < num_classes and rare_ratio >= 1, got "
                           f"{out['rare_classes']}, {out['rare_ratio']}")
    if out["num_classes"] < 2 or out["image_size"] < 16:
        raise SegrankError("data.options: synthetic needs num_classes >= 2 and image_size >= 16")
    if not 2 <= out["min_classes"] <= out["max_classes"] <= min(out["num_classes"], 6):
        raise SegrankError(f"data.options: need 2 <= min_classes <= max_classes <= min(num_classes, 6), got "
                           f"{out['min_classes']}, {out['max_classes']}")
    return out


def class_appearance(k: int) -> tuple[int, int, int, int, int]:
    """(first colour, second colour, pattern, period, shape) of class ``k``; unique for every k."""
    n = len(COLOURS)
    first, rest = k % n, k // n
    pair, group = rest % (n - 1), rest // (n - 1)  # second colour differs from the first
    pattern = (group + first + pair) % len(PATTERNS)  # spread textures over the vocabulary
    return first, (first + 1 + pair) % n, pattern, 8 + 4 * (group // len(PATTERNS)), (k + rest) % len(SHAPES)


def synthetic_classes(num_classes: int, class_offset: int = 0) -> list[str]:
    names = list(COLOURS)
    out = []
    for k in range(class_offset, class_offset + num_classes):
        first, second, pattern, period, shape = class_appearance(k)
        out.append(f"{names[first]}-{names[second]} {PATTERNS[pattern]}" + (f" p{period}" if period != 8 else "")
                   + f" {SHAPES[shape]}")
    return out


def _pattern(pattern: int, period: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    half = period // 2
    if pattern == 0:  # fixed per-pixel hash: fine-grained texture without randomness
        return (((xx * 73856093) ^ (yy * 19349663)) >> 5) & 1
    if pattern == 1:
        return (yy // half) % 2
    if pattern == 2:
        return (xx // half) % 2
    if pattern == 3:
        return ((xx + yy) // half) % 2
    if pattern == 4:
        return ((xx - yy) // half) % 2
    if pattern == 5:
        return ((xx // half) + (yy // half)) % 2
    if pattern == 6:
        return ((xx % period) < half) & ((yy % period) < half)
    return ((xx % period) < 2) | ((yy % period) < 2)


def _tones(k: int) -> np.ndarray:
    """(2, 3) first and second colour of class ``k``."""
    first, second, _, _, _ = class_appearance(k)
    palette = list(COLOURS.values())
    return np.array([palette[first], palette[second]], np.float32)


def _shape_mask(shape: int, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = (rng.uniform(0.35, 0.65, 2) * size).astype(int)
    y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    box = [x0, y0, x0 + w - 1, y0 + h - 1]
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if SHAPES[shape] == "ellipse":
        draw.ellipse(box, fill=1)
    elif SHAPES[shape] == "rectangle":
        draw.rectangle(box, fill=1)
    elif SHAPES[shape] == "triangle":
        apex = x0 + int(rng.integers(0, w))
        draw.polygon([(apex, y0), (x0, y0 + h - 1), (x0 + w - 1, y0 + h - 1)], fill=1)
    else:
        draw.polygon([(x0 + w // 2, y0), (x0 + w - 1, y0 + h // 2), (x0 + w // 2, y0 + h - 1), (x0, y0 + h // 2)],
                     fill=1)
    return np.asarray(canvas, dtype=bool)


def draw_classes(rng: np.random.Generator, count: int, opts: dict[str, int]) -> np.ndarray:
    """``count`` distinct classes of a scene, the background first. With ``rare_classes`` R (an imbalanced dataset)
    the background is one of the other classes, and each of the last R classes joins a scene ``rare_ratio`` times less
    often than each other class."""
    n, rare = opts["num_classes"], opts["rare_classes"]
    if not rare:
        return rng.choice(n, count, replace=False)
    background = int(rng.integers(n - rare))
    others = np.delete(np.arange(n), background)
    weights = np.where(others < n - rare, 1.0, 1.0 / opts["rare_ratio"])
    return np.concatenate([[background], rng.choice(others, count - 1, replace=False, p=weights / weights.sum())])


def synthetic_scene(index: int, split: str, opts: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, int64 label) of scene ``index`` of ``split``."""
    split_key = {"train": 0, "val": 1, "test": 2}.get(split, sum(map(ord, split)) + 3)
    rng = np.random.default_rng([opts["seed"], split_key, index])
    size = opts["image_size"]
    count = int(rng.integers(opts["min_classes"], opts["max_classes"] + 1))
    classes = draw_classes(rng, count, opts)
    offset = opts["class_offset"]
    for _ in range(50):  # redraw the layout until every class keeps a sizeable region
        label = np.full((size, size), classes[0], np.int64)
        for k in classes[1:]:
            label[_shape_mask(class_appearance(int(k) + offset)[4], size, rng)] = k
        if np.bincount(np.searchsorted(np.sort(classes), label.ravel()), minlength=count).min() \
                >= MIN_CLASS_FRACTION * size * size:
            break
    ranks = np.searchsorted(np.sort(classes), label)  # label -> 0..count-1
    yy, xx = np.mgrid[:size, :size]
    second = np.zeros((size, size), bool)
    for r, k in enumerate(np.sort(classes)):
        _, _, pattern, period, _ = class_appearance(int(k) + offset)
        second |= (ranks == r) & _pattern(pattern, period, yy, xx).astype(bool)
    tones = np.stack([_tones(int(k) + offset) for k in np.sort(classes)])  # (count, 2, 3)
    image = tones[ranks, second.astype(np.int64)]
    image += rng.standard_normal(image.shape, dtype=np.float32) * NOISE_STD
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label
