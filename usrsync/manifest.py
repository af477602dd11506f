"""Typed manifests: what a dataset holds, path by path, with content digests."""

from __future__ import annotations

import bisect
import contextlib
import itertools
import operator
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import msgspec

from remote_agent import usrsync_agent as engine
from usrsync.dataset import SECTIONS, classify, unsafe_path_reason
from usrsync.errors import ProtocolError

KIND_FILE = engine.KIND_FILE
entry_path = operator.attrgetter("path")  # the sort key of every entry list
# Hashing progress: (files, bytes) hashed so far of (total_files, total_bytes) to hash.
HashProgress = Callable[[int, int, int, int], None]


Section = Literal["primary", "meta", ".events.log", "_snapshots", "_derived", "_auxiliary"]
Kind = Literal["file", "symlink", "special", "badname"]


class Entry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One file of a manifest. Millions of these are normal, so: no GC tracking (they hold only
    str/int), and Literal section/kind so decoding shares one string object instead of a copy each."""

    path: str
    section: Section
    size: int
    mtime_ns: int
    kind: Kind
    digest: str


class Manifest(msgspec.Struct):
    exists: bool
    algo: str
    entries: list[Entry]  # sorted by path, each path once (the engine sorts; a remote's are checked)
    digest: str | None = None  # the agent's digest of a remote manifest (see usrsync.manifest_copy)

    def get(self, path: str) -> Entry | None:
        return find(self.entries, path)

    def files(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == KIND_FILE]

    def outside(self, prefix: str) -> list[Entry]:
        """The entries not below a directory given as "dir/" ("" = none)."""
        lo, hi = prefix_bounds(self.entries, prefix, key=entry_path)
        return self.entries[:lo] + self.entries[hi:]

    def below(self, prefix: str) -> Iterator[Entry]:
        """The entries below a directory given as "dir/" ("" = all), in order, without a copy."""
        return entries_below(self.entries, prefix)


class ExpectedTree(msgspec.Struct):
    """A tree as the engine's verify_tree checks it (and the agent's verify call receives it):
    its files' paths, sorted, with their sizes and digests, as columns."""

    paths: list[str]
    sizes: list[int]
    digests: list[str]

    def columns(self) -> dict[str, list]:
        return msgspec.structs.asdict(self)


def entries_below(entries: list[Entry], prefix: str) -> Iterator[Entry]:
    """The path-sorted entries below a directory given as "dir/" ("" = all), in order, without a copy."""
    return itertools.islice(entries, *prefix_bounds(entries, prefix, key=entry_path))


def prefix_bounds(items: list, prefix: str, key: Callable | None = None) -> tuple[int, int]:
    """Where the paths below a directory "dir/" ("" = the whole dataset) are in a path-sorted list:
    they sit between "dir/" and "dir0" ('0' follows '/'), two bisections. `key`: an item's path."""
    if not prefix:
        return 0, len(items)
    lo = bisect.bisect_left(items, prefix, key=key)
    return lo, bisect.bisect_left(items, prefix[:-1] + "0", lo=lo, key=key)


class EntryPool:
    """A manifest's entries (sorted by path), handed out in place of equal entries decoded from
    elsewhere: a file that is the same on both sides is then one object, not two. Entries are
    immutable, so sharing them is safe; at a million files it saves ~300 MB, and comparing an
    entry with itself is the quickest comparison there is."""

    def __init__(self, entries: list[Entry]):
        self._entries = entries
        self._cursor = 0  # decoded entries come in path order: the next one is usually here

    def share(self, decoded: list[Entry]) -> list[Entry]:
        """`decoded`, each entry equal to one of the pool's replaced by that one. Any order is
        right; path order, the manifests' own, is fast (one C-level comparison per run of equal
        entries)."""
        mine = self._entries
        if not decoded or not mine:
            return decoded
        i = self._cursor
        if i >= len(mine) or mine[i].path != decoded[0].path:
            i = bisect.bisect_left(mine, decoded[0].path, key=entry_path)
        same = mine[i:i + len(decoded)]
        if same == decoded:
            self._cursor = i + len(decoded)
            return same
        shared = []
        for entry in decoded:
            while i < len(mine) and mine[i].path < entry.path:
                i += 1
            if i < len(mine) and mine[i] == entry:
                shared.append(mine[i])
                i += 1
            else:
                shared.append(entry)
        self._cursor = i
        return shared


def find(entries: list[Entry], path: str) -> Entry | None:
    """The entry of `path` among path-sorted entries, by bisection: no dict of them all, no pass over them."""
    i = bisect.bisect_left(entries, path, key=entry_path)
    return entries[i] if i < len(entries) and entries[i].path == path else None


# A file name that may make a path unsafe or change its section: the full checks run on those.
_UNPLAIN_NAME_RE = re.compile(r"^\.{0,2}$|[\x00\n\r]|" + "|".join(re.escape(n) for n in sorted(engine.RUNTIME_ANY_NAMES)))


def validate_remote_entries(entries: list[Entry]) -> None:
    """Reject a remote manifest that could steer us outside the dataset or lie about sections."""
    previous = None
    # Directories already checked through one of their files: below a safe directory, a plain name
    # is safe and in that directory's section. Millions of entries are normal; this is the fast path.
    checked_dirs: dict[str, str] = {}
    for entry in entries:
        parent, slash, name = entry.path.rpartition("/")
        if not slash or checked_dirs.get(parent) != entry.section or _UNPLAIN_NAME_RE.search(name):
            _check_path(entry)
            if slash and not _UNPLAIN_NAME_RE.search(name):
                checked_dirs[parent] = entry.section
        if entry.size < 0 or (previous is not None and entry.path <= previous):
            raise ProtocolError(
                "the remote agent sent an unsorted or invalid manifest",
                "rerun; if it persists, run `usr remotes doctor`",
            )
        previous = entry.path


def _check_path(entry: Entry) -> None:
    reason = unsafe_path_reason(entry.path)
    if reason is not None:
        raise ProtocolError(
            f"the remote agent sent an unsafe path {entry.path!r} ({reason})",
            "the remote is misbehaving or compromised; inspect it before syncing again",
        )
    if entry.section not in SECTIONS or classify(entry.path) != entry.section:
        raise ProtocolError(
            f"the remote agent put {entry.path!r} in section {entry.section!r}",
            "the remote agent is out of date or misbehaving; rerun to redeploy it",
        )


def local_manifest(
    root: Path,
    algo: str,
    *,
    jobs: int = 2,
    use_cache: bool = True,
    cache_dir: Path | None = None,
    hash_sections: set[str] | None = None,
    trusted: engine.TrustedDigests | None = None,
    progress: HashProgress | None = None,
    cancelled: threading.Event | None = None,
    cache: engine.HashCache | None = None,
    before: Manifest | None = None,
) -> Manifest:
    """`cache`: a hash cache to use and leave to the caller to save (see engine.HashCache).
    `before`: an earlier manifest of this root (a rescan's): each entry equal to one of its is
    that object, shared as each directory is scanned, so a rescan holds no second set of entries."""
    if not root.is_dir():
        return Manifest(exists=False, algo=algo, entries=[])
    totals = [0, 0]

    def start(files: int, nbytes: int) -> None:
        totals[:] = [files, nbytes]
        if progress is not None:
            progress(0, 0, files, nbytes)

    entries = engine.build_manifest(
        str(root), algo, jobs=jobs, cache_dir=str(cache_dir) if cache_dir else None,
        use_cache=use_cache, hash_sections=hash_sections, trusted=trusted,
        progress=(lambda files, nbytes: progress(files, nbytes, *totals)) if progress else None,
        progress_start=start if progress else None, cancelled=cancelled, cache=cache, entry_type=Entry,
        share=EntryPool(before.entries).share if before is not None else None,
    )
    return Manifest(exists=True, algo=algo, entries=entries)


def cached_algo(root: Path, cache_dir: Path | None = None) -> str | None:
    """The algorithm of the most recently written hash cache of this dataset dir, if any."""
    caches = []
    for algo in engine.hash_algos():
        for cache_format in engine.CACHE_FORMATS_READ:  # an older usrsync's file counts too: it is converted
            with contextlib.suppress(OSError):
                path = engine.HashCache.path_for(str(cache_dir or engine.default_cache_dir()), str(root), algo,
                                                 cache_format)
                caches.append((os.stat(path).st_mtime_ns, algo))
    return max(caches)[1] if caches else None
