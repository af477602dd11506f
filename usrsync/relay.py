"""Relaying remote commands over a private unix socket to exec channels of one SSH connection.

Used in two places: the per-run relay that rsync's `-e` shim (`usrsync.rsh`) talks to, and the
warm-auth broker that keeps an authenticated connection for later runs. Wire format: see
`usrsync.rsh` (command, then raw stdin; records o/e/x back).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from usrsync.errors import RemoteError

RECORD = struct.Struct(">cI")
MARKER = "USRSYNC-RSH"
MAX_COMMAND = 1 << 16
BUFSIZE = 256 * 1024
ExecFn = Callable[[str], Awaitable[Any]]


def peer_uid(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


async def send_record(writer: asyncio.StreamWriter, kind: bytes, payload: bytes) -> None:
    writer.write(RECORD.pack(kind, len(payload)) + payload)
    await writer.drain()


async def skip_to_marker(reader: Any, marker: str) -> None:
    """Drop what a noisy login shell prints before our marker line."""
    expected = marker.encode()
    seen = 0
    while seen < (1 << 20):
        line = await reader.readline()
        if not line or line.rstrip(b"\r\n") == expected:
            return
        seen += len(line)
    raise RemoteError("the remote shell printed over 1 MiB before the command started",
                      "check the remote login shell's startup files for endless output")


class RelayServer:
    """Serves relay requests from processes of this user; runs only commands `allowed` accepts."""

    def __init__(self, exec_fn: ExecFn, allowed: Callable[[str], bool], max_channels: int = 7):
        self.exec_fn = exec_fn
        self.allowed = allowed
        self.channels = asyncio.Semaphore(max_channels)
        self.active = 0
        self.last_activity = asyncio.get_running_loop().time()
        self.server: asyncio.AbstractServer | None = None
        self.path: str | None = None
        self.special: dict[str, Callable[[], bytes]] = {}

    async def start(self, path: str) -> None:
        self.path = path
        self.server = await asyncio.start_unix_server(self._serve, path=path)
        os.chmod(path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Never raises: an exception escaping here must not reach the SSH connection."""
        self.active += 1
        try:
            if peer_uid(writer) != os.getuid():
                return
            size = struct.unpack(">I", await reader.readexactly(4))[0]
            if size > MAX_COMMAND:
                return
            command = (await reader.readexactly(size)).decode("utf-8", "surrogateescape")
            if command in self.special:
                await send_record(writer, b"o", self.special[command]())
                await send_record(writer, b"x", struct.pack(">i", 0))
            elif not self.allowed(command):
                await send_record(writer, b"e", b"usrsync relay: command not allowed\n")
                await send_record(writer, b"x", struct.pack(">i", 255))
            else:
                async with self.channels:
                    await self._relay(command, reader, writer)
        except Exception:  # noqa: BLE001 - see docstring
            pass
        finally:
            self.active -= 1
            self.last_activity = asyncio.get_running_loop().time()
            writer.close()

    async def _relay(self, command: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        marker = f"{MARKER}-{secrets.token_hex(8)}"
        process = await self.exec_fn(f"echo {marker}; {command}")

        async def upstream() -> None:
            while chunk := await reader.read(BUFSIZE):
                process.stdin.write(chunk)
                await process.stdin.drain()
            process.stdin.write_eof()

        async def downstream() -> None:
            await skip_to_marker(process.stdout, marker)
            while chunk := await process.stdout.read(BUFSIZE):
                await send_record(writer, b"o", chunk)

        async def errors() -> None:
            while chunk := await process.stderr.read(64 * 1024):
                await send_record(writer, b"e", chunk)

        up = asyncio.create_task(upstream())
        try:
            await asyncio.gather(downstream(), errors())
            status = (await process.wait(check=False)).exit_status
            if status is None or status < 0:
                status = 255  # killed by a signal: what ssh reports
            await send_record(writer, b"x", struct.pack(">i", status))
        finally:
            up.cancel()
            process.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)
            self.path = None


class _RelayStdin:
    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        if self.writer.can_write_eof():
            self.writer.write_eof()


class _Completed:
    def __init__(self, exit_status: int | None):
        self.exit_status = exit_status


class RelayProcess:
    """A remote command run through a relay socket, shaped like asyncssh's client process."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.stdin = _RelayStdin(writer)
        self.stdout = asyncio.StreamReader(limit=1 << 20)
        self.stderr = asyncio.StreamReader(limit=1 << 20)
        self._writer = writer
        self._status: int | None = None
        self._pump = asyncio.create_task(self._read_records(reader))

    @classmethod
    async def open(cls, socket_path: str, command: str) -> RelayProcess:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        encoded = command.encode("utf-8", "surrogateescape")
        writer.write(struct.pack(">I", len(encoded)) + encoded)
        await writer.drain()
        return cls(reader, writer)

    async def _read_records(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                kind, length = RECORD.unpack(await reader.readexactly(RECORD.size))
                payload = await reader.readexactly(length) if length else b""
                if kind == b"o":
                    self.stdout.feed_data(payload)
                elif kind == b"e":
                    self.stderr.feed_data(payload)
                elif kind == b"x":
                    self._status = struct.unpack(">i", payload)[0]
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self.stdout.feed_eof()
            self.stderr.feed_eof()

    async def wait(self, check: bool = False) -> _Completed:
        await self._pump
        return _Completed(self._status)

    def close(self) -> None:
        self._pump.cancel()
        self._writer.close()


def private_runtime_dir() -> str:
    """Our 0700 runtime dir (XDG_RUNTIME_DIR/usrsync, else /tmp/usrsync-UID), verified as ours."""
    for parent in runtime_parents():
        try:
            Path(parent).mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.lstat(parent)
        except OSError:
            continue
        if st.st_uid == os.getuid() and not st.st_mode & 0o077 and os.path.isdir(parent) \
                and len(parent) < 70 and " " not in parent:
            return parent  # anything else could let another user swap our sockets
    raise RemoteError("no private runtime directory for the relay socket",
                      "set XDG_RUNTIME_DIR to a short path without spaces, owned by you with mode 0700")


def private_socket_dir(prefix: str = "rsh-") -> str:
    """A fresh 0700 dir: short (sun_path <= 107 bytes) and space-free (rsync splits -e on spaces)."""
    return tempfile.mkdtemp(prefix=prefix, dir=private_runtime_dir())


def runtime_parents() -> list[str]:
    # cron has no XDG_RUNTIME_DIR while a login shell does: fall back to the same
    # /run/user/UID the login shell sees, so a warm-auth broker is found from both.
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    parents = [os.path.join(runtime, "usrsync")] if os.path.isdir(runtime) else []
    return parents + [os.path.join(tempfile.gettempdir(), f"usrsync-{os.getuid()}")]


def broker_socket(remote_name: str) -> str:
    return os.path.join(private_runtime_dir(), f"broker-{remote_name}.sock")


async def relay_request(socket_path: str, command: str, timeout: float = 5.0) -> bytes | None:
    """Run one special command on a relay (status, stop); None when nobody answers."""
    try:
        process = await asyncio.wait_for(RelayProcess.open(socket_path, command), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        process.stdin.write_eof()
        output = await asyncio.wait_for(process.stdout.read(), timeout)
        status = (await asyncio.wait_for(process.wait(), timeout)).exit_status
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        process.close()
    return output if status == 0 else None
