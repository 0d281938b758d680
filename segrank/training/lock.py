"""The work-dir lock: one training at a time writes a work dir (log.jsonl, checkpoints). A second run, or a
``--resume`` while the first still runs, is refused with one line naming the holder.

The lock is a POSIX record lock (``fcntl.lockf``) on ``<work_dir>/train.lock``, held on an open file for the run's
life. The kernel releases it when the process ends, however it ends (SIGKILL included), so a lock file left by a
killed run is simply taken over. Unlike ``flock``, a record lock belongs to the process, not to the open file: the
DataLoader workers a run forks do not inherit it, so a killed run's lingering workers cannot keep its restarted
torchrun attempt out. Under torchrun only the rank that writes the work dir (rank 0) takes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from segrank.errors import SegrankError

LOCK = "train.lock"


class WorkDirInUseError(SegrankError):
    """Another live process trains in the work dir."""


@contextlib.contextmanager
def hold_work_dir(work_dir: Path) -> Iterator[None]:
    """Hold the lock of ``work_dir`` (created if needed) until the block ends; raises WorkDirInUseError when a live
    process holds it. The lock file is removed on release, and a work dir this call created is removed when empty
    (the run was refused before writing anything)."""
    created = not work_dir.exists()
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / LOCK
    fd = acquire(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the release: a waiting run then locks a new file, never this one
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                work_dir.rmdir()  # only when empty


def acquire(path: Path) -> int:
    """Lock ``path`` (created if needed); returns the open descriptor that holds the lock."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise SegrankError(f"{path}: cannot lock the work dir ({err.strerror})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise SegrankError(f"{path}: cannot lock the work dir ({err.strerror})") from None
            raise WorkDirInUseError(f"work dir {path.parent} is in use by {holder(path)}") from None
        # The holder unlinks the file before it releases it: a lock on an unlinked file guards nothing, try again.
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
        os.close(fd)


def holder(path: Path) -> str:
    """Who holds the lock, as its file says: "pid N on host H since T"."""
    try:
        words = path.read_text().split()
    except OSError:
        words = []
    if len(words) < 6 or words[0] != "pid" or words[2] != "host" or words[4] != "since":
        return "another process (its lock file gives no details yet)"
    return f"pid {words[1]} on host {words[3]} since {' '.join(words[5:])}"
