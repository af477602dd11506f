"""A remote that is a path on this machine (second disk, mounted FS): agent as a subprocess."""

from __future__ import annotations

import asyncio
from typing import Any

from usrsync.errors import RemoteError
from usrsync.transport.base import AGENT_PATH, Transport


class LocalTransport(Transport):
    process: asyncio.subprocess.Process | None = None

    async def connect(self) -> None:
        return None

    async def start_agent(self, nonce: str) -> tuple[Any, Any]:
        python = self.remote.profile.python
        try:
            self.process = await asyncio.create_subprocess_exec(
                python, str(AGENT_PATH), "serve", nonce,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, limit=1 << 20,
            )
        except OSError as exc:
            raise RemoteError(f"cannot start the agent with {python!r}: {exc.strerror}",
                              f"set `python` of remote {self.remote.name!r} to a Python 3 interpreter") from None
        return self.process.stdout, self.process.stdin

    def rsync_endpoint(self, path: str) -> str:
        return path

    async def close(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        # Read what the agent still sends, to EOF, while it exits: a pipe paused with unread
        # output keeps wait() from returning, and the garbage collector would close it after
        # the loop has gone (printing a traceback).
        try:
            await asyncio.wait_for(asyncio.gather(process.wait(), _discard(process.stdout)), 10)
        except asyncio.TimeoutError:
            process.kill()
            try:
                await asyncio.wait_for(asyncio.gather(process.wait(), _discard(process.stdout)), 10)
            except asyncio.TimeoutError:
                pass  # a grandchild holds the pipe: nothing more we can do


async def _discard(reader: asyncio.StreamReader | None) -> None:
    while reader is not None and await reader.read(1 << 16):
        pass
