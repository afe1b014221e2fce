"""An exclusive lock on a folder, so that processes writing into one bundle take turns.

The lock is an ``fcntl.flock`` on an empty file in the folder (``LOCK_FILE``). The kernel drops it
when its holder exits for any reason, SIGKILL included, so a crashed writer never leaves a folder
locked; the file itself stays and is never deleted (a writer that deleted it could let the next
two writers lock two different files).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from supsup_deploy.errors import SupsupError

LOCK_FILE = ".lock"
LOCK_TIMEOUT = 30.0
_POLL_SECONDS = 0.02


class LockError(SupsupError):
    """A folder's lock could not be taken: held by another process too long, or unopenable."""


@contextmanager
def folder_lock(folder: str | Path, *, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` for the duration of a ``with`` block.

    Args:
        folder: an existing folder; its ``LOCK_FILE`` is created when missing.
        timeout: seconds to wait while another process holds the lock.

    Yields:
        Nothing; the lock is held until the block exits.

    Raises:
        LockError: the lock file cannot be opened, or the lock stayed taken for ``timeout``.

    Example:
        >>> with folder_lock("artifacts/bundle"):
        ...     install_the_task()
    """
    path = Path(folder) / LOCK_FILE
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise LockError(f"{path}: cannot open the lock file ({error.strerror})") from None
    try:
        _acquire(descriptor, path, timeout)
        yield
    finally:
        os.close(descriptor)


def _acquire(descriptor: int, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockError(
                    f"{path}: another process has held this lock for over {timeout:g} s "
                    "(is another add-task still running?); try again when it has finished"
                ) from None
            time.sleep(_POLL_SECONDS)


@contextmanager
def hold_new_lock(folder: str | Path) -> Iterator[None]:
    """Create the ``LOCK_FILE`` of a new folder of ours already locked, and hold it.

    The lock file is locked under a temporary name and then renamed, so nobody can find it
    unlocked while its creator lives.

    Args:
        folder: a folder this process just created (e.g. with ``tempfile.mkdtemp``).

    Yields:
        Nothing; the lock is held until the block exits.
    """
    pending = Path(folder) / f"{LOCK_FILE}.pending"
    descriptor = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.rename(pending, Path(folder) / LOCK_FILE)
        yield
    finally:
        os.close(descriptor)


def remove_if_abandoned(folder: str | Path) -> bool:
    """Remove a scratch folder made under :func:`hold_new_lock` whose writer has exited.

    A folder without a lock file (its writer was killed before creating it, or it was made some
    other way) is left alone, as is one whose lock is held.

    Returns:
        Whether the folder was removed.
    """
    try:
        descriptor = os.open(Path(folder) / LOCK_FILE, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(descriptor)
