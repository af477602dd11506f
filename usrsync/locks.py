"""Local locks: our per-dataset sync lock, and USR's own writer lock during promotion."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from remote_agent import usrsync_agent as engine
from usrsync.errors import LockedError


def acquire_local_lock(root: Path, dataset: str, txid: str, timeout: float, wait: float) -> engine.Lock:
    """The same O_EXCL + heartbeat + flock lock the agent holds remotely, under <root>/.usrsync/locks."""
    lock = engine.Lock(str(root / engine.STATE_DIR / "locks"), engine.dataset_key(dataset), txid, timeout)
    try:
        return lock.acquire(wait)
    except engine.AgentError as exc:
        raise LockedError(
            f"dataset {dataset!r} is locked on this machine by {engine.describe_holder(exc.detail.get('holder'))}",
            "wait for that sync to finish or pass --wait SECONDS",
        ) from None


class DatasetWriteLock:
    """USR's `.usr.lock` (flock): a USR writer on the destination finishes before we swap trees."""

    def __init__(self, dataset_dir: Path, wait: float):
        self.path = dataset_dir / ".usr.lock"
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> DatasetWriteLock:
        if not self.path.is_file():
            return self
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise LockedError(f"a USR writer holds {self.path}",
                                      "wait for it to finish or pass --wait SECONDS") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
