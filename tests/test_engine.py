"""The agent's engine (remote_agent/usrsync_agent.py) on real files: classification, scanning,
the hash cache's invalidation rules, locks, staging, verification, promotion and recovery."""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import gc
import hashlib
import io
import json
import marshal
import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import cache_columns, cache_entries, loaded_cache, trusted_digests

from remote_agent import usrsync_agent as engine

OLD = 1_700_000_000  # an mtime far outside the racy window
FORGED = "f" * 64  # a digest no file has: seeing it proves the cache (or trust) was used


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(root: Path, files: dict[str, bytes], mtime: int | None = OLD) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))


# --- classification and path safety ---------------------------------------------------------


@pytest.mark.parametrize(("path", "section"), [
    ("records.parquet", "primary"),
    ("meta.md", "meta"),
    (".events.log", ".events.log"),
    ("_snapshots/records-1.parquet", "_snapshots"),
    ("_snapshots/deep/x", "_snapshots"),
    ("_derived/ns/part-1.parquet", "_derived"),
    ("_derived/x", "_derived"),
    ("notes.txt", "_auxiliary"),
    ("_artifacts/x.json", "_auxiliary"),
    ("_snapshots", "_auxiliary"),  # a file, not the dir
    ("_derived", "_auxiliary"),
    ("sub/records.parquet", "_auxiliary"),
    ("sub/.events.log", "_auxiliary"),
    ("sub/.usr.lock", "_auxiliary"),  # runtime names are top-level only...
    ("sub/.usrsync-notes", "_auxiliary"),
    (".usr.lockfile", "_auxiliary"),
    # ...except rsync's partial dirs, which are runtime anywhere
    (".usr.lock", None),
    (".events.lock", None),
    (".usr.transfer.lock", None),
    (".usr.lease.x", None),
    (".usr.lease.job-42", None),
    (".usrsync", None),
    (".usrsync/locks/a.lock", None),
    (".usrsync-partial", None),
    (".usrsyncanything", None),
    (".usrsync-partial/records.parquet", None),
    ("_derived/ns/.usrsync-partial/part-1.parquet", None),
    ("_snapshots/.rsync-partial/x", None),
    ("a/b/~tmp~/c", None),
])
def test_classify(path: str, section: str | None) -> None:
    assert engine.classify(path) == section


@pytest.mark.parametrize(("path", "reason"), [
    ("records.parquet", None),
    ("_derived/a/b", None),
    ("..a", None),
    ("a..", None),
    ("", "empty path"),
    (None, "empty path"),
    ("a\x00b", "control character in path"),
    ("a\nb", "control character in path"),
    ("a\rb", "control character in path"),
    ("/etc/passwd", "absolute path"),
    ("..", "'.', '..' or empty component"),
    ("a/../b", "'.', '..' or empty component"),
    ("a/./b", "'.', '..' or empty component"),
    ("a//b", "'.', '..' or empty component"),
    ("a/", "'.', '..' or empty component"),
])
def test_unsafe_path_reason(path: Any, reason: str | None) -> None:
    assert engine.unsafe_path_reason(path) == reason


@pytest.mark.parametrize(("dataset", "ok"), [
    ("ds", True), ("densegen/my_dataset", True), ("a/.usrsync", True),
    (".usrsync", False), (".usrsync-x/y", False), ("../x", False), ("/abs", False), ("", False),
])
def test_check_dataset_id(dataset: str, ok: bool) -> None:
    if ok:
        engine.check_dataset_id(dataset)
        return
    with pytest.raises(engine.AgentError) as info:
        engine.check_dataset_id(dataset)
    assert info.value.kind == "unsafe_dataset"


def test_dataset_key_is_flat_and_injective() -> None:
    keys = {d: engine.dataset_key(d) for d in ("a/b", "a%2Fb", "a%b", "a.b", "a")}
    assert keys == {"a/b": "a%2Fb", "a%2Fb": "a%252Fb", "a%b": "a%25b", "a.b": "a.b", "a": "a"}
    assert all("/" not in k for k in keys.values())


# --- scanning -------------------------------------------------------------------------------


def scan(root: Path) -> list[tuple[str, str, str, Any]]:
    """Every (relpath, section, kind, FileStat) the walk yields, sorted by path."""
    return sorted((item for batch in engine.walk_batches(str(root)) for item in batch), key=lambda item: item[0])


def test_scan_skips_runtime_files_and_reports_special_kinds(tmp_path: Path) -> None:
    write(tmp_path, {
        "records.parquet": b"p", "_derived/ns/a": b"a", "notes/x.txt": b"x",
        ".usr.lock": b"", ".events.lock": b"", ".usr.transfer.lock": b"", ".usr.lease.42": b"",
        ".usrsync/locks/d.lock": b"{}", ".usrsync-partial/records.parquet": b"partial",
        "_derived/ns/.usrsync-partial/b": b"partial", "_snapshots/.rsync-partial/s": b"partial",
    })
    os.symlink("records.parquet", tmp_path / "link")
    os.symlink("/", tmp_path / "_derived" / "dirlink")  # never followed
    os.mkfifo(tmp_path / "fifo")
    assert [(rel, kind) for rel, _, kind, _ in scan(tmp_path)] == [
        ("_derived/dirlink", "symlink"), ("_derived/ns/a", "file"), ("fifo", "special"), ("link", "symlink"),
        ("notes/x.txt", "file"), ("records.parquet", "file"),
    ]


def test_scan_reports_undecodable_names(tmp_path: Path) -> None:
    write(tmp_path, {"records.parquet": b"p"})
    (tmp_path / os.fsdecode(b"bad\xffname")).write_bytes(b"x")
    assert [(rel, kind) for rel, _, kind, _ in scan(tmp_path)] == [("bad\\xffname", "badname"), ("records.parquet", "file")]
    entries = engine.build_manifest(str(tmp_path), "sha256", use_cache=False)
    assert entries[0][4:6] == ["badname", ""]  # never hashed, never transferred


def test_scan_escapes_names_below_an_undecodable_or_newline_directory(tmp_path: Path) -> None:
    write(tmp_path, {"records.parquet": b"p"})
    for directory in (b"_derived/bad\xffdir", b"notes/line\nbreak"):
        (tmp_path / os.fsdecode(directory)).mkdir(parents=True)
        (tmp_path / os.fsdecode(directory) / "plain.txt").write_bytes(b"x")
    assert [(rel, kind) for rel, _, kind, _ in scan(tmp_path)] == [
        ("_derived/bad\\xffdir/plain.txt", "badname"), ("notes/line\\nbreak/plain.txt", "badname"),
        ("records.parquet", "file"),
    ]


@pytest.mark.parametrize("by_fd", [True, False])
def test_walk_sections_agree_with_classify_by_fd_or_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           by_fd: bool) -> None:
    """The walk fixes each file's section from its top-level name; classify() decides per path.
    By path is how Python 3.6 walks (no scandir on a descriptor there)."""
    write(tmp_path, {
        "records.parquet": b"p", "meta.md": b"m", ".events.log": b"e\n", "top.txt": b"t",
        "_derived/a/b/c.parquet": b"d", "_snapshots/s1/records.parquet": b"s", "_derivedX/x": b"x",
        "notes/_derived/y": b"y", "_auxiliary/z": b"z", ".hidden/h": b"h", "records.parquet.d/q": b"q",
    })
    if not by_fd:
        monkeypatch.setattr(engine, "_SCANDIR_FD", False)
    batches = list(engine.walk_batches(str(tmp_path)))
    items = [item for batch in batches for item in batch]
    assert [(rel, section) for rel, section, _, _ in items] == [(rel, engine.classify(rel)) for rel, _, _, _ in items]
    # Runs of one directory's files, in path order: the consumer never needs a list of the whole
    # tree, nor to sort one. The four top-level files are split by the directories between them.
    assert [rel for rel, _, _, _ in items] == sorted(rel for rel, _, _, _ in items)
    assert [len(batch) for batch in batches] == [1] * 11
    assert all(len({rel.rpartition("/")[0] for rel, _, _, _ in batch}) == 1 for batch in batches)
    assert len(items) == 11
    st = os.lstat(tmp_path / "_derived/a/b/c.parquet")
    stats = {rel: fs for rel, _, _, fs in items}
    assert stats["_derived/a/b/c.parquet"] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def test_plain_names_walk_as_the_general_path_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ASCII names without line breaks take a columnar path per directory; every other name the
    general one. Both give the same rows, in the same runs, for every kind and section."""
    write(tmp_path, {
        "records.parquet": b"p", "meta.md": b"m", ".events.log": b"e\n", "a.txt": b"a", "a-b/c": b"c",
        "a/b": b"b", "a/b.c/d": b"d", "a/b-c": b"bc", "a0": b"0", "_derived/x/y": b"y", "_derived/x.y": b"xy",
        "_snapshots/s/records.parquet": b"s", ".usr.lock": b"", "_derived/.rsync-partial/p": b"p",
    })
    os.symlink("records.parquet", tmp_path / "link")
    os.symlink("/", tmp_path / "a" / "dirlink")
    os.mkfifo(tmp_path / "a" / "fifo")
    plain = list(engine.walk_batches(str(tmp_path)))
    monkeypatch.setattr(engine, "_isascii", None)  # every directory through the general path
    assert list(engine.walk_batches(str(tmp_path))) == plain
    assert [rel for batch in plain for rel, _, _, _ in batch] == [
        ".events.log", "_derived/x.y", "_derived/x/y", "_snapshots/s/records.parquet", "a-b/c", "a.txt",
        "a/b", "a/b-c", "a/b.c/d", "a/dirlink", "a/fifo", "a0", "link", "meta.md", "records.parquet",
    ]
    kinds = {rel: kind for batch in plain for rel, _, kind, _ in batch}
    assert (kinds["a/dirlink"], kinds["a/fifo"], kinds["link"]) == ("symlink", "special", "symlink")


def test_scan_of_a_missing_dir_is_empty(tmp_path: Path) -> None:
    assert list(engine.walk_batches(str(tmp_path / "missing"))) == []


def test_a_file_removed_between_listing_and_stat_is_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer may delete a file while we scan: the scan goes on without it (the rescans before
    promotion catch the change), instead of failing or coming back empty."""
    write(tmp_path, {"records.parquet": b"p", "_derived/a": b"a", "_derived/gone": b"g", "_derived/z": b"z"})
    real_scandir = os.scandir

    class ListingThenRemove:
        def __init__(self, directory: Any) -> None:
            self.listing = real_scandir(directory)

        def __enter__(self) -> Any:
            entries = list(self.listing)
            if "gone" in {entry.name for entry in entries}:
                (tmp_path / "_derived" / "gone").unlink()
            return iter(entries)

        def __exit__(self, *exc: Any) -> None:
            self.listing.close()

    monkeypatch.setattr(engine.os, "scandir", ListingThenRemove)
    entries = engine.build_manifest(str(tmp_path), "sha256", use_cache=False)
    monkeypatch.undo()
    assert [e[0] for e in entries] == ["_derived/a", "_derived/z", "records.parquet"]
    assert [e[5] for e in entries] == [sha(b"a"), sha(b"z"), sha(b"p")]


MOUNTINFO = "\n".join([
    "22 1 0:21 / / rw,relatime - ext4 /dev/vda rw",
    "30 22 0:40 / /home rw,relatime - nfs4 fs:/home rw,vers=4.2",
    "31 22 0:41 / /scratch rw - lustre 10.0.0.1@o2ib:/scratch rw,flock",
    "32 31 0:42 / /scratch/local rw - xfs /dev/nvme0n1 rw",
    "33 22 0:43 / /mnt/my\\040disk rw,nosuid shared:7 - fuse.sshfs me@host: rw,user_id=0",
    "34 22 0:44 / /mnt/usb rw - fuseblk /dev/sdb1 rw",
    "35 30 0:45 / /home rw - ext4 /dev/vdb rw",  # mounted over the NFS one: the last mount wins
    "garbage without a separator",
])


@pytest.mark.parametrize(("path", "fs_type"), [
    ("/", "ext4"), ("/etc/passwd", "ext4"), ("/home/me/data", "ext4"), ("/homework/x", "ext4"),
    ("/scratch", "lustre"), ("/scratch/me/ds", "lustre"), ("/scratch/local/ds", "xfs"),
    ("/scratch/localx/ds", "lustre"), ("/mnt/my disk/ds", "fuse.sshfs"), ("/mnt/usb/ds", "fuseblk"),
])
def test_the_filesystem_of_a_path_is_that_of_its_longest_mount_point(path: str, fs_type: str) -> None:
    assert engine.mount_fs_type(path, MOUNTINFO) == fs_type


def test_a_path_under_no_mount_point_has_no_filesystem_type() -> None:
    without_root = "\n".join(MOUNTINFO.splitlines()[1:])
    assert engine.mount_fs_type("/data", without_root) is None


@pytest.mark.parametrize(("fs_type", "jobs", "threads"), [
    ("ext4", 8, 1), ("xfs", 2, 1), ("tmpfs", 2, 1), ("fuseblk", 4, 1), (None, 4, 1), ("overlay", 2, 1),
    ("lustre", 2, 8), ("nfs4", 1, 4), ("gpfs", 4, 16), ("fuse.sshfs", 2, 8), ("beegfs", 64, 32),
])
def test_only_network_filesystems_stat_on_several_threads(fs_type: str | None, jobs: int, threads: int) -> None:
    assert engine.threads_for_fs(fs_type, jobs) == threads


def test_this_test_directory_is_scanned_on_one_thread_unless_it_is_remote(tmp_path: Path) -> None:
    with open("/proc/self/mountinfo") as handle:
        fs_type = engine.mount_fs_type(os.path.realpath(tmp_path), handle.read())
    assert fs_type is not None
    assert engine.stat_threads(str(tmp_path), 2) == engine.threads_for_fs(fs_type, 2)


@pytest.mark.parametrize("threads", [2, 5])
def test_a_walk_on_several_threads_yields_what_one_thread_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               threads: int) -> None:
    """Directories below and above PARALLEL_STAT_MIN files, the general path's names among them:
    the same rows, in the same runs, each file with its own stat."""
    files = {"records.parquet": b"p", "meta.md": b"m", "_derived/one/a": b"a", "_derived/two/a": b"a",
             "_derived/two/b": b"bb"}
    files.update({f"_derived/many/f{i:04d}": b"x" * i for i in range(100)})
    files.update({f"_derived/mixed/f{i:03d}": b"y" * i for i in range(10)})
    files["_derived/mixed/caf\u00e9"] = b"non-ASCII: this directory takes the general path"
    write(tmp_path, files)
    os.symlink("f0001", tmp_path / "_derived" / "many" / "link")
    serial = list(engine.walk_batches(str(tmp_path)))
    stated = []  # the size of each directory the walk handed to the threads' stat
    parallel_lstat = engine._parallel_lstat

    def spied(pool: Any, count: int) -> Any:
        lstat_all = parallel_lstat(pool, count)
        return lambda entries: stated.append(len(entries)) or lstat_all(entries)

    monkeypatch.setattr(engine, "_parallel_lstat", spied)
    assert list(engine.walk_batches(str(tmp_path), threads)) == serial
    assert engine.PARALLEL_STAT_MIN == 2 and 101 in stated  # _derived/many, its symlink included
    stats = {rel: st for batch in serial for rel, _, _, st in batch}
    for rel in ("_derived/many/f0000", "_derived/many/f0099", "_derived/many/link", "_derived/mixed/caf\u00e9"):
        st = os.lstat(tmp_path / rel)
        assert stats[rel] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    assert len(stats) == len(files) + 1


def test_scans_and_verifications_stat_on_the_threads_their_filesystem_gets(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"records.parquet": b"p", **{f"_derived/d/f{i:03d}": b"%d" % i for i in range(100)}}
    write(tmp_path, files)
    alone = engine.build_manifest(str(tmp_path), "sha256", use_cache=False)
    asked = []
    monkeypatch.setattr(engine, "stat_threads", lambda root, jobs: asked.append((root, jobs)) or 3)
    stated = []
    parallel_lstat = engine._parallel_lstat
    monkeypatch.setattr(engine, "_parallel_lstat", lambda pool, count: lambda entries: stated.append(
        (count, len(entries))) or parallel_lstat(pool, count)(entries))
    hashed_on = set()  # the threads files were hashed on
    hash_file = engine.hash_file
    monkeypatch.setattr(engine, "hash_file", lambda path, algo: hashed_on.add(threading.get_ident()) or hash_file(
        path, algo))
    assert engine.build_manifest(str(tmp_path), "sha256", jobs=5, use_cache=False) == alone
    assert threading.get_ident() not in hashed_on  # small files too: a network filesystem's latency
    hashed_on.clear()
    result = engine.verify_tree(str(tmp_path), expected_of(files), sorted(files), "sha256", jobs=7)
    assert (result["problems"], result["checked"], result["bytes"]) == ([], 101, sum(map(len, files.values())))
    assert hashed_on and threading.get_ident() not in hashed_on
    assert asked == [(str(tmp_path), 5), (str(tmp_path), 7)] and sorted(stated) == [(3, 1), (3, 1), (3, 100), (3, 100)]
    # Every file is hashed on the threads there, and a wrong one is still found.
    (tmp_path / "_derived/d/f042").write_bytes(b"xy")  # same size, other bytes
    result = engine.verify_tree(str(tmp_path), expected_of(files), sorted(files), "sha256", jobs=7)
    assert result["problems"] == [["_derived/d/f042", "content differs from the source manifest"]]


def test_run_jobs_runs_each_job_once_and_raises_what_one_raises() -> None:
    for workers in (1, 4):
        done = []
        engine.run_jobs(done.append, range(3 * engine.POOL_BATCH + 5), workers)
        assert sorted(done) == list(range(3 * engine.POOL_BATCH + 5))

        def fails_at_600(job: int) -> None:
            if job == 600:
                raise OSError(errno.EIO, "unreadable")
        with pytest.raises(OSError):
            engine.run_jobs(fails_at_600, range(1000), workers)


class _Entry:
    """A DirEntry's stat(), as _parallel_lstat calls it: what it returns names the entry and the
    thread that asked; `fails` raises instead, as for a file gone since the listing."""

    def __init__(self, name: str, fails: bool = False):
        self.name, self.fails = name, fails

    def stat(self, follow_symlinks: bool = True) -> tuple[str, int]:
        if self.fails:
            raise FileNotFoundError(errno.ENOENT, "gone", self.name)
        return self.name, threading.get_ident()


def test_parallel_stats_keep_the_order_and_raise_what_any_thread_meets() -> None:
    """A directory of PARALLEL_STAT_MIN files or more is stated on the pool's threads, a smaller
    one on the scanning thread; either way in the listing's order."""
    names = [f"f{i:03d}" for i in range(200)]
    here = threading.get_ident()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        lstat_all = engine._parallel_lstat(pool, 4)
        many = lstat_all([_Entry(n) for n in names])
        assert [name for name, _ in many] == names and here not in {thread for _, thread in many}
        few = lstat_all([_Entry(n) for n in names[:engine.PARALLEL_STAT_MIN - 1]])
        assert few == [(n, here) for n in names[:engine.PARALLEL_STAT_MIN - 1]]
        with pytest.raises(FileNotFoundError):
            lstat_all([_Entry(n, fails=n == "f150") for n in names])


@pytest.mark.parametrize("final_sort", [True, False])
def test_walk_and_manifest_come_in_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              final_sort: bool) -> None:
    """Sorted by the whole path, where "a/b" sorts after "a.txt" and "a-x/c" but before "a0": the
    walk yields that order itself (a directory sorts as its name plus "/"), and the manifest keeps
    it. Without build_manifest's final sort (which then only confirms it) the order is the same."""
    names = ["records.parquet", "a/b", "a.txt", "a-x/c", "a0", "a/b.c/d", "a/b-c", "_derived/x/y", "_derived.txt",
             "_derived/x.y", "_derived/x-/z", "Z", "é/é", "a/b0/e", "a/b.c/d.e/f"]
    write(tmp_path, {name: name.encode() for name in names})
    assert [rel for batch in engine.walk_batches(str(tmp_path)) for rel, _, _, _ in batch] == sorted(names)
    if not final_sort:
        monkeypatch.setattr(engine, "_first", lambda entry: 0)  # every key equal: the sort keeps the walk's order
    entries = engine.build_manifest(str(tmp_path), "sha256", use_cache=False)
    assert [e[0] for e in entries] == sorted(names)
    assert all(e[5] == sha(e[0].encode()) for e in entries)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_first_scan_caches_every_file_in_path_order_with_big_files_hashed_on_threads(tmp_path: Path,
                                                                                    jobs: int) -> None:
    """Small files are put in the walk's order and become the cache's columns as they are; big
    ones, hashed on threads, may finish out of turn and are merged in by path."""
    files = {f"_derived/d{i % 3}/f{i:02d}": b"%d" % i for i in range(30)}
    files.update({f"_derived/d{i}/big": bytes([i]) * (engine.READ_CHUNK + i) for i in range(3)})
    ds = Dataset(tmp_path, {"records.parquet": b"PAR1", **files})
    digests = ds.manifest(jobs=jobs)
    cache = engine.HashCache(str(ds.cache_dir), str(ds.root), "sha256")
    assert cache.paths == sorted(digests)
    assert {rel: digest for rel, (_, digest) in loaded_cache(cache).items()} == digests


def test_the_collector_is_paused_during_a_scan_and_back_after_the_last_overlapping_one() -> None:
    assert gc.isenabled()
    first, second = engine.gc_paused(), engine.gc_paused()
    first.__enter__()
    assert not gc.isenabled()
    second.__enter__()  # another scan, overlapping (threads)
    first.__exit__(None, None, None)
    assert not gc.isenabled(), "the collector came back while a scan still ran"
    second.__exit__(None, None, None)
    assert gc.isenabled()
    gc.disable()  # whoever turned it off keeps it off
    try:
        with engine.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_scan_that_fails_leaves_the_collector_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "records.parquet").write_bytes(b"x")

    def fail(*_: Any) -> None:
        assert not gc.isenabled()  # the scan ran paused
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(engine, "walk_batches", fail)
    with pytest.raises(OSError):
        engine.build_manifest(str(tmp_path), "sha256", use_cache=False)
    assert gc.isenabled()


def test_manifest_entries(tmp_path: Path) -> None:
    files = {"records.parquet": b"PAR1", "_derived/a": b"derived", ".events.log": b"a\nb\nhalf"}
    write(tmp_path, files)
    os.symlink("records.parquet", tmp_path / "link")
    entries = engine.build_manifest(str(tmp_path), "sha256", use_cache=False)
    assert entries == [
        [".events.log", ".events.log", 8, OLD * 10**9, "file", sha(files[".events.log"])],
        ["_derived/a", "_derived", 7, OLD * 10**9, "file", sha(b"derived")],
        ["link", "_auxiliary", len("records.parquet"), (tmp_path / "link").lstat().st_mtime_ns, "symlink", ""],
        ["records.parquet", "primary", 4, OLD * 10**9, "file", sha(b"PAR1")],
    ]


def test_manifest_hash_sections_and_jobs(tmp_path: Path) -> None:
    files = {f"_derived/f{i:03d}": os.urandom(i * 37) for i in range(60)} | {"records.parquet": b"p"}
    write(tmp_path, files)
    calls: list[tuple[int, int]] = []
    entries = engine.build_manifest(str(tmp_path), "sha256", jobs=4, use_cache=False,
                                    progress=lambda n, b: calls.append((n, b)))
    assert {e[0]: e[5] for e in entries} == {p: sha(d) for p, d in files.items()}
    assert sorted(calls)[-1] == (61, sum(len(d) for d in files.values()))
    partial = engine.build_manifest(str(tmp_path), "sha256", use_cache=False, hash_sections={"primary"})
    assert {e[0]: e[5] for e in partial} == {p: (sha(d) if p == "records.parquet" else "") for p, d in files.items()}


def test_xxh3_when_available(tmp_path: Path) -> None:
    write(tmp_path, {"records.parquet": b"PAR1"})
    if engine.xxhash is None:
        with pytest.raises(engine.AgentError):
            engine.build_manifest(str(tmp_path), "xxh3_128", use_cache=False)
        return
    entries = engine.build_manifest(str(tmp_path), "xxh3_128", use_cache=False)
    assert entries[0][5] == engine.xxhash.xxh3_128(b"PAR1").hexdigest()
    assert engine.hash_algos() == ["xxh3_128", "sha256"]


# --- the hash cache -----------------------------------------------------------------------------


class Dataset:
    """A dataset dir and its hash cache, with ways to read and forge cache entries."""

    def __init__(self, tmp_path: Path, files: dict[str, bytes] | None = None):
        self.root = tmp_path / "ds"
        self.cache_dir = tmp_path / "cache"
        write(self.root, files or {"records.parquet": b"PAR1-primary", "_derived/a": b"derived-a"})

    @property
    def cache_path(self) -> Path:
        return Path(engine.HashCache(str(self.cache_dir), str(self.root), "sha256").path)

    def manifest(self, **kw: Any) -> dict[str, str]:
        entries = engine.build_manifest(str(self.root), "sha256", cache_dir=str(self.cache_dir), **kw)
        return {e[0]: e[5] for e in entries}

    def remember(self, proven: dict[str, list], stats: dict[str, list] | None = None) -> None:
        """engine.remember_digests on this dataset's cache ({relpath: [inode, size, mtime_ns,
        digest]}), saved as its owner would."""
        cache = engine.HashCache(str(self.cache_dir), str(self.root), "sha256")
        engine.remember_digests(cache, [(rel, *known) for rel, known in proven.items()], stats)
        cache.save()

    def document(self) -> dict[str, Any]:
        return marshal.loads(self.cache_path.read_bytes())

    def entries(self) -> dict[str, tuple[bytes, str]]:
        doc = self.document()
        return cache_entries(doc["paths"], doc["keys"], doc["digests"])

    def cached(self) -> dict[str, list]:
        """Entries as [size, mtime_ns, ctime_ns, inode, digest]."""
        return {rel: [*engine.CACHE_KEY.unpack(key), digest] for rel, (key, digest) in self.entries().items()}

    def forge(self, rel: str, key: list[int] | None = None, **doc: Any) -> None:
        """Replace `rel`'s cache entry by FORGED under `key` (default: the file's current key)."""
        entries = self.entries()
        entries[rel] = (engine.cache_key(key or self.key(rel)), FORGED)
        self.cache_path.write_bytes(marshal.dumps({**self.document(), **cache_columns(entries), **doc}, 4))

    def key(self, rel: str) -> list[int]:
        st = os.lstat(self.root / rel)
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def test_cache_stores_settled_files_with_their_full_key(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    assert ds.manifest() == {"records.parquet": sha(b"PAR1-primary"), "_derived/a": sha(b"derived-a")}
    assert ds.cached() == {
        "records.parquet": ds.key("records.parquet") + [sha(b"PAR1-primary")],
        "_derived/a": ds.key("_derived/a") + [sha(b"derived-a")],
    }
    doc = ds.document()
    assert (doc["format"], doc["root"], doc["algo"]) == (engine.CACHE_FORMAT, str(ds.root), "sha256")
    assert set(doc) == {"format", "root", "algo", "paths", "keys", "digests"}  # no st_dev anywhere


def test_cached_digest_is_reused_when_the_whole_key_matches(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    ds.manifest()
    ds.forge("_derived/a")
    assert ds.manifest()["_derived/a"] == FORGED  # reused, not rehashed
    assert ds.cached()["_derived/a"][4] == FORGED  # and kept


@pytest.mark.parametrize("component", ["size", "mtime_ns", "ctime_ns", "inode"])
def test_any_key_component_mismatch_rehashes(tmp_path: Path, component: str) -> None:
    ds = Dataset(tmp_path)
    ds.manifest()
    key = ds.key("_derived/a")
    key[["size", "mtime_ns", "ctime_ns", "inode"].index(component)] += 1
    ds.forge("_derived/a", key)
    assert ds.manifest()["_derived/a"] == sha(b"derived-a")
    assert ds.cached()["_derived/a"] == ds.key("_derived/a") + [sha(b"derived-a")]


def test_same_size_rewrite_with_restored_mtime_is_rehashed(tmp_path: Path) -> None:
    """The classic in-place rewrite: same length, mtime put back. ctime gives it away."""
    ds = Dataset(tmp_path)
    ds.manifest()
    before = ds.key("_derived/a")
    time.sleep(0.01)  # ctime has ns resolution, but be sure the clock moved
    write(ds.root, {"_derived/a": b"derived-B"})  # same size, same (restored) mtime
    after = ds.key("_derived/a")
    assert (after[0], after[1], after[3]) == (before[0], before[1], before[3]) and after[2] != before[2]
    assert ds.manifest()["_derived/a"] == sha(b"derived-B")


def test_size_change_is_rehashed(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    ds.manifest()
    ds.forge("_derived/a")
    write(ds.root, {"_derived/a": b"derived-a-longer"})
    assert ds.manifest()["_derived/a"] == sha(b"derived-a-longer")


def test_mtime_change_alone_is_rehashed(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    ds.manifest()
    ds.forge("_derived/a")
    os.utime(ds.root / "_derived/a", (OLD + 60, OLD + 60))
    assert ds.manifest()["_derived/a"] == sha(b"derived-a")


def test_ctime_change_alone_is_rehashed(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    ds.manifest()
    time.sleep(0.01)
    ds.forge("_derived/a")
    mtime_before = ds.key("_derived/a")[1]
    os.chmod(ds.root / "_derived/a", 0o600)  # changes ctime only
    assert ds.key("_derived/a")[1] == mtime_before
    assert ds.manifest()["_derived/a"] == sha(b"derived-a")


def test_inode_change_is_rehashed(tmp_path: Path) -> None:
    """A same-content, same-mtime copy renamed over the file: a new inode is a new file."""
    ds = Dataset(tmp_path)
    ds.manifest()
    ds.forge("_derived/a")
    old_ino = ds.key("_derived/a")[3]
    copy = ds.root / "_derived" / "a.new"
    shutil.copy2(ds.root / "_derived/a", copy)
    os.replace(copy, ds.root / "_derived/a")
    assert ds.key("_derived/a")[3] != old_ino
    assert ds.manifest()["_derived/a"] == sha(b"derived-a")


def test_racy_files_are_hashed_but_not_cached(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    write(ds.root, {"_derived/fresh": b"just written"}, mtime=None)
    assert ds.manifest()["_derived/fresh"] == sha(b"just written")
    assert "_derived/fresh" not in ds.cached()
    assert "_derived/a" in ds.cached()
    # Once settled (older than the racy window) it is cached.
    os.utime(ds.root / "_derived/fresh", (OLD, OLD))
    ds.manifest()
    assert ds.cached()["_derived/fresh"][4] == sha(b"just written")


def test_racy_window_is_two_seconds(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    now = time.time()
    write(ds.root, {"_derived/edge-in": b"1"}, mtime=None)
    write(ds.root, {"_derived/edge-out": b"2"}, mtime=None)
    os.utime(ds.root / "_derived/edge-in", (now - 1, now - 1))
    os.utime(ds.root / "_derived/edge-out", (now - 10, now - 10))
    ds.manifest()
    assert "_derived/edge-in" not in ds.cached()
    assert "_derived/edge-out" in ds.cached()


def test_events_log_is_never_cached(tmp_path: Path) -> None:
    ds = Dataset(tmp_path, {".events.log": b"a\nb\n", "records.parquet": b"p"})
    ds.manifest()
    assert ".events.log" not in ds.cached()
    entries = engine.build_manifest(str(ds.root), "sha256", cache_dir=str(ds.cache_dir))
    assert entries[0] == [".events.log", ".events.log", 4, OLD * 10**9, "file", sha(b"a\nb\n")]  # hashed again
    assert ".events.log" not in ds.cached()


@pytest.mark.parametrize("garbage", [
    b"\x00\xff not marshal", b"", marshal.dumps([]), marshal.dumps({"format": 2}), marshal.dumps({"format": 2})[:-3],
    marshal.dumps({"format": 99, "entries": {}}), marshal.dumps({"format": 2, "root": "R", "algo": "sha256", "entries": []}),
    b'{"format": 1, "root": "R", "algo": "sha256", "entries": {}}',  # the old JSON format
])
def test_corrupt_cache_file_is_ignored_and_rebuilt(tmp_path: Path, garbage: bytes) -> None:
    ds = Dataset(tmp_path)
    ds.manifest()
    ds.cache_path.write_bytes(garbage)
    assert ds.manifest() == {"records.parquet": sha(b"PAR1-primary"), "_derived/a": sha(b"derived-a")}
    assert ds.cached()["_derived/a"][4] == sha(b"derived-a")


def test_cache_columns_of_a_good_file_are_taken(tmp_path: Path) -> None:
    """The file the next test breaks, first whole: so each of its cases fails for its own reason."""
    ds = Dataset(tmp_path, {"records.parquet": b"PAR1", "_derived/a": b"a", "_derived/b": b"b"})
    ds.manifest()
    ds.forge("_derived/a")
    assert ds.manifest()["_derived/a"] == FORGED


@pytest.mark.parametrize("damage", ["unsorted", "duplicate", "short key", "long digest", "bytes path", "int path",
                                    "keys as str", "paths as tuple"])
def test_malformed_cache_columns_are_ignored(tmp_path: Path, damage: str) -> None:
    """A lookup bisects the paths and slices the keys and digests by position: columns that are not
    sorted, unique str paths with one key and one digest each are not used at all."""
    ds = Dataset(tmp_path, {"records.parquet": b"PAR1", "_derived/a": b"a", "_derived/b": b"b"})
    ds.manifest()
    ds.forge("_derived/a")
    doc = ds.document()
    paths, keys, digests = doc["paths"], doc["keys"], doc["digests"]
    assert paths == ["_derived/a", "_derived/b", "records.parquet"]
    size = engine.KEY_SIZE
    damaged = {
        "unsorted": {"paths": [paths[1], paths[0], paths[2]]},
        "duplicate": {"paths": [paths[0], paths[0], paths[2]]},
        "short key": {"keys": keys[:-1]},
        "long digest": {"digests": digests + b"\0" * 3},
        "bytes path": {"paths": [p.encode() for p in paths]},
        "int path": {"paths": [paths[0], 7, paths[2]]},
        "keys as str": {"keys": keys[:size].hex()},
        "paths as tuple": {"paths": tuple(paths)},
    }[damage]
    ds.cache_path.write_bytes(marshal.dumps({**doc, **damaged}, 4))
    assert not engine.HashCache(str(ds.cache_dir), str(ds.root), "sha256").loaded_ok
    assert ds.manifest() == {"records.parquet": sha(b"PAR1"), "_derived/a": sha(b"a"), "_derived/b": sha(b"b")}
    assert ds.document()["paths"] == paths  # rebuilt


def format_3_entry(ds: Dataset, rel: str, digest: str = FORGED) -> tuple[str, bytes, str]:
    return rel, engine.cache_key(ds.key(rel)), digest


@pytest.mark.parametrize("bad_entry", [(1, 2), "digest", None, [0, 0, 0, 0, 7], "key+7", "flat", "list", "unpacked",
                                       "format 2", "other path", "short digest", "not hex"])
def test_malformed_format_3_entries_are_left_out_when_converted(tmp_path: Path, bad_entry: Any) -> None:
    ds = Dataset(tmp_path)
    key = ds.key("_derived/a")
    packed = engine.cache_key(key)
    forged = {"key+7": ("_derived/a", packed, 7), "flat": ("_derived/a", packed + FORGED.encode()),
              "list": ["_derived/a", packed, FORGED], "unpacked": ("_derived/a", tuple(key), FORGED),
              "format 2": (packed, FORGED),  # a format 2 entry, keys packed, in a format 3 file
              "other path": ("records.parquet", packed, FORGED),  # would rename the entry
              "short digest": ("_derived/a", packed, FORGED[:-2]), "not hex": ("_derived/a", packed, "x" * 64)}
    entries = {"_derived/a": forged.get(bad_entry, bad_entry) if isinstance(bad_entry, str) else bad_entry,
               "records.parquet": format_3_entry(ds, "records.parquet")}
    write_format(ds, 3, {"format": 3, "root": str(ds.root), "algo": "sha256", "entries": entries})
    assert ds.manifest() == {"records.parquet": FORGED, "_derived/a": sha(b"derived-a")}  # the good one converted


def write_format(ds: Dataset, cache_format: int, doc: dict[str, Any]) -> Path:
    path = Path(engine.HashCache.path_for(str(ds.cache_dir), str(ds.root), "sha256", cache_format))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(marshal.dumps(doc, 4))
    return path


@pytest.mark.parametrize("cache_format", [2, 3])
def test_an_older_format_is_converted_not_rehashed_and_left_to_older_versions(tmp_path: Path,
                                                                            cache_format: int) -> None:
    """Format 2 kept each key as a tuple of four ints, in a file without a version in its name;
    format 3 a dict of (path, packed key, hex digest). Their digests still count (a large dataset
    must not be reread because the cache's layout changed). Each format has a file of its own: an
    older usrsync still running on the account (a cron job's venv) keeps reading its own, instead
    of both rehashing everything in turn."""
    ds = Dataset(tmp_path)
    if cache_format == 2:
        entries: dict[str, Any] = {"_derived/a": (tuple(ds.key("_derived/a")), FORGED),
                                   "records.parquet": ((1, 2), sha(b"PAR1-primary"))}  # malformed: rehashed
    else:
        entries = {"_derived/a": format_3_entry(ds, "_derived/a"),
                   "records.parquet": ("records.parquet", b"short", sha(b"PAR1-primary"))}  # malformed: rehashed
    old = {"format": cache_format, "root": str(ds.root), "algo": "sha256", "entries": entries}
    path = write_format(ds, cache_format, old)
    assert path != ds.cache_path and ds.cache_path.name.endswith(".v4.marshal")
    assert path.name.endswith(".marshal" if cache_format == 2 else ".v3.marshal")
    assert ds.manifest() == {"records.parquet": sha(b"PAR1-primary"), "_derived/a": FORGED}
    assert ds.document()["format"] == engine.CACHE_FORMAT == 4
    assert ds.cached() == {"records.parquet": ds.key("records.parquet") + [sha(b"PAR1-primary")],
                           "_derived/a": ds.key("_derived/a") + [FORGED]}
    assert marshal.loads(path.read_bytes()) == old  # untouched
    ds.forge("_derived/a", key=[0, 0, 0, 0])  # the current format's file wins once it exists
    assert ds.manifest()["_derived/a"] == sha(b"derived-a")


def test_format_3_is_read_before_format_2(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    write_format(ds, 2, {"format": 2, "root": str(ds.root), "algo": "sha256",
                         "entries": {"_derived/a": (tuple(ds.key("_derived/a")), sha(b"format 2"))}})
    write_format(ds, 3, {"format": 3, "root": str(ds.root), "algo": "sha256",
                         "entries": {"_derived/a": format_3_entry(ds, "_derived/a")}})
    assert ds.manifest()["_derived/a"] == FORGED


def test_a_file_whose_key_does_not_fit_is_hashed_every_time_and_never_cached(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    future = 2**63 + 10**9  # an mtime in ns past the year 2262: no int64 holds it
    try:
        os.utime(ds.root / "_derived/a", ns=(future, future))
    except OSError:
        pytest.skip("this filesystem does not store such a timestamp")
    if os.lstat(ds.root / "_derived/a").st_mtime_ns != future:
        pytest.skip("this filesystem clamps the timestamp")
    assert engine.cache_key(ds.key("_derived/a")) is None
    assert ds.manifest() == {"records.parquet": sha(b"PAR1-primary"), "_derived/a": sha(b"derived-a")}
    assert sorted(ds.cached()) == ["records.parquet"]
    assert ds.manifest()["_derived/a"] == sha(b"derived-a")


@pytest.mark.parametrize("doc", [{"root": "/some/other/dataset"}, {"algo": "xxh3_128"}, {"format": 0}])
def test_cache_of_another_dataset_or_algorithm_is_ignored(tmp_path: Path, doc: dict[str, Any]) -> None:
    ds = Dataset(tmp_path)
    ds.manifest()
    ds.forge("_derived/a", **doc)
    assert ds.manifest()["_derived/a"] == sha(b"derived-a")


def test_caches_are_per_dataset_and_algorithm(tmp_path: Path) -> None:
    paths = {engine.HashCache(str(tmp_path), root, algo).path
             for root in ("/d/a", "/d/b") for algo in ("sha256", "xxh3_128")}
    assert len(paths) == 4


def test_no_cache_rehashes_and_writes_nothing(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    ds.manifest()
    ds.forge("_derived/a")
    assert ds.manifest(use_cache=False)["_derived/a"] == sha(b"derived-a")
    assert ds.cached()["_derived/a"][4] == FORGED  # untouched


def test_unwritable_cache_dir_does_not_fail_the_scan(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    ds.cache_dir.write_text("a file where the cache dir should be")
    assert ds.manifest()["_derived/a"] == sha(b"derived-a")


def test_trusted_digest_used_only_when_the_inode_matches(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    size, mtime_ns, _, ino = ds.key("_derived/a")

    def scanned(path: str, known: list) -> str:
        return ds.manifest(use_cache=False, trusted=trusted_digests({path: known}))["_derived/a"]

    assert scanned("_derived/a", [ino, size, mtime_ns, FORGED]) == FORGED
    assert scanned("_derived/a", [ino + 1, size, mtime_ns, FORGED]) == sha(b"derived-a")
    assert scanned("other", [ino, size, mtime_ns, FORGED]) == sha(b"derived-a")
    # Same inode, but rewritten since it was verified: the trusted digest no longer applies.
    assert scanned("_derived/a", [ino, size, mtime_ns - 1, FORGED]) == sha(b"derived-a")


def test_racy_file_is_rehashed_even_when_trusted_and_never_cached(tmp_path: Path) -> None:
    """Git's racy rule wins over trust: a file inside the window is read again, and not cached."""
    ds = Dataset(tmp_path)
    write(ds.root, {"_derived/fresh": b"just written"}, mtime=None)
    size, mtime_ns, _, ino = ds.key("_derived/fresh")
    trusted = trusted_digests({"_derived/fresh": [ino, size, mtime_ns, FORGED]})
    assert ds.manifest(trusted=trusted)["_derived/fresh"] == sha(b"just written")
    assert "_derived/fresh" not in ds.cached()


def test_a_trusted_digest_serves_the_scan_and_is_not_cached(tmp_path: Path) -> None:
    """Trusted digests are those of files staging linked: their ctime moves again when staging
    goes, so a key put now would be stale; the transfer remembers them after promotion."""
    ds = Dataset(tmp_path)
    size, mtime_ns, _, ino = ds.key("_derived/a")
    assert ds.manifest(trusted=trusted_digests({"_derived/a": [ino, size, mtime_ns, FORGED]}))["_derived/a"] == FORGED
    assert "_derived/a" not in ds.cached() and "records.parquet" in ds.cached()


def test_a_borrowed_cache_serves_several_scans_and_is_saved_by_its_owner(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    ds.manifest()
    saved = ds.cache_path.stat()
    cache = engine.HashCache(str(ds.cache_dir), str(ds.root), "sha256")
    ds.forge("_derived/a")  # on disk only: the loaded object does not see it
    (ds.root / "records.parquet").unlink()
    first = engine.build_manifest(str(ds.root), "sha256", cache=cache)
    assert {e[0]: e[5] for e in first} == {"_derived/a": sha(b"derived-a")}
    cache.add([("_derived/a", engine.cache_key(ds.key("_derived/a")), FORGED)])  # what this object knows now
    second = engine.build_manifest(str(ds.root), "sha256", cache=cache)
    assert {e[0]: e[5] for e in second} == {"_derived/a": FORGED}  # the second scan used the first's
    assert ds.entries()["_derived/a"][1] == FORGED  # the forged file, untouched
    cache.save()
    assert sorted(ds.cached()) == ["_derived/a"] and ds.cache_path.stat().st_ino != saved.st_ino


def test_after_a_scan_the_cache_holds_one_copy_of_each_path(tmp_path: Path) -> None:
    """On a hit the entry takes the cache's path string, and a miss puts the entry's own: cache and
    manifest never hold two copies of one path."""
    ds = Dataset(tmp_path, {"records.parquet": b"PAR1", "_derived/a": b"a", "_derived/b": b"b"})
    ds.manifest()
    write(ds.root, {"_derived/b": b"B"})  # a miss: kept under the scan's string
    cache = engine.HashCache(str(ds.cache_dir), str(ds.root), "sha256")
    assert cache.loaded_ok
    loaded = {path: path for path in cache.paths}
    entries = engine.build_manifest(str(ds.root), "sha256", cache=cache)
    assert cache.paths == sorted(e[0] for e in entries if e[1] != ".events.log")
    paths = {e[0]: e[0] for e in entries}
    assert all(path is paths[path] for path in cache.paths)
    assert [e[0] is loaded[e[0]] for e in entries] == [True, False, True]  # _derived/b missed


@pytest.mark.parametrize("change", ["none", "removed", "added", "replaced", "all"])
def test_a_scan_keeps_what_it_met_and_what_it_put_in_path_order(tmp_path: Path, change: str) -> None:
    """The columns after a scan: the unchanged entries in place, a removed file's entry gone, a new or
    rehashed one merged in at its place. Many files, so the splice runs over real stretches."""
    files = {f"_derived/d{i % 7}/f{i:03d}": b"%d" % i for i in range(300)}
    ds = Dataset(tmp_path, {"records.parquet": b"PAR1", **files})
    ds.manifest()
    before = ds.entries()
    expected = dict(before)
    if change in ("removed", "all"):
        for rel in ("_derived/d0/f000", "_derived/d3/f150", "records.parquet"):
            (ds.root / rel).unlink()
            del expected[rel]
    if change in ("added", "all"):
        write(ds.root, {"_derived/d0/f000a": b"new", "_derived/d9/z": b"z", "_auxiliary/x": b"x"})
    if change in ("replaced", "all"):
        write(ds.root, {"_derived/d2/f002": b"other", "_derived/d6/f299": b"other too"})
    digests = ds.manifest()
    for rel in set(digests) - set(expected) | ({"_derived/d2/f002", "_derived/d6/f299"} & set(digests)):
        expected[rel] = (engine.cache_key(ds.key(rel)), sha((ds.root / rel).read_bytes()))
    doc = ds.document()
    assert doc["paths"] == sorted(expected) and ds.entries() == expected
    cache = engine.HashCache(str(ds.cache_dir), str(ds.root), "sha256")
    assert loaded_cache(cache) == expected


def counting_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the engine hashes from now on, in order."""
    hashed: list[str] = []
    real = engine.hash_file

    def counted(path: str, *args: Any, **kw: Any) -> Any:
        hashed.append(path)
        return real(path, *args, **kw)

    monkeypatch.setattr(engine, "hash_file", counted)
    return hashed


def test_a_warm_scan_takes_each_unchanged_directory_from_the_cache_at_once(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The daily no-op: every run of files the cache holds unchanged is taken in one piece, with
    no per-file lookup and nothing hashed, and the entries are the ones a per-file scan gives."""
    files = {f"_derived/d{i % 4}/f{i:03d}": b"%d" % i for i in range(200)}
    ds = Dataset(tmp_path, {"records.parquet": b"PAR1", "meta.md": b"m", "notes/x": b"x", **files})
    first = engine.build_manifest(str(ds.root), "sha256", cache_dir=str(ds.cache_dir))
    saved = ds.cache_path.stat().st_ino

    def no_single_lookups(*_: Any) -> None:
        raise AssertionError("a per-file cache lookup in a no-op scan")

    monkeypatch.setattr(engine.HashCache, "get", no_single_lookups)
    hashed = counting_hashes(monkeypatch)
    assert engine.build_manifest(str(ds.root), "sha256", cache_dir=str(ds.cache_dir)) == first
    assert hashed == []
    assert ds.cache_path.stat().st_ino == saved  # every entry met: nothing to save


@pytest.mark.parametrize("change", ["rewritten", "added", "removed", "racy"])
def test_a_run_with_a_change_is_looked_up_file_by_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       change: str) -> None:
    """One changed file in a directory: that directory is looked up file by file, so only the
    changed file is hashed, its neighbours still come from the cache (forged digests prove it),
    and the other directories are still taken whole."""
    files = {f"_derived/d{i % 3}/f{i:02d}": b"%d" % i for i in range(30)}
    ds = Dataset(tmp_path, {"records.parquet": b"PAR1", **files})
    ds.manifest()
    ds.forge("_derived/d1/f01")  # a neighbour of the change, taken from the cache
    ds.forge("_derived/d2/f02")  # in an unchanged directory
    target = "_derived/d1/f04"
    if change == "rewritten":
        write(ds.root, {target: b"rewritten"})
    elif change == "added":
        target = "_derived/d1/f04a"
        write(ds.root, {target: b"new"})
    elif change == "removed":
        (ds.root / target).unlink()
    else:
        write(ds.root, {target: b"4"}, mtime=None)  # same bytes, mtime now: inside the racy window
    hashed = counting_hashes(monkeypatch)
    digests = ds.manifest()
    assert digests["_derived/d1/f01"] == FORGED and digests["_derived/d2/f02"] == FORGED
    assert [os.path.relpath(path, ds.root) for path in hashed] == ([] if change == "removed" else [target])
    if change != "removed":
        assert digests[target] == sha((ds.root / target).read_bytes())
    else:
        assert target not in digests


def test_a_warm_scan_leaves_sections_out_of_hash_sections_unhashed(tmp_path: Path) -> None:
    ds = Dataset(tmp_path, {"records.parquet": b"PAR1", "_derived/a": b"a", "_derived/b": b"b"})
    ds.manifest()
    assert ds.manifest(hash_sections={"primary"}) == {"records.parquet": sha(b"PAR1"), "_derived/a": "",
                                                      "_derived/b": ""}


def test_a_run_whose_key_does_not_pack_is_looked_up_file_by_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ds = Dataset(tmp_path, {"records.parquet": b"PAR1", "_derived/a": b"aa", "_derived/b": b"b"})
    ds.manifest()
    ds.forge("_derived/a")
    real_pack = engine.CACHE_KEY

    class Unpackable:
        size = real_pack.size

        @staticmethod
        def pack(*values: int) -> bytes:
            if values[0] == 1:  # _derived/b's size: as if its mtime were past the year 2262
                raise engine.struct.error("out of range")
            return real_pack.pack(*values)

    monkeypatch.setattr(engine, "CACHE_KEY", Unpackable)
    digests = ds.manifest()
    assert digests["_derived/a"] == FORGED and digests["_derived/b"] == sha(b"b")


def test_puts_in_any_order_land_in_path_order_and_the_last_put_wins(tmp_path: Path) -> None:
    """Digests are put in the order hashing finishes (threads, remember's dict): the columns are
    merged by path all the same, several puts between two old entries included."""
    ds = Dataset(tmp_path, {"a": b"a", "m": b"m", "z": b"z"})
    ds.manifest()
    cache = engine.HashCache(str(ds.cache_dir), str(ds.root), "sha256")
    key = engine.cache_key([1, 2, 3, 4])
    digest = {name: hashlib.sha256(name.encode()).hexdigest() for name in ("b", "c", "d", "m", "0", "zz")}
    cache.add([(name, key, digest[name]) for name in ("d", "zz", "b", "m", "0", "c")])
    cache.add([("c", key, FORGED)])
    got = loaded_cache(cache)
    assert list(got) == cache.paths == ["0", "a", "b", "c", "d", "m", "z", "zz"]
    assert got["c"] == (key, FORGED) and got["m"] == (key, digest["m"]) and got["a"][1] == sha(b"a")
    cache.save()
    assert ds.entries() == got


def test_remembered_digests_are_cached_with_the_full_key_and_the_rest_kept(tmp_path: Path) -> None:
    """A transfer's reread proves a file's digest; the next scan then takes it from the cache."""
    ds = Dataset(tmp_path)
    ds.manifest()
    write(ds.root, {"_derived/moved": b"moved bytes", "_derived/fresh": b"racy"})
    write(ds.root, {"_derived/fresh": b"racy"}, mtime=None)
    size, mtime_ns, _, ino = ds.key("_derived/moved")
    fresh = ds.key("_derived/fresh")
    ds.remember({
        "_derived/moved": [ino, size, mtime_ns, FORGED],
        "_derived/fresh": [fresh[3], fresh[0], fresh[1], FORGED],  # racy: never cached
        "_derived/gone": [1, 2, 3, FORGED],
    })
    cached = ds.cached()
    assert cached["_derived/moved"] == ds.key("_derived/moved") + [FORGED]
    assert "_derived/fresh" not in cached and "_derived/gone" not in cached
    assert cached["_derived/a"] == ds.key("_derived/a") + [sha(b"derived-a")]
    assert ds.manifest()["_derived/moved"] == FORGED  # taken from the cache, not read


def test_remembered_digests_take_their_keys_from_the_live_trees_check(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The check of the promoted tree has just stat'ed every file: its stats make the keys, and only
    a path it lacks is looked up again. A key seen there that no longer holds is simply a miss."""
    ds = Dataset(tmp_path, {"records.parquet": b"PAR1", "_derived/a": b"a", "_derived/b": b"b"})
    size, mtime_ns, ctime_ns, ino = ds.key("_derived/a")
    b_size, b_mtime_ns, _, b_ino = ds.key("_derived/b")
    stats = {"_derived/a": [ino, size, mtime_ns, ctime_ns + 7]}  # a ctime no lstat would give
    looked_up = []
    real_lstat = os.lstat

    def lstat(path: Any, *args: Any, **kw: Any) -> Any:
        looked_up.append(os.path.relpath(path, ds.root))
        return real_lstat(path, *args, **kw)

    monkeypatch.setattr(engine.os, "lstat", lstat)
    ds.remember({"_derived/a": [ino, size, mtime_ns, FORGED], "_derived/b": [b_ino, b_size, b_mtime_ns, FORGED]},
                stats)
    monkeypatch.undo()
    assert looked_up == ["_derived/b"]
    cached = ds.cached()
    assert cached["_derived/a"] == [size, mtime_ns, ctime_ns + 7, ino, FORGED]
    assert cached["_derived/b"] == ds.key("_derived/b") + [FORGED]
    assert ds.manifest()["_derived/a"] == sha(b"a")  # the stats' key is not the file's: read again


def test_an_update_replaces_a_held_entry_in_place_and_queues_a_new_path(tmp_path: Path) -> None:
    """What a transfer remembers is nearly always a path the cache holds: its key and digest are
    replaced where they are, and only a new path waits for add() to merge it in path order."""
    ds = Dataset(tmp_path, {"records.parquet": b"PAR1", "_derived/a": b"a", "_derived/c": b"c"})
    ds.manifest()
    cache = engine.HashCache(str(ds.cache_dir), str(ds.root), "sha256")
    held, new = engine.CACHE_KEY.pack(1, 2, 3, 4), engine.CACHE_KEY.pack(5, 6, 7, 8)
    cache.update("_derived/a", held, FORGED)
    cache.update("_derived/b", new, FORGED)
    assert cache._added[0] == ["_derived/b"] and cache.dirty
    assert loaded_cache(cache)["_derived/a"] == (held, FORGED)
    cache.add(())
    cache.save()
    assert loaded_cache(engine.HashCache(str(ds.cache_dir), str(ds.root), "sha256")) == {
        "records.parquet": loaded_cache(cache)["records.parquet"], "_derived/a": (held, FORGED),
        "_derived/b": (new, FORGED), "_derived/c": loaded_cache(cache)["_derived/c"]}


@pytest.mark.parametrize("stale", ["inode", "size", "mtime"])
def test_a_file_changed_since_its_reread_is_not_remembered(tmp_path: Path, stale: str) -> None:
    ds = Dataset(tmp_path)
    size, mtime_ns, _, ino = ds.key("_derived/a")
    proven = {"inode": [ino + 1, size, mtime_ns], "size": [ino, size + 1, mtime_ns],
              "mtime": [ino, size, mtime_ns - 1]}[stale]
    ds.remember({"_derived/a": [*proven, FORGED]})
    assert ds.manifest()["_derived/a"] == sha(b"derived-a")


# --- locks ----------------------------------------------------------------------------------


def new_lock(tmp_path: Path, txid: str, timeout: float = 300, flock: bool = True) -> engine.Lock:
    lock = engine.Lock(str(tmp_path / "locks"), "ds", txid, timeout)
    lock.use_flock = flock
    return lock


def plant_lock(tmp_path: Path, age: float, **holder: Any) -> Path:
    """A lock file some other process left: holder info, heartbeat `age` seconds old."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "user": "someone",
            "started": "2026-01-01T00:00:00Z", "txid": "T-other", "purpose": "sync", **holder}
    path = tmp_path / "locks" / "ds.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    return proc.pid


def test_acquire_and_release(tmp_path: Path) -> None:
    lock = new_lock(tmp_path, "T1").acquire()
    try:
        info = json.loads(Path(lock.path).read_text())
        assert (info["txid"], info["pid"], info["host"], info["purpose"], info["flock"]) == (
            "T1", os.getpid(), socket.gethostname(), "sync", True)
        assert lock.broken is None
    finally:
        lock.release()
    assert not os.path.lexists(lock.path)
    assert lock.fd is None


@pytest.mark.parametrize("flock", [True, False])
def test_busy_lock_names_its_holder(tmp_path: Path, flock: bool) -> None:
    first = new_lock(tmp_path, "T1", flock=flock).acquire()
    try:
        os.utime(first.path, (time.time() - 5,) * 2)  # past the fresh-file grace, within the timeout
        with pytest.raises(engine.AgentError) as info:
            new_lock(tmp_path, "T2", flock=flock).acquire(0)
        err = info.value
        assert err.kind == "locked"
        assert err.detail["holder"]["txid"] == "T1"
        assert err.message == f"locked by {engine.describe_holder(err.detail['holder'])}"
        assert f"pid {os.getpid()}" in err.message and "(txid T1)" in err.message
    finally:
        first.release()


def test_stale_heartbeat_is_broken_and_reported(tmp_path: Path) -> None:
    plant_lock(tmp_path, age=1000)
    lock = new_lock(tmp_path, "T2", timeout=300).acquire(0)
    try:
        assert lock.broken is not None
        assert lock.broken["holder"]["txid"] == "T-other"
        assert 990 <= lock.broken["age_seconds"] <= 1100
        assert json.loads(Path(lock.path).read_text())["txid"] == "T2"
    finally:
        lock.release()
    assert not list((tmp_path / "locks").iterdir())  # the stale file was not left aside


def test_racing_breakers_of_one_stale_lock_leave_exactly_one_holder(tmp_path: Path) -> None:
    """Eight contenders see the same dead holder at once: one takes the lock, the rest are refused."""
    plant_lock(tmp_path, age=1000)
    contenders = [new_lock(tmp_path, f"T{i}", timeout=300) for i in range(8)]
    start = threading.Barrier(len(contenders))
    outcomes: dict[str, str] = {}

    def contend(lock: engine.Lock) -> None:
        start.wait(5)
        try:
            lock.acquire(0.5)
            outcomes[lock.txid] = "held"
        except engine.AgentError as exc:
            outcomes[lock.txid] = exc.kind

    threads = [threading.Thread(target=contend, args=(lock,)) for lock in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    try:
        holders = [txid for txid, outcome in outcomes.items() if outcome == "held"]
        assert len(holders) == 1, outcomes
        assert sorted(set(outcomes.values())) == ["held", "locked"]
        assert json.loads(Path(contenders[0].path).read_text())["txid"] == holders[0]
    finally:
        for lock in contenders:
            if outcomes.get(lock.txid) == "held":
                lock.release()


def test_dead_local_pid_is_stale(tmp_path: Path) -> None:
    plant_lock(tmp_path, age=0, pid=dead_pid())
    lock = new_lock(tmp_path, "T2").acquire(0)
    try:
        assert lock.broken is not None and lock.broken["holder"]["txid"] == "T-other"
    finally:
        lock.release()


def test_live_holder_on_another_host_is_not_broken_while_its_heartbeat_is_fresh(tmp_path: Path) -> None:
    """No flock is visible across hosts on many cluster filesystems: only the heartbeat counts."""
    plant_lock(tmp_path, age=10, host="login2.cluster", pid=dead_pid())
    with pytest.raises(engine.AgentError) as info:
        new_lock(tmp_path, "T2").acquire(0)
    assert info.value.detail["holder"]["host"] == "login2.cluster"
    plant_lock(tmp_path, age=400, host="login2.cluster")
    lock = new_lock(tmp_path, "T3").acquire(0)
    lock.release()
    assert lock.broken["holder"]["host"] == "login2.cluster"


def test_flocked_holder_on_this_host_without_its_flock_is_dead(tmp_path: Path) -> None:
    """A live pid that no longer holds the flock it took is not the holder (pid reuse): stale."""
    plant_lock(tmp_path, age=10, pid=1, flock=True)
    lock = new_lock(tmp_path, "T2").acquire(0)
    lock.release()
    assert lock.broken is not None and lock.broken["holder"]["pid"] == 1


def test_live_holder_that_took_no_flock_is_not_broken(tmp_path: Path) -> None:
    """A holder on a filesystem without flock never had one: a free flock says nothing about it."""
    plant_lock(tmp_path, age=10, pid=1)
    with pytest.raises(engine.AgentError) as info:
        new_lock(tmp_path, "T2").acquire(0)
    assert info.value.detail["holder"]["pid"] == 1


def test_without_flock_exclusion_still_holds(tmp_path: Path) -> None:
    first = new_lock(tmp_path, "T1", flock=False).acquire()
    try:
        os.utime(first.path, (time.time() - 30,) * 2)
        second = new_lock(tmp_path, "T2", flock=False)
        with pytest.raises(engine.AgentError) as info:
            second.acquire(0.2)
        assert info.value.kind == "locked"
        assert second.broken is None
    finally:
        first.release()


def test_wait_acquires_once_the_holder_releases(tmp_path: Path) -> None:
    first = new_lock(tmp_path, "T1").acquire()
    releaser = threading.Timer(0.3, first.release)
    releaser.start()
    try:
        second = new_lock(tmp_path, "T2").acquire(wait=20)
    finally:
        releaser.join(10)
    try:
        assert second.broken is None
        assert json.loads(Path(second.path).read_text())["txid"] == "T2"
    finally:
        second.release()


def test_wait_expires_on_a_live_holder(tmp_path: Path) -> None:
    first = new_lock(tmp_path, "T1").acquire()
    try:
        started = time.monotonic()
        with pytest.raises(engine.AgentError):
            new_lock(tmp_path, "T2").acquire(wait=0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        first.release()


def test_heartbeat_refreshes_the_lock_file(tmp_path: Path) -> None:
    lock = new_lock(tmp_path, "T1", timeout=2).acquire()  # heartbeat every 0.5 s
    try:
        os.utime(lock.path, (OLD, OLD))
        deadline = time.monotonic() + 10
        while os.stat(lock.path).st_mtime < time.time() - 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.stat(lock.path).st_mtime > time.time() - 60
    finally:
        lock.release()


def test_release_leaves_a_lock_someone_else_took_over(tmp_path: Path) -> None:
    lock = new_lock(tmp_path, "T1").acquire()
    Path(lock.path).write_text(json.dumps({"txid": "T-new"}))
    lock.release()
    assert json.loads(Path(lock.path).read_text()) == {"txid": "T-new"}


# --- staging, verification, promotion, recovery -------------------------------------------------

DATASET = "grp/ds"
TXID = "20260101T000000Z-0badcafe"
OLD_TREE = {"records.parquet": b"PAR1-old", "meta.md": b"# m\n", "_derived/ns/a": b"aaaa", "notes/x": b"x"}
NEW_TREE = {"records.parquet": b"PAR1-new", "meta.md": b"# m\n", "_derived/ns/a": b"aaaa", "_derived/ns/b": b"bbbb"}
SUB = "_derived/ns"  # a promotion root: only this directory of OLD_TREE changes
NEW_SUB = {"a": b"aaaa", "b": b"bbbb"}
OLD_WITH_NEW_SUB = {**OLD_TREE, **{f"{SUB}/{k}": v for k, v in NEW_SUB.items()}}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    b = tmp_path / "base"
    write(b / DATASET, OLD_TREE)
    return b


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_of(files: dict[str, bytes]) -> dict[str, list]:
    """verify_tree's `expected` columns for a tree of these files."""
    return columns({p: [len(d), sha(d)] for p, d in files.items()})


def columns(by_path: dict[str, list]) -> dict[str, list]:
    paths = sorted(by_path)
    return {"paths": paths, "sizes": [by_path[p][0] for p in paths], "digests": [by_path[p][1] for p in paths]}


def staged(base: Path, link: list[str]) -> Path:
    reply = engine.stage(str(base), DATASET, TXID, link)
    assert reply["linked"] == len(link)
    return Path(reply["staging"])


def test_stage_seeds_hard_links(base: Path) -> None:
    staging = staged(base, ["_derived/ns/a", "meta.md"])
    assert staging == base / ".usrsync" / "staging" / f"grp%2Fds.{TXID}"
    assert tree(staging) == {"_derived/ns/a": b"aaaa", "meta.md": b"# m\n"}
    for rel in ("_derived/ns/a", "meta.md"):
        assert (staging / rel).stat().st_ino == (base / DATASET / rel).stat().st_ino


def test_stage_links_files_of_directories_met_again_and_of_any_name(base: Path) -> None:
    """Path order leaves a directory's files on both sides of its subdirectories' (a/b/x,
    a/b/c/z, a/b/y): each run is linked relative to its directories, whatever the names."""
    files = {"a/b/x": b"x", "a/b/c/z": b"z", "a/b/y": b"y", "a/b/\u00e9t\u00e9.bin": b"e", "top.txt": b"t"}
    write(base / DATASET, files)
    link = sorted(files)
    staging = staged(base, link)
    assert tree(staging) == files
    assert all((staging / rel).stat().st_ino == (base / DATASET / rel).stat().st_ino for rel in link)


def test_stage_follows_a_dataset_directory_that_is_a_symlink(base: Path, tmp_path: Path) -> None:
    """Datasets kept on another disk are often linked into the root: that one symlink is followed."""
    scratch = tmp_path / "scratch"
    (base / DATASET).rename(scratch)
    os.symlink(scratch, base / DATASET)
    staging = staged(base, ["meta.md", "_derived/ns/a"])
    assert (staging / "meta.md").stat().st_ino == (scratch / "meta.md").stat().st_ino
    assert (staging / "_derived/ns/a").stat().st_ino == (scratch / "_derived/ns/a").stat().st_ino


def test_stage_refuses_a_live_directory_swapped_for_a_symlink(base: Path, tmp_path: Path) -> None:
    """A directory replaced by a symlink since the scan is not followed: nothing elsewhere is linked."""
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere, {"a": b"secret"})
    shutil.rmtree(base / DATASET / "_derived" / "ns")
    os.symlink(elsewhere, base / DATASET / "_derived" / "ns")
    with pytest.raises(OSError):
        engine.stage(str(base), DATASET, TXID, ["_derived/ns/a"])
    assert (elsewhere / "a").stat().st_nlink == 1


@pytest.mark.parametrize(("rel", "why"), [("../escape", "'.', '..' or empty component"),
                                          ("/etc/passwd", "absolute path")])
def test_stage_refuses_unsafe_paths(base: Path, rel: str, why: str) -> None:
    with pytest.raises(engine.AgentError) as info:
        engine.stage(str(base), DATASET, TXID, [rel])
    assert (info.value.kind, info.value.message) == ("unsafe_path", f"refusing to stage {rel!r}: {why}")


@pytest.mark.parametrize(("make", "kind"), [(lambda p: os.symlink("/etc/passwd", p), "symlink"),
                                            (os.mkfifo, "special")], ids=["symlink", "fifo"])
def test_stage_links_a_non_file_as_itself_and_verification_rejects_it(base: Path, make: Any, kind: str) -> None:
    """No lstat before each link (it cost ~15% of staging): linkat() links a symlink or FIFO
    itself, never opening or following it, and the check that gates promotion rejects it."""
    make(base / DATASET / "evil")
    staging = staged(base, ["evil"])
    assert (staging / "evil").lstat().st_ino == (base / DATASET / "evil").lstat().st_ino
    result = engine.verify_tree(str(staging), columns({"evil": [11, sha(b"root:x:0:0")]}), ["evil"], "sha256")
    assert (result["problems"], result["checked"]) == ([["evil", f"not a regular file ({kind})"]], 0)


def test_stage_refuses_to_link_a_directory(base: Path) -> None:
    with pytest.raises(PermissionError):
        engine.stage(str(base), DATASET, TXID, ["notes"])


def test_verify_accepts_the_exact_tree(base: Path) -> None:
    root = base / DATASET
    result = engine.verify_tree(str(root), expected_of(OLD_TREE), ["records.parquet", "notes/x"], "sha256")
    assert result["problems"] == []
    assert (result["checked"], result["bytes"]) == (2, len(OLD_TREE["records.parquet"]) + 1)
    stats = {rel: (root / rel).stat() for rel in OLD_TREE}
    tree = engine.VerifiedTree(expected_of(OLD_TREE), result["stats"])
    assert len(result["stats"]) == len(OLD_TREE) * engine.TREE_STAT.size
    assert {rel: tree.get(rel) for rel in OLD_TREE} == \
        {rel: (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for rel, st in stats.items()}
    assert {rel: tree.get(rel) for rel in reversed(OLD_TREE)} == {rel: tree.get(rel) for rel in OLD_TREE}  # any order
    assert (tree.get("not/expected"), tree.digest("records.parquet")) == (None, sha(OLD_TREE["records.parquet"]))


def test_verify_reports_every_kind_of_problem(base: Path) -> None:
    root = base / DATASET
    expected = columns({p: [len(d), sha(d)] for p, d in OLD_TREE.items()} | {"missing": [1, sha(b"m")]})
    write(root, {"records.parquet": b"PAR1-OLD", "meta.md": b"# m, longer\n", "unexpected": b"?"})
    (root / "notes/x").unlink()
    os.symlink("/etc/passwd", root / "notes/x")
    result = engine.verify_tree(str(root), expected, ["records.parquet", "meta.md", "notes/x", "_derived/ns/a"],
                                "sha256")
    assert result["problems"] == [
        ["meta.md", "size 12, expected 4"],
        ["missing", "missing"],
        ["notes/x", "not a regular file (symlink)"],
        ["records.parquet", "content differs from the source manifest"],
        ["unexpected", "unexpected file"],
    ]
    assert result["checked"] == 2  # the bad ones are not reread


def test_verify_finds_a_file_replaced_by_another_of_the_same_size(base: Path) -> None:
    """As many files as expected, all of their sizes, in one directory: one is still the wrong one."""
    root = base / DATASET
    (root / "_derived/ns/a").rename(root / "_derived/ns/z")
    result = engine.verify_tree(str(root), expected_of(OLD_TREE), [], "sha256")
    assert result["problems"] == [["_derived/ns/a", "missing"], ["_derived/ns/z", "unexpected file"]]


def test_verify_without_reread_checks_sizes_only(base: Path) -> None:
    root = base / DATASET
    write(root, {"records.parquet": b"PAR1-OLD"})  # same size
    assert engine.verify_tree(str(root), expected_of(OLD_TREE), [], "sha256")["problems"] == []


def test_verify_does_not_follow_a_planted_directory_symlink(base: Path, tmp_path: Path) -> None:
    root = base / DATASET
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(root / "_derived"), elsewhere)
    os.symlink(elsewhere, root / "_derived")
    result = engine.verify_tree(str(root), expected_of(OLD_TREE), ["_derived/ns/a"], "sha256")
    assert result["problems"] == [["_derived", "not a regular file (symlink)"], ["_derived/ns/a", "missing"]]
    assert result["checked"] == 0


def test_promote_exchanges_and_removes_the_old_tree(base: Path) -> None:
    staging = staged(base, ["_derived/ns/a", "meta.md"])
    write(staging, {"records.parquet": NEW_TREE["records.parquet"], "_derived/ns/b": NEW_TREE["_derived/ns/b"]})
    assert engine.promote(str(base), DATASET, TXID) == {"method": "exchange"}
    assert tree(base / DATASET) == NEW_TREE
    assert os.listdir(base / ".usrsync" / "staging") == []
    assert os.listdir(base / ".usrsync" / "journal") == []


def test_promote_bootstrap_renames(tmp_path: Path) -> None:
    base = tmp_path / "base"
    staging = Path(engine.stage(str(base), DATASET, TXID, [])["staging"])
    write(staging, NEW_TREE)
    assert engine.promote(str(base), DATASET, TXID) == {"method": "rename"}
    assert tree(base / DATASET) == NEW_TREE


def no_exchange(a: str, b: str) -> None:
    """The platform seam replaced (not the filesystem): an OS without an atomic exchange."""
    raise OSError(errno.ENOSYS, "no atomic exchange on this platform")


def test_promote_falls_back_to_a_journaled_rename_pair(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "exchange", no_exchange)
    staging = staged(base, ["meta.md"])
    write(staging, {k: v for k, v in NEW_TREE.items() if k != "meta.md"})
    assert engine.promote(str(base), DATASET, TXID) == {"method": "rename-pair"}
    assert tree(base / DATASET) == NEW_TREE
    assert os.listdir(base / ".usrsync" / "staging") == []


# --- promoting one directory of the dataset ------------------------------------------------------


def staged_subtree(base: Path) -> Path:
    """Staging for SUB: its unchanged file linked, its new file written (as rsync would)."""
    reply = engine.stage(str(base), DATASET, TXID, [f"{SUB}/a"], SUB)
    assert reply["linked"] == 1
    staging = Path(reply["staging"])
    write(staging, {"b": NEW_SUB["b"]})
    return staging


def inodes(root: Path, rels: list[str]) -> dict[str, int]:
    return {rel: (root / rel).stat().st_ino for rel in rels}


class Died(BaseException):
    """The process killed at a pause point (a BaseException: no handler on the way catches it)."""


def die_at(monkeypatch: pytest.MonkeyPatch, phase: str) -> None:
    def checkpoint(reached: str) -> None:
        if reached == phase:
            raise Died(phase)

    monkeypatch.setattr(engine, "checkpoint", checkpoint)


def test_stage_mirrors_only_the_subtree(base: Path) -> None:
    (base / DATASET / ".usr.lock").write_bytes(b"")
    staging = staged_subtree(base)
    assert tree(staging) == NEW_SUB
    assert (staging / "a").stat().st_ino == (base / DATASET / SUB / "a").stat().st_ino
    assert not (staging / ".usr.lock").exists()  # USR's locks stay where they are, at the dataset's top


@pytest.mark.parametrize(("link", "subtree", "message"), [
    (["notes/x"], SUB, "refusing to stage 'notes/x': not below '_derived/ns'"),
    (["_derived/nsx/a"], SUB, "refusing to stage '_derived/nsx/a': not below '_derived/ns'"),
    ([], "../other", "refusing subtree '../other': '.', '..' or empty component"),
    ([], "/etc", "refusing subtree '/etc': absolute path"),
])
def test_stage_refuses_paths_outside_the_subtree(base: Path, link: list[str], subtree: str, message: str) -> None:
    with pytest.raises(engine.AgentError) as info:
        engine.stage(str(base), DATASET, TXID, link, subtree)
    assert (info.value.kind, info.value.message) == ("unsafe_path", message)


@pytest.mark.parametrize("call", ["stage", "promote", "verify"])
def test_a_symlink_on_the_way_to_the_subtree_is_never_followed(base: Path, tmp_path: Path, call: str) -> None:
    staging = staged_subtree(base)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(base / DATASET / "_derived"), elsewhere)
    os.symlink(elsewhere, base / DATASET / "_derived")
    shutil.rmtree(staging)
    with pytest.raises(NotADirectoryError) as info:
        if call == "stage":
            engine.stage(str(base), DATASET, TXID, [f"{SUB}/a"], SUB)
        elif call == "promote":
            staging.mkdir()
            engine.promote(str(base), DATASET, TXID, subtree=SUB)
        else:
            engine.Agent(io.BytesIO()).call_verify({"base_dir": str(base), "dataset": DATASET, "txid": TXID,
                                                     "expected": columns({}), "algo": "sha256", "subtree": SUB})
    assert info.value.filename == str(base / DATASET / "_derived")
    assert tree(elsewhere) == {"ns/a": b"aaaa"}
    assert not (base / ".usrsync" / "journal").exists() or os.listdir(base / ".usrsync" / "journal") == []


def test_verify_of_a_subtree_speaks_dataset_relative_paths(base: Path) -> None:
    staging = staged_subtree(base)
    expected = {f"{SUB}/{k}": [len(v), sha(v)] for k, v in NEW_SUB.items()}
    result = engine.verify_tree(str(staging), columns(expected), [f"{SUB}/b"], "sha256", SUB)
    assert (result["problems"], result["checked"], result["bytes"]) == ([], 1, 4)
    tree = engine.VerifiedTree(columns(expected), result["stats"])
    assert tree.get(f"{SUB}/b") == (os.lstat(staging / "b").st_ino, 4, *[getattr(os.lstat(staging / "b"), f)
                                                                          for f in ("st_mtime_ns", "st_ctime_ns")])
    write(staging, {"b": b"BBBB", "c": b"?"})
    result = engine.verify_tree(str(staging), columns({**expected, f"{SUB}/d": [1, sha(b"d")]}), [f"{SUB}/b"],
                                "sha256", SUB)
    assert result["problems"] == [[f"{SUB}/b", "content differs from the source manifest"],
                                  [f"{SUB}/c", "unexpected file"], [f"{SUB}/d", "missing"]]


@pytest.mark.parametrize("method", ["exchange", "rename-pair"])
def test_promote_swaps_only_the_subtree(base: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    live = base / DATASET
    (live / ".usr.lock").write_bytes(b"")
    outside = inodes(live, ["records.parquet", "meta.md", "notes/x", ".usr.lock", ".", "_derived"])
    staging = staged_subtree(base)
    journal = Path(engine.journal_path(str(base), DATASET, TXID))
    journals = []

    def checkpoint(phase: str) -> None:
        if phase == "mid-promote":
            journals.append(json.loads(journal.read_text()))

    monkeypatch.setattr(engine, "checkpoint", checkpoint)
    if method == "rename-pair":
        monkeypatch.setattr(engine, "exchange", no_exchange)
    assert engine.promote(str(base), DATASET, TXID, subtree=SUB) == {"method": method}
    assert tree(live) == {**OLD_WITH_NEW_SUB, ".usr.lock": b""}
    assert inodes(live, list(outside)) == outside  # nothing outside the subtree was touched
    assert journals == [{"live": str(live / SUB), "subtree": SUB, "staging": str(staging),
                         "backup": f"{staging}.old", "txid": TXID}]
    assert os.listdir(staging.parent) == [] and not journal.exists()


def test_a_usr_writer_on_the_dataset_holds_off_a_subtree_promotion(base: Path) -> None:
    """USR's lock is the dataset's `.usr.lock`, whatever directory is swapped."""
    lock = base / DATASET / ".usr.lock"
    lock.write_bytes(b"")
    staging = staged_subtree(base)
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(engine.AgentError) as info:
            engine.promote(str(base), DATASET, TXID, wait=0.2, subtree=SUB)
        assert (info.value.kind, info.value.message) == ("locked", f"a USR writer holds {lock}")
        assert tree(base / DATASET) == {**OLD_TREE, ".usr.lock": b""} and tree(staging) == NEW_SUB
    finally:
        os.close(fd)
    assert engine.promote(str(base), DATASET, TXID, subtree=SUB) == {"method": "exchange"}
    assert tree(base / DATASET) == {**OLD_WITH_NEW_SUB, ".usr.lock": b""}


def test_recover_restores_a_subtree_after_a_crash_between_the_two_renames(base: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    staging = staged_subtree(base)
    die_at(monkeypatch, "mid-promote")
    with pytest.raises(Died):
        engine.promote(str(base), DATASET, TXID, subtree=SUB)  # the journal is written
    os.rename(base / DATASET / SUB, f"{staging}.old")  # the first rename of the pair happened; the second did not
    journal = Path(engine.journal_path(str(base), DATASET, TXID))
    assert engine.recover(str(base), DATASET) == [
        f"restored live dataset directory {SUB} from {staging}.old",
        f"removed journal {journal.name}",
        f"removed leftover staging {staging.name}",
    ]
    assert tree(base / DATASET) == OLD_TREE
    assert os.listdir(staging.parent) == [] and not journal.exists()


def test_recover_keeps_a_promoted_subtree_after_a_crash_after_the_exchange(base: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    staging = staged_subtree(base)
    die_at(monkeypatch, "after-promote")
    with pytest.raises(Died):
        engine.promote(str(base), DATASET, TXID, subtree=SUB)
    assert tree(staging) == {"a": b"aaaa"}  # the old subtree waits in staging
    journal = Path(engine.journal_path(str(base), DATASET, TXID))
    assert engine.recover(str(base), DATASET) == [f"removed journal {journal.name}",
                                                  f"removed leftover staging {staging.name}"]
    assert tree(base / DATASET) == OLD_WITH_NEW_SUB


def test_recover_never_restores_a_subtree_through_a_symlink(base: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The backup is the only copy of the old subtree: refuse loudly rather than move it elsewhere."""
    staging = staged_subtree(base)
    die_at(monkeypatch, "mid-promote")
    with pytest.raises(Died):
        engine.promote(str(base), DATASET, TXID, subtree=SUB)
    os.rename(base / DATASET / SUB, f"{staging}.old")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(base / DATASET / "_derived"), elsewhere)
    os.symlink(elsewhere, base / DATASET / "_derived")
    with pytest.raises(NotADirectoryError):
        engine.recover(str(base), DATASET)
    assert tree(Path(f"{staging}.old")) == {"a": b"aaaa"} and os.listdir(elsewhere) == []


def crash_state(base: Path, txid: str = TXID) -> tuple[Path, Path, Path]:
    """Staging with the new tree and a journal, as promote() leaves them before its first rename."""
    staging = Path(engine.staging_path(str(base), DATASET, txid))
    write(staging, NEW_TREE)
    journal = Path(engine.journal_path(str(base), DATASET, txid))
    live = base / DATASET
    record = {"live": str(live), "staging": str(staging), "backup": str(staging) + ".old", "txid": txid}
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text(json.dumps(record))
    return live, staging, journal


def test_recover_after_a_crash_between_the_two_renames(base: Path) -> None:
    live, staging, journal = crash_state(base)
    os.rename(live, str(staging) + ".old")  # the first rename of the pair happened; the second did not
    repaired = engine.recover(str(base), DATASET)
    assert repaired == [
        f"restored live dataset from {staging}.old",
        f"removed journal {journal.name}",
        f"removed leftover staging {staging.name}",
    ]
    assert tree(live) == OLD_TREE
    assert os.listdir(staging.parent) == [] and not journal.exists()


def test_recover_after_a_crash_after_the_exchange(base: Path) -> None:
    live, staging, journal = crash_state(base)
    engine.exchange(str(staging), str(live))  # promoted; the old tree waits in staging
    repaired = engine.recover(str(base), DATASET)
    assert repaired == [f"removed journal {journal.name}", f"removed leftover staging {staging.name}"]
    assert tree(live) == NEW_TREE


def test_recover_after_a_crash_before_promotion(base: Path) -> None:
    live, staging, journal = crash_state(base)
    engine.recover(str(base), DATASET)
    assert tree(live) == OLD_TREE
    assert not staging.exists() and not journal.exists()


def test_recover_removes_leftover_staging_without_a_journal(base: Path) -> None:
    staging = staged(base, ["meta.md"])
    (staging / "_derived").mkdir()
    (staging / "_derived").chmod(0o500)  # a read-only dir in the leftover does not stop removal
    assert engine.recover(str(base), DATASET) == [f"removed leftover staging {staging.name}"]
    assert not staging.exists()
    assert tree(base / DATASET) == OLD_TREE


def test_a_file_list_is_written_for_rsync_and_a_leftover_one_is_recovered(base: Path) -> None:
    agent = engine.Agent(io.BytesIO())
    args = {"base_dir": str(base), "dataset": DATASET, "txid": TXID}
    path = Path(agent.call_write_file_list({**args, "names": ["_derived", "_derived/a b.parquet", "é"]})["path"])
    assert path == base / ".usrsync" / "tmp" / f"grp%2Fds.{TXID}.files"
    assert path.read_bytes() == "_derived\0_derived/a b.parquet\0é\0".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # a dataset's file names may be private
    agent.call_write_file_list({**args, "names": ["meta.md"]})  # the next batch replaces it
    assert path.read_bytes() == b"meta.md\0"
    assert engine.recover(str(base), DATASET) == [f"removed leftover file list {path.name}"]
    agent.call_write_file_list({**args, "names": []})
    assert agent.call_remove_file_list(args) == {"removed": True} and not path.exists()
    assert agent.call_remove_file_list(args) == {"removed": False}


@pytest.mark.parametrize(("change", "kind"), [
    ({"names": ["a\0b"]}, "bad_request"),  # would split into two names
    ({"names": "meta.md"}, "bad_request"),
    ({"names": [b"meta.md"]}, "bad_request"),
    ({"txid": "x.y"}, "bad_request"),  # recover() tells a dataset's files apart by the dot after the txid
    ({"txid": "../x"}, "bad_request"),
    ({"txid": ""}, "bad_request"),
    ({"dataset": "../elsewhere"}, "unsafe_dataset"),
])
def test_a_malformed_file_list_request_is_refused(base: Path, change: dict, kind: str) -> None:
    args = {"base_dir": str(base), "dataset": DATASET, "txid": TXID, "names": ["meta.md"], **change}
    with pytest.raises(engine.AgentError) as info:
        engine.Agent(io.BytesIO()).call_write_file_list(args)
    assert info.value.kind == kind
    assert not (base / ".usrsync" / "tmp").exists() or os.listdir(base / ".usrsync" / "tmp") == []


def test_recover_leaves_other_datasets_alone(base: Path) -> None:
    """Dataset `grp/ds.v2` shares the prefix `grp%2Fds.` with `grp/ds`: its run is not ours to clean."""
    other = Path(engine.stage(str(base), "grp/ds.v2", TXID, [])["staging"])
    other_journal = Path(engine.journal_path(str(base), "grp/ds.v2", TXID))
    other_journal.parent.mkdir(parents=True)
    other_journal.write_text(json.dumps({"live": str(base / "grp/ds.v2"), "backup": str(other) + ".old"}))
    assert engine.recover(str(base), DATASET) == []
    assert other.is_dir() and other_journal.exists()
    assert engine.recover(str(base), "grp/ds.v2") == [f"removed journal {other_journal.name}",
                                                      f"removed leftover staging {other.name}"]


@pytest.mark.parametrize(("name", "owner"), [
    (f"grp%2Fds.{TXID}", "grp/ds"),
    (f"grp%2Fds.{TXID}.old", "grp/ds"),
    (f"grp%2Fds.{TXID}.json", "grp/ds"),
    (f"grp%2Fds.{TXID}.json.tmp.123.456", "grp/ds"),
    (f"grp%2Fds.v2.{TXID}", "grp/ds.v2"),
    (f"grp%2Fds.v2.{TXID}.old", "grp/ds.v2"),
    (f"grp%2Fds.v2.{TXID}.json", "grp/ds.v2"),
    (f"grp%2Fdsx.{TXID}", None),
    ("grp%2Fds.", None),
])
def test_leftovers_belong_to_exactly_one_dataset(name: str, owner: str | None) -> None:
    for dataset in ("grp/ds", "grp/ds.v2"):
        assert engine._owned_by(name, engine.dataset_key(dataset)) == (dataset == owner), dataset


@pytest.mark.parametrize("forged", ["live-elsewhere", "subtree-escapes", "subtree-mismatch", "subtree-not-text",
                                    "backup-elsewhere"])
def test_recover_never_follows_a_journal_that_points_elsewhere(base: Path, tmp_path: Path, forged: str) -> None:
    """Only `<dataset>/<subtree>` and a backup in our staging dir are ever renamed. Here the live
    directory is missing and its old tree waits as the backup: a journal we followed would move
    something somewhere."""
    victim, nowhere = tmp_path / "victim", tmp_path / "nowhere"
    write(victim, {"keep": b"me"})
    live = base / DATASET / SUB
    staging = engine.staging_path(str(base), DATASET, TXID)
    os.makedirs(os.path.dirname(staging))
    os.rename(live, staging + ".old")
    record = {"live": str(live), "subtree": SUB, "staging": staging, "backup": staging + ".old", "txid": TXID}
    record |= {
        "live-elsewhere": {"live": str(nowhere), "subtree": ""},
        "subtree-escapes": {"live": str(nowhere), "subtree": "../../../nowhere"},
        "subtree-mismatch": {"subtree": "notes"},
        "subtree-not-text": {"subtree": ["_derived", "ns"]},
        "backup-elsewhere": {"backup": str(victim)},
    }[forged]
    journal = Path(engine.journal_path(str(base), DATASET, TXID))
    journal.parent.mkdir(parents=True)
    journal.write_text(json.dumps(record))
    assert engine.recover(str(base), DATASET) == [f"removed leftover staging {Path(staging).name}.old"]
    assert not live.exists() and not nowhere.exists() and tree(victim) == {"keep": b"me"}
    assert journal.exists()  # not ours to act on


def test_recover_drops_a_corrupt_journal(base: Path) -> None:
    journal = Path(engine.journal_path(str(base), DATASET, TXID))
    journal.parent.mkdir(parents=True)
    journal.write_text("{not json")
    assert engine.recover(str(base), DATASET) == []
    assert not journal.exists()
    assert tree(base / DATASET) == OLD_TREE


# --- the agent process: `usrsync_agent.py serve NONCE` over pipes ---------------------------------


def request(rid: int | None, call: str, args: Any) -> bytes:
    body = json.dumps({"id": rid, "call": call, "args": args}).encode()
    return len(body).to_bytes(4, "big") + b"\x00" + body


def serve(stdin: bytes, env: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Run the agent on `stdin` to its end; its exit code and every frame it wrote after the sentinel."""
    proc = subprocess.run([sys.executable, engine.__file__, "serve", "n0nce"], input=stdin, capture_output=True,
                          timeout=60, env={**os.environ, **(env or {})})
    sentinel, _, rest = proc.stdout.partition(b"\n")
    assert sentinel == f"{engine.SENTINEL} {engine.AGENT_VERSION} n0nce".encode()
    stream = io.BytesIO(rest)
    frames = []
    while (frame := engine.read_frame(stream)) is not None:
        frames.append(frame)
    return proc.returncode, frames


def test_serve_answers_calls_and_keeps_going_after_errors(tmp_path: Path) -> None:
    write(tmp_path / "base" / "ds", {"records.parquet": b"PAR1", "_derived/a": b"a"})
    code, frames = serve(
        request(1, "hello", {})
        + request(2, "no_such_call", {})
        + request(3, "hello", [1, 2])
        + request(4, "manifest", {"base_dir": str(tmp_path / "base"), "dataset": "ds", "algo": "sha256",
                                  "cache": False})
        + request(5, "manifest", {"base_dir": str(tmp_path / "missing"), "dataset": "ds", "algo": "sha256"})
        + request(6, "manifest", {"base_dir": str(tmp_path / "base"), "dataset": "../ds", "algo": "sha256"})
    )
    assert code == 0
    hello = frames[0]
    assert (hello["id"], hello["type"], hello["result"]["version"]) == (1, "result", engine.AGENT_VERSION)
    assert hello["result"]["python"] == platform.python_version()
    assert hello["result"]["hash_algos"] == engine.hash_algos()
    assert [(f["id"], f["type"], f.get("error", {}).get("kind")) for f in frames[1:]] == [
        (2, "error", "unknown_call"), (3, "error", "bad_request"), (4, "chunk", None), (4, "result", None),
        (5, "error", "base_dir_missing"), (6, "error", "unsafe_dataset"),
    ]
    assert frames[3]["items"] == [["_derived/a", "_derived", 1, OLD * 10**9, "file", sha(b"a")],
                                  ["records.parquet", "primary", 4, OLD * 10**9, "file", sha(b"PAR1")]]
    assert frames[4]["result"] == {"exists": True, "count": 2, "algo": "sha256", "root": str(tmp_path / "base/ds")}


@pytest.mark.parametrize(("garbage", "kind"), [
    ((engine.MAX_FRAME + 1).to_bytes(4, "big") + b"\x00", "frame_too_large"),
    (b"\x00\x00\x00\x05\x01" + b"notzl", "bad_request"),
    (b"\x00\x00\x00\x04\x00" + b"{no}", "bad_request"),
    (b"\x00\x00\x00\x02\x00" + b"\xff\xfe", "bad_request"),
])
def test_serve_answers_garbage_with_an_error_frame_and_exits(garbage: bytes, kind: str) -> None:
    code, frames = serve(request(1, "hello", {}) + garbage + request(2, "hello", {}))
    assert code == 3
    assert [(f["id"], f["type"]) for f in frames] == [(1, "result"), (None, "error")]
    assert frames[1]["error"]["kind"] == kind


def test_serve_releases_its_locks_when_the_session_ends(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    code, frames = serve(request(1, "lock", {"base_dir": str(base), "dataset": "ds", "txid": "T1"}))
    assert code == 0
    assert frames[0]["result"] == {"path": str(base / ".usrsync/locks/ds.lock"), "broken": None}
    assert not (base / ".usrsync/locks/ds.lock").exists()


def test_promotion_keeps_usr_lock_files_by_inode(tmp_path: Path) -> None:
    """A USR writer's `.usr.lock` and `.events.lock` survive promotion as the same inodes."""
    base = tmp_path / "base"
    live = base / "ds"
    live.mkdir(parents=True)
    (live / "records.parquet").write_bytes(b"old")
    (live / ".usr.lock").write_bytes(b"")
    (live / ".events.lock").write_bytes(b"")
    inodes = {name: (live / name).stat().st_ino for name in (".usr.lock", ".events.lock")}
    staged = engine.stage(str(base), "ds", "T1", [])
    Path(staged["staging"], "records.parquet").write_bytes(b"new")
    engine.promote(str(base), "ds", "T1")
    assert (live / "records.parquet").read_bytes() == b"new"
    assert {name: (live / name).stat().st_ino for name in inodes} == inodes
    assert [e[0] for e in engine.build_manifest(str(live), "sha256", use_cache=False)] == ["records.parquet"]
