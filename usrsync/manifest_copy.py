"""The last manifest each remote sent, kept on this machine.

The agent digests the manifest it is about to send; when that equals the digest of our copy it
answers "unchanged" and sends no entries. A no-op run then moves a few bytes instead of the
whole manifest, and skips decoding and validating it. Otherwise it sends only the chunks our
copy lacks (chunks end where the paths say: `usrsync_agent.manifest_chunks`), and the rest is
taken from the copy. The copy is only a transport shortcut: the agent still scans (and hashes
by its cache rules) every time, and a missing, corrupt or foreign copy just means the entries
are sent again.

File: the 64-hex digest, a newline, the chunk layout as JSON ([[chunk digest, entries], ...]),
a newline, then the entries as msgpack arrays of up to _SLICE entries each, then a newline and
an index line (JSON {"slices": [byte size of each array]}) and a newline. The head stays at the
front (each run reads it); the index trails, as the sizes are known only once written. Slices
let a load decode a piece at a time and hand each entry equal to one of this side's over as
that one (see manifest.EntryPool): a loaded copy then costs ~10 bytes per such entry, not ~300.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec

from remote_agent import usrsync_agent as engine
from usrsync.config import Remote
from usrsync.manifest import Entry, EntryPool

_DIGEST_LEN = 64
_MAX_LAYOUT_LINE = 64 << 20  # ~40 bytes per chunk of ~1000 entries: far beyond any real dataset
_decoder = msgspec.msgpack.Decoder(list[Entry])
_encoder = msgspec.msgpack.Encoder()
_SLICE = 10_000  # entries per msgpack array (~1 MB): encoded, compared and decoded one at a time
_layout_decoder = msgspec.json.Decoder(list[tuple[str, int]])


class _Index(msgspec.Struct, frozen=True):
    slices: list[int]  # the byte size of each msgpack array of entries, in order


_index_decoder = msgspec.json.Decoder(_Index)


class Head(msgspec.Struct, frozen=True):
    """What a copy says about itself without decoding its entries."""

    digest: str
    chunks: list[tuple[str, int]]  # the agent's chunk digests and entry counts, in order


def copy_path(remote: Remote, base_dir: str, dataset: str, algo: str) -> Path:
    p = remote.profile
    key = msgspec.json.encode([remote.name, p.host, p.port, p.user, base_dir, dataset, algo])
    return Path(engine.default_cache_dir()) / "remote-manifests" / (hashlib.sha256(key).hexdigest()[:32] + ".msgpack")


def read_head(path: Path) -> Head | None:
    """Our copy's digest and chunk layout, or None when there is no readable copy."""
    try:
        with open(path, "rb") as handle:
            first = handle.read(_DIGEST_LEN + 1)
            layout = handle.readline(_MAX_LAYOUT_LINE)
    except OSError:
        return None
    if len(first) != _DIGEST_LEN + 1 or first[-1:] != b"\n" or not layout.endswith(b"\n"):
        return None
    digest = first[:-1].decode("ascii", "replace")
    if not all(c in "0123456789abcdef" for c in digest):
        return None
    try:
        return Head(digest=digest, chunks=_layout_decoder.decode(layout))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def load(path: Path, digest: str, pool: EntryPool | None = None) -> list[Entry] | None:
    """Our copy's entries if it (still) carries `digest` and decodes, else None. With a `pool`,
    an entry equal to one of the pool's is that one (decoded a slice at a time, then dropped)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data[:_DIGEST_LEN + 1] != digest.encode("ascii") + b"\n" or not data.endswith(b"\n"):
        return None
    body = data.find(b"\n", _DIGEST_LEN + 1) + 1
    # The index line holds no newline: the one before it is the last in the file but its own.
    index_at = data.rfind(b"\n", body, len(data) - 1) + 1
    if body == 0 or index_at == 0:
        return None
    view = memoryview(data)
    entries: list[Entry] = []
    try:
        slices = _index_decoder.decode(view[index_at:-1]).slices
        if min(slices, default=1) <= 0 or sum(slices) != index_at - 1 - body:
            return None
        start = body
        for size in slices:
            piece = _decoder.decode(view[start:start + size])
            entries += pool.share(piece) if pool is not None else piece
            start += size
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return entries


def matches(path: Path, digest: str, entries: list[Entry]) -> bool:
    """Whether our copy (still) carries `digest` and holds exactly `entries`, compared encoded, a
    slice at a time. A no-op run whose remote manifest equals the local one, the daily case, then
    uses the local entries for both instead of decoding a second copy of every entry (~290 bytes
    a file, ~40 ms per 100k)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(_DIGEST_LEN + 1) != digest.encode("ascii") + b"\n":
                return False
            if not handle.readline(_MAX_LAYOUT_LINE).endswith(b"\n"):  # the chunk layout
                return False
            sizes = []
            for piece in _encoded(entries):
                if handle.read(len(piece)) != piece:
                    return False
                sizes.append(len(piece))
            return handle.read() == _index_line(sizes)
    except OSError:
        return False


def _encoded(entries: list[Entry]) -> Iterator[bytes]:
    """The entries as msgpack arrays of _SLICE entries (the last one shorter): a million entries
    encode to ~90 MB, which neither writing nor comparing a copy needs to hold at once."""
    for start in range(0, len(entries), _SLICE):
        yield _encoder.encode(entries[start:start + _SLICE])


def _index_line(sizes: list[int]) -> bytes:
    return b"\n" + msgspec.json.encode(_Index(slices=sizes)) + b"\n"


def save(path: Path, digest: str, chunks: list[tuple[str, int]], entries: list[Entry]) -> None:
    """Replace the copy atomically; a cache must never fail a run, so errors are ignored."""
    if len(digest) != _DIGEST_LEN:
        return
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(digest.encode("ascii") + b"\n")
            handle.write(msgspec.json.encode(chunks) + b"\n")
            sizes = []
            for piece in _encoded(entries):
                handle.write(piece)
                sizes.append(len(piece))
            handle.write(_index_line(sizes))
        os.replace(tmp, path)
    except (OSError, UnicodeEncodeError):
        with contextlib.suppress(OSError):
            tmp.unlink()
