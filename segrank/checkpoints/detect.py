"""What a checkpoint path holds, judged by content, never by the file name's extension.

A folder stands for the checkpoint inside it: a ``save_pretrained`` folder (config.json + model.safetensors), a
training run's work dir (the checkpoint its ``latest`` pointer names) or an official Segmenter run (variant.yml). A
file's first bytes tell safetensors (a little-endian header length, then JSON), a PyTorch file (zip with
``data.pkl``, or a pickle) and an ``.npz`` archive (zip of ``.npy`` members) apart; what a PyTorch file holds tells
an mmseg checkpoint, an official Segmenter one, a backbone state dict, or a file that is no model at all (a training
state, an optimizer state). Anything else gets a message saying what the file is.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

from torch import Tensor

from segrank import files
from segrank.errors import CheckpointError

LATEST = "latest"  # a run's checkpoint folder: the pointer file naming its newest complete checkpoint
PRETRAINED_FILES = ("config.json", "model.safetensors")
NATIVE_KEY = "segrank_config"  # safetensors metadata of segrank's native format: the ModelConfig as YAML
TRAINING_STATE_KEYS = {"step", "seed", "optimizer", "scaler"}
VIT_NAMES = ("patch_embed", "pos_embed", "cls_token")  # in every ViT backbone's parameter names (timm, ours)
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header

# (first bytes, what the file is) of files people hand over by mistake.
_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip-compressed file (unpack it first)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file (unpack it first)"), (b"BZh", "a bzip2-compressed file (unpack it first)"),
]
_FOLDER_HELP = ("expected config.json + model.safetensors (save_pretrained), a training run's work dir "
                "(checkpoints/latest) or an official Segmenter run (checkpoint.pth + variant.yml)")


def resolve_checkpoint(path: Path) -> Path:
    """The file (or official Segmenter folder) that ``path`` stands for."""
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if not path.is_dir():
        return path
    if all((path / name).is_file() for name in PRETRAINED_FILES):
        return path
    for folder in (path / "checkpoints", path):
        pointer = folder / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            weights = folder / f"{name}.safetensors"
            if not name or not weights.is_file():
                raise CheckpointError(f"{pointer}: names checkpoint {name!r}, but {weights.name} is not there")
            return weights
    if (path / "variant.yml").is_file():
        return path
    if (path / "checkpoint.pth").is_file():
        raise CheckpointError(f"{path}: official Segmenter folder without its variant.yml (the architecture)")
    if (path / "config.yaml").is_file():
        raise CheckpointError(f"{path}: training run without a checkpoint yet (no checkpoints/{LATEST})")
    raise CheckpointError(f"{path}: not a checkpoint folder ({_FOLDER_HELP})")


def detect_format(path: Path) -> str:
    """The layout of a resolved checkpoint path (see ``resolve_checkpoint``), one of the loaders' format names."""
    if path.is_dir():
        return "pretrained" if (path / PRETRAINED_FILES[0]).is_file() else "segmenter"
    if path.name == "variant.yml":
        return "segmenter"
    kind, header = file_kind(path)
    if kind == "npz":
        return "npz"
    if kind == "safetensors":
        if NATIVE_KEY in (header.get("__metadata__") or {}):
            return "native"
        return backbone_format([k for k in header if k != "__metadata__"], path, "a .safetensors file")
    return torch_format(files.read_torch(path), path)


def backbone_format(names: list[str], path: Path, what: str) -> str:
    """``timm`` for tensors named as a ViT backbone's; anything else is refused, saying what it is."""
    if any(part in name for name in names for part in VIT_NAMES):
        return "timm"
    shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
    raise CheckpointError(f"{path}: {what} of tensors ({shown}) that are neither a segrank model nor ViT backbone "
                          "weights")


def file_kind(path: Path) -> tuple[str, dict[str, Any]]:
    """("safetensors" | "torch" | "npz", the safetensors JSON header) from the first bytes of ``path``."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    if not head:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    (length,) = struct.unpack("<Q", head[:8]) if len(head) > 8 else (0,)
    if head[8:9] == b"{" and length < MAX_SAFETENSORS_HEADER:
        if length > size - 8:
            raise CheckpointError(f"{path}: truncated .safetensors file (its header needs {length + 8} bytes, the "
                                  f"file has {size})")
        return "safetensors", _safetensors_header(path, length)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_kind(path), {}
    if head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle: PyTorch's legacy format, or pickle.dump
        return "torch", {}
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise CheckpointError(f"{path}: {what}, not a checkpoint")
    if head[8:12] == b"WEBP" and head.startswith(b"RIFF"):
        raise CheckpointError(f"{path}: a WebP image, not a checkpoint")
    text = _text_start(head)
    if text is not None:
        raise CheckpointError(f"{path}: a text file, not a checkpoint (it starts with {text!r})")
    raise CheckpointError(f"{path}: not a checkpoint: neither safetensors, a PyTorch file nor an .npz archive "
                          f"(it starts with bytes {head[:8].hex(' ')})")


def _text_start(head: bytes) -> str | None:
    """The first line of ``head`` if it reads as UTF-8 text (a character cut by the 4 kB limit allowed)."""
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:
            return None
        text = head[:err.start].decode("utf-8")
    lines = text.strip().splitlines()
    return lines[0][:60] if lines else None


def _safetensors_header(path: Path, length: int) -> dict[str, Any]:
    with open(path, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise CheckpointError(f"{path}: damaged .safetensors file (its header is not the expected JSON)")
    return header


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "torch"  # a damaged zip: torch.load's reader names the damage
    if names and all(name.endswith(".npy") for name in names):
        return "npz"
    if any(name.endswith("data.pkl") for name in names):
        return "torch"
    raise CheckpointError(f"{path}: a zip archive holding neither PyTorch weights (data.pkl) nor .npy arrays, "
                          "not a checkpoint")


def torch_format(obj: Any, path: Path) -> str:
    """The layout of an unpickled PyTorch file: mmseg, official Segmenter or a backbone (timm) state dict."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint (a mapping of weights)")
    if isinstance(obj.get("state_dict"), dict):
        return "mmseg"
    if obj.keys() >= TRAINING_STATE_KEYS:
        weights = path.name.removesuffix(".state.pt") + ".safetensors"
        raise CheckpointError(f"{path}: a segrank training state (optimizer state and step, read by train --resume), "
                              f"not model weights; the weights are in {weights} beside it")
    if {"state", "param_groups"} <= obj.keys():
        raise CheckpointError(f"{path}: an optimizer state, not model weights")
    if isinstance(obj.get("model"), dict) and "n_cls" in obj:
        if not (path.parent / "variant.yml").is_file():
            raise CheckpointError(f"{path}: official Segmenter checkpoint without the variant.yml (the architecture) "
                                  "that belongs beside it")
        return "segmenter"
    weights = obj.get("model") if isinstance(obj.get("model"), dict) else obj
    if weights and all(isinstance(v, Tensor) for v in weights.values()):
        return backbone_format([str(k) for k in weights], path, "a PyTorch file")
    raise CheckpointError(f"{path}: a mapping with keys {', '.join(map(str, list(obj)[:5]))}, not model weights")
