"""Local locks: our per-dataset sync lock (USR's own `.usr.lock` is taken by engine.promote)."""

from __future__ import annotations

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

