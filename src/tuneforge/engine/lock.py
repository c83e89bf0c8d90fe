"""An exclusive lock on a run directory for the whole life of the run that writes it.

The lock is ``fcntl.flock`` on ``RUN_DIR/.tuneforge.lock``, a file holding ``{"pid", "host", "started"}`` of the
holder. The kernel drops a flock when its process dies, however it dies (SIGKILL included), so a lock file whose
flock can be taken is stale: its process is gone, and the new run takes it over. A second ``train`` (plain,
``--overwrite`` or ``--resume``) on a locked directory is refused with the holder's pid and host. Only runs that
write the directory lock it; reading verbs (eval, report, plot, generate, merge) never touch the lock file.

The holder deletes the file on release while it still holds the flock; a process that opened the old file just
before that sees, once it gets the flock, that the path no longer names the file it locked, and starts again.
Under ``torchrun`` rank 0 holds the lock for every rank. Standard library only: the lock is taken before torch
or any model is needed.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from tuneforge.errors import UserError

LOCK_FILE = ".tuneforge.lock"


class RunLockedError(UserError):
    """The run directory is locked by a run that is still alive."""


def read_holder(path: Path) -> dict:
    """The ``{"pid", "host", "started"}`` record of a lock file; {} when it is missing, empty or unreadable."""
    try:
        holder = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process (it has not recorded its pid yet)"
    started = holder.get("started")
    since = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}"


class RunLock:
    """The lock of one run directory; :meth:`acquire` takes it, :meth:`release` gives it back (idempotent)."""

    def __init__(self, run_dir: Path, fd: int, created: list[Path]):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = fd
        self._created = created  # folders made for the lock, removed on release if still empty

    @classmethod
    def acquire(cls, run_dir: str | Path, log=print) -> "RunLock":
        """Lock ``run_dir`` (created if missing), or raise :class:`RunLockedError` naming the live holder."""
        run_dir = Path(run_dir)
        created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"train.output_dir: cannot create {run_dir}: {error.strerror or error}") from None
        path = run_dir / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise UserError(f"cannot create the lock file {path}: {error.strerror or error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunLockedError(f"run directory {run_dir} is in use by a run that is still training "
                                     f"({describe_holder(read_holder(path))}); wait for it to finish or stop it, or "
                                     "choose another train.output_dir") from None
            if _names(path, fd):
                break
            os.close(fd)  # its holder released and deleted the file between our open and our flock: start again
        previous = read_holder(path)
        if previous.get("pid"):
            log(f"taking over a stale lock of pid {previous['pid']} on host {previous.get('host', '?')} (that "
                "process is gone)")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        os.fsync(fd)
        return cls(run_dir, fd, created)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Delete the lock file (still holding the flock, see module docstring), then unlock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _names(self.path, fd):
                self.path.unlink()
        finally:
            os.close(fd)  # closing the last descriptor drops the flock
        for folder in self._created:  # innermost first; one that holds anything stays
            try:
                folder.rmdir()
            except OSError:
                break

    def __del__(self):
        # A recipe driven by hand (tests, notebooks) and dropped without release: do not keep the directory locked.
        if getattr(self, "_fd", None) is not None:
            try:
                self.release()
            except Exception:  # interpreter shutdown: the kernel drops the flock with the process anyway
                pass


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is (still) the file open as ``fd``."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


def lock_run_dir(run_dir: str | Path, dist, log=print) -> RunLock | None:
    """Lock ``run_dir`` on rank 0 and tell every rank the outcome, so that a refused lock stops all of them
    with the same message (not rank 0 alone, with the others waiting at the next collective). Returns the lock on
    rank 0, None on the others."""
    lock, message = None, None
    if dist.is_main:
        try:
            lock = RunLock.acquire(run_dir, log)
        except UserError as error:
            message = (type(error).__name__, str(error))
    import torch.distributed  # only here: the rest of the module needs no torch

    if dist.enabled and torch.distributed.is_initialized():
        shared = [message]
        torch.distributed.broadcast_object_list(shared, src=0)
        message = shared[0]
    if message is not None:
        raise (RunLockedError if message[0] == RunLockedError.__name__ else UserError)(message[1])
    return lock
