"""What a checkpoint path holds, judged by content, never by the file name's extension.

A folder stands for the checkpoint inside it: a ``save_pretrained`` folder (config.json + model.safetensors), a
training run's work dir (the checkpoint its ``latest`` pointer names) or an official Segmenter run (variant.yml). A
file's first bytes tell safetensors (a little-endian header length, then JSON), a PyTorch file (zip with
``data.pkl``, or a pickle) and an ``.npz`` archive (zip of ``.npy`` members) apart. ``CheckpointContent`` is what the
formats' ``detect`` functions (formats.py) ask about a resolved path; a path that no format claims gets a message
saying what it is instead (``unclaimed_error``): a training or optimizer state, an image, a text file, ...
"""

from __future__ import annotations

import json
import struct
import zipfile
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import Tensor

from segrank import files
from segrank.errors import CheckpointError

LATEST = "latest"  # a run's checkpoint folder: the pointer file naming its newest complete checkpoint
PRETRAINED_FILES = ("config.json", "model.safetensors")
TRAINING_STATE_KEYS = {"step", "seed", "optimizer", "scaler"}
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header
MAX_POINTER_BYTES = 255  # a ``latest`` pointer holds one checkpoint name

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
        name = read_latest(folder)
        if name is not None:
            weights = folder / f"{name}.safetensors"
            if not weights.is_file():
                raise CheckpointError(f"{folder / LATEST}: names checkpoint {name!r}, but {weights.name} is not there")
            return weights
    if (path / "variant.yml").is_file():
        return path
    if (path / "checkpoint.pth").is_file():
        raise CheckpointError(f"{path}: official Segmenter folder without its variant.yml (the architecture)")
    if (path / "config.yaml").is_file():
        raise CheckpointError(f"{path}: training run without a checkpoint yet (no checkpoints/{LATEST})")
    raise CheckpointError(f"{path}: not a checkpoint folder ({_FOLDER_HELP})")


def pretrained_folder(path: Path) -> bool:
    """Whether a resolved folder is a ``save_pretrained`` one (its config.json), rather than an official run's."""
    return (path / PRETRAINED_FILES[0]).is_file()


def read_latest(folder: Path) -> str | None:
    """The checkpoint name ``folder``'s ``latest`` pointer holds (None: no pointer). It may only name a checkpoint
    of its own folder: a pointer that is no short UTF-8 line, is empty or holds a path is refused."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    try:
        with open(pointer, "rb") as f:
            data = f.read(MAX_POINTER_BYTES + 1)
        name = data.decode("utf-8").strip()
    except OSError as err:
        raise CheckpointError(f"{pointer}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        name = None
    if name is None or len(data) > MAX_POINTER_BYTES or not name.isprintable():
        raise CheckpointError(f"{pointer}: not a checkpoint pointer (one line naming a checkpoint of this folder, "
                              "e.g. iter_0000100)")
    if not name:
        raise CheckpointError(f"{pointer}: empty; it should name the newest checkpoint of this folder, e.g. "
                              "iter_0000100")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"{pointer}: names {name!r}, a path; a pointer may only name a checkpoint in its own "
                              f"folder {folder}")
    return name


class CheckpointContent:
    """A resolved checkpoint path (``resolve_checkpoint``) as the formats' ``detect`` functions see it. Each property
    reads only what it needs, once, however many formats ask."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @cached_property
    def sniffed(self) -> tuple[str, dict[str, Any]] | CheckpointError:
        """("folder" | "safetensors" | "torch" | "npz", the safetensors JSON header), or the error that says what
        else the file is (kept for ``unclaimed_error``: a format may still claim the file by its name)."""
        if self.path.is_dir():
            return "folder", {}
        try:
            return file_kind(self.path)
        except CheckpointError as err:
            return err

    @property
    def kind(self) -> str | None:
        """One of "folder", "safetensors", "torch" and "npz"; None for a file that is none of them."""
        return None if isinstance(self.sniffed, CheckpointError) else self.sniffed[0]

    @property
    def safetensors_header(self) -> dict[str, Any]:
        """The JSON header of a safetensors file (tensor names, ``__metadata__``); {} for other kinds."""
        return self.sniffed[1] if self.kind == "safetensors" else {}

    @property
    def metadata(self) -> dict[str, str]:
        """The metadata of a safetensors file; {} for other kinds."""
        return self.safetensors_header.get("__metadata__") or {}

    @cached_property
    def mapping(self) -> dict[Any, Any]:
        """What a PyTorch file holds (unpickled without running code); anything but a mapping is refused."""
        obj = files.read_torch(self.path)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: holds a {type(obj).__name__}, not a checkpoint (a mapping of "
                                  "weights)")
        return obj

    @cached_property
    def model_mapping(self) -> dict[Any, Any]:
        """``mapping``, refused when it is a file that holds no model: a training state, an optimizer state."""
        obj = self.mapping
        if obj.keys() >= TRAINING_STATE_KEYS:
            weights = self.path.name.removesuffix(".state.pt") + ".safetensors"
            raise CheckpointError(f"{self.path}: a segrank training state (optimizer state and step, read by train "
                                  f"--resume), not model weights; the weights are in {weights} beside it")
        if {"state", "param_groups"} <= obj.keys():
            raise CheckpointError(f"{self.path}: an optimizer state, not model weights")
        return obj

    @cached_property
    def tensor_names(self) -> list[str] | None:
        """The names of the tensors of a plain mapping of weights: all of a safetensors file's, or those of a
        PyTorch mapping (or of its ``model`` entry) whose values are all tensors; None for anything else."""
        if self.kind == "safetensors":
            return [name for name in self.safetensors_header if name != "__metadata__"]
        if self.kind != "torch":
            return None
        obj = self.model_mapping
        weights = obj["model"] if isinstance(obj.get("model"), dict) else obj
        if weights and all(isinstance(v, Tensor) for v in weights.values()):
            return [str(k) for k in weights]
        return None


def unclaimed_error(content: CheckpointContent) -> CheckpointError:
    """The error for a path that no checkpoint format claims, saying what it holds instead."""
    if isinstance(content.sniffed, CheckpointError):
        return content.sniffed
    path, names = content.path, content.tensor_names
    if names is not None:
        what = "a .safetensors file" if content.kind == "safetensors" else "a PyTorch file"
        shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
        return CheckpointError(f"{path}: {what} of tensors ({shown}) that are neither a segrank model nor ViT "
                               "backbone weights")
    if content.kind == "torch":
        return CheckpointError(f"{path}: a mapping with keys {', '.join(map(str, list(content.mapping)[:5]))}, not "
                               "model weights")
    return CheckpointError(f"{path}: no checkpoint format reads this {content.kind}")


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
