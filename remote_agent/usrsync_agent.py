#!/usr/bin/env python3
"""usrsync hashing agent: the manifest engine, hash cache, locks, staging, verify, promote.

One file, standard library only, Python >= 3.6 (login nodes run old system Pythons).
The orchestrator imports this same module for the local side, so both ends scan,
classify and hash identically. On the remote it runs as `... serve NONCE` and speaks
length-prefixed JSON frames on stdin/stdout after a sentinel line.
"""

import binascii
import bisect
import collections
import contextlib
import errno
import functools
import gc
import getpass
import hashlib
import json
import marshal
import mmap
import os
import platform
import re
import select
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from itertools import chain, islice, repeat, starmap
from operator import attrgetter, itemgetter, lt, methodcaller
from stat import S_ISLNK, S_ISREG

try:  # optional: XXH3-128 is ~10x faster than sha256, but login nodes rarely have it
    import xxhash
except ImportError:  # pragma: no cover - depends on the interpreter
    xxhash = None

AGENT_VERSION = "1"
SENTINEL = "USRSYNC-AGENT"
READ_CHUNK = 1 << 20
MAX_FRAME = 64 << 20  # compressed bytes on the wire
MAX_FRAME_RAW = 256 << 20  # after decompression
COMPRESS_OVER = 1 << 20  # a reply this large goes compressed (a verification's stats: 32 bytes a file)
CHUNK_ENTRIES = 5000
CHUNK_SPLIT = 1024  # a manifest chunk holds ~1000 entries on average: see manifest_chunks()
RACY_WINDOW_NS = 2 * 10**9  # git's racy-clean rule
BREAK_GUARD_STALE = 30  # seconds after which a lock breaker's guard file is itself stale
CACHE_FORMAT = 4  # 1: JSON; 2: {relpath: (key as four ints, digest)}; 3: {relpath: (relpath, packed key, digest)}
CACHE_FORMATS_READ = (4, 3, 2)  # newest first; 2 and 3 are converted when loaded (see HashCache)
FLAG_ZLIB = 1
EXIT_AGENT_MISSING = 96  # loader exit codes: the orchestrator uploads and retries
EXIT_AGENT_MISMATCH = 97

# --- dataset layout (DESIGN §3) ------------------------------------------------------

PRIMARY = "primary"
META = "meta"
EVENTS = ".events.log"
SNAPSHOTS = "_snapshots"
DERIVED = "_derived"
AUXILIARY = "_auxiliary"
SECTIONS = (PRIMARY, META, EVENTS, SNAPSHOTS, DERIVED, AUXILIARY)
TOP_LEVEL_SECTIONS = {"records.parquet": PRIMARY, "meta.md": META, ".events.log": EVENTS}
TOP_DIR_SECTIONS = {SNAPSHOTS: SNAPSHOTS, DERIVED: DERIVED}  # files below any other directory: AUXILIARY
RUNTIME_TOP_NAMES = {".usr.lock", ".events.lock", ".usr.transfer.lock"}
CARRIED_LOCKS = (".usr.lock", ".events.lock")  # kept in place by promotion, never synced
RUNTIME_TOP_PREFIXES = (".usr.lease.", ".usrsync")
# rsync's own temporary names: partial dirs and in-flight files (".name.XXXXXX")
RUNTIME_ANY_NAMES = {".usrsync-partial", ".rsync-partial", "~tmp~"}
_RUNTIME_ANY_RE = re.compile("|".join(re.escape(name) for name in sorted(RUNTIME_ANY_NAMES)))

KIND_FILE = "file"
KIND_SYMLINK = "symlink"
KIND_SPECIAL = "special"
KIND_BADNAME = "badname"

STATE_DIR = ".usrsync"  # under a datasets root/base_dir: locks, staging, journal


class AgentError(Exception):
    """An expected failure with a machine-readable kind, sent back as an error frame."""

    def __init__(self, kind, message, **detail):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message
        self.detail = detail


def classify(relpath):
    """Section of a dataset-relative POSIX path, or None for runtime files (never synced)."""
    top, slash, _ = relpath.partition("/")
    if top in RUNTIME_TOP_NAMES or top.startswith(RUNTIME_TOP_PREFIXES):
        return None
    # Called per file per manifest: one substring scan rules out the runtime names first.
    if _RUNTIME_ANY_RE.search(relpath) and not RUNTIME_ANY_NAMES.isdisjoint(relpath.split("/")):
        return None
    if not slash:
        return TOP_LEVEL_SECTIONS.get(top, AUXILIARY)
    return TOP_DIR_SECTIONS.get(top, AUXILIARY)


# Matches every path unsafe_path_reason() rejects (and a few it accepts): one C-level search
# clears the common case, the checks below run only on a match.
_MAYBE_UNSAFE_RE = re.compile(r"[\x00\n\r]|^/|(?:^|/)\.{0,2}(?:/|$)")


def unsafe_path_reason(relpath):
    """Why a relative path from the other side must not be used, or None when it is safe."""
    if isinstance(relpath, str) and not _MAYBE_UNSAFE_RE.search(relpath):
        return None
    if not isinstance(relpath, str) or not relpath:
        return "empty path"
    if "\x00" in relpath or "\n" in relpath or "\r" in relpath:
        return "control character in path"
    if relpath.startswith("/"):
        return "absolute path"
    parts = relpath.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "'.', '..' or empty component"
    return None


def check_dataset_id(dataset):
    """Dataset ids are relative paths below the base dir: no '..', no absolute path."""
    reason = unsafe_path_reason(dataset)
    if reason is None and dataset.split("/")[0].startswith(STATE_DIR):
        reason = "reserved name"
    if reason is not None:
        raise AgentError("unsafe_dataset", "unsafe dataset id %r: %s" % (dataset, reason))


def dataset_key(dataset):
    """A flat, filesystem-safe name for a dataset id (for lock, staging and cache files)."""
    return dataset.replace("%", "%25").replace("/", "%2F")


def dataset_dir(base_dir, dataset):
    check_dataset_id(dataset)
    return os.path.join(expand(base_dir), *dataset.split("/"))


def expand(path):
    return os.path.abspath(os.path.expanduser(path))


# --- hashing ---------------------------------------------------------------------------


def hash_algos():
    """Algorithms this interpreter offers, best first."""
    return (["xxh3_128"] if xxhash is not None else []) + ["sha256"]


def new_hasher(algo):
    if algo == "xxh3_128":
        if xxhash is None:
            raise AgentError("hash_unavailable", "xxhash is not installed here")
        return xxhash.xxh3_128()
    if algo == "sha256":
        return hashlib.sha256()
    raise AgentError("hash_unavailable", "unknown hash algorithm %r" % algo)


_buffers = threading.local()


def _buffer():
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        # Page-aligned (an anonymous mmap): a bytearray this size starts 16 bytes past a page
        # boundary, and the kernel copies file data into that ~3x slower (1.9 against 5.7 GB/s
        # from the page cache, measured on the 2-core test VM; any 64-byte-aligned start is fast).
        buf = _buffers.buf = mmap.mmap(-1, READ_CHUNK)
    return buf


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def open_nofollow(path):
    """Open for reading without following a symlink planted in place of the file."""
    return os.open(path, _READ_FLAGS)


def hash_file(path, algo):
    """(hex digest, bytes read) of one file, read in 1 MiB chunks.
    Straight into the buffer by os.readv, with no file object: for a 4 KiB file that is a
    quarter less CPU than a file object's readinto (0.41 against 0.55 s per 50k files here)."""
    hasher = new_hasher(algo)
    buf = _buffer()
    total = 0
    fd = open_nofollow(path)
    try:
        with memoryview(buf) as view:
            while True:
                n = os.readv(fd, (buf,))
                if not n:
                    break
                hasher.update(view[:n])
                total += n
    finally:
        os.close(fd)
    return hasher.hexdigest(), total


def line_digests(path):
    """Short digests of every complete line, and whether a partial last line follows.

    Used to decide whether one .events.log is a complete-line prefix of the other, and how
    many lines each side has past the common prefix when they diverge.
    """
    digests = []
    partial = False
    if not os.path.lexists(path):
        return digests, partial
    with os.fdopen(open_nofollow(path), "rb") as handle:
        for line in handle:
            if line.endswith(b"\n"):
                digests.append(hashlib.blake2b(line, digest_size=8).hexdigest())
            else:
                partial = True
    return digests, partial


# --- hash cache ------------------------------------------------------------------------


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "usrsync")


# A hash cache entry's key, packed: (size, mtime_ns, ctime_ns, inode) in 32 bytes. As a tuple of four
# ints it took ~190 bytes, and a million of them ~120 MB more on each end and 30% longer to load.
CACHE_KEY = struct.Struct("<QqqQ")
KEY_SIZE = CACHE_KEY.size
NO_KEY = bytes(KEY_SIZE)  # in place of a key where a digest may not be cached (no inode is 0)
DIGEST_SIZES = {"xxh3_128": 16, "sha256": 32}


def cache_key(st):
    """The hash cache key of a FileStat, or None when a value does not fit (an mtime past the
    year 2262): such a file is hashed on every scan, never cached."""
    try:
        return CACHE_KEY.pack(*st)
    except struct.error:
        return None


def _run_at(paths, cursor, relpaths):
    """Where a run of path-sorted files sits in the sorted `paths`, looked for at `cursor` first
    (the next run of a walk in path order starts there), else by bisection; None unless every one
    of them is there, in a row."""
    i = cursor
    if i >= len(paths) or paths[i] != relpaths[0]:
        i = bisect.bisect_left(paths, relpaths[0])
    return i if paths[i:i + len(relpaths)] == list(relpaths) else None


class _ByPath(object):
    """Columns in the order of their sorted `paths`, looked up by path: in path order, the way
    scans and verifications make their lookups, one comparison at a cursor; otherwise a bisection."""

    def __init__(self, paths):
        self.paths = paths
        self._cursor = 0

    def _index(self, rel):
        i = self._cursor
        if i >= len(self.paths) or self.paths[i] != rel:
            i = bisect.bisect_left(self.paths, rel)
            if i == len(self.paths) or self.paths[i] != rel:
                return None
        self._cursor = i + 1
        return i


class HashCache(_ByPath):
    """Digests of settled files by relpath and cache_key(), one file per dataset and algo.

    Three columns, sorted by path: `paths` (unique), `keys` (the packed keys, KEY_SIZE bytes each,
    in one bytes object) and `digests` (the raw digests, `width` bytes each, likewise). A million
    entries hold ~150 MB and load in ~0.2 s; as a dict of (path, key, hex digest) tuples (format 3)
    they held ~350 MB and loaded in ~0.9 s. Scans walk in path order (see _walk), so a lookup is
    one comparison at a cursor, a bisection only past a file added or removed since. A hit hands the scan the cache's own
    path string, so a scan does not hold a second copy of every path (~90 MB per million).

    Never keyed on st_dev (it changes across NFS/Lustre remounts). A corrupt or foreign cache file
    is ignored and rebuilt, never trusted. Stored with marshal (Python 3.4+ reads format 4). The
    files of formats 2 and 3 are converted when loaded, not rehashed, and left in place: each
    format has its own file name, so an older usrsync still running on the account (a cron job's
    venv) keeps its cache instead of both versions rehashing everything in turn.

    One object may serve several scans of a run: each scan runs between start_scan() and
    finish_scan(), and the object's owner saves it. A scan cut short never finishes, so what is
    saved is always a whole scan's result: the entries it met unchanged (get) and those it put.
    """

    def __init__(self, cache_dir, root, algo):
        self.root = root
        self.algo = algo
        self.width = DIGEST_SIZES[algo]
        self.path = self.path_for(cache_dir, root, algo)
        _ByPath.__init__(self, [])
        self.keys, self.digests = b"", b""
        self.dirty = False
        self.loaded_ok = False
        self._kept = None  # during a scan: a byte per entry, set when get() finds it unchanged
        self._added = ([], bytearray(), bytearray())  # put() since the last finish: path, key, digest columns
        for cache_format in CACHE_FORMATS_READ:
            columns = self._read(self.path_for(cache_dir, root, algo, cache_format), cache_format)
            if columns is not None:
                self.paths, self.keys, self.digests = columns
                self.loaded_ok = True
                self.dirty = cache_format != CACHE_FORMAT  # converted: written to the current format's file
                break

    @staticmethod
    def path_for(cache_dir, root, algo, cache_format=None):
        name = hashlib.sha256(("%s\x00%s" % (root, algo)).encode("utf-8", "surrogateescape")).hexdigest()[:32]
        cache_format = cache_format or CACHE_FORMAT
        suffix = ".marshal" if cache_format == 2 else ".v%d.marshal" % cache_format  # 2 came before versioned names
        return os.path.join(cache_dir, "hashes", name + suffix)

    def _read(self, path, cache_format):
        """The columns of the cache file at `path` if it holds this root's and algo's cache in that format."""
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            with gc_paused():
                doc = marshal.loads(data)
        except (OSError, EOFError, ValueError, TypeError):
            return None
        del data
        if not (type(doc) is dict and doc.get("format") == cache_format and doc.get("root") == self.root
                and doc.get("algo") == self.algo):
            return None
        if cache_format == CACHE_FORMAT:
            return self._checked(doc.get("paths"), doc.get("keys"), doc.get("digests"))
        entries = doc.get("entries")
        if type(entries) is not dict:
            return None
        with gc_paused():
            return self._converted(entries if cache_format == 3 else _packed_keys(entries))

    def _checked(self, paths, keys, digests):
        """Columns read from a file, or None unless they are well-formed: sorted unique str paths and
        a key and a digest of the right sizes for each (a lookup compares, slices and bisects them)."""
        if not (type(paths) is list and type(keys) is bytes and type(digests) is bytes
                and len(keys) == KEY_SIZE * len(paths) and len(digests) == self.width * len(paths)):
            return None
        if not all(type(path) is str for path in paths) or not all(map(lt, paths, islice(paths, 1, None))):
            return None
        return paths, keys, digests

    def _converted(self, entries):
        """Format 3's {relpath: (relpath, key, hex digest)} as columns; a malformed entry is left
        out (rehashed), as format 3's lookup would never have used it."""
        rows = []
        for rel, value in entries.items():
            if not (type(value) is tuple and len(value) == 3 and type(rel) is str and value[0] == rel
                    and type(value[1]) is bytes and len(value[1]) == KEY_SIZE):
                continue
            digest = self._raw(value[2])
            if digest is not None:
                rows.append((rel, value[1], digest))
        rows.sort(key=_first)
        return [row[0] for row in rows], b"".join(row[1] for row in rows), b"".join(row[2] for row in rows)

    def _raw(self, digest):
        """A hex digest of this algo as bytes, or None."""
        try:
            raw = bytes.fromhex(digest)
        except (TypeError, ValueError):
            return None
        return raw if len(raw) == self.width else None

    def start_scan(self):
        self._kept = bytearray(len(self.paths))
        self._added = ([], bytearray(), bytearray())
        self._cursor = 0

    def finish_scan(self):
        """What the scan met unchanged and what it put become the entries; the rest goes."""
        kept, self._kept = self._kept, None
        self._apply(_zero_positions(kept))

    def get(self, relpath, key):
        """(the cache's path string, hex digest) when relpath's whole key (a cache_key()) matches;
        the entry is then kept. Called once per file on every scan, in path order: first one
        comparison at the cursor, a bisection only when that misses."""
        paths = self.paths
        i = self._cursor
        if i >= len(paths) or paths[i] != relpath:
            i = bisect.bisect_left(paths, relpath)
            if i >= len(paths) or paths[i] != relpath:
                self._cursor = i
                return None
        self._cursor = i + 1
        if self.keys[i * KEY_SIZE:(i + 1) * KEY_SIZE] != key:
            return None
        self._kept[i] = 1
        width = self.width
        return paths[i], self.digests[i * width:(i + 1) * width].hex()

    def keep(self, relpath):
        """Keep relpath's entry though get() just found its key changed: a digest known otherwise
        stands in for it this scan (see build_manifest's `trusted`). Never served: a key must match."""
        i = self._index(relpath)
        if i is not None:
            self._kept[i] = 1

    def get_run(self, relpaths, keys):
        """get() of a run of path-sorted files at once, their keys joined: (the cache's path
        strings, hex digests) when every one matches, else None and nothing is marked kept."""
        count = len(relpaths)
        i = _run_at(self.paths, self._cursor, relpaths)
        if i is None or self.keys[i * KEY_SIZE:(i + count) * KEY_SIZE] != keys:
            return None
        self._kept[i:i + count] = b"\x01" * count
        self._cursor = i + count
        width = 2 * self.width
        digests = self.digests[i * self.width:(i + count) * self.width].hex()
        return self.paths[i:i + count], [digests[j:j + width] for j in range(0, count * width, width)]

    def keep_run(self, relpaths):
        """keep() of a run of path-sorted files at once (a directory's trusted files)."""
        i = _run_at(self.paths, self._cursor, relpaths)
        if i is None:  # not all of them are cached: each one that is
            for rel in relpaths:
                self.keep(rel)
            return
        self._kept[i:i + len(relpaths)] = b"\x01" * len(relpaths)
        self._cursor = i + len(relpaths)

    def put(self, relpath, key, digest):
        """Cache `digest` under `key` once the scan finishes (or add() applies it)."""
        raw = self._raw(digest)
        if raw is not None:
            paths, keys, digests = self._added
            paths.append(relpath)
            keys += key
            digests += raw

    def update(self, relpath, key, digest):
        """put() outside a scan, at once where it can be: a path the columns hold gets the new key
        and digest in place (a transfer remembers nearly every file it verified again, and a
        million of them queued first held ~60 MB more); a new path waits for add()."""
        i = self._index(relpath)
        raw = self._raw(digest)
        if i is None or raw is None:
            self.put(relpath, key, digest)
            return
        self._replace(i, relpath, key, raw)
        self.dirty = True

    def _replace(self, i, relpath, key, raw):
        """Entry i takes a new key and raw digest in place (the columns are made mutable once: loaded
        ones are bytes), and the putter's path string, which its manifest entry holds: one copy of
        each path."""
        if type(self.keys) is not bytearray:
            self.keys, self.digests = bytearray(self.keys), bytearray(self.digests)
        self.paths[i] = relpath
        self.keys[i * KEY_SIZE:(i + 1) * KEY_SIZE] = key
        self.digests[i * self.width:(i + 1) * self.width] = raw

    def add(self, items):
        """Put (relpath, key, hex digest) items outside a scan, every other entry kept."""
        for rel, key, digest in items:
            self.put(rel, key, digest)
        self._apply(())

    def _apply(self, removed):
        """The columns without the entries at the sorted positions `removed`, with what was put
        since the last apply merged in (the last put of a path wins, over an old entry too)."""
        added_paths, added_keys, added_digests = self._added
        self._added = ([], bytearray(), bytearray())
        if not removed and not added_paths:
            return
        self.dirty = True
        paths, keys, digests = self.paths, self.keys, self.digests
        if not paths and all(map(lt, added_paths, islice(added_paths, 1, None))):
            # A first scan, its puts unique and in the walk's path order (no big file hashed on a
            # thread finished out of turn): they are the columns, as they are (~100 MB less to
            # hold at a million files than sorting them).
            self.paths, self.keys, self.digests = added_paths, added_keys, added_digests
            return
        width = self.width
        # The puts by path, the last of each path kept (sorted() is stable). Usually they come in
        # path order already, each path once: no permutation of them to build.
        if all(map(lt, added_paths, islice(added_paths, 1, None))):
            adds = range(len(added_paths))
        else:
            order = sorted(range(len(added_paths)), key=added_paths.__getitem__)
            adds = [j for n, j in enumerate(order)
                    if n + 1 == len(order) or added_paths[order[n + 1]] != added_paths[j]]
        if not paths:  # a first scan whose puts came out of order
            self.paths = [added_paths[j] for j in adds]
            self.keys = b"".join(added_keys[j * KEY_SIZE:(j + 1) * KEY_SIZE] for j in adds)
            self.digests = b"".join(added_digests[j * width:(j + 1) * width] for j in adds)
            return
        # A put for a path the columns hold replaces its key and digest in place (a file a scan
        # hashed again); only new paths make new columns.
        fresh = []
        replaced = []
        i = 0
        for j in adds:
            path = added_paths[j]
            if i >= len(paths) or paths[i] != path:
                i = bisect.bisect_left(paths, path, i)  # the puts are in path order: from the cursor on
            if i < len(paths) and paths[i] == path:
                self._replace(i, path, added_keys[j * KEY_SIZE:(j + 1) * KEY_SIZE],
                              added_digests[j * width:(j + 1) * width])
                if removed:
                    replaced.append(i)
                i += 1
            else:
                fresh.append(j)
        keys, digests = self.keys, self.digests
        if removed and replaced:  # a scan's changed file: not met unchanged, but put again
            replaced = set(replaced)
            removed = [i for i in removed if i not in replaced]
        if not removed and not fresh:
            return
        # Cut points in the old columns: an entry removed is left out, and new paths go in before
        # the old entry at their bisection point, in path order (their rank).
        adds = fresh
        events = [(i, 1, 0) for i in removed]
        events += [(bisect.bisect_left(paths, added_paths[j]), 0, rank) for rank, j in enumerate(adds)]
        events.sort()
        new_paths, new_keys, new_digests = [], [], []
        start = 0
        for i, is_removal, rank in events:
            if start < i:
                new_paths += paths[start:i]
                new_keys.append(keys[start * KEY_SIZE:i * KEY_SIZE])
                new_digests.append(digests[start * width:i * width])
                start = i
            if is_removal:
                start = max(start, i + 1)
            else:
                j = adds[rank]
                new_paths.append(added_paths[j])
                new_keys.append(added_keys[j * KEY_SIZE:(j + 1) * KEY_SIZE])
                new_digests.append(added_digests[j * width:(j + 1) * width])
        new_paths += paths[start:]
        new_keys.append(keys[start * KEY_SIZE:])
        new_digests.append(digests[start * width:])
        self.paths, self.keys, self.digests = new_paths, b"".join(new_keys), b"".join(new_digests)

    def save(self):
        if not self.dirty:
            return  # every entry came back unchanged: the file is current
        doc = {"format": CACHE_FORMAT, "root": self.root, "algo": self.algo,
               "paths": self.paths, "keys": self.keys, "digests": self.digests}
        try:
            atomic_write(self.path, marshal.dumps(doc, 4), mode=0o600)
            self.dirty = False
        except (OSError, ValueError):
            pass  # a cache is an optimisation: a read-only home must not fail the sync


def _zero_positions(flags):
    """The positions of the zero bytes of `flags`, found at C speed (a no-op scan has none)."""
    positions = []
    i = flags.find(0)
    while i >= 0:
        positions.append(i)
        i = flags.find(0, i + 1)
    return positions


def _packed_keys(entries):
    """Format 2's entries {relpath: ((size, mtime_ns, ctime_ns, inode), digest)} as format 3's;
    a malformed entry is left out (rehashed), as its lookup would never have used it."""
    packed = {}
    for rel, value in entries.items():
        try:
            key, digest = value
            packed[rel] = (rel, CACHE_KEY.pack(*key), digest)
        except (TypeError, ValueError, struct.error):
            continue
    return packed


def atomic_write(path, data, mode=0o644):
    directory = os.path.dirname(path)
    makedirs(directory)
    tmp = "%s.tmp.%d.%d" % (path, os.getpid(), threading.get_ident())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def makedirs(path, mode=0o755):
    try:
        os.makedirs(path, mode)
    except OSError as exc:
        if exc.errno != errno.EEXIST or not os.path.isdir(path):
            raise


# --- scanning and manifests ----------------------------------------------------------


_gc_pause_lock = threading.Lock()
_gc_pause = {"holders": 0, "was_enabled": False}


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while a scan builds a few acyclic objects per file.

    At 100k files its collections, which walk every tracked object again and again as the lists
    grow, took 35-40% of a scan (median 0.67 s with them, 0.44 s without). Scans may overlap in
    threads: the collector comes back when the last one ends, if it was on before the first.
    """
    with _gc_pause_lock:
        if _gc_pause["holders"] == 0:
            _gc_pause["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_pause["holders"] += 1
    try:
        yield
    finally:
        with _gc_pause_lock:
            _gc_pause["holders"] -= 1
            if _gc_pause["holders"] == 0 and _gc_pause["was_enabled"]:
                gc.enable()


_isascii = getattr(str, "isascii", None)  # Python >= 3.7
_first = itemgetter(0)
_entry_size = itemgetter(2)  # of a manifest entry as a list
_path_attribute = attrgetter("path")
# What a scan keeps of an lstat (the hash cache keys on it, packed: cache_key). An os.stat_result
# takes ~600 bytes, this ~170: a scan holds one per file of the directory at hand.
_FileStat = collections.namedtuple("FileStat", "st_size st_mtime_ns st_ctime_ns st_ino")
_new_tuple = tuple.__new__  # half the cost of calling _FileStat(...)
_as_file_stat = functools.partial(_new_tuple, _FileStat)
_stat_fields = attrgetter(*_FileStat._fields)
_stat_mode = attrgetter("st_mode")
_stat_size = attrgetter("st_size")
_stat_mtime = attrgetter("st_mtime_ns")
_stat_ino = attrgetter("st_ino")
_tree_stat = itemgetter(3, 1, 2)  # a FileStat as verify_tree() packs it: (inode, mtime_ns, ctime_ns)
_entry_name = attrgetter("name")
_entry_is_dir = methodcaller("is_dir", follow_symlinks=False)  # from d_type: no stat
_entry_lstat = methodcaller("stat", follow_symlinks=False)

# Python >= 3.7 scans a directory by fd, and DirEntry.stat() is then an fstatat() relative to
# it: ~30% less CPU per file than resolving every full path again (measured, 100k files).
_SCANDIR_FD = os.scandir in os.supports_fd
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_SUBDIR_FLAGS = _DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0)  # below the root: never through a symlink

# Filesystems where a stat is a round trip to a server (type names as /proc/self/mountinfo gives
# them; FUSE ones are "fuse.<name>", also a round trip, to a daemon). A scan there waits on
# latency, not on the CPU (Lustre: ~2,500 stats/s per client, one at a time), so it stats each
# directory's files on several threads. On a local disk threads only cost: 100k files took
# 0.43-0.50 s on one thread and 0.64-0.69 s on two (the kernel work does not spread).
NETWORK_FS_TYPES = frozenset(("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph",
                              "glusterfs", "panfs", "wekafs", "orangefs", "pvfs2", "afs", "9p"))
STAT_THREADS_PER_JOB = 4  # they wait on the server: more of them than --jobs' CPU bound
MAX_STAT_THREADS = 32
# A directory of one file is stated on the scanning thread; from two on, a stat's round trip
# (~0.4 ms) outweighs handing it to a thread (~0.02 ms).
PARALLEL_STAT_MIN = 2
_MOUNT_ESCAPE = re.compile(r"\\([0-7]{3})")


def mount_fs_type(path, mountinfo):
    """The type of the filesystem that the absolute, resolved `path` is on, read from the text of
    /proc/self/mountinfo: that of the longest mount point above it, the last one mounted there
    when several are. None when no line applies."""
    found, found_len = None, -1
    for line in mountinfo.splitlines():
        mount, separator, rest = line.partition(" - ")
        fields, rest = mount.split(), rest.split()
        if not separator or len(fields) < 5 or not rest:
            continue
        point = _MOUNT_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= found_len:
            found, found_len = rest[0], len(point)
    return found


def is_network_fs(fs_type):
    """Whether a filesystem of `fs_type` (None: unknown) answers a stat with a round trip."""
    return fs_type is not None and (fs_type in NETWORK_FS_TYPES or fs_type.startswith("fuse."))


def threads_for_fs(fs_type, jobs):
    """How many threads a scan or a verification on a filesystem of `fs_type` (None: unknown) stats
    and hashes files on: one on a local filesystem, STAT_THREADS_PER_JOB per job on a network one."""
    if not is_network_fs(fs_type):
        return 1
    return min(MAX_STAT_THREADS, STAT_THREADS_PER_JOB * max(1, jobs))


def filesystem_type(path):
    """The type of the filesystem `path` is on; None where that is unknown (no /proc: not Linux)."""
    try:
        with open("/proc/self/mountinfo", errors="surrogateescape") as handle:
            return mount_fs_type(os.path.realpath(path), handle.read())
    except OSError:
        return None


def stat_threads(root, jobs):
    """threads_for_fs() of the filesystem `root` is on."""
    return threads_for_fs(filesystem_type(root), jobs)


POOL_BATCH = 256  # jobs handed to the threads at a time


def run_jobs(work, jobs, workers):
    """work(job) for each of `jobs` (a sequence): in turn, or on `workers` threads when more than
    one, a batch at a time, so that a million small files never become a million futures at once.
    What a job raises is raised."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            work(job)
        return
    from concurrent.futures import ThreadPoolExecutor  # ~15 ms at every start: only where it pays

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(jobs), POOL_BATCH):
            for _ in pool.map(work, jobs[start:start + POOL_BATCH]):
                pass


def _lstat_list(entries):
    return list(map(_entry_lstat, entries))


def _parallel_lstat(pool, threads):
    """_lstat_list, its directory cut in slices that `pool`'s threads stat at the same time (a few
    slices per thread, so that slow ones even out). An OSError of any slice is raised."""
    def lstat_all(entries):
        if len(entries) < PARALLEL_STAT_MIN:
            return _lstat_list(entries)
        step = -(-len(entries) // (4 * threads))
        return list(chain.from_iterable(pool.map(_lstat_list, [entries[i:i + step]
                                                                for i in range(0, len(entries), step)])))
    return lstat_all


def _is_runtime(name, top):
    return name in RUNTIME_ANY_NAMES or top and (name in RUNTIME_TOP_NAMES or name.startswith(RUNTIME_TOP_PREFIXES))


def _walk(directory, prefix, section, lstat_all):
    """Yield lists of (relpath, section, kind, FileStat) of the non-directories below `directory`
    (the dataset root plus `prefix`; an fd where _SCANDIR_FD), runtime files left out, in path
    order: a directory sorts as its name plus "/", which every path below it starts with, so its
    files come in runs between its subdirectories. Path order is the hash cache's (a lookup is one
    comparison at a cursor) and the manifest's (the final sort only checks it). A consumer that
    builds its own per-file objects as the runs come never holds a second whole-tree list (~250
    bytes per file at a million files). The rules of classify(), applied once per directory: the
    top-level name fixes the section."""
    with os.scandir(directory) as listing:
        entries = list(listing)
    if not prefix or not RUNTIME_ANY_NAMES.isdisjoint(map(_entry_name, entries)):
        entries = [entry for entry in entries if not _is_runtime(entry.name, not prefix)]
    is_dir = list(map(_entry_is_dir, entries))
    subdirs = []
    if True in is_dir:
        subdirs = sorted((entry.name + "/", entry) for entry, flag in zip(entries, is_dir) if flag)
        entries = [entry for entry, flag in zip(entries, is_dir) if not flag]
    del is_dir
    entries.sort(key=_entry_name)
    # Runs of files between the subdirectories, cut by name (a file's name never equals "name/").
    names = list(map(_entry_name, entries))
    parts = []
    start = 0
    for sort_key, entry in subdirs:
        stop = bisect.bisect_left(names, sort_key, start)
        if stop > start:
            parts.append(entries[start:stop])
        parts.append(entry)
        start = stop
    if start < len(entries):
        parts.append(entries[start:] if start else entries)
    entries = names = subdirs = None
    parts.reverse()
    while parts:
        part = parts.pop()  # let go of here: a run's rows, once handed over, are the consumer's
        if type(part) is list:
            files = _file_rows(part, prefix, section, lstat_all)
            if files:
                yield files
            continue
        name = part.name
        sub = (prefix + name + "/", section or TOP_DIR_SECTIONS.get(name, AUXILIARY), lstat_all)
        if not _SCANDIR_FD:
            try:
                yield from _walk(part.path, *sub)
            except FileNotFoundError:  # gone since the listing: the rescans catch it
                pass
            continue
        try:
            fd = os.open(name, _SUBDIR_FLAGS, dir_fd=directory)
        except OSError as exc:  # gone or replaced since the listing: the rescans catch it
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                continue
            raise _naming(exc, prefix + name)
        try:
            yield from _walk(fd, *sub)
        finally:
            os.close(fd)


def _file_rows(entries, prefix, section, lstat_all):
    """(relpath, section, kind, FileStat) of a directory's non-directories, sorted by name.

    Plain names (ASCII, no line breaks; nearly every dataset's) are handled one C-level pass per
    column (stat, relpath, kind, FileStat) instead of a loop body per file; other names, and a
    directory where a stat fails, take the general path below."""
    names = list(map(_entry_name, entries))
    joined = prefix + "".join(names)
    if _isascii is not None and _isascii(joined) and "\n" not in joined and "\r" not in joined:
        try:
            stats = lstat_all(entries)
        except OSError:
            stats = None  # gone since the listing, or unreadable: sorted out one by one below
        if stats is not None:
            modes = list(map(_stat_mode, stats))
            kinds = repeat(KIND_FILE) if all(map(S_ISREG, modes)) else \
                [KIND_FILE if S_ISREG(mode) else KIND_SYMLINK if S_ISLNK(mode) else KIND_SPECIAL for mode in modes]
            sections = repeat(section) if section else [TOP_LEVEL_SECTIONS.get(name, AUXILIARY) for name in names]
            return list(zip(map(prefix.__add__, names), sections, kinds, map(_as_file_stat, map(_stat_fields, stats))))
    rows = []
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # gone since the listing: the rescans catch it
            continue
        except OSError as exc:
            raise _naming(exc, prefix + entry.name)
        name = entry.name
        rel = prefix + name
        kind = _kind(rel, st.st_mode)
        # Relpaths are UTF-8 text whatever the locale (Python 3.6 under LANG=C decodes names as
        # ASCII); a name that is not UTF-8 is shown with backslash escapes.
        rel = os.fsencode(rel).decode("utf-8", "backslashreplace")
        if "\n" in rel or "\r" in rel:  # no manifest may carry it: reported (escaped), never transferred
            kind = KIND_BADNAME
            rel = rel.replace("\r", "\\r").replace("\n", "\\n")
        rows.append((rel, section or TOP_LEVEL_SECTIONS.get(name, AUXILIARY), kind,
                     _new_tuple(_FileStat, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))))
    return rows


def _naming(exc, rel):
    """`exc` again, naming the dataset-relative path (an unreadable directory, say): relative to a
    directory descriptor the error knows only the entry's own name."""
    return type(exc)(exc.errno, exc.strerror, rel)


def _kind(rel, mode):
    try:
        os.fsencode(rel).decode("utf-8")
    except UnicodeDecodeError:
        return KIND_BADNAME
    if S_ISREG(mode):
        return KIND_FILE
    if S_ISLNK(mode):
        return KIND_SYMLINK
    return KIND_SPECIAL


def fs_path(root, rel):
    """The OS path of a UTF-8 relpath from a manifest, in this interpreter's filesystem encoding."""
    if _isascii is not None and _isascii(rel) and not rel.startswith("/"):
        return root + "/" + rel  # ASCII is the same in every filesystem encoding
    return os.path.join(root, os.fsdecode(rel.encode("utf-8")))


def walk_batches(root, threads=1):
    """(relpath, section, kind, FileStat) of every non-directory of a dataset dir, runtime files
    left out, in path order, in lists of one directory's files each (see _walk). Nothing when
    `root` is missing. `threads` (see stat_threads): how many stat a directory's files."""
    try:
        top = os.open(root, _DIR_FLAGS) if _SCANDIR_FD else root
    except FileNotFoundError:
        return
    pool = None
    try:
        lstat_all = _lstat_list
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor  # ~15 ms: only where it pays

            pool = ThreadPoolExecutor(max_workers=threads)
            lstat_all = _parallel_lstat(pool, threads)
        yield from _walk(top, "", None, lstat_all)
    except FileNotFoundError:  # the dataset dir itself went away while we scanned it
        return
    finally:
        if pool is not None:
            pool.shutdown()
        if _SCANDIR_FD:
            os.close(top)


def _time_ns():
    return time.time_ns() if hasattr(time, "time_ns") else int(time.time() * 1e9)  # Python < 3.7


class Cancelled(Exception):
    """build_manifest's `cancelled` event was set: the caller no longer wants the result."""


def _known_run(cache, trusted, batch, racy_from, hash_sections, entry_type=None):
    """The manifest entries of a run of files from the walk when every one of them is known: the
    cache holds them all unchanged, or else `trusted` (a TrustedDigests) vouches for them all; None
    otherwise. A no-op scan's common case (and a rescan's after staging linked a directory), at C
    speed per column instead of a lookup per file. The rules are build_manifest's: files of hashed
    sections, not racy, not .events.log (always rehashed)."""
    paths, sections, kinds, stats = zip(*batch)
    if kinds.count(KIND_FILE) != len(kinds) or EVENTS in sections \
            or hash_sections is not None and not hash_sections.issuperset(sections):
        return None
    mtimes = list(map(_stat_mtime, stats))
    if max(mtimes) >= racy_from:
        return None
    sizes = list(map(_stat_size, stats))
    digests = None
    try:
        if cache is not None:
            found = cache.get_run(paths, b"".join(starmap(CACHE_KEY.pack, stats)))
            if found is not None:
                paths, digests = found
        if digests is None and trusted:
            digests = trusted.get_run(paths, b"".join(map(TRUSTED_KEY.pack, map(_stat_ino, stats), sizes, mtimes)))
            if digests is not None and cache is not None:
                cache.keep_run(paths)  # their entries stay, to be replaced in place when remembered
    except struct.error:  # a key out of the packed range: the files take the slow path
        return None
    if digests is None:
        return None
    fields = zip(paths, sections, sizes, mtimes, kinds, digests)
    return list(map(list, fields) if entry_type is None else starmap(entry_type, fields))


def build_manifest(root, algo, jobs=2, cache_dir=None, use_cache=True, hash_sections=None,
                   trusted=None, progress=None, progress_start=None, cancelled=None, cache=None,
                   entry_type=None, share=None):
    """Manifest entries [path, section, size, mtime_ns, kind, digest], sorted by path.

    `hash_sections`: sections whose files are hashed (default all); others get digest "".
    `trusted`: a TrustedDigests, known-good digests of files this run just verified or
    hard-linked, reused when the inode, size and mtime still match. They are not put in
    the cache: staging's links moved those inodes' ctimes, and removing staging moves them again,
    so such a key would be stale by the time anyone saved it (the digests are remembered after
    promotion, under the keys the check of the promoted tree saw). The cache keeps their entries
    until then, so that remembering replaces them in place.
    `progress_start(files, bytes)` is called once with what is about to be hashed (only when
    something is), `progress(files, bytes)` after each hashed file.
    `cancelled`: a threading.Event; once set, Cancelled is raised before the next file is hashed.
    `cache`: a HashCache of this root and algo to use, and leave for the caller to save; without
    it, the cache is loaded from `cache_dir` and saved here.
    `entry_type`: a class built from those six fields, in that order, with the path as its
    attribute `path`; the entries are of it instead of lists. A warm scan then builds no list of
    the whole tree at all (at a million files, ~130 MB of lists the caller would convert).
    `share` (with `entry_type`): called with each directory's run of entries as soon as they are
    complete, in path order; the entries are what it returns (a rescan hands back the equal ones
    of the manifest it checks, so that it holds no second set of entries).
    """
    scan_start = _time_ns()
    threads = stat_threads(root, jobs)
    owned = use_cache and cache is None
    if owned:
        cache = HashCache(cache_dir or default_cache_dir(), root, algo)
    elif not use_cache:
        cache = None
    if cache is not None:
        cache.start_scan()
    racy_from = scan_start - RACY_WINDOW_NS
    entries = []
    # The entries to hash, and side by side the cache key of each (KEY_SIZE bytes, all zero where
    # none may be cached) packed in one bytearray: a (entry, key) tuple and a bytes key per file
    # held ~100 MB more at a million files, during a first scan's peak.
    to_hash = []
    hash_keys = bytearray()
    as_lists = []  # with entry_type: (start, stop) of each run of entries built as lists, converted at the end
    with gc_paused():
        for batch in walk_batches(root, threads):
            known = _known_run(cache, trusted, batch, racy_from, hash_sections, entry_type) \
                if cache is not None or trusted else None
            if known is not None:
                entries += share(known) if share is not None else known
                continue
            run_start, queued = len(entries), len(to_hash)
            for rel, section, kind, st in batch:
                entry = [rel, section, st.st_size, st.st_mtime_ns, kind, ""]
                entries.append(entry)
                if kind != KIND_FILE or (hash_sections is not None and section not in hash_sections):
                    continue
                if section == EVENTS:
                    to_hash.append(entry)  # always rehashed: it grows in place; never cached
                    hash_keys += NO_KEY
                    continue
                # Racy files (git's rule) are always rehashed: neither cached nor trusted digests apply.
                racy = st.st_mtime_ns >= racy_from
                # The key a digest is cached under; None when none may be (racy, no cache, or no fit).
                key = cache_key(st) if cache is not None and not racy else None
                cached = cache.get(rel, key) if key is not None else None
                digest = None
                if cached is not None:
                    entry[0], digest = cached  # the cache's path string: the scan's goes with the batch
                elif trusted and not racy:
                    vouched = trusted.get(rel)
                    if vouched is not None and vouched[:3] == (st.st_ino, st.st_size, st.st_mtime_ns):
                        digest = vouched[3]
                        if key is not None:
                            cache.keep(rel)  # its entry stays, to be replaced in place when it is remembered
                if digest is not None:
                    entry[5] = digest
                else:
                    to_hash.append(entry)  # with its key, not its FileStat: ~190 bytes less per file
                    hash_keys += key if key is not None else NO_KEY
            del batch  # this directory's FileStats can go: entries and keys hold what is needed
            if entry_type is not None:
                if len(to_hash) == queued:  # complete already: typed now, not held as lists to the end
                    run = list(starmap(entry_type, entries[run_start:]))
                    entries[run_start:] = share(run) if share is not None else run
                else:
                    as_lists.append((run_start, len(entries)))

    done = [0, 0]
    lock = threading.Lock()

    def work(job):
        if cancelled is not None and cancelled.is_set():
            raise Cancelled()
        entry = to_hash[job]
        key = bytes(hash_keys[job * KEY_SIZE:(job + 1) * KEY_SIZE])
        if key == NO_KEY:
            key = None
        digest, nbytes = hash_file(fs_path(root, entry[0]), algo)
        entry[5] = digest
        if nbytes != entry[2]:
            # Changed while we read it: report what we read (the caller's checks catch it); not cached.
            entry[2] = nbytes
            key = None
        with lock:
            if key is not None:
                cache.put(entry[0], key, digest)
            done[0] += 1
            done[1] += nbytes
            if progress is not None:
                progress(done[0], done[1])

    if to_hash:
        if progress_start is not None:
            progress_start(len(to_hash), sum(map(_entry_size, to_hash)))
        # On a local disk, threads only for files of at least one read chunk. Measured on the
        # 2-core test VM (README, "Performance"): 100k x 4 KiB took 1.0 s in one thread, 3.2-4.0 s
        # on 2 threads (every open/read/close hands the GIL back and forth) and 0.9-1.0 s on 2
        # forked processes, so small files stay in this thread (no process pool: no gain, and
        # forking a threaded orchestrator is unsafe). 4 x 1 GiB from the page cache took
        # 0.38-0.46 s either way (memory-bound); reading and hashing drop the GIL, so threads
        # overlap the reads where storage latency is the limit (cold caches). On a network
        # filesystem every open and read waits on the server: every file goes to the threads.
        if threads > 1:
            run_jobs(work, range(len(to_hash)), threads)
        else:
            for job, entry in enumerate(to_hash):
                if entry[2] < READ_CHUNK:
                    work(job)
            run_jobs(work, [job for job, entry in enumerate(to_hash) if entry[2] >= READ_CHUNK], jobs)
    to_hash = hash_keys = None  # gone before the cache merges what was put and saves it
    for start, stop in as_lists:
        run = list(starmap(entry_type, entries[start:stop]))
        entries[start:stop] = share(run) if share is not None else run
    del as_lists
    # In path order already (see _walk), but for names shown escaped: one pass confirms it.
    entries.sort(key=_first if entry_type is None else _path_attribute)
    if cache is not None:
        cache.finish_scan()
        if owned:
            cache.save()
    return entries


def manifest_chunks(entries):
    """Sorted entries cut where a path's CRC-32 is a multiple of CHUNK_SPLIT (or at CHUNK_ENTRIES):
    the cuts depend on the paths alone, so a changed, added or removed file changes one chunk."""
    start = 0
    for i, entry in enumerate(entries):
        if zlib.crc32(entry[0].encode("utf-8", "surrogateescape")) % CHUNK_SPLIT == 0 \
                or i + 1 - start >= CHUNK_ENTRIES:
            yield entries[start:i + 1]
            start = i + 1
    if start < len(entries):
        yield entries[start:]


# --- locks ---------------------------------------------------------------------------


def _now():
    return time.time()


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return not _is_zombie(pid)


def _is_zombie(pid):
    """A dead process nobody has reaped: its parent exited first and PID 1 does not reap
    (a bare container init). It holds nothing, but kill(pid, 0) still finds it."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            data = handle.read()
    except (IOError, OSError):
        return False
    return data[data.rfind(b")") + 2:][:1] == b"Z"


class Lock(object):
    """An O_EXCL lock file with holder info and a heartbeat, plus flock where supported.

    Stale when its heartbeat (the file's mtime) is older than `timeout` seconds, or when
    the holder is a dead process on this host. A stale lock is moved aside atomically
    (only one breaker wins the rename) and taken over.
    """

    use_flock = True  # tests turn this off to behave like a filesystem without flock

    def __init__(self, lock_dir, name, txid, timeout, purpose="sync"):
        self.path = os.path.join(lock_dir, name + ".lock")
        self.txid = txid
        self.timeout = timeout
        self.purpose = purpose
        self.fd = None
        self.broken = None
        self._stop = threading.Event()
        self._thread = None

    def info(self):
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": _user(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "txid": self.txid,
            "purpose": self.purpose,
        }

    def holder(self):
        """(info dict or None, heartbeat age in seconds or None) of the current holder."""
        try:
            fd = open_nofollow(self.path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None, None
            try:  # a symlink or unreadable file in its place: only its age counts (stale breaks it)
                return None, max(0.0, _now() - os.lstat(self.path).st_mtime)
            except OSError:
                return None, None
        try:
            st = os.fstat(fd)
            data = os.read(fd, 65536)
        finally:
            os.close(fd)
        try:
            info = json.loads(data.decode("utf-8"))
            if not isinstance(info, dict):
                info = None
        except ValueError:
            info = None
        return info, max(0.0, _now() - st.st_mtime)

    def _try_create(self):
        makedirs(os.path.dirname(self.path))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileExistsError:
            return False
        info = self.info()
        if self.use_flock:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                info["flock"] = True  # contenders may read a free flock as our death
            except (ImportError, OSError):
                pass  # Lustre/NFS without flock: O_EXCL and the heartbeat still hold
        try:
            os.write(fd, json.dumps(info).encode("utf-8"))
            os.fsync(fd)
        except OSError:  # e.g. a full disk: an empty lock file would block every run until stale
            os.close(fd)
            os.unlink(self.path)
            raise
        self.fd = fd
        return True

    def _holder_dead(self, info, age):
        if age is None:
            return False
        if age > self.timeout:
            return True
        here = bool(info) and info.get("host") == socket.gethostname()
        if here and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
            return True
        # A free flock proves death (e.g. a reused pid) only for a holder on this host that
        # took one: cluster filesystems hide other nodes' flocks (Lustre localflock) or lack flock.
        if self.use_flock and here and info.get("flock") is True and age > 2:
            try:
                import fcntl

                fd = open_nofollow(self.path)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True  # nobody holds it: the holder died
                except OSError:
                    return False  # held, or no flock here: only the heartbeat decides
                finally:
                    os.close(fd)
            except (ImportError, OSError):
                return False
        return False

    def acquire(self, wait=0.0):
        deadline = _now() + max(0.0, wait)
        delay = 0.05
        while True:
            if self._try_create():
                self._start_heartbeat()
                return self
            info, age = self.holder()
            if info is not None or age is not None:
                if self._holder_dead(info, age):
                    self._break(info)
                    continue
            if _now() >= deadline:
                raise AgentError("locked", "locked by %s" % describe_holder(info), holder=info)
            time.sleep(min(delay, max(0.0, deadline - _now())))
            delay = min(delay * 2, 1.0)

    def _break(self, judged):
        """Remove a dead holder's lock, under a guard so two breakers cannot both win.

        Without the guard, a second breaker that judged the same dead holder could move
        aside the fresh lock the first breaker has just created.
        """
        guard = self.path + ".break"
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            try:  # a breaker that died mid-break must not block everyone forever
                if _now() - os.lstat(guard).st_mtime > BREAK_GUARD_STALE:
                    os.unlink(guard)
            except OSError:
                pass
            time.sleep(0.05)
            return
        try:
            info, age = self.holder()
            if info == judged and self._holder_dead(info, age):
                aside = "%s.stale.%s" % (self.path, self.txid)
                os.rename(self.path, aside)
                os.unlink(aside)
                self.broken = {"holder": info, "age_seconds": round(age, 1)}
        except OSError:
            pass
        finally:
            os.close(fd)
            os.unlink(guard)

    def _start_heartbeat(self):
        interval = max(0.5, min(30.0, self.timeout / 4.0))

        def beat():
            while not self._stop.wait(interval):
                try:
                    self.touch()
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, name="usrsync-heartbeat")
        self._thread.daemon = True
        self._thread.start()

    def touch(self):
        """Refresh the heartbeat of the file we created, through our fd: a symlink planted at
        the path must not make us touch its target, nor refresh a lock that is no longer ours."""
        os.utime(self.fd if self.fd is not None and os.utime in os.supports_fd else self.path)

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        info, _ = self.holder()
        if info is not None and info.get("txid") == self.txid:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def describe_holder(info):
    if not info:
        return "an unknown holder"
    return "%s@%s pid %s since %s (txid %s)" % (
        info.get("user"), info.get("host"), info.get("pid"), info.get("started"), info.get("txid"))


def _user():
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers): still lock
        return str(os.getuid())


# --- staging, verification, promotion ------------------------------------------------


def state_dir(base_dir, *parts):
    return os.path.join(expand(base_dir), STATE_DIR, *parts)


def staging_path(base_dir, dataset, txid):
    return state_dir(base_dir, "staging", "%s.%s" % (dataset_key(dataset), txid))


def file_list_path(base_dir, dataset, txid):
    """Where a transfer keeps its rsync file list (recover() removes one a dead run left)."""
    if not txid or "/" in txid or "." in txid:  # recover() tells datasets apart by the dot after a txid
        raise AgentError("bad_request", "malformed txid %r" % (txid,))
    return state_dir(base_dir, "tmp", "%s.%s.files" % (dataset_key(dataset), txid))


def write_file_list(path, names):
    """rsync's --from0 file list: the names, each ended by a NUL; readable by this user only. A
    scratch file that lives for one rsync run: not synced to disk."""
    if not isinstance(names, list) or not all(isinstance(name, str) and "\0" not in name for name in names):
        raise AgentError("bad_request", "a file list must be names without NUL bytes")
    makedirs(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(b"".join(name.encode("utf-8", "surrogateescape") + b"\0" for name in names))


def subtree_dir(root, subtree):
    """`root/<subtree>` (dataset-relative; "" is root itself), refusing an unsafe subtree, and
    raising OSError unless every component is a real directory (a planted symlink must not
    redirect us)."""
    if not subtree:
        return root
    reason = unsafe_path_reason(subtree)
    if reason:
        raise AgentError("unsafe_path", "refusing subtree %r: %s" % (subtree, reason))
    parts = subtree.split("/")
    for depth in range(1, len(parts) + 1):
        path = fs_path(root, "/".join(parts[:depth]))
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise OSError(errno.ENOTDIR, "not a directory (a symlink or file in its place)", path)
    return path


def stage(base_dir, dataset, txid, link, subtree=""):
    """Create an empty staging dir next to the live dataset that mirrors `live/<subtree>`,
    seeded with hard links.

    `link` lists live files below `subtree` that are unchanged (dataset-relative paths): they
    enter staging as hard links, so only changed files need bytes on the wire and on disk.
    """
    live = dataset_dir(base_dir, dataset)
    source = subtree_dir(live, subtree)
    prefix = subtree + "/" if subtree else ""
    staging = staging_path(base_dir, dataset, txid)
    makedirs(os.path.dirname(staging))
    os.mkdir(staging, 0o755)
    linked = 0
    made = set()  # parent dirs created so far: makedirs per file costs as much as the link
    dirs = None  # (parent, its fd in the live tree, its fd in staging) while its files are linked
    try:
        for rel in link:
            reason = unsafe_path_reason(rel)
            if reason is None and not rel.startswith(prefix):
                reason = "not below %r" % subtree
            if reason:
                raise AgentError("unsafe_path", "refusing to stage %r: %s" % (rel, reason))
            inner = rel[len(prefix):]
            parent, _, name = inner.rpartition("/")
            if parent and parent not in made:
                makedirs(fs_path(staging, parent))
                made.add(parent)
            # No lstat first: linkat() links a symlink or special file itself, never its target,
            # and verify_tree() rejects anything but a regular file before promotion.
            if not _LINK_AT:
                os.link(fs_path(source, inner), fs_path(staging, inner), follow_symlinks=False)
            else:
                # Relative to each directory's descriptors: a path is not resolved twice per file
                # (~45% less time per link, measured on 100k files), and a live directory swapped
                # for a symlink since the scan is refused, not followed.
                if dirs is None or dirs[0] != parent:
                    _close_dirs(dirs)
                    dirs = None
                    # The dataset's own directory may be a symlink (to a scratch disk, say), as
                    # for the walk; one below it may not.
                    live_fd = os.open(fs_path(source, parent), _SUBDIR_FLAGS) if parent else os.open(source, _DIR_FLAGS)
                    try:
                        dirs = (parent, live_fd, os.open(fs_path(staging, parent) if parent else staging, _DIR_FLAGS))
                    except OSError:
                        os.close(live_fd)
                        raise
                name = _os_name(name)
                os.link(name, name, src_dir_fd=dirs[1], dst_dir_fd=dirs[2], follow_symlinks=False)
            linked += 1
    finally:
        _close_dirs(dirs)
    for name in CARRIED_LOCKS if not subtree else ():
        # USR's own lock files keep their inode across promotion, so a USR writer waiting on
        # one still excludes the next writer afterwards (a subtree promotion leaves them be).
        src = os.path.join(live, name)
        try:
            if stat.S_ISREG(os.lstat(src).st_mode):
                os.link(src, os.path.join(staging, name), follow_symlinks=False)
        except OSError:
            pass
    return {"staging": staging, "linked": linked}


_LINK_AT = os.link in os.supports_dir_fd


def _close_dirs(dirs):
    if dirs is not None:
        os.close(dirs[1])
        os.close(dirs[2])


def _os_name(name):
    """A UTF-8 name from a manifest as this interpreter's filesystem encoding has it (see fs_path)."""
    return name if _isascii is not None and _isascii(name) else os.fsdecode(name.encode("utf-8"))


def verify_tree(root, expected, reread, algo, subtree="", jobs=2):
    """Compare a tree with the manifest it must equal; reread the listed files' bytes.

    `root` holds the dataset's directory `subtree` ("" = the whole dataset): a staging dir or
    the live one. Every relpath, here and in the result, is dataset-relative (below `subtree`).
    `expected`: {"paths": [...], "sizes": [...], "digests": [...]}, columns of every file the
    tree must hold (nothing else), sorted by path; `reread`: relpaths whose bytes are read again
    and hashed (never from a cache).
    Returns {"problems": [[relpath, reason]...] (empty when the tree is right), "checked",
    "bytes" (files and bytes reread), "stats"}. Without problems, "stats" holds each expected
    file's (inode, mtime_ns, ctime_ns), packed in the order of the paths (read it through
    VerifiedTree); with problems it is empty. Columns and packed stats, not dicts by path: a
    million files take ~50 MB here instead of ~400 MB.
    """
    if not stat.S_ISDIR(os.lstat(root).st_mode):  # e.g. a symlink planted in place of staging
        return {"problems": [[subtree or ".", "not a directory"]], "checked": 0, "bytes": 0, "stats": b""}
    threads = stat_threads(root, jobs)
    prefix = subtree + "/" if subtree else ""
    paths_expected, sizes = expected["paths"], expected["sizes"]
    count = len(paths_expected)
    width = TREE_STAT.size
    met = bytearray(count)  # 1 for each expected path the walk met, whatever it is
    packed = bytearray(count * width)
    problems = []
    cursor = 0  # the walk goes in path order: a run that is right is the next run of expected paths
    with gc_paused():
        for batch in walk_batches(root, threads):
            paths, _, kinds, file_stats = zip(*batch)
            if prefix:
                paths = tuple(map(prefix.__add__, paths))
            stop = cursor + len(paths)
            # The usual run: regular files, the next expected paths, of their sizes: a column at a time.
            if kinds.count(KIND_FILE) == len(kinds) and list(paths) == paths_expected[cursor:stop] \
                    and list(map(_stat_size, file_stats)) == sizes[cursor:stop]:
                met[cursor:stop] = bytes([1]) * len(paths)
                packed[cursor * width:stop * width] = b"".join(starmap(TREE_STAT.pack, map(_tree_stat, file_stats)))
                cursor = stop
                continue
            for rel, kind, st in zip(paths, kinds, file_stats):
                i = bisect.bisect_left(paths_expected, rel)
                if i == count or paths_expected[i] != rel:
                    problems.append([rel, "unexpected file" if kind == KIND_FILE else "not a regular file (%s)" % kind])
                    continue
                met[i] = 1
                cursor = i + 1
                if kind != KIND_FILE:
                    problems.append([rel, "not a regular file (%s)" % kind])
                elif st.st_size != sizes[i]:
                    problems.append([rel, "size %d, expected %d" % (st.st_size, sizes[i])])
                else:
                    TREE_STAT.pack_into(packed, i * width, *_tree_stat(st))
    if 0 in met:
        problems += [[rel, "missing"] for rel, seen in zip(paths_expected, met) if not seen]
    tree = VerifiedTree(expected, packed)
    bad = set(p[0] for p in problems)
    totals = [0, 0]  # files and bytes reread
    lock = threading.Lock()

    def reread_file(rel):
        digest, n = hash_file(fs_path(root, rel[len(prefix):]), algo)
        with lock:
            totals[0] += 1
            totals[1] += n
            if digest != tree.digest(rel):
                problems.append([rel, "content differs from the source manifest"])

    run_jobs(reread_file, [rel for rel in reread if rel not in bad], threads)
    problems.sort()
    return {"problems": problems, "checked": totals[0], "bytes": totals[1], "stats": b"" if problems else tree.packed}


# A verified file's stat as verify_tree() packs it: (inode, mtime_ns, ctime_ns); its size is the
# expected one. 24 bytes a file, where a tuple of four ints in a dict by path took ~250.
TREE_STAT = struct.Struct("<Qqq")


class VerifiedTree(_ByPath):
    """The expected columns of a verify_tree() call and the stats it packed: each file's
    (inode, size, mtime_ns, ctime_ns) and digest, found by path."""

    def __init__(self, expected, packed):
        _ByPath.__init__(self, expected["paths"])
        self.sizes, self.digests = expected["sizes"], expected["digests"]
        self.packed = packed

    def get(self, rel):
        """(inode, size, mtime_ns, ctime_ns) of a verified file; None for a path not expected, or
        when the verification found problems (nothing was packed)."""
        i = self._index(rel)
        if i is None or not self.packed:
            return None
        ino, mtime_ns, ctime_ns = TREE_STAT.unpack_from(self.packed, i * TREE_STAT.size)
        return ino, self.sizes[i], mtime_ns, ctime_ns

    def digest(self, rel):
        i = self._index(rel)
        return None if i is None else self.digests[i]


# What a trusted digest holds to: the file's (inode, size, mtime_ns).
TRUSTED_KEY = struct.Struct("<Qqq")


class TrustedDigests(_ByPath):
    """Digests a transfer proved for files it did not copy (those staging hard-linked), for
    build_manifest's `trusted`: each applies while its file's inode, size and mtime are still the
    ones in `keys` (TRUSTED_KEY each, in path order). As columns a million of them take ~40 MB (the
    path and digest strings are the manifest's own); as a dict of lists they took ~170 MB, and
    the rescans looked each one up alone. `keys` may come as base64 text (a call's argument)."""

    def __init__(self, paths, keys, digests):
        if not isinstance(keys, (bytes, bytearray)):
            keys = binascii.a2b_base64(keys)
        if not (type(paths) is list and type(digests) is list and len(digests) == len(paths)
                and len(keys) == TRUSTED_KEY.size * len(paths) and all(map(lt, paths, islice(paths, 1, None)))):
            raise ValueError("trusted digests: columns of unequal lengths, or paths not sorted")
        _ByPath.__init__(self, paths)
        self.keys, self.digests = keys, digests

    def __len__(self):
        return len(self.paths)

    def columns(self):
        """As a call's argument (the JSON encoder writes `keys` as base64)."""
        return {"paths": self.paths, "keys": self.keys, "digests": self.digests}

    def get(self, rel):
        """(inode, size, mtime_ns, digest) trusted for a file, or None."""
        i = self._index(rel)
        return None if i is None else TRUSTED_KEY.unpack_from(self.keys, i * TRUSTED_KEY.size) + (self.digests[i],)

    def get_run(self, relpaths, keys):
        """The digests of a run of path-sorted files when every one is trusted under its key
        (`keys`: theirs joined), else None."""
        count = len(relpaths)
        i = _run_at(self.paths, self._cursor, relpaths)
        if i is None or self.keys[i * TRUSTED_KEY.size:(i + count) * TRUSTED_KEY.size] != keys:
            return None
        self._cursor = i + count
        return self.digests[i:i + count]

    def items(self):
        """(relpath, inode, size, mtime_ns, digest) of each trusted file, in path order."""
        for i, rel in enumerate(self.paths):
            yield (rel,) + TRUSTED_KEY.unpack_from(self.keys, i * TRUSTED_KEY.size) + (self.digests[i],)


def remember_digests(cache, proven, stats=None):
    """Put digests a transfer just proved into a dataset's hash cache (its owner saves it), so the
    next scan need not read those files again. `proven`: (relpath, inode, size, mtime_ns, digest)
    of each, as seen when it was proved; a file whose inode, size or mtime no longer match, or that
    is racy, is left out. Every other cache entry is kept. `stats`: what a verify_tree() of the live
    tree just now saw (its VerifiedTree: get(relpath) gives (inode, size, mtime_ns, ctime_ns)),
    which saves an lstat per file (0.3-0.4 s per 100k here); a path it lacks is looked up."""
    racy_from = _time_ns() - RACY_WINDOW_NS
    for rel, ino, size, mtime_ns, digest in proven:
        seen = stats.get(rel) if stats is not None else None
        if seen is None:
            try:
                st = os.lstat(fs_path(cache.root, rel))
            except OSError:
                continue
            if not S_ISREG(st.st_mode):
                continue
            seen = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        now_ino, now_size, now_mtime_ns, now_ctime_ns = seen
        key = cache_key((now_size, now_mtime_ns, now_ctime_ns, now_ino))
        if (now_ino, now_size, now_mtime_ns) == (ino, size, mtime_ns) and mtime_ns < racy_from and key is not None:
            cache.update(rel, key, digest)
    cache.add(())  # the paths it did not hold yet


def reread_digests(tree, reread):
    """remember_digests()'s `proven` for the reread files of a verify_tree() without problems
    (`tree`: its VerifiedTree)."""
    proven = []
    for rel in reread:
        seen = tree.get(rel)
        if seen is not None:
            proven.append((rel, seen[0], seen[1], seen[2], tree.digest(rel)))
    return proven


RENAME_EXCHANGE = 2
SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347, "i686": 353}
AT_FDCWD = -100


def _exchange_linux(a, b):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ea, eb = os.fsencode(a), os.fsencode(b)
    func = getattr(libc, "renameat2", None)
    if func is not None:
        rc = func(AT_FDCWD, ea, AT_FDCWD, eb, RENAME_EXCHANGE)
    else:  # glibc < 2.28 has the syscall but no wrapper
        nr = SYS_RENAMEAT2.get(platform.machine())
        if nr is None:
            raise OSError(errno.ENOSYS, "renameat2 unavailable")
        rc = libc.syscall(nr, AT_FDCWD, ea, AT_FDCWD, eb, RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _exchange_macos(a, b):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 0x2)  # RENAME_SWAP
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# How renameat2/renamex_np say "not on this kernel or filesystem" (anything else is a real error).
EXCHANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def exchange(a, b):
    """Atomically swap two directories; raises OSError where the OS cannot."""
    if sys.platform.startswith("linux"):
        _exchange_linux(a, b)
    elif sys.platform == "darwin":
        _exchange_macos(a, b)
    else:
        raise OSError(errno.ENOSYS, "no atomic exchange on this platform")


def journal_path(base_dir, dataset, txid):
    return state_dir(base_dir, "journal", "%s.%s.json" % (dataset_key(dataset), txid))


def hold_usr_lock(root, wait):
    """flock USR's own `<dataset>/.usr.lock`, if the dataset has one, so a USR writer there
    finishes before we swap trees; waits up to `wait` s. Returns the fd to close, or None."""
    path = os.path.join(root, ".usr.lock")
    try:
        fd = open_nofollow(path)
    except FileNotFoundError:
        return None
    except OSError:  # e.g. a symlink planted there (ELOOP): never lock, or touch, its target
        raise AgentError("unsafe_path", "refusing to promote: %s is not a regular file" % path)
    import fcntl

    deadline = _now() + max(0.0, wait)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return fd  # no flock on this filesystem: USR's writers cannot hold it either
        if _now() >= deadline:
            os.close(fd)
            raise AgentError("locked", "a USR writer holds %s" % path, path=path)
        time.sleep(0.1)


def promote(base_dir, dataset, txid, wait=0.0, subtree=""):
    """Make the staging dir the live `<dataset>/<subtree>` in one atomic step; remove the old tree.

    Every change of the run lies below `subtree` ("" = the whole dataset), so this one exchange
    flips them all at once: the dataset is the old or the new one, never a mix. A journal
    records the transaction first, so a crash at any point is repaired by `recover()`: the live
    path always holds the old or the new tree. A USR writer holding the dataset's `.usr.lock`
    gets `wait` seconds to finish first.
    """
    root = dataset_dir(base_dir, dataset)
    staging = staging_path(base_dir, dataset, txid)
    backup = staging + ".old"
    journal = journal_path(base_dir, dataset, txid)
    if not stat.S_ISDIR(os.lstat(staging).st_mode):  # a symlink planted there must never go live
        raise AgentError("unsafe_path", "refusing to promote %s: not a directory" % staging)
    usr_lock = hold_usr_lock(root, wait) if os.path.isdir(root) and not os.path.islink(root) else None
    try:
        live = subtree_dir(root, subtree)  # checked under the lock: the path we swap is the one we checked
        record = {"live": live, "subtree": subtree, "staging": staging, "backup": backup, "txid": txid}
        atomic_write(journal, json.dumps(record).encode("utf-8"))
        checkpoint("mid-promote")
        if not os.path.lexists(live):
            makedirs(os.path.dirname(live))
            os.rename(staging, live)
            method = "rename"
        else:
            try:
                exchange(staging, live)
                method = "exchange"
            except OSError as exc:
                if exc.errno not in EXCHANGE_UNSUPPORTED:
                    raise  # e.g. staging removed while we were stalled: the live tree stays
                # Journaled rename pair: between the two renames the live path is absent,
                # and recover() puts the backup back if we die there.
                os.rename(live, backup)
                os.rename(staging, live)
                method = "rename-pair"
    finally:
        if usr_lock is not None:
            os.close(usr_lock)
    checkpoint("after-promote")
    for leftover in (staging, backup):
        if os.path.lexists(leftover):
            remove_tree(leftover)
    os.unlink(journal)
    return {"method": method}


def remove_tree(path):
    def onerror(func, failed, exc_info):
        # A read-only directory inside the old tree: make it writable and retry once.
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            func(failed)
        except OSError:
            pass

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=onerror)
    elif os.path.lexists(path):
        os.unlink(path)


def recover(base_dir, dataset):
    """Repair what a crashed run of this dataset left: journals, staging dirs. Lock held."""
    repaired = []
    key = dataset_key(dataset)
    journal_dir = state_dir(base_dir, "journal")
    for name in sorted(_listdir(journal_dir)):
        if not _owned_by(name, key):
            continue
        path = os.path.join(journal_dir, name)
        try:
            with open(path, "rb") as handle:
                record = json.loads(handle.read().decode("utf-8"))
            live, backup, subtree = record["live"], record["backup"], record.get("subtree", "")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            os.unlink(path)
            continue
        if not _journal_is_ours(base_dir, dataset, live, backup, subtree):
            continue  # never follow paths from a file we did not expect
        if not os.path.lexists(live) and os.path.isdir(backup):
            # Died between the two renames of the fallback: the old tree goes back where it was.
            subtree_dir(dataset_dir(base_dir, dataset), subtree.rpartition("/")[0])  # real dirs only
            os.rename(backup, live)
            what = "live dataset" if not subtree else "live dataset directory %s" % subtree
            repaired.append("restored %s from %s" % (what, backup))
        os.unlink(path)
        repaired.append("removed journal %s" % name)
    staging_dir = state_dir(base_dir, "staging")
    for name in sorted(_listdir(staging_dir)):
        if _owned_by(name, key):
            remove_tree(os.path.join(staging_dir, name))
            repaired.append("removed leftover staging %s" % name)
    tmp_dir = state_dir(base_dir, "tmp")  # the orchestrator's rsync file lists
    for name in sorted(_listdir(tmp_dir)):
        if _owned_by(name, key) and name.endswith(".files"):
            os.unlink(os.path.join(tmp_dir, name))
            repaired.append("removed leftover file list %s" % name)
    return repaired


def _journal_is_ours(base_dir, dataset, live, backup, subtree):
    """Whether a journal names this dataset's own paths: the live `<dataset>/<subtree>` and a
    backup in our staging dir under this dataset's name."""
    if not isinstance(subtree, str) or (subtree and unsafe_path_reason(subtree)) or not isinstance(backup, str):
        return False
    root = dataset_dir(base_dir, dataset)
    return (live == (fs_path(root, subtree) if subtree else root)
            and os.path.dirname(backup) == state_dir(base_dir, "staging") and backup.endswith(".old")
            and _owned_by(os.path.basename(backup), dataset_key(dataset)))


def _owned_by(name, key):
    """Whether a staging/journal/tmp name is `<key>.<txid>[.old|.json[.tmp.*]|.files]` for this dataset.

    Keys may contain dots (datasets `a` and `a.v2`), txids do not: a prefix test alone
    would let one dataset's recovery delete another's in-flight staging.
    """
    if not name.startswith(key + "."):
        return False
    txid, _, rest = name[len(key) + 1:].partition(".")
    return bool(txid) and (rest in ("", "old", "json", "files") or rest.startswith("json.tmp."))


def _listdir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


# --- test hook: pause at a named phase so a test can kill us there -------------------


def checkpoint(phase):
    """Pause USRSYNC_PAUSE_SECONDS, or until the test deletes USRSYNC_PAUSE_FILE (a release
    that does not depend on how fast a loaded machine gets there)."""
    if os.environ.get("USRSYNC_PAUSE_AT") != phase:
        return
    marker = os.environ.get("USRSYNC_PAUSE_FILE")
    if marker:
        with open(marker, "w") as handle:
            handle.write("%s %d\n" % (phase, os.getpid()))
    deadline = time.time() + float(os.environ.get("USRSYNC_PAUSE_SECONDS", "60"))
    while time.time() < deadline and (not marker or os.path.exists(marker)):
        time.sleep(min(0.05, max(0.0, deadline - time.time())))


# --- environment facts -----------------------------------------------------------------


def rsync_version(rsync_path="rsync"):
    try:
        proc = subprocess.Popen([rsync_path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, _ = proc.communicate(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.decode("utf-8", "replace") if proc.returncode == 0 else None


def parquet_shape(path):
    """(rows, columns) of a parquet file through pyarrow, or None without pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    meta = pq.ParquetFile(path).metadata
    return [meta.num_rows, meta.num_columns]


def has_pyarrow():
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def list_datasets(base_dir):
    """Datasets (dirs holding records.parquet, two levels deep) with size and file count."""
    base = expand(base_dir)
    found = []
    for top in sorted(_listdir(base)):
        if top.startswith("."):
            continue
        candidates = [top] + ["%s/%s" % (top, sub) for sub in sorted(_listdir(os.path.join(base, top)))
                              if not sub.startswith(".")]
        for dataset in candidates:
            root = os.path.join(base, *dataset.split("/"))
            if not os.path.isfile(os.path.join(root, "records.parquet")):
                continue
            # Regular files only, as a sync counts them: symlinks and specials are never transferred.
            files = [st for batch in walk_batches(root) for _, _, kind, st in batch if kind == KIND_FILE]
            found.append({
                "dataset": dataset,
                "files": len(files),
                "bytes": sum(st.st_size for st in files),
                "last_change_ns": max([st.st_mtime_ns for st in files] or [0]),
            })
    return found


# --- framing -------------------------------------------------------------------------


def encode_frame(obj, compress=False):
    return encode_body(json.dumps(obj, separators=(",", ":")).encode("utf-8"), compress)


def encode_body(body, compress=False):
    """Frame an already JSON-encoded body."""
    flags = 0
    if compress:
        body = zlib.compress(body, 1)
        flags = FLAG_ZLIB
    if len(body) > MAX_FRAME:
        raise AgentError("frame_too_large", "frame of %d bytes exceeds the limit" % len(body))
    return struct.pack(">IB", len(body), flags) + body


def _read_exact(stream, n):
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_frame(stream):
    header = _read_exact(stream, 5)
    if header is None:
        return None
    size, flags = struct.unpack(">IB", header)
    if size > MAX_FRAME:
        raise AgentError("frame_too_large", "incoming frame of %d bytes exceeds the limit" % size)
    body = _read_exact(stream, size)
    if body is None:
        return None
    if flags & FLAG_ZLIB:
        inflater = zlib.decompressobj()
        try:
            body = inflater.decompress(body, MAX_FRAME_RAW)
        except zlib.error:
            raise ValueError("corrupt compressed frame")
        if inflater.unconsumed_tail:
            raise AgentError("frame_too_large", "frame inflates past the limit")
    return json.loads(body.decode("utf-8"))


# --- the agent's RPC server --------------------------------------------------------------


class _Keepalive(object):
    """Sends a progress frame every `interval` s while a call runs: to the orchestrator,
    silence then means a hung or broken agent, not a long manifest."""

    def __init__(self, agent, rid, interval):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(agent, rid, interval), name="usrsync-keepalive")
        self._thread.daemon = True
        self._thread.start()

    def _run(self, agent, rid, interval):
        while not self._done.wait(interval):
            try:
                agent.send({"id": rid, "type": "progress"})
            except (OSError, ValueError):
                return

    def stop(self):
        """No progress frame is sent after this returns (the result must come last)."""
        self._done.set()
        self._thread.join()


class _HashProgress(object):
    """Hashing progress as progress frames carrying [files, bytes, total_files, total_bytes]:
    the start and the last file always, in between at most every `interval` s."""

    def __init__(self, agent, rid, interval=0.2):
        self._agent = agent
        self._rid = rid
        self._interval = interval
        self._totals = [0, 0]
        self._sent = 0.0

    def start(self, files, nbytes):
        self._totals = [files, nbytes]
        self._send(0, 0)

    def update(self, files, nbytes):  # called under build_manifest's lock
        if files >= self._totals[0] or time.monotonic() - self._sent >= self._interval:
            self._send(files, nbytes)

    def _send(self, files, nbytes):
        self._sent = time.monotonic()
        self._agent.send({"id": self._rid, "type": "progress", "progress": [files, nbytes] + self._totals})


class Agent(object):
    def __init__(self, out):
        self.out = out
        self.locks = {}
        self.hash_caches = {}
        self.trusted = {}  # (root, algo) -> the TrustedDigests of the last manifest call, for verify's remember
        self.keepalive = 30.0  # seconds between progress frames; the orchestrator sets it in hello
        self._send_lock = threading.Lock()
        self._release_lock = threading.Lock()  # serve() and watch_session() may both release

    def hash_cache(self, root, algo):
        """This session's hash cache of a dataset: loaded once however many calls scan it."""
        key = (root, algo)
        if key not in self.hash_caches:
            self.hash_caches[key] = HashCache(default_cache_dir(), root, algo)
        return self.hash_caches[key]

    def send(self, obj, compress=False):
        body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
        self.send_body(body, compress or len(body) > COMPRESS_OVER)

    def send_body(self, body, compress=False):
        data = encode_body(body, compress)
        with self._send_lock:  # the keepalive thread writes too
            self.out.write(data)
            self.out.flush()

    def call_hello(self, args):
        for key, value in (args.get("test_env") or {}).items():
            if key.startswith("USRSYNC_PAUSE_"):  # tests pause the agent at a named phase
                os.environ[key] = str(value)
        rsync = rsync_version(args.get("rsync_path") or "rsync")
        return {
            "version": AGENT_VERSION,
            "python": platform.python_version(),
            "platform": sys.platform,
            "hostname": socket.gethostname(),
            "user": _user(),
            "home": os.path.expanduser("~"),
            "hash_algos": hash_algos(),
            "rsync": rsync,
            "pid": os.getpid(),
        }

    def call_check_base(self, args):
        base = expand(args["base_dir"])
        exists = os.path.isdir(base)
        return {
            "base_dir": base,
            "exists": exists,
            "writable": exists and os.access(base, os.W_OK | os.X_OK),
            "fs_type": filesystem_type(base) if exists else None,
        }

    def call_manifest(self, args, rid):
        root = dataset_dir(args["base_dir"], args["dataset"])
        base = expand(args["base_dir"])
        if not os.path.isdir(base):
            raise AgentError("base_dir_missing", "base_dir %s does not exist" % base)
        exists = os.path.isdir(root)
        entries = []
        if exists:
            hash_sections = args.get("hash_sections")
            report = _HashProgress(self, rid) if args.get("progress") else None
            use_cache = bool(args.get("cache", True))
            cache = self.hash_cache(root, args["algo"]) if use_cache else None
            trusted = TrustedDigests(**args["trusted"]) if args.get("trusted") else None
            self.trusted[(root, args["algo"])] = trusted
            entries = build_manifest(
                root, args["algo"], jobs=int(args.get("jobs", 2)), use_cache=use_cache,
                hash_sections=set(hash_sections) if hash_sections is not None else None,
                trusted=trusted,
                progress=report.update if report else None,
                progress_start=report.start if report else None,
                cache=cache,
            )
            # `save_cache` false: a later call saves (a push's destination rescan is followed by
            # verify's remember, which puts the digests of the files staging linked under their
            # keys once staging is gone: a link count change moves ctime).
            if cache is not None and args.get("save_cache", True):
                cache.save()
        reply = {"exists": exists, "count": len(entries), "algo": args["algo"], "root": root}
        chunks = [entries[i:i + CHUNK_ENTRIES] for i in range(0, len(entries), CHUNK_ENTRIES)]
        known_chunks = ()
        if "known" in args:
            # The orchestrator keeps the last manifest we sent, in chunks whose ends depend only on
            # paths, and tells us its digests: a no-op run sends a digest instead of every entry,
            # and a run with a few changes sends only the chunks holding them. marshal format 2
            # (no back-references) is deterministic and half the cost of JSON-encoding for this.
            # The digest runs over fixed slices; the chunks are cut only when something is sent
            # (a no-op run's digest of 100k entries: 0.115 s with the cuts, 0.062 s without).
            digest = hashlib.sha256(marshal.dumps([exists, args["algo"], root], 2))
            for chunk in chunks:
                digest.update(marshal.dumps(chunk, 2))
            reply["digest"] = digest.hexdigest()
            reply["unchanged"] = args["known"] == reply["digest"]
            if reply["unchanged"]:
                return reply
            chunks = list(manifest_chunks(entries))
            reply["chunks"] = [[hashlib.sha256(marshal.dumps(chunk, 2)).hexdigest()[:32], len(chunk)]
                               for chunk in chunks]
            known_chunks = set(args.get("known_chunks") or ())
        head = '{"id":%s,"type":"chunk","items":' % json.dumps(rid)
        for i, chunk in enumerate(chunks):
            if known_chunks and reply["chunks"][i][0] in known_chunks:
                continue
            items = json.dumps(chunk, separators=(",", ":"))
            self.send_body((head + items + "}").encode("utf-8"), compress=True)
        return reply

    def call_events_lines(self, args, rid):
        root = dataset_dir(args["base_dir"], args["dataset"])
        digests, partial = line_digests(os.path.join(root, ".events.log"))
        for i in range(0, len(digests), CHUNK_ENTRIES * 4):
            self.send({"id": rid, "type": "chunk", "items": digests[i:i + CHUNK_ENTRIES * 4]}, compress=True)
        return {"count": len(digests), "partial": partial}

    def call_lock(self, args):
        dataset = args["dataset"]
        check_dataset_id(dataset)
        lock = Lock(state_dir(args["base_dir"], "locks"), dataset_key(dataset), args["txid"],
                    float(args.get("timeout", 300)), purpose=args.get("purpose", "sync"))
        if args.get("no_flock"):
            lock.use_flock = False
        lock.acquire(float(args.get("wait", 0)))
        self.locks[args["txid"]] = lock
        return {"path": lock.path, "broken": lock.broken}

    def call_unlock(self, args):
        lock = self.locks.pop(args["txid"], None)
        if lock is not None:
            lock.release()
        return {"released": lock is not None}

    def call_heartbeat(self, args):
        lock = self.locks.get(args["txid"])
        if lock is None:
            raise AgentError("not_locked", "no lock held for txid %s" % args["txid"])
        lock.touch()
        return {"ok": True}

    def call_recover(self, args):
        return {"repaired": recover(args["base_dir"], args["dataset"])}

    def call_stage(self, args):
        return stage(args["base_dir"], args["dataset"], args["txid"], args.get("link", []), args["subtree"])

    def call_verify(self, args):
        subtree = args["subtree"]
        if args.get("staging"):
            root = staging_path(args["base_dir"], args["dataset"], args["txid"])
        else:
            root = subtree_dir(dataset_dir(args["base_dir"], args["dataset"]), subtree)
        checkpoint("before-verify")
        reread = args.get("reread", [])
        result = verify_tree(root, args["expected"], reread, args["algo"], subtree, int(args.get("jobs", 2)))
        if args.get("remember") and not args.get("staging") and not result["problems"]:
            # What the last manifest call trusted (the files staging linked: the orchestrator sent
            # them once, for the rescan), and what this call reread.
            live = dataset_dir(args["base_dir"], args["dataset"])
            trusted = self.trusted.get((live, args["algo"]))
            proven = chain(trusted.items() if trusted else (),
                           reread_digests(VerifiedTree(args["expected"], result["stats"]), reread))
            cache = self.hash_cache(live, args["algo"])
            remember_digests(cache, proven, VerifiedTree(args["expected"], result["stats"]))
            cache.save()
        result["stats"] = binascii.b2a_base64(result["stats"]).decode("ascii").rstrip("\n")  # JSON carries text
        return result

    def call_promote(self, args):
        return promote(args["base_dir"], args["dataset"], args["txid"], float(args.get("wait", 0)), args["subtree"])

    def call_write_file_list(self, args):
        """The file list of a pull's rsync, kept on this side: rsync reads a list on the receiving side
        and forwards it to the sender name by name, which costs more CPU per file than the copy."""
        check_dataset_id(args["dataset"])
        path = file_list_path(args["base_dir"], args["dataset"], args["txid"])
        write_file_list(path, args["names"])
        return {"path": path}

    def call_remove_file_list(self, args):
        check_dataset_id(args["dataset"])
        try:
            os.unlink(file_list_path(args["base_dir"], args["dataset"], args["txid"]))
        except FileNotFoundError:
            return {"removed": False}
        return {"removed": True}

    def call_cleanup(self, args):
        staging = staging_path(args["base_dir"], args["dataset"], args["txid"])
        existed = os.path.lexists(staging)
        remove_tree(staging)
        return {"removed": existed}

    def call_pyarrow(self, args):
        # Not part of hello: importing pyarrow takes a good part of a second where it is installed.
        return {"pyarrow": has_pyarrow()}

    def call_parquet_shape(self, args):
        root = dataset_dir(args["base_dir"], args["dataset"])
        return {"shape": parquet_shape(os.path.join(root, "records.parquet"))}

    def call_ls(self, args):
        return {"datasets": list_datasets(args["base_dir"])}

    def call_pause(self, args):
        checkpoint(args["phase"])
        return {}

    STREAMING = ("manifest", "events_lines")

    def handle(self, request):
        rid = request.get("id") if isinstance(request, dict) else None
        try:
            if not isinstance(request, dict) or not isinstance(request.get("call"), str):
                raise AgentError("bad_request", "malformed request")
            name = request["call"]
            method = getattr(self, "call_" + name, None)
            if method is None:
                raise AgentError("unknown_call", "unknown call %r" % name)
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise AgentError("bad_request", "malformed request arguments")
            if name == "hello" and args.get("keepalive"):
                self.keepalive = max(0.05, float(args["keepalive"]))
            keepalive = _Keepalive(self, rid, self.keepalive)
            try:
                result = method(args, rid) if name in self.STREAMING else method(args)
            finally:
                keepalive.stop()
            self.send({"id": rid, "type": "result", "result": result})
        except AgentError as exc:
            self.send({"id": rid, "type": "error",
                       "error": {"kind": exc.kind, "message": exc.message, "detail": exc.detail}})
        except (OSError, KeyError, TypeError, ValueError) as exc:
            self.send({"id": rid, "type": "error",
                       "error": {"kind": type(exc).__name__, "message": str(exc), "detail": {}}})

    def release_all(self):
        with self._release_lock:
            for lock in list(self.locks.values()):
                lock.release()
            self.locks.clear()


def serve(nonce):
    out = sys.stdout.buffer
    out.write(("%s %s %s\n" % (SENTINEL, AGENT_VERSION, nonce)).encode("ascii"))
    out.flush()
    agent = Agent(out)
    watch_session(agent)
    stdin = sys.stdin.buffer
    try:
        while True:
            try:
                request = read_frame(stdin)
            except AgentError as exc:
                agent.send({"id": None, "type": "error", "error": {"kind": exc.kind, "message": exc.message,
                                                                   "detail": {}}})
                return 3
            except ValueError:
                agent.send({"id": None, "type": "error",
                            "error": {"kind": "bad_request", "message": "undecodable frame", "detail": {}}})
                return 3
            if request is None:  # the session ended: leave nothing behind
                return 0
            agent.handle(request)
    except BrokenPipeError:
        return 0
    finally:
        agent.release_all()


def watch_session(agent):
    """Exit as soon as the session is gone, even in the middle of a call.

    Nobody can read the answer any more, and an agent must never outlive its SSH session on a
    login node (a manifest of a huge tree could hash on for hours, holding the dataset's lock).
    The session's end shows as POLLERR/POLLHUP on our stdout: its reader closed it.
    """
    if not hasattr(select, "poll"):
        return
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return
    poller = select.poll()
    poller.register(fd, 0)  # error conditions are always reported

    def watch():
        while not poller.poll():
            pass
        try:
            agent.release_all()
        finally:
            os._exit(0)  # whatever the main thread is doing: nobody is listening any more

    thread = threading.Thread(target=watch, name="usrsync-session-watch")
    thread.daemon = True
    thread.start()


def main(argv):
    if len(argv) >= 2 and argv[0] == "serve":
        return serve(argv[1])
    sys.stderr.write("usage: usrsync_agent.py serve NONCE\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
