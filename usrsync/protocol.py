"""The orchestrator's side of the agent protocol: sentinel, frames, typed replies."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import struct
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import msgspec

from remote_agent import usrsync_agent as engine
from usrsync.errors import ProtocolError, RemoteError

HEADER = struct.Struct(">IB")
MAX_FRAME = engine.MAX_FRAME
MAX_FRAME_RAW = engine.MAX_FRAME_RAW
MAX_BANNER = 1 << 20  # login banners before the sentinel
# Items one streamed reply may hold (manifest entries, .events.log lines): millions of files
# are normal, an endless stream is not; memory stays bounded whatever the remote sends.
MAX_CALL_ITEMS = 10_000_000
T = TypeVar("T")


class ErrorBody(msgspec.Struct):
    kind: str
    message: str
    detail: dict[str, Any] = {}


class Frame(msgspec.Struct):
    id: int | None
    type: Literal["chunk", "result", "error", "progress"]  # progress: the agent's keepalive
    items: list[Any] | None = None
    result: Any = None
    error: ErrorBody | None = None
    progress: list[int] | None = None  # hashing: [files, bytes, total_files, total_bytes]


class AgentCallError(RemoteError):
    """The agent ran the call and reported an expected failure (`kind` says which)."""

    def __init__(self, call: str, body: ErrorBody):
        hint = ("give the remote login user access to that path (e.g. `chmod -R u+rwX`, or ask its owner), then rerun"
                if body.kind == "PermissionError" else "run `usr remotes doctor --remote NAME` to check the remote")
        super().__init__(f"remote agent: {call} failed: {body.message}", hint)
        self.agent_kind = body.kind
        self.detail = body.detail
        self.agent_message = body.message


def encode_request(rid: int, call: str, args: dict[str, Any]) -> bytes:
    """A request frame; one over engine.COMPRESS_OVER goes zlib-compressed, as the agent's replies
    do: the staged tree a push's verification checks (~70 bytes of JSON per file) and the digests
    its rescan trusts (~100) pass the 64 MiB frame limit at about 900k and 650k files;
    compressed, they fit up to about two million."""
    body = msgspec.json.encode({"id": rid, "call": call, "args": args})
    flags = 0
    if len(body) > engine.COMPRESS_OVER:
        raw = len(body)
        if raw <= MAX_FRAME_RAW:
            body = zlib.compress(body, 1)
            flags = engine.FLAG_ZLIB
        if raw > MAX_FRAME_RAW or len(body) > MAX_FRAME:
            # Checked before anything is sent: the agent would drop the session mid-write, which
            # shows only as a lost connection.
            raise ProtocolError(f"the {call} request is {raw >> 20} MiB, over what one call to the agent carries",
                                "the promoted directory holds too many files for one call; please report this")
    return HEADER.pack(len(body), flags) + body


@functools.cache
def typed_frame(item_type: Any) -> type[Frame]:
    """A Frame whose chunk items decode straight into `item_type`: no intermediate Python objects
    and no second pass (a 100k-entry manifest decodes several times faster)."""
    name = "Frame_" + getattr(item_type, "__name__", "items")
    return msgspec.defstruct(name, [("items", list[item_type] | None, None)], bases=(Frame,))


def decode_body(header: bytes, body: bytes, frame_type: type[Frame] = Frame) -> Frame:
    """One frame; with a `typed_frame`, chunk items come typed, unless they do not validate: then
    the plain Frame is returned and the caller reports exactly what is wrong."""
    _, flags = HEADER.unpack(header)
    if flags & ~engine.FLAG_ZLIB:
        raise ProtocolError("the remote agent sent a frame with unknown flags",
                            "the agent and this usrsync disagree; rerun to redeploy the agent")
    if flags & engine.FLAG_ZLIB:
        inflater = zlib.decompressobj()
        try:
            body = inflater.decompress(body, MAX_FRAME_RAW)
        except zlib.error as exc:
            raise ProtocolError(f"the remote agent sent a corrupt compressed frame ({exc})",
                                "rerun; if it persists, check the remote with `usr remotes doctor`") from None
        if inflater.unconsumed_tail or (not inflater.eof and len(body) >= MAX_FRAME_RAW):
            raise ProtocolError("the remote agent sent a frame that inflates past the limit",
                                "the remote is misbehaving; inspect it before syncing again")
        if not inflater.eof or inflater.unused_data:  # cut short (no checksum) or trailing bytes
            raise ProtocolError("the remote agent sent a corrupt compressed frame (truncated or trailing data)",
                                "rerun; if it persists, check the remote with `usr remotes doctor`")
    if frame_type is not Frame:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            return msgspec.json.decode(body, type=frame_type)
    try:
        return msgspec.json.decode(body, type=Frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"the remote agent sent a malformed frame ({exc})",
                            "rerun; if it persists, check the remote with `usr remotes doctor`") from None


async def read_frame(reader: Any, frame_type: type[Frame] = Frame) -> Frame:
    try:
        header = await reader.readexactly(HEADER.size)
        size, _ = HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ProtocolError(f"the remote agent announced a {size}-byte frame, over the limit",
                                "the remote is misbehaving; inspect it before syncing again")
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise RemoteError("the remote agent closed the connection mid-reply",
                          "rerun; if it persists, check the remote with `usr remotes doctor`") from None
    return decode_body(header, body, frame_type)


AGENT_START_TIMEOUT = 120.0  # a cold login node can take long to start Python; never forever


async def await_sentinel(reader: Any, nonce: str, timeout: float = AGENT_START_TIMEOUT) -> str:
    """Skip login-shell noise until `USRSYNC-AGENT <version> <nonce>`; return the version."""
    try:
        return await asyncio.wait_for(_sentinel(reader, nonce), timeout)
    except asyncio.TimeoutError:
        raise RemoteError(f"the remote agent did not start within {timeout:g} s",
                          "run `usr remotes doctor --remote NAME`; check the remote's load and startup files") from None


async def _sentinel(reader: Any, nonce: str) -> str:
    seen = 0
    while seen <= MAX_BANNER:
        try:
            line = await reader.readline()
        except ValueError:  # asyncio.StreamReader: a line longer than its limit
            break
        if not line:
            raise RemoteError("the remote agent exited before it started",
                              "run `usr remotes doctor --remote NAME` to see why")
        seen += len(line)
        parts = line.decode("utf-8", "replace").split()
        if len(parts) == 3 and parts[0] == engine.SENTINEL and parts[2] == nonce:
            return parts[1]
    raise ProtocolError("the remote printed over 1 MiB without starting the agent",
                        "check the remote login shell's startup files for endless output")


class AgentClient:
    """Sequential calls to one agent over a byte stream pair (SSH channel or pipes)."""

    def __init__(self, reader: Any, writer: Any, *, timeout: float | None = None, idle_timeout: float | None = None):
        self.reader = reader
        self.writer = writer
        self.timeout = timeout  # per call, in total
        self.idle_timeout = idle_timeout  # per frame: the agent sends progress frames while it works
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def call(self, name: str, args: dict[str, Any], result_type: type[T], chunk_type: Any = None,
                   on_progress: Callable[[int, int, int, int], None] | None = None,
                   on_chunk: Callable[[list[Any]], Awaitable[list[Any]]] | None = None) -> tuple[T, list[Any]]:
        """`on_chunk`: what to keep of each streamed chunk's typed items (they are kept as they are without it)."""
        async with self._lock:
            return await asyncio.wait_for(self._call(name, args, result_type, chunk_type, on_progress, on_chunk),
                                          self.timeout)

    async def _call(self, name, args, result_type, chunk_type, on_progress, on_chunk):
        rid = next(self._ids)
        self.writer.write(encode_request(rid, name, args))
        await _drain(self.writer)
        items: list[Any] = []
        budget = MAX_CALL_ITEMS
        frame_type = typed_frame(chunk_type) if chunk_type is not None else Frame
        while True:
            try:
                frame = await asyncio.wait_for(read_frame(self.reader, frame_type), self.idle_timeout)
            except asyncio.TimeoutError:
                raise RemoteError(f"the remote agent sent nothing for {self.idle_timeout:g} s during {name}",
                                  "the remote may be hung or overloaded; rerun, or raise agent_timeout "
                                  "in the remote profile") from None
            if frame.id != rid:
                if frame.type == "error" and frame.error is not None and frame.id is None:
                    raise AgentCallError(name, frame.error)
                raise ProtocolError(f"the remote agent answered call {frame.id}, expected {rid}",
                                    "rerun; if it persists, check the remote with `usr remotes doctor`")
            if frame.type == "progress":
                counts = frame.progress
                # Only a display hint: a malformed one is dropped, never trusted for anything.
                if on_progress is not None and counts is not None and len(counts) == 4 and min(counts) >= 0:
                    on_progress(*counts)
                continue
            if frame.type == "chunk":
                if chunk_type is None or frame.items is None:
                    raise ProtocolError(f"the remote agent streamed data for {name}",
                                        "rerun to redeploy the agent")
                budget -= max(1, len(frame.items))  # empty chunks count: an endless stream ends
                if budget < 0:
                    raise ProtocolError(f"the remote agent streamed over {MAX_CALL_ITEMS} items for {name}",
                                        "the remote is misbehaving; inspect it before syncing again")
                try:
                    chunk = frame.items if type(frame) is frame_type else msgspec.convert(frame.items,
                                                                                           list[chunk_type])
                except msgspec.ValidationError as exc:
                    raise ProtocolError(f"the remote agent sent a malformed {name} entry ({exc})",
                                        "the remote is misbehaving; inspect it before syncing again") from None
                items.extend(await on_chunk(chunk) if on_chunk is not None else chunk)
                continue
            if frame.type == "error":
                raise AgentCallError(name, frame.error or ErrorBody(kind="unknown", message="unknown error"))
            try:
                return msgspec.convert(frame.result, result_type), items
            except msgspec.ValidationError as exc:
                raise ProtocolError(f"the remote agent sent a malformed {name} reply ({exc})",
                                    "rerun to redeploy the agent") from None


async def _drain(writer: Any) -> None:
    drain = getattr(writer, "drain", None)
    if drain is not None:
        await drain()
