"""What every converter shares: the plan of a conversion (one task per image) and the file helpers."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segrank import files
from segrank.errors import SegrankError


def nothing() -> None:
    """A plan without a last step."""


@dataclass
class Job:
    """A planned conversion: ``work(task)`` writes the outputs of one image that do not exist yet and returns
    whether it wrote anything; it runs in worker processes, so it is a module-level function or a
    functools.partial of one, and a task is plain data (paths, names, numbers). ``finish()`` runs once, in this
    process, after every task (e.g. split lists)."""

    desc: str
    work: Callable[[Any], bool]
    tasks: list[Any]
    finish: Callable[[], None] = field(default=nothing)


def copy_file(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise SegrankError(f"{src}: file not found")
    files.atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def save_label(label: np.ndarray, path: Path) -> None:
    """uint8 or uint16 label map as PNG/TIFF (pillow writes uint16 as 16-bit)."""
    fmt = "TIFF" if path.suffix in (".tif", ".tiff") else "PNG"
    files.atomic_write(path, lambda tmp: Image.fromarray(label).save(tmp, format=fmt))


def load_mat(path: Path, key: str) -> np.ndarray:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise SegrankError("reading .mat files needs scipy: pip install 'segrank[convert]'") from None
    try:
        data = loadmat(str(path))
    except (OSError, ValueError) as err:
        raise SegrankError(f"{path}: cannot read .mat file ({err})") from None
    if key not in data:
        raise SegrankError(f"{path}: no key {key!r} (keys: {', '.join(k for k in data if not k.startswith('__'))})")
    return np.asarray(data[key])


def read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise SegrankError(f"{path}: list file not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
