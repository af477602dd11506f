"""Relaying remote commands over a private unix socket to exec channels of one SSH connection.

Used in two places: the per-run relay that rsync's `-e` shim (`usrsync.rsh`) talks to, and the
warm-auth broker that keeps an authenticated connection for later runs. Wire format: see
`usrsync.rsh` (command, then raw stdin; records o/e/x back).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import os
import secrets
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh

from usrsync.errors import RemoteError

RECORD = struct.Struct(">cI")
MARKER = "USRSYNC-RSH"
MAX_COMMAND = 1 << 16
MAX_PREAMBLE = 1 << 20
BUFSIZE = 256 * 1024
# Output queued for a client: above HIGH the channel stops delivering, so sshd stops at the window.
WRITE_HIGH = 1 << 20
WRITE_LOW = 256 << 10
IOV_MAX = 512  # buffers per writev (Linux takes 1024)
SessionFactory = Callable[[], asyncssh.SSHClientSession[bytes]]
Channel = tuple[asyncssh.SSHClientChannel[bytes], asyncssh.SSHClientSession[bytes]]
OpenSessionFn = Callable[[SessionFactory, str], Awaitable[Channel]]


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class RelayServer:
    """Serves relay requests from processes of this user; runs only commands `allowed` accepts.

    Bytes are spliced with callbacks, not a coroutine per chunk: what the channel delivers in one
    event-loop pass leaves as one record, and each side's back-pressure pauses the other.
    """

    def __init__(self, open_session: OpenSessionFn, allowed: Callable[[str], bool], max_channels: int = 7):
        self.open_session = open_session
        self.allowed = allowed
        self.channels = asyncio.Semaphore(max_channels)
        self.loop = asyncio.get_running_loop()
        self.active = 0
        self.last_activity = self.loop.time()
        self.listener: socket.socket | None = None
        self.path: str | None = None
        self.special: dict[str, Callable[[], bytes]] = {}
        self.tasks: set[asyncio.Task[None]] = set()  # the loop holds tasks only weakly

    async def start(self, path: str) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(64)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self.path, self.listener = path, listener
        self.loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError:  # out of fds: pause accepting rather than spin on the pending client
            self.loop.remove_reader(self.listener.fileno())
            self.loop.call_later(1.0, self._resume_accepting)
            return
        try:
            ours = peer_uid(sock) == os.getuid()
        except OSError:
            ours = False
        if ours:
            _RelayClient(self, sock)
        else:
            sock.close()

    def _resume_accepting(self) -> None:
        if self.listener is not None:
            self.loop.add_reader(self.listener.fileno(), self._accept)

    def close(self) -> None:
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)
            self.path = None


class _RelayClient:
    """One connection to the relay: a command, then raw stdin in; records out (see usrsync.rsh).

    It drives its socket itself: records leave with writev straight from the channel's buffers,
    where an asyncio transport (before Python 3.12) copies every byte into its own buffer first.
    """

    def __init__(self, server: RelayServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.loop = server.loop
        self.head = bytearray()
        self.started = False  # the command is in
        self.ready = False  # its channel is open and has the early stdin
        self.early: list[bytes] = []  # stdin read before the channel was open
        self.early_eof = False
        self.channel: asyncssh.SSHClientChannel[bytes] | None = None
        self.read_holds: set[str] = set()  # reasons not to read; "eof" for good
        self.out: collections.deque[memoryview] = collections.deque()
        self.out_size = 0
        self.out_paused = False  # the channel is told to stop delivering
        self.writer_on = False
        self.closing = False  # close once `out` is sent
        self.lost = False
        server.active += 1
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(BUFSIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close()
            return
        try:
            if not data:
                self._eof()
            elif self.ready:
                self._to_channel(data)
            elif self.started:
                self.early.append(data)
            else:
                self._read_command(data)
        except Exception:  # noqa: BLE001 - a bug here must end this client only, with its channel
            self._close()

    def _eof(self) -> None:
        self.hold_reading("eof")
        if not self.started:
            self._close()  # no command will come
        elif self.ready:
            self._to_channel(None)
        else:
            self.early_eof = True

    def _read_command(self, data: bytes) -> None:
        self.head += data
        if len(self.head) < 4:
            return
        size = struct.unpack_from(">I", self.head)[0]
        if size > MAX_COMMAND:
            self._close()
        elif len(self.head) >= 4 + size:
            command = bytes(self.head[4:4 + size]).decode("utf-8", "surrogateescape")
            if len(self.head) > 4 + size:
                self.early.append(bytes(self.head[4 + size:]))
            self.head = bytearray()
            self.started = True
            self.hold_reading("opening")
            task = self.loop.create_task(self._run(command))
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)

    async def _run(self, command: str) -> None:
        server = self.server
        try:
            if command in server.special:
                self.send((b"o", [server.special[command]()]), (b"x", [struct.pack(">i", 0)]))
            elif not server.allowed(command):
                self.send((b"e", [b"usrsync relay: command not allowed\n"]), (b"x", [struct.pack(">i", 255)]))
            else:
                async with server.channels:
                    if not self.lost:
                        await self._relay(command)
        except Exception as exc:  # noqa: BLE001 - e.g. the channel could not be opened: tell the shim why
            message = f"usrsync relay: cannot run the command: {exc or type(exc).__name__}\n"
            self.send((b"e", [message.encode()]), (b"x", [struct.pack(">i", 255)]))
        finally:
            self.closing = True
            if not self.out:
                self._close()

    async def _relay(self, command: str) -> None:
        marker = f"{MARKER}-{secrets.token_hex(8)}"
        session = _ChannelSession(self, marker.encode())
        # The session is the sink from the first byte on: output may arrive before this returns.
        await self.server.open_session(lambda: session, f"echo {marker}; {command}")
        if self.lost:
            session.abort()
        for chunk in self.early:
            self._to_channel(chunk)
        self.early = []
        if self.early_eof:
            self._to_channel(None)
        self.ready = True
        self.release_reading("opening")
        await session.finished

    def _to_channel(self, data: bytes | None) -> None:
        """stdin to the channel (None: EOF); dropped once the remote command has closed it."""
        assert self.channel is not None
        try:
            if data is None:
                self.channel.write_eof()
            else:
                self.channel.write(data)
        except OSError:
            pass

    def hold_reading(self, reason: str) -> None:
        if not self.read_holds and not self.lost:
            self.loop.remove_reader(self.sock.fileno())
        self.read_holds.add(reason)

    def release_reading(self, reason: str) -> None:
        self.read_holds.discard(reason)
        if not self.read_holds and not self.lost:
            self.loop.add_reader(self.sock.fileno(), self._readable)

    def send(self, *records: tuple[bytes, list[bytes]]) -> None:
        """Queue these records and write what the socket takes now."""
        if self.lost:
            return
        was_idle = not self.out
        for kind, chunks in records:
            if chunks:
                header = RECORD.pack(kind, sum(map(len, chunks)))
                self.out.append(memoryview(header))
                self.out.extend(map(memoryview, chunks))
                self.out_size += len(header) + sum(map(len, chunks))
        if was_idle and self.out:
            self._writable()
        if self.out_size > WRITE_HIGH and not self.out_paused and self.channel is not None:
            self.out_paused = True
            self.channel.pause_reading()  # asyncssh then withholds window adjusts: sshd stops

    def _writable(self) -> None:
        try:
            self._write_some()
        except Exception:  # noqa: BLE001 - as in _readable
            self._close()

    def _write_some(self) -> None:
        try:
            sent = os.writev(self.sock.fileno(), list(itertools.islice(self.out, IOV_MAX)))
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close()
            return
        self.out_size -= sent
        while sent:
            if len(self.out[0]) <= sent:
                sent -= len(self.out.popleft())
            else:
                self.out[0] = self.out[0][sent:]
                sent = 0
        if self.out_paused and self.out_size <= WRITE_LOW and self.channel is not None:
            self.out_paused = False
            self.channel.resume_reading()  # delivers what it buffered meanwhile, right here
        if self.out and not self.writer_on:
            self.writer_on = True
            self.loop.add_writer(self.sock.fileno(), self._writable)
        elif not self.out and self.writer_on:
            self.writer_on = False
            self.loop.remove_writer(self.sock.fileno())
        if not self.out and self.closing:
            self._close()

    def _close(self) -> None:
        """End this client (after a clean finish, or when the shim or rsync went away)."""
        if self.lost:
            return
        self.lost = True
        self.loop.remove_reader(self.sock.fileno())
        self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self.out.clear()
        self.server.active -= 1
        self.server.last_activity = self.loop.time()
        if self.channel is not None:
            self.channel.close()  # stops the remote command if it still runs


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """asyncssh closes the whole connection when a session callback raises: close only this channel."""

    @functools.wraps(method)
    def wrapper(self: _ChannelSession, *args: Any) -> Any:
        try:
            return method(self, *args)
        except Exception:  # noqa: BLE001 - see docstring
            self.abort()
            return None

    return wrapper


class _ChannelSession(asyncssh.SSHClientSession[bytes]):
    """The exec channel's end of a relay: its output is coalesced into records for the client."""

    def __init__(self, client: _RelayClient, marker: bytes):
        self.client = client
        self.marker = marker
        self.preamble: bytearray | None = bytearray()  # stdout before our marker line: shell noise
        self.skipped = 0
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.flush_pending = False
        self.status = 255  # unless an exit status arrives: a signal or a lost connection, as ssh reports
        self.finished = asyncio.get_running_loop().create_future()

    @_guarded
    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self.client.channel = chan

    @_guarded
    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.err.append(data)
        elif self.preamble is None:
            self.out.append(data)
        else:
            self._skip_preamble(data)
        if not self.flush_pending:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def _skip_preamble(self, data: bytes) -> None:
        assert self.preamble is not None
        self.preamble += data
        start = 0
        while (end := self.preamble.find(b"\n", start)) >= 0:
            line = self.preamble[start:end]
            start = end + 1
            if line.rstrip(b"\r") == self.marker:
                if start < len(self.preamble):
                    self.out.append(bytes(self.preamble[start:]))
                self.preamble = None
                return
        self.skipped += start
        del self.preamble[:start]
        if self.skipped + len(self.preamble) > MAX_PREAMBLE:
            self.err.append(b"usrsync relay: the remote shell printed over 1 MiB before the command started; "
                            b"check the remote login shell's startup files for endless output\n")
            self.abort()

    @_guarded
    def eof_received(self) -> bool:
        return True  # stdin stays open until the client ends it

    @_guarded
    def exit_status_received(self, status: int) -> None:
        self.status = status

    @_guarded
    def pause_writing(self) -> None:
        self.client.hold_reading("window")

    @_guarded
    def resume_writing(self) -> None:
        self.client.release_reading("window")

    @_guarded
    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.flush()
            self.client.send((b"x", [struct.pack(">i", self.status)]))
        finally:
            if not self.finished.done():
                self.finished.set_result(None)

    def flush(self) -> None:
        self.flush_pending = False
        out, err, self.out, self.err = self.out, self.err, [], []
        self.client.send((b"o", out), (b"e", err))

    def abort(self) -> None:
        """Close the channel; connection_lost follows and reports status 255."""
        if self.client.channel is not None:
            self.client.channel.close()


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
