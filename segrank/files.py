"""The one place that reads and writes files: atomic writes, safe checkpoint readers, strict state-dict loading.

Every write goes through a temp file in the destination folder and a rename, so a killed process never leaves a
half-written file under the final name; the file gets the mode any other tool would give it under the process's
umask. Commands call ``ensure_writable`` on their destinations before they start the work. Pickled files are only read
with ``torch.load(weights_only=True)``: loading a file can never run code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor

from segrank.errors import CheckpointError, SegrankError


def current_umask() -> int:
    """The process's umask. Read from /proc where the kernel shows it: setting and restoring it with ``os.umask``
    would briefly leave another thread creating files with umask 0."""
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temp file in ``path``'s folder, then rename it to ``path``. The temp name keeps the
    suffix, so writers that pick a format from the file name (PIL, numpy) still work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates the file 0600 whatever the umask, and some writers (safetensors) replace it by their own
        # 0600 temp file: give the output the mode any tool would give a new file, as colleagues expect.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# What atomic_write's temp files are called: "." + stem + "." + mkstemp's 8 random characters + ".tmp" + suffix.
TEMP_FILE = re.compile(r"\..*\.[a-z0-9_]{8}\.tmp(\.[^.]*)?")


def remove_temps(folder: Path) -> int:
    """Delete the temp files that killed atomic writes left anywhere under ``folder``; returns how many."""
    stale = [p for p in Path(folder).rglob(".*.tmp*") if TEMP_FILE.fullmatch(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def ensure_writable(path: Path, folder: bool = False) -> None:
    """Refuse, before any work starts, a destination that cannot be written: a file ``path`` (``folder=False``) or a
    folder ``path`` that may not exist yet. Creates nothing; the error names ``path``."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise SegrankError(f"{path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise SegrankError(f"{path}: is a folder, expected a file name")
    target = path if folder else path.parent
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise SegrankError(f"{path}: cannot be created, {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SegrankError(f"{path}: cannot write, {existing} is not writable")
    try:  # a read-only file system, or rights that os.access does not see (e.g. ACLs, root on NFS)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise SegrankError(f"{path}: cannot write in {existing} ({err.strerror})") from None


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def append_line(path: Path, line: str) -> None:
    """Append one line to a log file (a killed write loses at most that line, which a resumed run rewrites)."""
    with open(path, "a") as f:
        f.write(line + "\n")


def json_safe(value: Any) -> Any:
    """NaN -> None, recursively, so the JSON is standard (no bare NaN tokens); e.g. the IoU of an absent class."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, value: Any, indent: int | None = None) -> None:
    write_text(path, json.dumps(json_safe(value), indent=indent) + "\n")


def read_yaml(path: Path, error: type[SegrankError] = SegrankError) -> Any:
    """``yaml.safe_load`` of a file (never constructs Python objects); ``error`` naming the file when it is not YAML."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def read_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with one clear error for a missing, damaged or code-carrying file."""
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
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable .npz file ({str(err)[:200]})") from None


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
