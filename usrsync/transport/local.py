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
        if self.process is None:
            return
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()
        if self.process.stdout is not None:
            # Read what the agent left unread to EOF: a paused pipe transport left open would
            # be closed by the garbage collector after the loop, printing a traceback.
            try:
                await asyncio.wait_for(self.process.stdout.read(), 10)
            except asyncio.TimeoutError:
                pass
        self.process = None
