"""The performance mechanisms, for correctness only (speed is measured by `make bench`, never
asserted here): the remote manifest copy, the hash cache's write-back, hashing small and large
files on different paths, page-aligned read buffers, and the compare's fast path."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import io
import marshal
import mmap
import operator
import os
import shutil
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import REMOTE, load_audit, loaded_cache, local_sides, trusted_digests
from hypothesis import given, settings
from hypothesis import strategies as st

from remote_agent import usrsync_agent as engine
from usrsync import compare as compare_mod
from usrsync import config, manifest_copy
from usrsync import session as session_mod
from usrsync import sync as sync_mod
from usrsync.compare import Policy, SectionDelta, compare
from usrsync.dataset import SECTIONS, classify, unsafe_path_reason
from usrsync.errors import ProtocolError, RemoteError
from usrsync.manifest import Entry, EntryPool, Manifest, validate_remote_entries
from usrsync.plan import TransferPlan
from usrsync.session import RemoteSession

OLD = 1_700_000_000


def write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (OLD, OLD))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry(path: str, data: bytes, mtime_ns: int = OLD * 10**9) -> Entry:
    return Entry(path=path, section=classify(path), size=len(data), mtime_ns=mtime_ns, kind="file",
                 digest=sha(data))


# --- the remote manifest copy: file format ---------------------------------------------------


DIGEST = "ab" * 32


LAYOUT = [("0" * 32, 1), ("1" * 32, 1)]


def test_copy_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "copy.msgpack"
    entries = [entry("_derived/a", b"a"), entry("records.parquet", b"PAR1")]
    manifest_copy.save(path, DIGEST, LAYOUT, entries)
    assert manifest_copy.read_head(path) == manifest_copy.Head(digest=DIGEST, chunks=LAYOUT)
    assert manifest_copy.load(path, DIGEST) == entries
    assert manifest_copy.load(path, "cd" * 32) is None  # another digest: not this copy


@pytest.mark.parametrize("content", [b"", b"ab" * 32, b"zz" * 32 + b"\n[]\n", b"\xff" * 65, b"ab" * 32 + b"\r",
                                     b"ab" * 32 + b"\n", b"ab" * 32 + b"\n[]", b"ab" * 32 + b"\n[[1,2]]\n"])
def test_copy_without_a_valid_head_has_none(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "copy.msgpack"
    path.write_bytes(content)
    assert manifest_copy.read_head(path) is None
    assert manifest_copy.read_head(tmp_path / "missing") is None


@pytest.mark.parametrize("body", [b"", b"\xc1", msgspec.msgpack.encode([["x"]]), msgspec.msgpack.encode({"a": 1})])
def test_corrupt_copy_is_not_loaded(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "copy.msgpack"
    path.write_bytes(DIGEST.encode() + b"\n[]\n" + body)
    assert manifest_copy.read_head(path) == manifest_copy.Head(digest=DIGEST, chunks=[])
    assert manifest_copy.load(path, DIGEST) is None


def test_copy_save_never_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache dir should be")
    manifest_copy.save(blocker / "sub" / "copy.msgpack", DIGEST, [], [entry("a", b"a")])  # no exception
    manifest_copy.save(tmp_path / "short", "abc", [], [entry("a", b"a")])  # not a digest: nothing written
    assert not (tmp_path / "short").exists()


# --- the agent: a known digest means no entries on the wire ------------------------------------


def manifest_call(base: Path, **extra: Any) -> tuple[dict[str, Any], list[list[Any]]]:
    """One `manifest` call on an in-process Agent: (result, chunk items), from the frames it wrote."""
    out = io.BytesIO()
    agent = engine.Agent(out)
    args = {"base_dir": str(base), "dataset": "ds", "algo": "sha256", "cache": False, **extra}
    agent.handle({"id": 9, "call": "manifest", "args": args})
    stream = io.BytesIO(out.getvalue())
    frames = []
    while (frame := engine.read_frame(stream)) is not None:
        frames.append(frame)
    assert [f["id"] for f in frames] == [9] * len(frames)
    assert frames[-1]["type"] == "result"
    return frames[-1]["result"], [item for f in frames[:-1] if f["type"] == "chunk" for item in f["items"]]


def test_agent_skips_the_entries_only_when_the_known_digest_matches(tmp_path: Path) -> None:
    base = tmp_path / "base"
    write(base / "ds", {"records.parquet": b"PAR1", "_derived/a": b"a"})
    expected = [["_derived/a", "_derived", 1, OLD * 10**9, "file", sha(b"a")],
                ["records.parquet", "primary", 4, OLD * 10**9, "file", sha(b"PAR1")]]

    first, items = manifest_call(base, known=None)
    assert items == expected
    assert (first["count"], first["unchanged"], len(first["digest"])) == (2, False, 64)

    again, items = manifest_call(base, known=first["digest"])
    assert (again["unchanged"], again["digest"], again["count"], items) == (True, first["digest"], 2, [])

    other, items = manifest_call(base, known="0" * 64)
    assert (other["unchanged"], other["digest"], items) == (False, first["digest"], expected)

    write(base / "ds", {"_derived/a": b"b"})
    changed, items = manifest_call(base, known=first["digest"])
    assert changed["unchanged"] is False and changed["digest"] != first["digest"]
    assert items[0][5] == sha(b"b")


def test_agent_sends_only_the_chunks_the_copy_lacks(tmp_path: Path) -> None:
    base = tmp_path / "base"
    write(base / "ds", {f"_derived/ns/part-{i:05d}": b"%d" % i for i in range(4000)} | {"records.parquet": b"PAR1"})
    first, everything = manifest_call(base, known=None)
    layout = first["chunks"]
    assert len(layout) > 2 and sum(n for _, n in layout) == len(everything) == first["count"]

    write(base / "ds", {"_derived/ns/part-02500": b"changed"})
    known = [digest for digest, _ in layout]
    again, items = manifest_call(base, known=first["digest"], known_chunks=known)
    new = [(digest, n) for digest, n in again["chunks"] if digest not in known]
    assert len(new) == 1 and len(items) == new[0][1] < 1500
    assert ["_derived/ns/part-02500", "_derived", 7] == items[[i[0] for i in items].index("_derived/ns/part-02500")][:3]
    assert [n for _, n in again["chunks"]] == [n for _, n in layout]  # same cuts: they depend on paths only


@settings(max_examples=100, deadline=None)
@given(st.sets(st.text("ab/c", min_size=1, max_size=12), min_size=1, max_size=300), st.text("ab/c", min_size=1, max_size=12))
def test_adding_a_path_changes_at_most_the_chunk_it_lands_in(paths: set, added: str) -> None:
    def chunks(names: set) -> set:
        return {tuple(map(tuple, c)) for c in engine.manifest_chunks([[n] for n in sorted(names)])}

    before, after = chunks(paths), chunks(paths | {added})
    assert len(before - after) <= 1 and len(after - before) <= 2


def _reply(chunks: list, count: int) -> Any:
    return msgspec.convert({"exists": True, "count": count, "algo": "sha256", "root": "/r", "digest": "d" * 64,
                            "chunks": chunks}, session_mod.ManifestReply)


def test_assembly_takes_known_chunks_from_the_copy_and_checks_the_rest() -> None:
    a, b, c = entry("_derived/a", b"a"), entry("_derived/b", b"b"), entry("records.parquet", b"P")
    head = manifest_copy.Head(digest="d" * 64, chunks=[("x" * 32, 2), ("y" * 32, 1)])
    saved = [a, b, c]
    assert session_mod._assemble(_reply([("x" * 32, 2), ("z" * 32, 1)], 3), [c], head, saved) == [a, b, c]
    # A known chunk the copy cannot supply (gone, or a different count): resend everything.
    assert session_mod._assemble(_reply([("x" * 32, 2)], 2), [], head, None) is None
    assert session_mod._assemble(_reply([("x" * 32, 1)], 1), [], head, saved) is None
    # Known chunks put out of order, and chunks the agent claims but did not send, are refused.
    with pytest.raises(ProtocolError, match="unsorted"):
        session_mod._assemble(_reply([("y" * 32, 1), ("x" * 32, 2)], 3), [], head, saved)
    with pytest.raises(RemoteError, match="incomplete"):
        session_mod._assemble(_reply([("x" * 32, 2), ("z" * 32, 2)], 4), [c], head, saved)
    with pytest.raises(ProtocolError, match="unsafe path"):
        session_mod._assemble(_reply([("z" * 32, 1)], 1), [entry("../x", b"x")], head, saved)


def test_session_after_a_change_holds_the_same_entries_as_a_full_send(tmp_path: Path) -> None:
    sides = local_sides(tmp_path / "w")
    sides.seed_remote({f"_derived/ns/part-{i:05d}": b"%d" % i for i in range(4000)} | {"records.parquet": b"PAR1"})
    session_manifest(sides.cfg)
    write(sides.remote, {"_derived/ns/part-00007": b"changed", "_derived/ns/part-03999b": b"added"})
    (sides.remote / "_derived/ns/part-02000").unlink()
    delta, copy = session_manifest(sides.cfg)
    copy.unlink()
    full, _ = session_manifest(sides.cfg)
    assert delta.entries == full.entries and delta.digest == full.digest
    assert delta.get("_derived/ns/part-00007") == entry("_derived/ns/part-00007", b"changed")


def test_the_agent_loads_a_dataset_hash_cache_once_per_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base"
    write(base / "ds", {"records.parquet": b"PAR1", "_derived/a": b"a"})
    loads = []

    class CountedCache(engine.HashCache):
        def __init__(self, *args: Any) -> None:
            loads.append(args)
            super().__init__(*args)

    monkeypatch.setattr(engine, "HashCache", CountedCache)
    agent = engine.Agent(io.BytesIO())
    args = {"base_dir": str(base), "dataset": "ds", "algo": "sha256", "cache": True, "known": None}
    agent.handle({"id": 1, "call": "manifest", "args": args})
    # The rescan is told to trust a digest for the file staging linked; verify's remember then
    # keeps it (the orchestrator sends it once), with what it reread itself.
    st = os.lstat(base / "ds" / "records.parquet")
    told = "f" * 64
    agent.handle({"id": 2, "call": "manifest",
                  "args": {**args, "trusted": trusted_digests(
                      {"records.parquet": [st.st_ino, 4, st.st_mtime_ns, told]}, as_sent=True)}})
    expected = {"paths": ["_derived/a", "records.parquet"], "sizes": [1, 4], "digests": [sha(b"a"), sha(b"PAR1")]}
    agent.handle({"id": 3, "call": "verify", "args": {**args, "txid": "t", "subtree": "", "staging": False,
                                                       "expected": expected, "reread": ["_derived/a"],
                                                       "remember": True}})
    assert len(loads) == 1
    cached = loaded_cache(engine.HashCache(engine.default_cache_dir(), str(base / "ds"), "sha256"))
    assert {rel: digest for rel, (_, digest) in cached.items()} == {"_derived/a": sha(b"a"), "records.parquet": told}


def test_a_rescan_with_trusted_digests_leaves_the_cache_file_to_verify_s_remember(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A push rescans the destination trusting the digests of the files staging linked. Their keys
    change again when staging goes, so only verify's remember, after promotion, writes the cache."""
    base = tmp_path / "base"
    write(base / "ds", {"records.parquet": b"PAR1", "_derived/a": b"a"})
    writes: list[bool] = []

    class CountedCache(engine.HashCache):
        def save(self) -> None:
            writes.append(self.dirty)
            super().save()

    monkeypatch.setattr(engine, "HashCache", CountedCache)
    agent = engine.Agent(io.BytesIO())
    args = {"base_dir": str(base), "dataset": "ds", "algo": "sha256", "cache": True, "known": None}
    agent.handle({"id": 1, "call": "manifest", "args": args})
    assert writes == [True]
    primary = base / "ds" / "records.parquet"
    time.sleep(0.05)  # past the kernel's coarse clock tick, so that the link below moves the ctime
    os.link(primary, tmp_path / "staged")  # staging's hard link moves the ctime: a cache miss
    linked = os.lstat(primary)
    trusted = trusted_digests({"records.parquet": [linked.st_ino, 4, linked.st_mtime_ns, sha(b"PAR1")]},
                              as_sent=True)
    agent.handle({"id": 2, "call": "manifest", "args": {**args, "trusted": trusted, "save_cache": False}})
    cache = agent.hash_caches[(str(base / "ds"), "sha256")]
    # The trusted digest was not put under the linked file's new key (it moves again when staging
    # goes); its entry stays as it was, to be replaced in place by verify's remember.
    assert not cache.dirty and "records.parquet" in cache.paths
    assert writes == [True]
    os.unlink(tmp_path / "staged")  # staging removed: the ctime moves again
    expected = {"paths": ["_derived/a", "records.parquet"], "sizes": [1, 4], "digests": [sha(b"a"), sha(b"PAR1")]}
    agent.handle({"id": 3, "call": "verify", "args": {**args, "txid": "t", "subtree": "", "staging": False,
                                                       "expected": expected, "reread": [], "remember": True}})
    assert writes == [True, True]
    now = os.lstat(primary)
    cached = loaded_cache(engine.HashCache(engine.default_cache_dir(), str(base / "ds"), "sha256"))
    assert cached["records.parquet"] == (engine.cache_key((4, now.st_mtime_ns, now.st_ctime_ns, now.st_ino)),
                                         sha(b"PAR1"))


def test_agent_without_known_replies_as_before(tmp_path: Path) -> None:
    write(tmp_path / "base" / "ds", {"records.parquet": b"PAR1"})
    result, items = manifest_call(tmp_path / "base")
    assert set(result) == {"exists", "count", "algo", "root"}
    assert len(items) == 1


@pytest.mark.parametrize("action", ["push", "pull"])
def test_only_a_push_s_destination_rescan_leaves_the_agent_s_cache_unsaved(tmp_path: Path, action: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The orchestrator, which knows verify's remember follows a push's destination rescan, says
    so; a pull's remote rescan (its source) saves as any scan does. Run in-process, recorded."""
    sides = local_sides(tmp_path / "w")
    files = {"records.parquet": b"PAR1", "_derived/ns/a": b"a", "_derived/ns/b": b"b"}
    write(sides.local, files)
    write(sides.remote, files)
    write(sides.local if action == "push" else sides.remote, {"_derived/ns/c": b"new"})
    recorded: list[bool] = []
    changed_since = RemoteSession.changed_since

    async def recording(self: RemoteSession, *args: Any, **kwargs: Any) -> Manifest | None:
        recorded.append(kwargs.get("save_cache", True))
        return await changed_since(self, *args, **kwargs)

    monkeypatch.setattr(RemoteSession, "changed_since", recording)
    remote = config.get_remote(config.load_remotes(sides.cfg), REMOTE, sides.cfg)
    doc, code = asyncio.run(sync_mod.run(action, "densegen/my_dataset", remote, sides.root, sync_mod.SyncOptions()))
    assert (code, doc.data.transfer_state, doc.data.transfer.files) == (0, "TRANSFERRED", 1)
    assert recorded == [action == "pull"]


# --- the session: the copy is used, and a broken copy costs only a resend ----------------------


def session_manifest(sides_cfg: Path, local: Manifest | None = None) -> tuple[Manifest, Path]:
    async def run() -> tuple[Manifest, Path]:
        remote = config.get_remote(config.load_remotes(sides_cfg), REMOTE, sides_cfg)
        session = await RemoteSession.open(remote)
        try:
            found = await session.manifest("densegen/my_dataset", "sha256", jobs=2, use_cache=True,
                                           local=None if local is None else asyncio.sleep(0, result=local))
            return found, manifest_copy.copy_path(remote, session.base.base_dir, "densegen/my_dataset", "sha256")
        finally:
            await session.close()

    return asyncio.run(run())


def test_an_unchanged_remote_manifest_equal_to_the_local_one_takes_the_local_entries(tmp_path: Path) -> None:
    """The daily no-op: our copy of the remote manifest equals this side's, so this side's entries
    serve both and the copy is not decoded. Enough files for several compared slices."""
    sides = local_sides(tmp_path / "w")
    sides.seed_remote({f"_derived/ns/part-{i:05d}": b"%d" % i for i in range(25_000)} | {"records.parquet": b"PAR1"})
    first, copy = session_manifest(sides.cfg)
    local = Manifest(exists=True, algo="sha256", entries=manifest_copy.load(copy, first.digest or "") or [])
    assert local.entries == first.entries and local.entries is not first.entries
    shared, _ = session_manifest(sides.cfg, local)
    assert shared.entries is local.entries and shared.digest == first.digest

    # One entry differs (an mtime), or one is missing: the copy is decoded, as before, and every
    # entry equal to a local one is that one.
    e = local.entries[12_345]
    for entries in (local.entries[:12_345] + [msgspec.structs.replace(e, mtime_ns=e.mtime_ns + 1)]
                    + local.entries[12_346:], local.entries[:-1]):
        other = Manifest(exists=True, algo="sha256", entries=entries)
        decoded, _ = session_manifest(sides.cfg, other)
        assert decoded.entries == first.entries and decoded.entries is not entries
        ours = {id(x) for x in entries}
        assert [i for i, x in enumerate(decoded.entries) if id(x) not in ours] == (
            [12_345] if len(entries) == len(first.entries) else [len(entries)])


def test_received_remote_entries_equal_to_local_ones_are_the_local_ones(tmp_path: Path) -> None:
    """Whether sent in full (no copy yet) or partly (the chunk with a change): an entry the same on
    both sides is one object, so a million of them are not held twice."""
    sides = local_sides(tmp_path / "w")
    files = {f"_derived/ns/part-{i:05d}": b"%d" % i for i in range(12_000)} | {"records.parquet": b"PAR1"}
    sides.seed_remote(files)
    first, copy = session_manifest(sides.cfg)
    local_entries = [msgspec.structs.replace(x) for x in first.entries]
    copy.unlink()  # as on a first run: every entry is sent
    local = Manifest(exists=True, algo="sha256", entries=local_entries)
    sent, _ = session_manifest(sides.cfg, local)
    assert sent.entries == first.entries and all(a is b for a, b in zip(sent.entries, local_entries))

    write(sides.remote, {"_derived/ns/part-00042": b"changed"})  # one chunk is sent, the rest is our copy
    changed, _ = session_manifest(sides.cfg, local)
    differing = [i for i, x in enumerate(changed.entries) if x is not local_entries[i]]
    assert [changed.entries[i].path for i in differing] == ["_derived/ns/part-00042"]
    assert changed.get("_derived/ns/part-00042") == entry("_derived/ns/part-00042", b"changed")


@pytest.mark.parametrize("count", [0, 3, 10_000, 20_001])
def test_the_copy_holds_its_entries_in_slices_and_a_trailing_index(tmp_path: Path, count: int) -> None:
    entries = [entry(f"_derived/part-{i:06d}", b"%d" % i) for i in range(count)]
    path = tmp_path / "copy"
    manifest_copy.save(path, "d" * 64, [("x" * 32, count)], entries)
    slices = [msgspec.msgpack.encode(entries[i:i + 10_000]) for i in range(0, count, 10_000)]
    index = b'{"slices":[%s]}' % b",".join(b"%d" % len(piece) for piece in slices)
    assert path.read_bytes() == b"d" * 64 + b'\n[["' + b"x" * 32 + b'",%d]]\n' % count + b"".join(slices) + (
        b"\n" + index + b"\n")
    assert manifest_copy.load(path, "d" * 64) == entries and manifest_copy.matches(path, "d" * 64, entries)


def test_a_loaded_copy_shares_the_entries_equal_to_a_pools(tmp_path: Path) -> None:
    """Decoded a slice at a time, each entry equal to one of this side's is this side's object."""
    entries = [entry(f"_derived/part-{i:06d}", b"%d" % i) for i in range(25_000)]
    path = tmp_path / "copy"
    manifest_copy.save(path, "d" * 64, [], entries)
    mine = [msgspec.structs.replace(e) for e in entries]
    changed = {7, 12_000, 24_999}
    for i in changed:
        mine[i] = msgspec.structs.replace(mine[i], mtime_ns=1)
    del mine[20_000]  # the copy holds a file this side lacks
    loaded = manifest_copy.load(path, "d" * 64, EntryPool(mine))
    assert loaded == entries
    ours = {id(e) for e in mine}
    assert [i for i, e in enumerate(loaded) if id(e) not in ours] == [7, 12_000, 20_000, 24_999]


@pytest.mark.parametrize("damage", ["old format", "no index", "sizes short", "sizes long", "zero size",
                                    "index not json", "cut in a slice", "trailing byte"])
def test_a_copy_with_a_damaged_body_or_index_is_not_loaded(tmp_path: Path, damage: str) -> None:
    entries = [entry(f"_derived/part-{i:06d}", b"%d" % i) for i in range(12_000)]
    path = tmp_path / "copy"
    manifest_copy.save(path, "d" * 64, [], entries)
    data = path.read_bytes()
    head = data[:data.index(b"\n", 65) + 1]
    index_at = data.rindex(b"\n", 0, len(data) - 1)
    body = data[len(head):index_at]
    damaged = {
        "old format": head + msgspec.msgpack.encode(entries),  # one array, no index: an older usrsync's copy
        "no index": head + body,
        "sizes short": head + body + b'\n{"slices":[1]}\n',
        "sizes long": head + body + b'\n{"slices":[%d,1]}\n' % len(body),
        "zero size": head + body + b'\n{"slices":[%d,0]}\n' % len(body),
        "index not json": head + body + b"\n{slices\n",
        "cut in a slice": head + body[:-5] + data[index_at:],
        "trailing byte": data + b"\xc0",
    }[damage]
    path.write_bytes(damaged)
    assert manifest_copy.load(path, "d" * 64) is None
    assert not manifest_copy.matches(path, "d" * 64, entries)


def test_an_entry_pool_hands_out_its_own_equal_entries_in_any_order() -> None:
    mine = [entry(f"_derived/p{i:03d}", b"%d" % i) for i in range(100)]
    pool = EntryPool(mine)
    decoded = [msgspec.structs.replace(e) for e in mine]
    assert all(a is b for a, b in zip(pool.share(decoded[:50]), mine[:50]))  # a run of equal entries
    other = msgspec.structs.replace(decoded[60], digest="0" * 64)
    extra = entry("_derived/p050x", b"new")
    out = pool.share([decoded[50], extra, other, decoded[99]])
    assert [o is m for o, m in zip(out, [mine[50], None, None, mine[99]])] == [True, False, False, True]
    assert out[1] is extra and out[2] is other
    # Out of order or repeated: slower to match, never a wrong object.
    out = pool.share([decoded[10], decoded[5], decoded[5], other])
    assert out == [decoded[10], decoded[5], decoded[5], other] and out[3] is other
    assert EntryPool([]).share(decoded[:3]) == decoded[:3]


def test_the_copy_matches_only_the_very_entries_it_holds(tmp_path: Path) -> None:
    a, b = entry("_derived/a", b"a"), entry("records.parquet", b"P")
    path = tmp_path / "copy"
    manifest_copy.save(path, "d" * 64, [("x" * 32, 2)], [a, b])
    assert manifest_copy.matches(path, "d" * 64, [a, b])
    assert not manifest_copy.matches(path, "e" * 64, [a, b])  # another digest
    assert not manifest_copy.matches(path, "d" * 64, [a])
    assert not manifest_copy.matches(path, "d" * 64, [a, b, entry("z", b"z")])
    assert not manifest_copy.matches(path, "d" * 64, [a, entry("records.parquet", b"Q")])
    data = path.read_bytes()
    for damaged in (data[:-1], data + b"\xc0"):
        path.write_bytes(damaged)
        assert not manifest_copy.matches(path, "d" * 64, [a, b])
    assert not manifest_copy.matches(tmp_path / "missing", "d" * 64, [a, b])


def test_session_reuses_its_copy_and_survives_a_broken_one(tmp_path: Path) -> None:
    sides = local_sides(tmp_path / "w")
    sides.seed_remote({"records.parquet": b"PAR1", "_derived/ns/a": b"a", "notes.txt": b"n"})
    first, copy = session_manifest(sides.cfg)
    assert [e.path for e in first.entries] == ["_derived/ns/a", "notes.txt", "records.parquet"]
    saved = copy.stat()

    second, _ = session_manifest(sides.cfg)
    assert second == first
    assert (copy.stat().st_ino, copy.stat().st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns)  # not rewritten

    # Same head, garbage body: the agent says "unchanged", we cannot load it, so it resends.
    data = copy.read_bytes()
    copy.write_bytes(data[:data.index(b"\n", 65) + 1] + b"\xc1garbage")
    third, _ = session_manifest(sides.cfg)
    assert third == first
    assert manifest_copy.load(copy, first.digest or "") == first.entries

    write(sides.remote, {"notes.txt": b"changed"})
    fourth, _ = session_manifest(sides.cfg)
    assert fourth.get("notes.txt") == entry("notes.txt", b"changed")
    head = manifest_copy.read_head(copy)
    assert head is not None and manifest_copy.load(copy, head.digest) == fourth.entries


def test_changed_since_sends_nothing_while_the_digest_holds(tmp_path: Path) -> None:
    sides = local_sides(tmp_path / "w")
    sides.seed_remote({"records.parquet": b"PAR1", "_derived/ns/a": b"a"})

    async def run() -> tuple[Manifest, Manifest | None, Manifest | None]:
        remote = config.get_remote(config.load_remotes(sides.cfg), REMOTE, sides.cfg)
        session = await RemoteSession.open(remote)
        try:
            before = await session.manifest("densegen/my_dataset", "sha256", jobs=2, use_cache=True)
            same = await session.changed_since("densegen/my_dataset", before, jobs=2, use_cache=True)
            write(sides.remote, {"_derived/ns/a": b"A"})
            changed = await session.changed_since("densegen/my_dataset", before, jobs=2, use_cache=True)
            return before, same, changed
        finally:
            await session.close()

    before, same, changed = asyncio.run(run())
    assert before.digest is not None and same is None
    assert changed is not None and changed.digest != before.digest
    assert changed.get("_derived/ns/a") == entry("_derived/ns/a", b"A")


@pytest.mark.parametrize("action", ["pull", "push"])
def test_after_a_transfer_every_destination_file_is_cached_under_its_current_key(tmp_path: Path,
                                                                                 action: str) -> None:
    """The next run reads nothing again: the moved file was reread on the way in, and staging's
    hard links (which change a file's ctime, part of the key) are re-keyed by the rescan."""
    sides = local_sides(tmp_path / "w")
    source, dest = (sides.remote, sides.local) if action == "pull" else (sides.local, sides.remote)
    files = {"records.parquet": b"PAR1", "meta.md": b"# m\n", "_derived/ns/part-0001.parquet": b"PAR1derived-1",
             "_derived/ns/part-0003.parquet": b"PAR1derived-3", "notes/readme.txt": b"aux\n"}
    write(source, files)  # settled (old mtimes): racy files are never cached
    write(dest, files)
    write(source, {"_derived/ns/part-0002.parquet": b"PAR1derived-2"})
    out = tmp_path / "audit.json"
    r = sides.run(action, "--audit-json-out", str(out))
    assert r.returncode == 0, r.stderr
    audit = load_audit(out)
    assert (audit["transfer"]["files"], audit["transfer"]["subtree"]) == (1, "_derived/ns")
    algo = audit["verify"]["hash_algo"]
    cached = loaded_cache(engine.HashCache(engine.default_cache_dir(), str(dest), algo))
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert sorted(cached) == files
    for rel in files:
        st = os.lstat(dest / rel)
        key = engine.cache_key((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        assert cached[rel] == (key, engine.hash_file(str(dest / rel), algo)[0]), rel


# --- the hash cache is written back only when something changed --------------------------------


def test_unchanged_scan_leaves_the_cache_file_alone(tmp_path: Path) -> None:
    root, cache_dir = tmp_path / "ds", tmp_path / "cache"
    write(root, {"records.parquet": b"PAR1", "_derived/a": b"a", "_derived/b": b"b"})
    engine.build_manifest(str(root), "sha256", cache_dir=str(cache_dir))
    path = Path(engine.HashCache(str(cache_dir), str(root), "sha256").path)
    before = path.stat()
    engine.build_manifest(str(root), "sha256", cache_dir=str(cache_dir))
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    (root / "_derived/b").unlink()
    engine.build_manifest(str(root), "sha256", cache_dir=str(cache_dir))
    assert marshal.loads(path.read_bytes())["paths"] == ["_derived/a", "records.parquet"]

    write(root, {"_derived/a": b"A"})
    engine.build_manifest(str(root), "sha256", cache_dir=str(cache_dir))
    assert loaded_cache(engine.HashCache(str(cache_dir), str(root), "sha256"))["_derived/a"][1] == sha(b"A")


# --- the local scan builds typed entries itself ------------------------------------------------------


@pytest.mark.parametrize("scan", ["first", "warm", "one changed"])
def test_typed_entries_from_the_scan_equal_its_lists_converted(tmp_path: Path, scan: str) -> None:
    """local_manifest has the engine build Entry objects (from the cache's columns on a warm
    scan, from its lists otherwise): the same entries, in the same order, as converting the lists,
    with .events.log, symlinks, and an escaped name that sorts out of the walk's order."""
    root, cache_dir = tmp_path / "ds", tmp_path / "cache"
    files = {f"_derived/d{i % 3}/f{i:02d}": b"%d" % i for i in range(20)}
    write(root, {"records.parquet": b"PAR1", ".events.log": b"a\nb\n", "meta.md": b"m", **files})
    os.symlink("records.parquet", root / "link")
    (root / "_derived" / os.fsdecode(b"d1\xff")).mkdir()
    (root / "_derived" / os.fsdecode(b"d1\xff") / "x").write_bytes(b"x")
    if scan != "first":
        engine.build_manifest(str(root), "sha256", cache_dir=str(cache_dir))
    if scan == "one changed":
        write(root, {"_derived/d1/f04": b"changed"})

    def scan_both() -> tuple[list, list]:
        lists = engine.build_manifest(str(root), "sha256", cache_dir=str(cache_dir / "lists"))
        typed = engine.build_manifest(str(root), "sha256", cache_dir=str(cache_dir), entry_type=Entry)
        return lists, typed

    if scan != "first":  # both caches in the same state
        shutil.copytree(cache_dir, cache_dir / "lists")
    lists, typed = scan_both()
    assert all(type(e) is Entry for e in typed)
    assert typed == msgspec.convert(lists, list[Entry])
    assert [e.path for e in typed] == sorted(e.path for e in typed)


@pytest.mark.parametrize("how", ["cached", "trusted", "hashed"])
def test_a_rescan_shares_the_entries_of_the_manifest_it_checks(tmp_path: Path, how: str) -> None:
    """local_manifest(before=...) hands back before's object for every entry equal to one of its,
    a directory at a time, however the digest was had (cache, trust, hashing), and a new entry for
    a file that changed: a rescan holds no second set of entries."""
    root, cache_dir = tmp_path / "ds", tmp_path / "cache"
    write(root, {"records.parquet": b"PAR1", **{f"_derived/d{i % 3}/f{i:02d}": b"%d" % i for i in range(30)}})
    before = sync_mod.local_manifest(root, "sha256", cache_dir=cache_dir)
    write(root, {"_derived/d1/f04": b"changed"})
    trusted = None
    if how == "trusted":  # as after staging linked them: new ctimes, so the cache misses
        known = {}
        for e in before.entries:
            st = os.lstat(root / e.path)
            os.link(root / e.path, tmp_path / "link")
            os.unlink(tmp_path / "link")
            known[e.path] = [st.st_ino, e.size, e.mtime_ns, e.digest]
        trusted = trusted_digests(known)
    now = sync_mod.local_manifest(root, "sha256", cache_dir=cache_dir, trusted=trusted, before=before,
                                  use_cache=how != "hashed")
    assert now.entries == sync_mod.local_manifest(root, "sha256", use_cache=False).entries
    shared = {e.path for e, b in zip(now.entries, before.entries) if e is b}
    assert shared == {e.path for e in before.entries} - {"_derived/d1/f04"}


@pytest.mark.parametrize("use_cache", [True, False])
def test_trusted_digests_serve_whole_directories_and_single_files_alike(tmp_path: Path, use_cache: bool) -> None:
    """A directory whose every file is vouched for takes the run path (one lookup of its keys);
    one with a stale or an unvouched file takes the per-file path, where each file is judged
    alone. Either way a digest is used exactly when the file's inode, size and mtime match, and
    the cache keeps the old entries of the files trust served, to be replaced when remembered."""
    root, cache_dir = tmp_path / "ds", tmp_path / "cache"
    files = {f"_derived/d{d}/f{i:02d}": b"%d-%d" % (d, i) for d in range(3) for i in range(10)}
    write(root, {"records.parquet": b"PAR1", **files})
    engine.build_manifest(str(root), "sha256", cache_dir=str(cache_dir))
    first = loaded_cache(engine.HashCache(str(cache_dir), str(root), "sha256"))
    known, forged = {}, "f" * 64
    for path in files:  # as staging's links do: the ctimes move, so the cache misses every one
        os.link(root / path, tmp_path / "link")
        os.unlink(tmp_path / "link")
        st = os.lstat(root / path)
        known[path] = [st.st_ino, st.st_size, st.st_mtime_ns, forged]
    known["_derived/d1/f03"][2] -= 1  # rewritten since it was proved: its digest no longer applies
    for i in range(0, 10, 2):
        del known[f"_derived/d2/f{i:02d}"]  # not vouched for
    served = {path for path, (ino, size, mtime_ns, _) in known.items() if mtime_ns == os.lstat(root / path).st_mtime_ns}
    assert len(served) == 10 + 9 + 5
    cache = engine.HashCache(str(cache_dir), str(root), "sha256") if use_cache else None
    entries = engine.build_manifest(str(root), "sha256", use_cache=use_cache, cache=cache,
                                    trusted=trusted_digests(known))
    assert {e[0]: e[5] for e in entries} == {"records.parquet": sha(b"PAR1"), **{
        path: forged if path in served else sha(data) for path, data in files.items()}}
    if cache is not None:  # trusted files keep their entries as they were; the ones read are put anew
        now = loaded_cache(cache)
        assert {path for path in files if now[path] == first[path]} == served


# --- hashing: small files in this thread, large ones on the pool -----------------------------------


@pytest.mark.parametrize("jobs", [1, 2, 4])
def test_small_and_large_files_hash_right_with_any_jobs(tmp_path: Path, jobs: int) -> None:
    chunk = engine.READ_CHUNK
    files = {f"_derived/small-{i}": bytes([i]) * (100 * i) for i in range(5)}
    files.update({f"_derived/large-{i}": os.urandom(chunk * (i + 1) + i) for i in range(3)})
    files["_derived/exact"] = b"x" * chunk
    files[".events.log"] = b'{"a":1}\n' * (chunk // 4) + b"partial"  # spans chunks
    write(tmp_path, files)
    got = {e[0]: e for e in engine.build_manifest(str(tmp_path), "sha256", jobs=jobs, use_cache=False)}
    assert {rel: got[rel][5] for rel in files} == {rel: sha(data) for rel, data in files.items()}


def test_an_equal_events_logs_lines_are_counted_across_read_blocks(tmp_path: Path) -> None:
    log = tmp_path / ".events.log"
    log.write_bytes(b'{"a":1}\n' * ((1 << 20) // 4) + b"partial")  # 2 MiB of whole lines, then half a one
    assert sync_mod._newline_count(log) == (1 << 20) // 4


def test_read_buffer_is_page_aligned() -> None:
    buf = engine._buffer()
    address = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    assert address % mmap.PAGESIZE == 0
    assert len(buf) == engine.READ_CHUNK


# --- compare: the fast paths agree with bucketing path by path ------------------------------------

PATHS = ["records.parquet", "meta.md", "_derived/a", "_derived/b", "_snapshots/s", "notes.txt"]
VARIANTS = st.sampled_from([(b"a", 0), (b"b", 0), (b"a", 1), (b"ab", 0)])
policies = st.builds(Policy, verify=st.sampled_from(["hash", "size"]), content_hashes=st.booleans())


def merged(local: Manifest, remote: Manifest, policy: Policy,
           primary_shapes: tuple | None = None) -> dict[str, SectionDelta]:
    """The sections as bucketing every path on its own gives them: the oracle of compare()."""
    sections = {s: SectionDelta(section=s, in_scope=policy.in_scope(s)) for s in SECTIONS}
    lfiles = {e.path: e for e in local.entries}
    rfiles = {e.path: e for e in remote.entries}
    for path in sorted(lfiles.keys() | rfiles.keys()):
        a, b = lfiles.get(path), rfiles.get(path)
        delta = sections[(a or b).section]
        delta.local_files += a is not None
        delta.remote_files += b is not None
        if b is None:
            delta.local_only.append(path)
        elif a is None:
            delta.remote_only.append(path)
        elif compare_mod._same(a, b, policy, primary_shapes):
            delta.same += 1
        else:
            delta.differing.append(path)
    return sections


@settings(max_examples=150, deadline=None)
@given(st.lists(VARIANTS, min_size=len(PATHS), max_size=len(PATHS)),
       st.lists(VARIANTS, min_size=len(PATHS), max_size=len(PATHS)), policies)
def test_same_paths_fast_path_equals_the_merge(left: list, right: list, policy: Policy) -> None:
    def build(variants: list) -> Manifest:
        return Manifest(exists=True, algo="sha256",
                        entries=sorted((entry(p, d, (OLD + m) * 10**9) for p, (d, m) in zip(PATHS, variants, strict=True)),
                                       key=lambda e: e.path))

    local, remote = build(left), build(right)
    assert compare(local, remote, policy).sections == merged(local, remote, policy)


# Several of the fast path's 1024-entry blocks, with auxiliary runs split by top-level files.
MANY_PATHS = sorted(["records.parquet", "meta.md", ".events.log", "aaa/first.txt", "zzz/last.txt"]
                    + [f"_derived/d{i // 100:02d}/p{i:05d}" for i in range(2500)]
                    + [f"_snapshots/s{i:04d}.parquet" for i in range(700)]
                    + [f"m/aux{i:04d}" for i in range(300)])
# Indices near the block edges, where an off-by-one would hide a change, and anywhere else.
MANY_INDICES = st.sets(st.sampled_from([0, 1, 1022, 1023, 1024, 2047, 2048, 3071, 3072, len(MANY_PATHS) - 1])
                       | st.integers(0, len(MANY_PATHS) - 1), max_size=12)


@settings(max_examples=100, deadline=None)
@given(MANY_INDICES, MANY_INDICES, policies)
def test_the_fast_path_finds_every_change_across_its_blocks(changed: set, touched: set, policy: Policy) -> None:
    """Contents differ at `changed`, mtimes at `touched`."""
    local = Manifest(exists=True, algo="sha256", entries=[entry(p, b"a", OLD * 10**9) for p in MANY_PATHS])
    remote = Manifest(exists=True, algo="sha256", entries=[
        entry(p, b"b" if i in changed else b"a", (OLD + (i in touched)) * 10**9) for i, p in enumerate(MANY_PATHS)])
    assert compare(local, remote, policy).sections == merged(local, remote, policy)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, len(MANY_PATHS) - 1), max_size=40), st.sets(st.integers(0, len(MANY_PATHS) - 1),
       max_size=40), MANY_INDICES, st.lists(st.integers(0, len(MANY_PATHS)), max_size=6), policies,
       st.sampled_from([None, ([1, 2], [1, 2]), ([1, 2], [3, 2])]))
def test_the_merge_of_added_and_removed_files_buckets_every_path(
        local_gone: set, remote_gone: set, changed: set, added: list, policy: Policy, shapes: tuple | None) -> None:
    """Files removed on either side, new ones in between, contents changed: runs of equal entries of
    every length between them, so the merge's window grows, stops part-way and starts again."""
    local = Manifest(exists=True, algo="sha256", entries=[
        entry(p, b"a") for i, p in enumerate(MANY_PATHS) if i not in local_gone])
    new = {MANY_PATHS[min(i, len(MANY_PATHS) - 1)] + "-new" for i in added}
    remote = Manifest(exists=True, algo="sha256", entries=sorted(
        [entry(p, b"b" if i in changed else b"a") for i, p in enumerate(MANY_PATHS) if i not in remote_gone]
        + [entry(p, b"n") for p in new], key=operator.attrgetter("path")))
    assert compare(local, remote, policy, primary_shapes=shapes).sections == merged(local, remote, policy, shapes)
    assert compare(remote, local, policy, primary_shapes=shapes).sections == merged(remote, local, policy, shapes)


def test_same_paths_with_different_parquet_shapes_are_not_the_same() -> None:
    files = Manifest(exists=True, algo="sha256", entries=[entry("records.parquet", b"PAR1")])
    cmp = compare(files, files, Policy(verify="parquet"), primary_shapes=([1, 2], [3, 2]))
    assert cmp.sections["primary"].differing == ["records.parquet"]
    cmp = compare(files, files, Policy(verify="parquet"), primary_shapes=([1, 2], [1, 2]))
    assert (cmp.sections["primary"].same, cmp.sections["primary"].differing) == (1, [])


# --- validating a remote manifest: the per-directory fast path agrees with checking every path -----

SAFE_NAMES = ["_derived", "_snapshots", "notes", "ns", "a", "b", "x~tmp~y", "records.parquet"]
COMPONENTS = st.sampled_from(SAFE_NAMES * 6 + [".", "..", "", "~tmp~", ".rsync-partial", ".usrsync", ".usr.lock", "c\nd"])


def every_path_checked(entries: list[Entry]) -> bool:
    return all(unsafe_path_reason(e.path) is None and classify(e.path) == e.section for e in entries)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(COMPONENTS, min_size=1, max_size=4).map("/".join),
                          st.sampled_from(sorted(SECTIONS)), st.integers(0, 9)), max_size=12, unique_by=lambda t: t[0]))
def test_fast_validation_accepts_exactly_what_checking_every_path_accepts(items: list) -> None:
    # Mostly the section the path really has (manifests that pass), sometimes any other.
    entries = [Entry(path=p, section=s if lie == 0 else classify(p) or s, size=1, mtime_ns=0, kind="file", digest="")
               for p, s, lie in sorted(items)]
    try:
        validate_remote_entries(entries)
        accepted = True
    except ProtocolError:
        accepted = False
    assert accepted == every_path_checked(entries)


def test_a_lying_section_deep_in_a_checked_directory_is_caught() -> None:
    entries = [Entry(path=f"_derived/ns/part-{i:04d}", section="_derived", size=1, mtime_ns=0, kind="file", digest="")
               for i in range(1000)]
    validate_remote_entries(entries)
    entries[700] = msgspec.structs.replace(entries[700], section="primary")
    with pytest.raises(ProtocolError, match="in section 'primary'"):
        validate_remote_entries(entries)


# --- after promotion: the bisected split and the outside fast path agree with filtering every path --

SPLIT_NAMES = ["a", "b", "b0", "b.txt", "b-c", "b!", "ba", "_derived", "é"]
split_paths = st.sets(st.lists(st.sampled_from(SPLIT_NAMES), min_size=1, max_size=3).map("/".join), max_size=14)


@settings(max_examples=300, deadline=None)
@given(split_paths, st.lists(st.sampled_from(SPLIT_NAMES), max_size=2).map("/".join))
def test_outside_and_below_are_filtering_by_prefix(paths: set, directory: str) -> None:
    files = Manifest(exists=True, algo="sha256", entries=[entry(p, b"x") for p in sorted(paths)])
    prefix = directory + "/" if directory else ""
    assert list(files.below(prefix)) == [e for e in files.entries if e.path.startswith(prefix)]
    assert files.outside(prefix) == [e for e in files.entries if not e.path.startswith(prefix)]


def after_promotion_by_filtering(dest: Manifest, source: Manifest, plan: TransferPlan, policy: Policy) -> bool:
    kept = [f for f in sync_mod.files_of(dest.entries, policy) if plan.prefix and not f[0].startswith(plan.prefix)]
    promoted = [(e.path, e.size, e.digest) for e in plan.expected() if policy.in_scope(classify(e.path))]
    return sorted(kept + promoted) == list(sync_mod.files_of(source.entries, policy))


side_contents = st.dictionaries(st.sampled_from(["_derived/a/x", "_derived/a/y", "_derived/b", "_snapshots/s",
                                                 "records.parquet", "notes/n"]),
                                st.tuples(st.sampled_from([b"1", b"2", b"33"]), st.integers(0, 1)), max_size=6)


@settings(max_examples=300, deadline=None)
@given(side_contents, side_contents, st.sampled_from(["", "_derived", "_derived/a"]), side_contents,
       st.builds(Policy, skip_snapshots=st.booleans(), primary_only=st.booleans()))
def test_in_sync_after_promotion_is_the_filtered_comparison(dest: dict, source: dict, subtree: str, staged: dict,
                                                             policy: Policy) -> None:
    def manifest(files: dict) -> Manifest:
        return Manifest(exists=True, algo="sha256",
                        entries=[entry(p, d, (OLD + m) * 10**9) for p, (d, m) in sorted(files.items())])

    # The destination after the transfer: what was staged below the subtree (outside it, the
    # check reads the manifests, so what `after` holds there must not matter).
    after = [entry(p, d) for p, (d, _) in sorted(staged.items())]
    plan = TransferPlan(direction="pull", subtree=subtree, copy=[], delete=[], before=[], after=after, replaced=set(),
                        linked=0, reread=[], bytes=0, bootstrap=False)
    for dest_files in (dest, source):  # the second: outside the subtree nothing differs
        args = (manifest(dest_files), manifest(source), plan, policy)
        assert sync_mod.in_sync_after_promotion(*args) == after_promotion_by_filtering(*args)
    # What a good transfer leaves: the source everywhere, below the subtree as planned.
    done = msgspec.structs.replace(plan, after=[entry(p, d) for p, (d, _) in sorted(source.items())])
    assert sync_mod.in_sync_after_promotion(manifest(source), manifest(source), done, policy)
