"""The transport interface shared by the SSH and local transports."""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remote_agent import usrsync_agent as engine
from usrsync.config import Remote
from usrsync.rsync import ItemizedChange, RsyncResult, run_rsync

AGENT_PATH = Path(engine.__file__)


class Transport(ABC):
    def __init__(self, remote: Remote):
        self.remote = remote

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def start_agent(self, nonce: str) -> tuple[Any, Any]:
        """Start the agent; return (reader, writer) positioned before its sentinel line."""

    @abstractmethod
    def rsync_endpoint(self, path: str) -> str:
        """The rsync argument naming a remote path (trailing slash kept)."""

    def rsync_rsh(self) -> str | None:
        return None

    def rsync_path(self) -> str | None:
        return None

    async def prepare_rsync(self) -> None:
        """Make the remote shell of rsync_rsh() ready (e.g. start a relay)."""

    async def run_rsync(self, argv: list[str],
                        on_change: Callable[[ItemizedChange], None] | None = None) -> RsyncResult:
        await self.prepare_rsync()
        cancel = threading.Event()
        task = asyncio.create_task(asyncio.to_thread(run_rsync, argv, on_change=on_change, cancel=cancel))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            cancel.set()  # kills rsync's process group; wait so nothing is left behind
            await asyncio.wait({task}, timeout=15)
            raise

    @abstractmethod
    async def close(self) -> None: ...
