"""What an output may replace. Destinations: no output replaces an input or an unrelated file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from segrank.errors import SegrankError
from segrank.files.writing import TEMP_FILE, current_umask

# Every command that writes lists all it will write and all it reads, and check_destinations decides, before the work
# starts, what may be written over. Folder outputs and files whose writers make temp files of their own are staged
# in a temp folder beside them (staged_write); a disk that fails meanwhile is one line naming the file
# (naming_write_errors); what killed writes left behind is removed by the next write there (remove_stale_temps).

WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})
STALE_AFTER_S = 60.0  # a temp file untouched this long, whose lock no writer holds, was left by a killed write


class WriteError(SegrankError):
    """A write the system refused (disk full, over quota, read-only, failing); the message names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: cannot write ({reason})")
        self.path, self.reason = Path(path), reason


@contextlib.contextmanager
def naming_write_errors(path: Path) -> Iterator[None]:
    """A full, read-only or failing disk met while writing ``path`` becomes a ``WriteError`` naming it (one line, no
    traceback); any other error passes unchanged."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise WriteError(path, err.strerror or str(err)) from None


def file_key(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` names, links followed; None when nothing is there. Equal keys: one file under
    two names (a hard or symbolic link, a bind mount, another case on a case-insensitive file system)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def check_destinations(outputs: Sequence[tuple[Path, str]], inputs: Iterable[Path | str | None], force: bool,
                       apart_from: Iterable[Path] = ()) -> None:
    """Refuse, before anything is written, outputs that would replace what they must not. ``outputs``: (file, what
    it is written for: the input image, ``--out``); ``inputs``: everything the command reads (None: not given).

    Always refused, even with ``force``: two outputs of one path; an output that is an input (the same path, or the
    same file under another name), or lies anywhere inside an input folder (a dataset root, a checkpoint folder), or
    directly in the folder of one of ``apart_from`` (images: predictions are never mixed with their photos); an
    existing folder where a file goes. An existing file is replaced only with ``force``."""
    first: dict[str, str] = {}
    for path, source in outputs:
        name = os.path.abspath(path)
        if name in first:
            raise SegrankError(f"{path}: would be written for both {first[name]} and {source}, one replacing the "
                               "other (rename one of them, or write them to separate folders)")
        first[name] = source
    paths = [Path(path) for path, _ in outputs]
    refuse_inputs(paths, [Path(p) for p in inputs if p is not None], list(apart_from))
    existing = [path for path in paths if os.path.lexists(path)]
    for path in existing:
        if path.is_dir():
            raise SegrankError(f"{path}: is a folder, expected a file name")
    if existing and not force:
        more = f", and {len(existing) - 1} more of the outputs" if len(existing) > 1 else ""
        raise SegrankError(f"{existing[0]}: already exists{more} (use --force to overwrite)")


def refuse_inputs(outputs: list[Path], inputs: list[Path], apart_from: list[Path]) -> None:
    """check_destinations' rules about inputs: compared by (device, inode), so a link or another spelling of an input
    is that input."""
    named, beside = keyed(inputs), keyed(apart_from, parent=True)
    folders = {key: path for key, path in named.items() if path.is_dir()}
    for path in outputs:
        if (key := file_key(path)) in named:
            what = "an input of this command" if named[key] == path else f"the same file as the input {named[key]}"
            raise SegrankError(f"{path}: is {what}; an output never replaces an input, even with --force")
    for folder in dict.fromkeys(path.parent for path in outputs):
        if (key := file_key(folder)) in beside:
            raise SegrankError(f"{folder}: holds the input {beside[key]}; write the outputs to another folder (never "
                               "among their inputs, even with --force)")
        for above in (folder, *folder.resolve().parents):
            if (key := file_key(above)) in folders:
                what = "an input folder" if above == folder else f"inside the input folder {folders[key]}"
                raise SegrankError(f"{folder}: is {what} of this command; write the outputs elsewhere (never into an "
                                   "input folder, even with --force)")


def keyed(paths: Iterable[Path], parent: bool = False) -> dict[tuple[int, int], Path]:
    """file_key (of the path, or of its folder) -> the first of ``paths`` that has it."""
    found: dict[tuple[int, int], Path] = {}
    for path in paths:
        if key := file_key(path.parent if parent else path):
            found.setdefault(key, path)
    return found


def check_folder_destination(path: Path, replaceable: Collection[str], force: bool) -> None:
    """A folder output that replaces ``path`` as a whole (``staged_write(folder=True)``): a new or empty folder is
    fine; one that holds only files named ``replaceable`` (and temp files of killed writes) needs ``force``; one that
    holds anything else is never replaced, its files are not the command's to delete."""
    if not path.is_dir():
        return
    held = sorted(p.name for p in path.iterdir() if not TEMP_FILE.fullmatch(p.name))
    other = [name for name in held if name not in replaceable]
    if other:
        shown = ", ".join(other[:3]) + (f", ... ({len(other)} in all)" if len(other) > 3 else "")
        raise SegrankError(f"{path}: already exists and holds other files ({shown}); choose a new or empty folder "
                           f"(--force replaces only a folder of {' + '.join(replaceable)})")
    if held and not force:
        raise SegrankError(f"{path}: already exists (use --force to overwrite)")


def staged_write(path: Path, write: Callable[[Path], Any], folder: bool = False) -> None:
    """Write ``path`` (a file, or a folder when ``folder``) inside a fresh temp folder beside it, ``write(target)``,
    then rename it into place: the temp files a writer makes of its own (safetensors does) stay in that folder too,
    and a failed or killed write leaves ``path`` as it was (the temp folder is removed now, or by the next write
    there). An existing folder is replaced only once the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        if folder:
            write(staging)
            os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700: the mode any tool gives a new folder
            replace_folder(staging, path)
        else:
            write(staging / path.name)
            os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(new: Path, path: Path) -> None:
    """Rename the complete folder ``new`` to ``path``; a non-empty ``path`` is set aside under a temp name first (no
    system call swaps two folders portably) and removed after."""
    if not (path.is_dir() and any(path.iterdir())):
        os.replace(new, path)  # onto nothing or an empty folder: one atomic rename
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(folder: Path) -> int:
    """Delete the temp files and folders (``TEMP_FILE`` names) that killed writes left directly in ``folder``; returns
    how many. A temp file is stale when untouched for ``STALE_AFTER_S`` and its lock is free (a live writer holds
    it, however slow or paused); a temp folder when it and everything in it are. Anything else is kept."""
    try:
        entries = [p for p in Path(folder).iterdir() if TEMP_FILE.fullmatch(p.name)]
    except OSError:
        return 0
    removed = 0
    for path in entries:
        if is_stale(path, time.time()):
            with contextlib.suppress(OSError):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed += 1
    return removed


def is_stale(path: Path, now: float) -> bool:
    try:
        info = os.lstat(path)
        if now - info.st_mtime < STALE_AFTER_S:
            return False
        if stat.S_ISDIR(info.st_mode):
            return all(is_stale(p, now) for p in path.iterdir())
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and not is_locked(path)


def is_locked(path: Path) -> bool:
    """Whether a writer holds ``path``'s lock; a file whose lock cannot be tried counts as held (kept)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # exclusive: NFS grants it only on a writable descriptor
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
