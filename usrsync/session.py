"""One remote session: connect, start the agent, typed calls, close."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from remote_agent import usrsync_agent as engine
from usrsync import manifest_copy
from usrsync.compare import EventsLines
from usrsync.config import Remote
from usrsync.errors import ConfigError, LockedError, ProtocolError, RemoteError
from usrsync.manifest import Entry, EntryPool, ExpectedTree, HashProgress, Manifest, validate_remote_entries
from usrsync.protocol import AgentCallError, AgentClient, await_sentinel
from usrsync.transport import transport_for
from usrsync.transport.base import Transport

log = structlog.get_logger("usrsync")
CALL_TIMEOUT = 6 * 3600  # a manifest of a huge tree may take hours; a dead peer is caught by keepalives


def keepalive_interval(agent_timeout: float) -> float:
    """How often the agent reports that it is still working: well inside the idle timeout."""
    return max(0.05, min(30.0, agent_timeout / 4))


class Hello(msgspec.Struct):
    version: str
    python: str
    platform: str
    hostname: str
    user: str
    home: str
    hash_algos: list[str]
    rsync: str | None
    pid: int


class BaseInfo(msgspec.Struct):
    base_dir: str
    exists: bool
    writable: bool
    fs_type: str | None = None  # as /proc/self/mountinfo names it; None where unknown


class ManifestReply(msgspec.Struct):
    exists: bool
    count: int
    algo: str
    root: str
    digest: str | None = None  # of the entries as sent (see usrsync.manifest_copy)
    unchanged: bool = False  # the entries equal our copy with the digest we sent: none were sent
    chunks: list[tuple[str, int]] | None = None  # (digest, entries) per chunk; known ones not sent


class LinesReply(msgspec.Struct):
    count: int
    partial: bool


class LockReply(msgspec.Struct):
    path: str
    broken: dict[str, Any] | None = None


class StageReply(msgspec.Struct):
    staging: str
    linked: int


PackedStats = bytes  # a name of its own: VerifyReply's field `bytes` shadows the type in its annotations


class VerifyReply(msgspec.Struct):
    problems: list[tuple[str, str]]
    checked: int
    bytes: int
    stats: PackedStats  # each expected file's packed (inode, mtime_ns, ctime_ns): read through engine.VerifiedTree


class PromoteReply(msgspec.Struct):
    method: str


class RecoverReply(msgspec.Struct):
    repaired: list[str]


class ShapeReply(msgspec.Struct):
    shape: list[int] | None


class PyarrowReply(msgspec.Struct):
    pyarrow: bool


class DatasetListing(msgspec.Struct):
    dataset: str
    files: int
    bytes: int
    last_change_ns: int


class FileListReply(msgspec.Struct):
    path: str


class LsReply(msgspec.Struct):
    datasets: list[DatasetListing]


class RemoteSession:
    """The agent on the remote side, reached through a transport."""

    def __init__(self, remote: Remote, transport: Transport, client: AgentClient, hello: Hello, base: BaseInfo):
        self.remote = remote
        self.transport = transport
        self.client = client
        self.hello = hello
        self.base = base

    @classmethod
    async def open(cls, remote: Remote, *, require_base: bool = True) -> RemoteSession:
        transport = transport_for(remote)
        try:
            await transport.connect()
            nonce = secrets.token_hex(16)
            idle = remote.profile.agent_timeout
            try:
                reader, writer = await asyncio.wait_for(_start_agent(transport, nonce, remote.is_local), idle)
            except asyncio.TimeoutError:
                raise RemoteError(f"the remote agent did not start within {idle:g} s",
                                  "run `usr remotes doctor --remote NAME`; on a slow login node raise "
                                  "agent_timeout in the remote profile") from None
            client = AgentClient(reader, writer, timeout=CALL_TIMEOUT, idle_timeout=idle)
            test_env = {k[len("USRSYNC_REMOTE_"):]: v for k, v in os.environ.items()
                        if k.startswith("USRSYNC_REMOTE_PAUSE_")}
            hello, _ = await client.call("hello", {"rsync_path": remote.profile.rsync_path,
                                                   "keepalive": keepalive_interval(idle),
                                                   "test_env": {"USRSYNC_" + k: v for k, v in test_env.items()}},
                                         Hello)
            base, _ = await client.call("check_base", {"base_dir": remote.profile.base_dir}, BaseInfo)
        except BaseException:
            await transport.close()
            raise
        session = cls(remote, transport, client, hello, base)
        if require_base and not base.exists:
            await session.close()
            raise ConfigError(
                f"remote {remote.name!r}: base_dir {base.base_dir} does not exist on {remote.display_host}",
                f"create it there (mkdir -p {base.base_dir}) or fix base_dir with `usr remotes add {remote.name} "
                "... --replace`",
            )
        return session

    def _args(self, dataset: str, **extra: Any) -> dict[str, Any]:
        return {"base_dir": self.base.base_dir, "dataset": dataset, **extra}

    async def manifest(self, dataset: str, algo: str, *, jobs: int, use_cache: bool,
                       hash_sections: set[str] | None = None, progress: HashProgress | None = None,
                       local: Awaitable[Manifest] | None = None) -> Manifest:
        """The remote's manifest. `local`: this side's, awaited once remote entries arrive or are
        loaded from our copy: each remote entry equal to a local one is that one (see EntryPool).
        When the agent answers "unchanged" and our copy equals the local entries, they serve both."""
        copy = manifest_copy.copy_path(self.remote, self.base.base_dir, dataset, algo)
        head = manifest_copy.read_head(copy) if use_cache else None
        args = self._args(dataset, algo=algo, jobs=jobs, cache=use_cache,
                          hash_sections=sorted(hash_sections) if hash_sections is not None else None,
                          progress=progress is not None, known=head.digest if head else None,
                          known_chunks=[digest for digest, _ in head.chunks] if head else None)
        mine: list[Entry] | None = None

        async def local_entries() -> list[Entry]:
            """This side's entries, awaited once something from the remote needs them."""
            nonlocal mine
            if mine is None:
                mine = []
                if local is not None:
                    with contextlib.suppress(Exception):  # the run reports it where it awaits the scan
                        mine = (await local).entries
            return mine

        reply, received = await self.client.call("manifest", args, ManifestReply, Entry, on_progress=progress,
                                                 on_chunk=_shared_with(local_entries))
        entries = None
        if not reply.unchanged:  # the chunks our copy lacks were sent; the others come from it
            from_copy = head is not None and len(received) < reply.count
            saved = await asyncio.to_thread(manifest_copy.load, copy, head.digest, EntryPool(await local_entries())) \
                if head and from_copy else None
            entries = _assemble(reply, received, head if from_copy else None, saved)
            source = "sent+copy" if from_copy else "sent"
        elif head is not None and reply.digest == head.digest:  # nothing was sent: our copy is it
            entries, source = await _unchanged_entries(copy, head.digest, reply.count, await local_entries())
        if entries is None:
            # Our copy changed or broke since we read its head: have every entry sent.
            args["known"] = args["known_chunks"] = None
            reply, received = await self.client.call("manifest", args, ManifestReply, Entry, on_progress=progress,
                                                     on_chunk=_shared_with(local_entries))
            entries = _assemble(reply, received, None, None)
            source = "sent"
        log.debug("remote_manifest", entries=len(entries), source=source)
        manifest = _received(reply, entries, algo)
        if reply.digest is not None and not reply.unchanged:
            await asyncio.to_thread(manifest_copy.save, copy, reply.digest, reply.chunks or [], entries)
        return manifest

    async def changed_since(self, dataset: str, before: Manifest, *, jobs: int, use_cache: bool,
                            hash_sections: set[str] | None = None,
                            trusted: engine.TrustedDigests | None = None, save_cache: bool = True) -> Manifest | None:
        """The manifest now, or None when the agent's digest of it is still `before`'s: nothing
        changed, and no entries cross the wire or need decoding. `trusted`: as build_manifest's.
        `save_cache` false: the agent leaves its hash cache for a later call to save."""
        args = self._args(dataset, algo=before.algo, jobs=jobs, cache=use_cache,
                          hash_sections=sorted(hash_sections) if hash_sections is not None else None,
                          trusted=trusted.columns() if trusted else None, save_cache=save_cache, progress=False,
                          known=before.digest)
        async def entries_before() -> list[Entry]:
            return before.entries

        reply, received = await self.client.call("manifest", args, ManifestReply, Entry,
                                                 on_chunk=_shared_with(entries_before))
        if reply.unchanged and before.digest is not None and reply.digest == before.digest:
            return None
        return _received(reply, [] if reply.unchanged else _assemble(reply, received, None, None), before.algo)

    async def events_lines(self, dataset: str) -> EventsLines:
        reply, digests = await self.client.call("events_lines", self._args(dataset), LinesReply, str)
        return EventsLines(digests=digests, partial=reply.partial)

    async def lock(self, dataset: str, txid: str, *, timeout: float, wait: float) -> LockReply:
        args = self._args(dataset, txid=txid, timeout=timeout, wait=wait)
        if os.environ.get("USRSYNC_REMOTE_NO_FLOCK") == "1":
            args["no_flock"] = True  # tests: behave like a Lustre/NFS mount without flock
        try:
            reply, _ = await self.client.call("lock", args, LockReply)
        except AgentCallError as exc:
            if exc.agent_kind == "locked":
                raise LockedError(
                    f"dataset {dataset!r} on remote {self.remote.name!r} is {exc.agent_message}",
                    "wait for that sync to finish or pass --wait SECONDS; a dead holder's lock "
                    f"expires after lock_timeout ({timeout:g} s)",
                ) from None
            raise
        return reply

    async def unlock(self, txid: str) -> None:
        await self.client.call("unlock", {"txid": txid}, dict)

    async def recover(self, dataset: str) -> list[str]:
        reply, _ = await self.client.call("recover", self._args(dataset), RecoverReply)
        return reply.repaired

    async def stage(self, dataset: str, txid: str, link: list[str], subtree: str) -> StageReply:
        """A staging dir mirroring the dataset's directory `subtree` ("" = all of it), `link` linked in."""
        args = self._args(dataset, txid=txid, link=link, subtree=subtree)
        reply, _ = await self.client.call("stage", args, StageReply)
        return reply

    async def verify(self, dataset: str, txid: str, *, expected: ExpectedTree, reread: list[str], algo: str,
                     staging: bool, subtree: str, jobs: int, remember: bool = False) -> VerifyReply:
        """Check staging, or the live directory `subtree`, against `expected` (dataset-relative paths).
        `remember` (live only): the agent puts in its hash cache the digests of the files it reread
        and found right, and those its last manifest call of this dataset was told to trust."""
        args = self._args(dataset, txid=txid, expected=expected, reread=reread, algo=algo, staging=staging,
                          subtree=subtree, jobs=jobs, remember=remember)
        reply, _ = await self.client.call("verify", args, VerifyReply)
        if len(reply.stats) not in (0, len(expected.paths) * engine.TREE_STAT.size):
            raise ProtocolError(f"the remote agent sent stats of {len(reply.stats)} bytes for {len(expected.paths)} "
                                "verified files", "rerun; if it persists, run `usr remotes doctor`")
        return reply

    async def promote(self, dataset: str, txid: str, *, wait: float, subtree: str) -> str:
        """Swap staging in for the directory `subtree`; a USR writer holding the dataset's `.usr.lock`
        gets `wait` s to finish."""
        try:
            args = self._args(dataset, txid=txid, wait=wait, subtree=subtree)
            reply, _ = await self.client.call("promote", args, PromoteReply)
        except AgentCallError as exc:
            if exc.agent_kind == "locked":
                raise LockedError(f"remote {self.remote.name!r}: {exc.agent_message}",
                                  "wait for that USR writer to finish or pass --wait SECONDS") from None
            raise
        return reply.method

    async def write_file_list(self, dataset: str, txid: str, names: list[str]) -> str:
        """Put an rsync file list on the remote (see rsync.lists_on_remote); its remote path."""
        reply, _ = await self.client.call("write_file_list", self._args(dataset, txid=txid, names=names),
                                          FileListReply)
        return reply.path

    async def remove_file_list(self, dataset: str, txid: str) -> None:
        await self.client.call("remove_file_list", self._args(dataset, txid=txid), dict)

    async def cleanup(self, dataset: str, txid: str) -> None:
        await self.client.call("cleanup", self._args(dataset, txid=txid), dict)

    async def has_pyarrow(self) -> bool:
        reply, _ = await self.client.call("pyarrow", {}, PyarrowReply)
        return reply.pyarrow

    async def parquet_shape(self, dataset: str) -> list[int] | None:
        reply, _ = await self.client.call("parquet_shape", self._args(dataset), ShapeReply)
        return reply.shape

    async def ls(self) -> list[DatasetListing]:
        reply, _ = await self.client.call("ls", {"base_dir": self.base.base_dir}, LsReply)
        return reply.datasets

    def dataset_path(self, dataset: str) -> str:
        return "/".join([self.base.base_dir.rstrip("/"), dataset])

    async def close(self) -> None:
        await self.transport.close()


def _shared_with(entries: Callable[[], Awaitable[list[Entry]]]) -> Callable[[list[Entry]], Awaitable[list[Entry]]]:
    """A call's on_chunk: received entries equal to one of `entries()` become that one (see
    EntryPool). `entries` is awaited at the first chunk; the rest wait in the channel meanwhile."""
    pool: EntryPool | None = None

    async def share(decoded: list[Entry]) -> list[Entry]:
        nonlocal pool
        if pool is None:
            pool = EntryPool(await entries())
        return pool.share(decoded)
    return share


async def _unchanged_entries(copy: Path, digest: str, count: int,
                             mine: list[Entry]) -> tuple[list[Entry] | None, str]:
    """The entries of an "unchanged" remote manifest, which our copy holds, and where they came
    from: the local manifest's own ("local") when the copy equals it, else the copy decoded,
    sharing the local entries it holds too ("copy")."""
    if mine and len(mine) == count and await asyncio.to_thread(manifest_copy.matches, copy, digest, mine):
        return mine, "local"
    saved = await asyncio.to_thread(manifest_copy.load, copy, digest, EntryPool(mine))
    return (saved, "copy") if saved is not None and len(saved) == count else (None, "")


def _assemble(reply: ManifestReply, received: list[Entry], head: manifest_copy.Head | None,
              saved: list[Entry] | None) -> list[Entry] | None:
    """The manifest's entries: the chunks the agent sent, validated, and those it left out because
    our copy (`head`, `saved`) has them. None when the copy cannot supply one after all."""
    if reply.chunks is None:
        validate_remote_entries(received)
        return received
    known: dict[str, tuple[int, int]] = {}  # chunk digest -> (start, count) in `saved`
    start = 0
    for digest, count in head.chunks if head is not None else ():
        known.setdefault(digest, (start, count))
        start += count
    usable = saved is not None and start == len(saved)
    entries: list[Entry] = []
    taken = 0
    for digest, count in reply.chunks:
        if digest in known:  # left out: our copy must supply it
            start, have = known[digest]
            if saved is None or not usable or have != count:
                return None
            chunk = saved[start:start + count]
        else:
            chunk = received[taken:taken + count]
            taken += count
            if len(chunk) != count:
                raise RemoteError("the remote manifest is incomplete", "rerun the command")
            validate_remote_entries(chunk)
        if entries and chunk and chunk[0].path <= entries[-1].path:
            raise ProtocolError("the remote agent sent an unsorted or invalid manifest",
                                "rerun; if it persists, run `usr remotes doctor`")
        entries.extend(chunk)
    if taken != len(received):
        raise RemoteError("the remote manifest is incomplete", "rerun the command")
    return entries


def _received(reply: ManifestReply, entries: list[Entry], algo: str) -> Manifest:
    """The manifest the agent sent (already validated), refused unless it is complete."""
    if reply.count != len(entries) or reply.algo != algo:
        raise RemoteError("the remote manifest is incomplete", "rerun the command")
    return Manifest(exists=reply.exists, algo=algo, entries=entries, digest=reply.digest)


async def _start_agent(transport: Transport, nonce: str, local: bool) -> tuple[Any, Any]:
    reader, writer = await transport.start_agent(nonce)
    if local:  # the SSH transport waits for the sentinel itself (it may deploy and retry)
        await await_sentinel(reader, nonce)
    return reader, writer
