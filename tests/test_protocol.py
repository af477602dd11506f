"""The agent protocol: frames both ways, garbage rejected cleanly, the sentinel, AgentClient.

Frames are encoded by the agent's own encode_frame and decoded by the orchestrator's
read_frame over a real asyncio.StreamReader; every read is bounded by asyncio.wait_for,
so a decoder that hangs fails the test instead of blocking it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import struct
import zlib
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remote_agent import usrsync_agent as engine
from usrsync import protocol
from usrsync.errors import ProtocolError, RemoteError
from usrsync.protocol import AgentCallError, AgentClient, Frame, await_sentinel, read_frame

BOUND = 5.0  # seconds any single decode may take before we call it a hang


def reader_of(data: bytes, *, eof: bool = True, limit: int = 1 << 16) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def decode(data: bytes, **kw: Any) -> Frame:
    return await asyncio.wait_for(read_frame(reader_of(data, **kw)), BOUND)


def raw_frame(body: bytes, flags: int = 0, size: int | None = None) -> bytes:
    return struct.pack(">IB", len(body) if size is None else size, flags) + body


def result(value: Any, rid: int = 1) -> dict[str, Any]:
    return {"id": rid, "type": "result", "result": value}


# --- round trips ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=40)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values, compress=st.booleans(), rid=st.integers(0, 2**31))
async def test_round_trip(value: Any, compress: bool, rid: int) -> None:
    frame = await decode(engine.encode_frame(result(value, rid), compress=compress))
    assert frame == Frame(id=rid, type="result", result=value)


async def test_round_trip_chunk_and_error_frames() -> None:
    items = [["records.parquet", "primary", 3, 1, "file", "ab"]] * 3
    chunk = await decode(engine.encode_frame({"id": 7, "type": "chunk", "items": items}, compress=True))
    assert (chunk.id, chunk.type, chunk.items) == (7, "chunk", items)
    err = await decode(engine.encode_frame({"id": None, "type": "error",
                                            "error": {"kind": "locked", "message": "busy", "detail": {"a": 1}}}))
    assert (err.id, err.type, err.error) == (None, "error", protocol.ErrorBody("locked", "busy", {"a": 1}))


async def test_consecutive_frames_on_one_stream() -> None:
    reader = reader_of(b"".join(engine.encode_frame(result(i, i), compress=i % 2 == 1) for i in range(5)))
    got = [await asyncio.wait_for(read_frame(reader), BOUND) for _ in range(5)]
    assert [(f.id, f.result) for f in got] == [(i, i) for i in range(5)]
    with pytest.raises(RemoteError, match="closed the connection mid-reply"):
        await asyncio.wait_for(read_frame(reader), BOUND)


def test_compressed_frames_are_smaller_on_the_wire() -> None:
    value = ["the same line"] * 1000
    assert len(engine.encode_frame(result(value), compress=True)) < len(engine.encode_frame(result(value))) / 10


def test_agent_refuses_to_encode_an_oversized_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "MAX_FRAME", 100)
    with pytest.raises(engine.AgentError) as info:
        engine.encode_frame(result("x" * 200))
    assert info.value.kind == "frame_too_large"


@given(value=json_values)
@settings(max_examples=100, deadline=None)
def test_agent_side_reads_what_the_orchestrator_writes(value: Any) -> None:
    stream = io.BytesIO(protocol.encode_request(3, "hello", {"v": value}))
    assert engine.read_frame(stream) == {"id": 3, "call": "hello", "args": {"v": value}}
    assert engine.read_frame(stream) is None  # clean end of stream


def test_a_large_request_goes_compressed_and_the_agent_reads_it() -> None:
    """A push's verification of a million files sends their paths, sizes and digests (~70 MB of
    JSON): compressed, it fits the agent's frame limit."""
    expected = {"paths": [f"_derived/d{i // 1000:04d}/part-{i:07d}" for i in range(1_000_000)],
                "sizes": [i % 4096 for i in range(1_000_000)],
                "digests": [hashlib.md5(b"%d" % i).hexdigest() for i in range(1_000_000)]}
    frame = protocol.encode_request(7, "verify", {"expected": expected})
    size, flags = protocol.HEADER.unpack_from(frame)
    assert flags == engine.FLAG_ZLIB and size == len(frame) - protocol.HEADER.size < protocol.MAX_FRAME
    assert engine.read_frame(io.BytesIO(frame)) == {"id": 7, "call": "verify", "args": {"expected": expected}}
    small = protocol.encode_request(8, "hello", {"v": 1})
    assert protocol.HEADER.unpack_from(small)[1] == 0  # small ones as they are


async def test_a_large_reply_goes_compressed_and_the_orchestrator_reads_it() -> None:
    """A push's check of a million promoted files answers with their packed stats (~32 MB)."""
    out = io.BytesIO()
    stats = base64.b64encode(os.urandom(3 << 20)).decode("ascii")
    engine.Agent(out).send({"id": 4, "type": "result", "result": {"stats": stats}})
    frame = out.getvalue()
    assert protocol.HEADER.unpack_from(frame)[1] == engine.FLAG_ZLIB
    assert (await decode(frame)).result == {"stats": stats}


def test_a_request_over_the_frame_limit_is_refused_before_it_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "MAX_FRAME", 1 << 10)
    with pytest.raises(ProtocolError) as info:
        protocol.encode_request(9, "verify", {"digests": [hashlib.md5(b"%d" % i).hexdigest() for i in range(100_000)]})
    assert info.value.message == "the verify request is 3 MiB, over what one call to the agent carries"
    assert info.value.exit_code == 3


# --- garbage ----------------------------------------------------------------------------------


async def test_oversized_length_header_is_refused_before_reading_the_body() -> None:
    # No body follows and the stream stays open: a decoder that tried to read it would hang.
    with pytest.raises(ProtocolError) as info:
        await decode(struct.pack(">IB", protocol.MAX_FRAME + 1, 0), eof=False)
    assert info.value.message == f"the remote agent announced a {protocol.MAX_FRAME + 1}-byte frame, over the limit"
    assert info.value.exit_code == 3


@pytest.mark.parametrize("data", [
    b"",  # nothing at all
    b"\x00\x00",  # half a header
    raw_frame(b'{"id":1,"type":"result"}')[:-3],  # body cut short
    struct.pack(">IB", 100, 0) + b"{",
])
async def test_truncated_frames(data: bytes) -> None:
    with pytest.raises(RemoteError) as info:
        await decode(data)
    assert type(info.value) is RemoteError
    assert info.value.message == "the remote agent closed the connection mid-reply"


async def test_bad_zlib() -> None:
    with pytest.raises(ProtocolError, match=r"^the remote agent sent a corrupt compressed frame \("):
        await decode(raw_frame(b"this is not zlib data", engine.FLAG_ZLIB))


async def test_truncated_zlib_stream() -> None:
    body = zlib.compress(json.dumps(result(list(range(500)))).encode())
    with pytest.raises(ProtocolError, match="compressed frame"):
        await decode(raw_frame(body[: len(body) // 2], engine.FLAG_ZLIB))


def test_limits_agree_between_the_two_ends() -> None:
    assert (protocol.MAX_FRAME, protocol.MAX_FRAME_RAW) == (engine.MAX_FRAME, engine.MAX_FRAME_RAW)
    assert protocol.MAX_FRAME < protocol.MAX_FRAME_RAW


async def test_zlib_bomb_over_the_raw_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small frame on the wire that inflates far past MAX_FRAME_RAW: refused, never fully inflated.

    The raw limit is lowered to 1 MiB so the test does not inflate 256 MiB to prove the same thing.
    """
    monkeypatch.setattr(protocol, "MAX_FRAME_RAW", 1 << 20)
    body = zlib.compress(b" " * (64 << 20), 9)
    assert len(body) < 100_000
    with pytest.raises(ProtocolError) as info:
        await decode(raw_frame(body, engine.FLAG_ZLIB))
    assert info.value.message == "the remote agent sent a frame that inflates past the limit"


async def test_zlib_with_trailing_garbage() -> None:
    body = zlib.compress(json.dumps(result(1)).encode()) + b"junk"
    with pytest.raises(ProtocolError, match="corrupt compressed frame"):
        await decode(raw_frame(body, engine.FLAG_ZLIB))


async def test_zlib_exactly_at_the_raw_limit_is_not_a_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = json.dumps(result("x" * 1000)).encode()
    monkeypatch.setattr(protocol, "MAX_FRAME_RAW", len(payload))
    assert (await decode(raw_frame(zlib.compress(payload), engine.FLAG_ZLIB))).result == "x" * 1000
    monkeypatch.setattr(protocol, "MAX_FRAME_RAW", len(payload) - 1)
    with pytest.raises(ProtocolError, match="inflates past the limit"):
        await decode(raw_frame(zlib.compress(payload), engine.FLAG_ZLIB))


@pytest.mark.parametrize("flags", [2, 3, 0x80, 0xFF])
async def test_unknown_flags(flags: int) -> None:
    with pytest.raises(ProtocolError) as info:
        await decode(raw_frame(json.dumps(result(1)).encode(), flags))
    assert info.value.message == "the remote agent sent a frame with unknown flags"


@pytest.mark.parametrize("body", [
    b"not json",
    b"[1, 2, 3]",
    b'"a string"',
    b'{"id": "one", "type": "result"}',  # id must be an int or null
    b'{"id": 1, "type": "reply"}',  # unknown frame type
    b'{"id": 1}',  # no type
    b'{"id": 1, "type": "chunk", "items": {"a": 1}}',  # items must be a list
    b'{"id": 1, "type": "error", "error": {"kind": 3, "message": "m"}}',
    b'{"id": 1, "type": "error", "error": "boom"}',
    b"\xff\xfe",
])
async def test_wrong_types_are_malformed(body: bytes) -> None:
    with pytest.raises(ProtocolError, match=r"^the remote agent sent a malformed frame \("):
        await decode(raw_frame(body))


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
async def test_random_bytes_never_hang_or_escape(data: bytes) -> None:
    try:
        await decode(data)
    except RemoteError:  # ProtocolError included
        pass


# --- the sentinel -----------------------------------------------------------------------------

NONCE = "0123456789abcdef"


async def sentinel(data: bytes, nonce: str = NONCE, **kw: Any) -> str:
    return await asyncio.wait_for(await_sentinel(reader_of(data, **kw), nonce), BOUND)


async def test_sentinel_after_a_banner() -> None:
    banner = b"Welcome to the cluster\n\nQuota: 93% of /home used\r\nUSRSYNC-AGENT is mentioned here\n"
    after = engine.encode_frame(result("hello"))
    reader = reader_of(banner + f"USRSYNC-AGENT 1 {NONCE}\n".encode() + after)
    assert await asyncio.wait_for(await_sentinel(reader, NONCE), BOUND) == "1"
    # The frames after the sentinel are intact.
    assert (await asyncio.wait_for(read_frame(reader), BOUND)).result == "hello"


async def test_sentinel_with_the_wrong_nonce_is_ignored() -> None:
    wrong = b"USRSYNC-AGENT 1 ffffffffffffffff\n"
    assert await sentinel(wrong + f"USRSYNC-AGENT 2 {NONCE}\n".encode()) == "2"
    with pytest.raises(RemoteError) as info:
        await sentinel(wrong)
    assert info.value.message == "the remote agent exited before it started"


async def test_sentinel_refuses_over_a_mebibyte_of_noise() -> None:
    noise = b"noise " * 13 + b"\n"
    data = noise * ((protocol.MAX_BANNER // len(noise)) + 2) + f"USRSYNC-AGENT 1 {NONCE}\n".encode()
    with pytest.raises(ProtocolError) as info:
        await sentinel(data)
    assert info.value.message == "the remote printed over 1 MiB without starting the agent"


async def test_sentinel_refuses_an_endless_line() -> None:
    """Noise without any newline: a clean error, not the StreamReader's ValueError."""
    with pytest.raises(ProtocolError, match="over 1 MiB without starting the agent"):
        await sentinel(b"x" * (2 << 20), eof=False, limit=1 << 20)


async def test_sentinel_just_under_the_limit_is_found() -> None:
    noise = b"n" * 1023 + b"\n"
    data = noise * (protocol.MAX_BANNER // 1024 - 1) + f"USRSYNC-AGENT 1 {NONCE}\n".encode()
    assert await sentinel(data) == "1"


async def test_sentinel_then_eof() -> None:
    with pytest.raises(RemoteError, match="exited before it started"):
        await sentinel(b"bash: python3: command not found\n")


# --- AgentClient ------------------------------------------------------------------------------


class Sink:
    """The writer half: collects what the client sends (no drain, like a pipe without one)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


class Reply(msgspec.Struct):
    answer: int


def client_with(*frames: dict[str, Any], compress: bool = False) -> tuple[AgentClient, Sink]:
    sink = Sink()
    reader = reader_of(b"".join(engine.encode_frame(f, compress=compress) for f in frames))
    return AgentClient(reader, sink, timeout=BOUND), sink


async def test_client_call_sends_a_request_and_decodes_the_reply() -> None:
    client, sink = client_with(result({"answer": 42}))
    reply, items = await client.call("hello", {"x": 1}, Reply)
    assert (reply, items) == (Reply(42), [])
    assert engine.read_frame(io.BytesIO(bytes(sink.data))) == {"id": 1, "call": "hello", "args": {"x": 1}}


async def test_client_collects_chunks() -> None:
    client, _ = client_with({"id": 1, "type": "chunk", "items": [1, 2]}, {"id": 1, "type": "chunk", "items": [3]},
                            result({"answer": 3}), compress=True)
    assert await client.call("manifest", {}, Reply, int) == (Reply(3), [1, 2, 3])


async def test_client_ids_advance() -> None:
    client, _ = client_with(result({"answer": 1}, 1), result({"answer": 2}, 2))
    assert (await client.call("a", {}, Reply))[0] == Reply(1)
    assert (await client.call("b", {}, Reply))[0] == Reply(2)


async def test_client_reply_id_mismatch() -> None:
    client, _ = client_with(result({"answer": 1}, 9))
    with pytest.raises(ProtocolError) as info:
        await client.call("hello", {}, Reply)
    assert info.value.message == "the remote agent answered call 9, expected 1"


async def test_client_error_frame_is_an_agent_call_error() -> None:
    client, _ = client_with({"id": 1, "type": "error",
                             "error": {"kind": "locked", "message": "locked by bob@login1", "detail": {"pid": 5}}})
    with pytest.raises(AgentCallError) as info:
        await client.call("lock", {}, Reply)
    err = info.value
    assert (err.agent_kind, err.agent_message, err.detail) == ("locked", "locked by bob@login1", {"pid": 5})
    assert err.message == "remote agent: lock failed: locked by bob@login1"
    assert err.exit_code == 3


async def test_client_error_frame_without_id() -> None:
    """The agent could not even decode our request: it answers with id null."""
    client, _ = client_with({"id": None, "type": "error",
                             "error": {"kind": "bad_request", "message": "undecodable frame", "detail": {}}})
    with pytest.raises(AgentCallError) as info:
        await client.call("hello", {}, Reply)
    assert info.value.agent_kind == "bad_request"


async def test_client_unexpected_chunk() -> None:
    client, _ = client_with({"id": 1, "type": "chunk", "items": [1]}, result({"answer": 1}))
    with pytest.raises(ProtocolError, match="the remote agent streamed data for hello"):
        await client.call("hello", {}, Reply)


async def test_client_malformed_chunk_and_reply() -> None:
    client, _ = client_with({"id": 1, "type": "chunk", "items": ["x"]}, result({"answer": 1}))
    with pytest.raises(ProtocolError, match=r"^the remote agent sent a malformed manifest entry"):
        await client.call("manifest", {}, Reply, int)
    client, _ = client_with(result({"answer": "many"}))
    with pytest.raises(ProtocolError, match=r"^the remote agent sent a malformed hello reply"):
        await client.call("hello", {}, Reply)


async def test_client_agent_gone_mid_call() -> None:
    client, _ = client_with({"id": 1, "type": "chunk", "items": [1]})
    with pytest.raises(RemoteError, match="closed the connection mid-reply"):
        await client.call("manifest", {}, Reply, int)


async def test_client_times_out_on_a_silent_agent() -> None:
    client = AgentClient(reader_of(b"", eof=False), Sink(), timeout=0.2)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.call("hello", {}, Reply), BOUND)


# --- the agent's own reader -------------------------------------------------------------------


def test_agent_read_frame_refuses_garbage() -> None:
    with pytest.raises(engine.AgentError) as info:
        engine.read_frame(io.BytesIO(struct.pack(">IB", engine.MAX_FRAME + 1, 0)))
    assert info.value.kind == "frame_too_large"
    assert engine.read_frame(io.BytesIO(b"\x00\x00\x00")) is None  # truncated header: end of session
    assert engine.read_frame(io.BytesIO(raw_frame(b"{}")[:-1])) is None  # truncated body
    with pytest.raises(ValueError):
        engine.read_frame(io.BytesIO(raw_frame(b"{not json")))
