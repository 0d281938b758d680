"""Checkpoints read safely: pickles only with ``torch.load(weights_only=True)`` (loading a file never runs code), a
zip archive (``.pth``, ``.npz``) refused by its table of contents before any member is inflated when it declares
more than a real one could hold, state dicts loaded strictly with the misfit keys named."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor

from segrank.errors import CheckpointError

# A zip archive whose members declare more bytes than this (a ratio of its size, plus room for small files of constant
# values) is refused unread: torch.save stores every member uncompressed, numpy's savez_compressed reaches ratios near
# 1000 only on constant arrays; a zip bomb reaches millions.
ARCHIVE_RATIO = 100
ARCHIVE_SLACK = 64 * 2**20


def check_archive(path: Path, tensors_stored: bool = False) -> None:
    """Refuse, from its table of contents and before any member is inflated, a zip archive (``.pth``, ``.npz``)
    whose members would inflate far beyond the file, or (``tensors_stored``: a PyTorch file) that holds compressed
    tensors, which torch.save never writes. Anything else, a file that is no zip included, passes to its reader."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # no (readable) zip: its reader says what the file is
    total = sum(m.file_size for m in members)
    if members and total > ARCHIVE_RATIO * size + ARCHIVE_SLACK:
        worst = max(members, key=lambda m: m.file_size - m.compress_size)
        raise CheckpointError(f"{path}: archive member {worst.filename} would inflate {worst.compress_size:,} bytes "
                              f"to {worst.file_size:,} (all members: {total:,} bytes from a {size:,}-byte file); "
                              "refusing a possible zip bomb")
    packed = [m for m in members if tensors_stored and m.compress_type != zipfile.ZIP_STORED
              and "/data/" in f"/{m.filename}"]
    if packed:
        raise CheckpointError(f"{path}: archive member {packed[0].filename} is a compressed tensor, which torch.save "
                              "never writes (a re-packed or crafted file); save the weights again with torch.save")


def read_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with one clear error for a missing, damaged or code-carrying file; a zip
    archive's table of contents is checked first (``check_archive``)."""
    check_archive(path, tensors_stored=True)
    try:
        # An open file, not the path: torch.load picks a reader by the file name (".safetensors"), not the content.
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means: not a safe checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            first = "it contains Python objects that would run code when loaded; refusing to load it"
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first[:200]})") from None


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a valid .safetensors file ({str(err)[:200]})") from None


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file (pickled object arrays refused)."""
    check_archive(path)
    arrays, name = {}, None
    try:
        with np.load(path, allow_pickle=False) as data:
            for name in data.files:
                arrays[name] = data[name]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable .npz file ({str(err)[:200]})") from None
    except MemoryError:  # a member whose header declares an array larger than memory
        raise CheckpointError(f"{path}: member {name} declares an array larger than this machine's memory") from None
    return arrays


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Load with one clear error listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source}: does not fit the architecture ({'; '.join(problems)})")
    model.load_state_dict(state_dict, strict=True)
