"""Writing files: a temp file in the destination folder and a rename, so a killed process never leaves a half-written
file under the final name; the file gets the mode any other tool would give it under the process's umask."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segrank.errors import SegrankError


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
    hold_lock(fd)  # while open: remove_stale_temps never takes a live writer's temp file
    try:
        write(Path(tmp))
        # mkstemp creates the file 0600 whatever the umask, and some writers (safetensors) replace it by their own
        # 0600 temp file: give the output the mode any tool would give a new file, as colleagues expect.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def hold_lock(fd: int) -> None:
    """Lock an open temp file: remove_stale_temps keeps it while the lock is held. The system drops the lock when the
    file is closed or its process dies, even by SIGKILL, so no PID (reused, or of another host on NFS) is trusted."""
    with contextlib.suppress(OSError):  # a file system without locks: the age rule alone protects its temp files
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


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
