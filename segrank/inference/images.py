"""Images to segment, read as an image viewer shows them, and the lists of files a user names.

A viewer turns a photo by its EXIF orientation, shows a 16-bit or floating-point grey image across its range (not
clipped to white), lays a transparent image on a white page and converts palette and CMYK images to colour: the
model sees the same. Training data is read by ``segrank.data`` as the reference pipeline reads it instead.
"""

from __future__ import annotations

import glob
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from segrank import files
from segrank.data.datasets import IMAGE_EXTENSIONS
from segrank.errors import SegrankError

WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
# Pillow's own error types for a damaged, truncated or oversized file.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
MAX_IMAGE_PIXELS = 64_000_000  # an image to segment with more pixels is refused, before a file of it is decoded


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, as a viewer shows it."""
    try:
        with Image.open(path) as img:
            return pil_to_rgb(img, str(path))
    except IMAGE_ERRORS as err:
        raise SegrankError(f"{path}: cannot read image ({err})") from None


def check_image_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise SegrankError(f"{name}: image of {width}x{height} pixels is larger than the limit of "
                           f"{MAX_IMAGE_PIXELS / 1e6:g} megapixels")


def upright(img: Image.Image, name: str) -> Image.Image:
    """``img`` turned by its EXIF orientation. The pixels are decoded first, so that whatever fails in the turn
    comes from the EXIF block: a damaged one (bad offsets, counts or values) is ignored with a warning and the
    image read as stored."""
    img.load()
    try:
        return ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 - Pillow's EXIF parser raises struct, key, type, value... errors
        warnings.warn(f"{name}: damaged EXIF metadata ({type(err).__name__}: {err}); read without its orientation",
                      stacklevel=2)
        return img


def pil_to_rgb(img: Image.Image, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image: EXIF orientation applied, wide greys scaled, transparency on white.
    One of more than ``MAX_IMAGE_PIXELS`` is refused before its pixels are decoded."""
    check_image_size(img.width, img.height, name)
    img = upright(img, name)
    if img.mode in WIDE_GREY_MODES:
        a = np.asarray(img)
        if img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535:  # how Pillow opens a 16-bit PNG
            a = a.astype(np.uint16)
        return grey_to_rgb(a)
    if img.mode in TRANSPARENT_MODES or "transparency" in img.info:
        return on_white(np.asarray(img.convert("RGBA")))
    return np.array(img.convert("RGB"))  # a copy: Pillow's buffer is read-only


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an array: H x W grey, H x W x 3 RGB or H x W x 4 RGBA (RGB order, not OpenCV's BGR);
    uint8 as is, 16-bit and float values scaled as for files."""
    a = np.asarray(array)
    if a.ndim >= 2:
        check_image_size(a.shape[1], a.shape[0], f"array of shape {a.shape}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2 and min(a.shape) > 0:
        return grey_to_rgb(a)
    if a.ndim == 3 and a.shape[2] in (3, 4) and min(a.shape[:2]) > 0:
        rgb = to_uint8(a)
        return on_white(rgb) if rgb.shape[2] == 4 else np.ascontiguousarray(rgb)
    raise SegrankError(f"array of shape {a.shape}: expected H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA)")


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Values onto 0-255: bool as 0/255, uint16 by /257 (its full range), floats in [0, 1] by x255, other values
    in [0, 255] as they are, and any other range stretched from its minimum to its maximum (NaN/inf as 0)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise SegrankError(f"array of dtype {a.dtype}: expected integer or floating-point pixel values")
    values = a.astype(np.float64)
    finite = np.isfinite(values)
    values[~finite] = 0.0
    low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:  # uint16 of either byte order (Pillow's I;16B is big-endian)
        values = values / 257.0
    elif np.issubdtype(a.dtype, np.floating) and low >= 0 and high <= 1:
        values = values * 255.0
    elif low < 0 or high > 255:
        values = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def grey_to_rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(to_uint8(a)[..., None], 3, axis=2)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """An RGBA image laid on a white page, as a viewer shows its transparent parts."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files, folders (their images, sorted, not recursive) and glob patterns -> image paths, in order, once each.
    A folder's hidden files (macOS ``._`` copies, editors' and killed runs' temp files) and the temp files a pattern
    matches are no inputs; a file named as such is read whatever its name."""
    paths: dict[Path, None] = {}  # ordered set
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
            if not found:
                raise SegrankError(f"{item}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(str(item)):
            found = sorted(p for p in map(Path, glob.glob(str(item))) if p.is_file()
                           and not files.TEMP_FILE.fullmatch(p.name))
            if not found:
                raise SegrankError(f"{item}: pattern matches no file")
        else:
            raise SegrankError(f"{item}: no such file or folder")
        paths.update(dict.fromkeys(found))
    return list(paths)
