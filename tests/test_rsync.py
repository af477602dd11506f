"""rsync.py: version parsing, argv per flavour, output parsing, and real local rsync runs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import rig as rigmod

from usrsync.errors import ConfigError
from usrsync.rsync import (
    EXIT_MEANINGS,
    OUT_FORMAT,
    ItemizedChange,
    RsyncInfo,
    RsyncResult,
    RsyncSetupError,
    build_argv,
    explain_exit,
    list_entries,
    lists_on_remote,
    local_rsync_info,
    parse_out_line,
    parse_version,
    run_rsync,
    security_warning,
)

# --- `rsync --version` samples -------------------------------------------------------------

V350 = """\
rsync  version 3.5.0  protocol version 32
Copyright (C) 1996-2026 by Andrew Tridgell, Wayne Davison, and others.
Web site: https://rsync.samba.org/
Capabilities:
    64-bit files, 64-bit inums, 64-bit timestamps, 64-bit long ints,
    socketpairs, symlinks, symtimes, hardlinks, hardlink-specials,
    hardlink-symlinks, IPv6, atimes, batchfiles, inplace, append, ACLs,
    ACL-at, xattrs, optional secluded-args, iconv, prealloc, stop-at,
    no crtimes
Optimizations:
    SIMD-roll, no asm-roll, openssl-crypto, no asm-MD5
Checksum list:
    xxh128 xxh3 xxh64 (xxhash) md5 md4 sha1 none
Compress list:
    zstd lz4 zlibx zlib none
Daemon auth list:
    sha512 sha256 sha1 md5 md4

rsync comes with ABSOLUTELY NO WARRANTY.  This is free software, and you
are welcome to redistribute it under certain conditions.  See the GNU
General Public Licence for details.
"""

V327 = """\
rsync  version 3.2.7  protocol version 31
Copyright (C) 1996-2022 by Andrew Tridgell, Wayne Davison, and others.
Web site: https://rsync.samba.org/
Capabilities:
    64-bit files, 64-bit inums, 64-bit timestamps, 64-bit long ints,
    socketpairs, symlinks, symtimes, hardlinks, hardlink-specials,
    hardlink-symlinks, IPv6, atimes, batchfiles, inplace, append, ACLs,
    xattrs, optional protect-args, iconv, prealloc, stop-at, no crtimes
Optimizations:
    SIMD-roll, no asm-roll, openssl-crypto, no asm-MD5
Checksum list:
    xxh128 xxh3 xxh64 (xxhash) md5 md4 sha1 none
Compress list:
    zstd lz4 zlibx zlib none
Daemon auth list:
    sha512 sha256 sha1 md5 md4

rsync comes with ABSOLUTELY NO WARRANTY.  This is free software, and you
are welcome to redistribute it under certain conditions.  See the GNU
General Public Licence for details.
"""

V313 = """\
rsync  version 3.1.3  protocol version 31
Copyright (C) 1996-2018 by Andrew Tridgell, Wayne Davison, and others.
Web site: http://rsync.samba.org/
Capabilities:
    64-bit files, 64-bit inums, 64-bit timestamps, 64-bit long ints,
    socketpairs, hardlinks, symlinks, IPv6, batchfiles, inplace,
    append, ACLs, xattrs, iconv, symtimes, prealloc

rsync comes with ABSOLUTELY NO WARRANTY.  This is free software, and you
are welcome to redistribute it under certain conditions.  See the GNU
General Public Licence for details.
"""

V309 = """\
rsync  version 3.0.9  protocol version 30
Copyright (C) 1996-2011 by Andrew Tridgell, Wayne Davison, and others.
Web site: http://rsync.samba.org/
Capabilities:
    64-bit files, 64-bit inums, 64-bit timestamps, 64-bit long ints,
    socketpairs, hardlinks, symlinks, IPv6, batchfiles, inplace,
    append, ACLs, xattrs, iconv, symtimes

rsync comes with ABSOLUTELY NO WARRANTY.  This is free software, and you
are welcome to redistribute it under certain conditions.  See the GNU
General Public Licence for details.
"""

# macOS before Sequoia: /usr/bin/rsync
V269 = """\
rsync  version 2.6.9  protocol version 29
Copyright (C) 1996-2006 by Andrew Tridgell, Wayne Davison, and others.
<http://rsync.samba.org/>
Capabilities: 64-bit files, socketpairs, hard links, symlinks, batchfiles,
              inplace, IPv6, 64-bit system inums, 64-bit internal inums

rsync comes with ABSOLUTELY NO WARRANTY.  This is free software, and you
are welcome to redistribute it under certain conditions.  See the GNU
General Public Licence for details.
"""

# macOS Sequoia: /usr/bin/rsync is openrsync
OPENRSYNC = "openrsync: protocol version 29\nrsync version 2.6.9 compatible\n"


def info(text: str) -> RsyncInfo:
    return parse_version(text)


# --- parse_version ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "version", "protocol", "secluded", "cc"),
    [
        (V350, (3, 5, 0), 32, True, True),
        (V327, (3, 2, 7), 31, True, True),
        (V313, (3, 1, 3), 31, True, False),
        (V309, (3, 0, 9), 30, True, False),
        (V269, (2, 6, 9), 29, False, False),
    ],
)
def test_parse_version_rsync(text: str, version: tuple[int, int, int], protocol: int, secluded: bool, cc: bool):
    i = parse_version(text)
    assert i.flavour == "rsync"
    assert i.version == version
    assert i.protocol == protocol
    assert i.secluded_args is secluded
    assert i.checksum_choice is cc
    assert i.from0 is True
    assert i.raw == text.splitlines()[0]


def test_parse_version_checksum_list():
    assert parse_version(V350).checksums == ("xxh128", "xxh3", "xxh64", "md5", "md4", "sha1", "none")
    assert parse_version(V313).checksums == ()


@pytest.mark.parametrize(
    ("text", "version", "protocol", "raw"),
    [
        (OPENRSYNC, (2, 6, 9), 29, "openrsync: protocol version 29"),
        ("openrsync: protocol version 29\n", (0, 0, 0), 29, "openrsync: protocol version 29"),
        ("rsync version 2.6.9 compatible\n", (2, 6, 9), None, "rsync version 2.6.9 compatible"),
    ],
)
def test_parse_version_openrsync(text: str, version: tuple[int, int, int], protocol: int | None, raw: str):
    i = parse_version(text)
    assert i.flavour == "openrsync"
    assert i.version == version
    assert i.protocol == protocol
    assert (i.secluded_args, i.checksum_choice, i.from0) == (False, False, True)
    assert i.raw == raw


def test_parse_version_variants():
    # "v" prefix (some distro builds), a pre-release suffix, and a login banner in front
    assert parse_version("rsync  version v3.2.3  protocol version 31\n").version == (3, 2, 3)
    assert parse_version("rsync  version 3.2.0dev  protocol version 31.PR2\n").version == (3, 2, 0)
    banner = "Welcome to the HPC cluster\nQuota: 80% used\n" + V327
    i = parse_version(banner)
    assert (i.version, i.raw) == ((3, 2, 7), "rsync  version 3.2.7  protocol version 31")


@pytest.mark.parametrize("text", ["", "bash: rsync: command not found\n", "rsync: unknown option --version"])
def test_parse_version_unknown(text: str):
    with pytest.raises(RsyncSetupError) as exc:
        parse_version(text)
    assert isinstance(exc.value, ConfigError)
    assert "rsync" in exc.value.message and exc.value.hint


def test_security_warning():
    assert security_warning(info(V350)) is None
    assert security_warning(info("rsync  version 3.4.0  protocol version 32")) is None
    for text in (V327, V313, V309, V269):
        w = security_warning(info(text))
        assert w is not None and "3.4.0" in w and "CVE" in w and "\n" not in w
    w = security_warning(info(OPENRSYNC))
    assert w is not None and "openrsync" in w


def test_local_rsync_info():
    i = local_rsync_info()
    assert i.flavour in ("rsync", "openrsync") and i.from0
    with pytest.raises(RsyncSetupError, match="not found"):
        local_rsync_info("/nonexistent/rsync")


# --- build_argv ------------------------------------------------------------------------------

FORBIDDEN = {"-z", "--compress", "-a", "--archive", "-p", "--perms", "-o", "--owner", "-g", "--group", "--delete"}


def argv_for(local: str, remote: str | None, **kw: object) -> list[str]:
    args: dict[str, object] = dict(
        local=info(local),
        remote=info(remote) if remote else None,
        source="host:/base/ds/",
        dest="/root/.usrsync/staging/ds/",
        files_from=Path("/tmp/list0"),
        rsh=None,
        rsync_path=None,
    )
    args.update(kw)
    argv = build_argv(**args)  # type: ignore[arg-type]
    assert not FORBIDDEN & set(argv)
    assert not any(a.startswith("-") and not a.startswith("--") and "z" in a for a in argv)
    return argv


COMMON = [
    "-d",
    "--no-implied-dirs",
    "-t",
    "--checksum",
    "--from0",
    "--files-from=/tmp/list0",
    "--itemize-changes",
    f"--out-format={OUT_FORMAT}",
    "--chmod=ugo=rwX",
    "--partial-dir=.usrsync-partial",
]


def test_argv_350_to_350_exact():
    argv = argv_for(V350, V350, rsh="python -m usrsync.rsh /run/s.sock", rsync_path="/opt/rsync/bin/rsync")
    assert argv == [
        "rsync",
        *COMMON,
        "--secluded-args",
        "--checksum-choice=xxh128",
        "--outbuf=L",
        "--timeout=300",
        "-e",
        "python -m usrsync.rsh /run/s.sock",
        "--rsync-path=/opt/rsync/bin/rsync",
        "--",
        "host:/base/ds/",
        "/root/.usrsync/staging/ds/",
    ]


def test_argv_without_checksum_for_a_destination_with_nothing_to_compare():
    argv = argv_for(V350, V350, checksum=False)
    assert argv == ["rsync", *[a for a in COMMON if a != "--checksum"], "--secluded-args", "--checksum-choice=xxh128",
                    "--outbuf=L", "--timeout=300", "--", "host:/base/ds/", "/root/.usrsync/staging/ds/"]


def test_argv_350_to_313():
    argv = argv_for(V350, V313)
    assert argv == ["rsync", *COMMON, "--protect-args", "--outbuf=L", "--timeout=300", "--",
                    "host:/base/ds/", "/root/.usrsync/staging/ds/"]
    assert not any(a.startswith("--checksum-choice") for a in argv)
    assert "--secluded-args" not in argv


def test_argv_327_both_ends():
    argv = argv_for(V327, V327)
    assert "--secluded-args" in argv and "--checksum-choice=xxh128" in argv


def test_argv_309_both_ends():
    argv = argv_for(V309, V309)
    assert "--protect-args" in argv and "--outbuf=L" not in argv
    assert not any(a.startswith("--checksum-choice") for a in argv)


def test_argv_openrsync_local():
    argv = argv_for(OPENRSYNC, V350)
    assert argv == ["rsync", *COMMON, "--timeout=300", "--", "host:/base/ds/", "/root/.usrsync/staging/ds/"]
    assert not {"-s", "--protect-args", "--secluded-args", "--outbuf=L"} & set(argv)


def test_argv_old_mac_rsync_local():
    argv = argv_for(V269, V350)
    assert not {"-s", "--protect-args", "--secluded-args", "--outbuf=L"} & set(argv)
    assert not any(a.startswith("--checksum-choice") for a in argv)


def test_argv_xxh128_needs_it_compiled_in():
    no_xxhash = V350.replace("xxh128 xxh3 xxh64 (xxhash) md5", "md5")
    assert not any(a.startswith("--checksum-choice") for a in argv_for(V350, no_xxhash))


def test_argv_local_copy_and_options():
    argv = argv_for(
        V350, None, source="/a/src/", dest="/a/dst/", rsync_path="rsync", basis_dir="/a/live",
        dry_run=True, io_timeout=None, partial_dir=".p", binary="/usr/local/bin/rsync",
    )
    assert argv[0] == "/usr/local/bin/rsync"
    assert "--secluded-args" in argv and "--checksum-choice=xxh128" in argv  # both ends are `local`
    assert "--copy-dest=/a/live" in argv and "--dry-run" in argv and "--partial-dir=.p" in argv
    assert not any(a.startswith(("--timeout", "--rsync-path")) for a in argv)
    assert "-e" not in argv
    assert argv[-3:] == ["--", "/a/src/", "/a/dst/"]


def test_a_list_on_the_remote_host_is_named_with_a_leading_colon():
    argv = argv_for(V350, V350, files_from="/base/.usrsync/tmp/ds.tx.files", remote_list=True)
    assert [a for a in argv if a.startswith("--files-from")] == ["--files-from=:/base/.usrsync/tmp/ds.tx.files"]
    # A local list is made absolute: a relative "host:x" would name a remote one.
    local = argv_for(V350, V350, files_from="list:0")
    assert [a for a in local if a.startswith("--files-from")] == [f"--files-from={os.path.abspath('list:0')}"]


def test_only_a_pull_from_a_remote_rsync_reads_its_list_there():
    ours, theirs = info(V350), info(V313)
    assert lists_on_remote(ours, theirs, pull=True)
    assert not lists_on_remote(ours, theirs, pull=False)  # a push's sender is local: so is its list
    assert not lists_on_remote(ours, None, pull=True)  # a local copy: no remote host
    assert not lists_on_remote(info(OPENRSYNC), theirs, pull=True)


def test_argv_requires_from0():
    no_from0 = RsyncInfo(
        flavour="rsync", version=(2, 5, 7), protocol=26, secluded_args=False, checksum_choice=False,
        from0=False, raw="rsync version 2.5.7  protocol version 26",
    )
    with pytest.raises(RsyncSetupError, match="--from0"):
        build_argv(local=no_from0, remote=None, source="/a/", dest="/b/", files_from=Path("/l"),
                   rsh=None, rsync_path=None)


# --- parse_out_line --------------------------------------------------------------------------


def test_parse_out_line_real_lines():
    c = parse_out_line(">f+++++++++ 5 49 a file.txt\n")
    assert c == ItemizedChange(path="a file.txt", item=">f+++++++++", size=5, is_file=True,
                               transferred=True, wire_bytes=49)
    c = parse_out_line("<fcst...... 300002 1057 sub/big.bin")
    assert c is not None and c.transferred and c.is_file and c.size == 300002 and c.path == "sub/big.bin"
    c = parse_out_line(".f..t...... 300000 0 sub/big.bin")
    assert c is not None and c.is_file and not c.transferred
    c = parse_out_line("cd+++++++++ 4096 0 sub/")
    assert c == ItemizedChange(path="sub", item="cd+++++++++", size=4096, is_file=False, transferred=False)
    c = parse_out_line(".d" + " " * 9 + " 4096 0 ./")  # all-unchanged attributes are spaces
    assert c is not None and c.path == "." and c.item == ".d" + " " * 9 and not c.is_file
    c = parse_out_line(">f+++++++ 12 40 9 lives.txt")  # openrsync: 9-char code; name starts with a digit
    assert c is not None and c.path == "9 lives.txt" and c.size == 12 and c.wire_bytes == 40


def test_parse_out_line_escapes():
    c = parse_out_line(r">f+++++++++ 6 0 \#303\#274n\#303\#257 c\#303\#266d\#303\#251.dat")
    assert c is not None and c.path == "ünï cödé.dat"
    c = parse_out_line(r">f+++++++++ 9 0 back\#134#123.txt")  # rsync escapes a literal "\#" too
    assert c is not None and c.path == "back\\#123.txt"
    c = parse_out_line(r">f+++++++++ 1 0 bad\#377name")  # not UTF-8: kept lossless as a surrogate
    assert c is not None and os.fsencode(c.path) == b"bad\xffname"


@pytest.mark.parametrize(
    "line",
    [
        "",
        "created directory /tmp/dst",
        'skipping non-regular file "link"',
        "*deleting   old.txt",
        "rsync: [sender] link_stat \"/x\" failed: No such file or directory (2)",
        "sent 1,234 bytes  received 35 bytes  2,538.00 bytes/sec",
    ],
)
def test_parse_out_line_other_lines(line: str):
    assert parse_out_line(line) is None


# --- exit codes ------------------------------------------------------------------------------


def test_exit_meanings():
    for code in (0, 1, 2, 3, 5, 10, 11, 12, 13, 14, 20, 21, 22, 23, 24, 25, 30, 35, 255):
        assert code in EXIT_MEANINGS
        assert explain_exit(code).startswith(f"rsync exit {code}: {EXIT_MEANINGS[code]}")
    assert "clean" in explain_exit(2)
    assert "unknown" in explain_exit(99)
    assert explain_exit(-signal.SIGKILL) == "rsync was killed by SIGKILL"


# --- list entries ----------------------------------------------------------------------------


def test_a_whole_directory_is_one_list_entry_however_its_files_interleave():
    files = ["a/f1", "a/sub/x", "a/z", "b/one", "top"]
    assert list_entries(files, {"a"}) == [("a/", 2), ("a/sub/x", 1), ("b/one", 1), ("top", 1)]
    assert list_entries(files, {"a", "a/sub", "b"}) == [("a/", 2), ("a/sub/", 1), ("b/", 1), ("top", 1)]
    assert list_entries(files, set()) == [(f, 1) for f in files]


# --- real local runs -------------------------------------------------------------------------

needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")

NAMES = ["with space.txt", "ünïcödé-名前.dat", "sub/dir/nested.bin"]
MTIME = 1_700_000_000


def write_list(path: Path, names: list[str]) -> Path:
    path.write_bytes(b"".join(os.fsencode(n) + b"\0" for n in names))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub" / "dir").mkdir(parents=True)
    dst.mkdir()
    for i, name in enumerate(NAMES):
        p = src / name
        p.write_bytes(os.urandom(1000 * (i + 1) + 7))
        os.utime(p, (MTIME + i, MTIME + i))
    (src / "not-listed.txt").write_text("stays behind")
    return {"src": src, "dst": dst, "list": write_list(tmp_path / "files0", NAMES), "tmp": tmp_path}


def local_argv(t: dict[str, Path], **kw: object) -> list[str]:
    local = local_rsync_info()
    return build_argv(local=local, remote=None, source=f"{t['src']}/", dest=f"{t['dst']}/",
                      files_from=t["list"], rsh=None, rsync_path=None, **kw)  # type: ignore[arg-type]


@needs_rsync
def test_run_copies_listed_files(tree: dict[str, Path]):
    seen: list[ItemizedChange] = []
    r = run_rsync(local_argv(tree), on_change=seen.append)
    assert r.exit_code == 0, r.stderr_tail
    assert not r.cancelled and r.pid
    total = 0
    for i, name in enumerate(NAMES):
        s, d = tree["src"] / name, tree["dst"] / name
        assert d.read_bytes() == s.read_bytes()
        assert int(d.stat().st_mtime) == MTIME + i
        total += s.stat().st_size
    assert not (tree["dst"] / "not-listed.txt").exists()
    assert r.files == 3 and r.bytes == total
    assert sorted(c.path for c in r.changes if c.transferred) == sorted(NAMES)
    assert seen == r.changes
    assert not (tree["dst"] / ".usrsync-partial").exists()


@needs_rsync
def test_second_run_transfers_only_the_changed_file(tree: dict[str, Path]):
    assert run_rsync(local_argv(tree)).exit_code == 0
    # Same size, same mtime, different bytes: only --checksum notices.
    target = tree["src"] / NAMES[2]
    data = bytearray(target.read_bytes())
    data[10] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, (MTIME + 2, MTIME + 2))
    r = run_rsync(local_argv(tree))
    assert r.exit_code == 0, r.stderr_tail
    assert r.files == 1 and r.bytes == len(data)
    assert [c.path for c in r.changes if c.transferred] == [NAMES[2]]
    assert (tree["dst"] / NAMES[2]).read_bytes() == bytes(data)
    # and a third run has nothing to do
    r = run_rsync(local_argv(tree))
    assert (r.exit_code, r.files, r.bytes, r.changes) == (0, 0, 0, [])


@needs_rsync
def test_dry_run_and_copy_dest(tree: dict[str, Path]):
    r = run_rsync(local_argv(tree, dry_run=True))
    assert r.exit_code == 0 and r.files == 3
    assert not any((tree["dst"] / n).exists() for n in NAMES)
    # With the previous tree as basis, identical files are copied locally, not "transferred".
    live = tree["tmp"] / "live"
    shutil.copytree(tree["src"], live, copy_function=shutil.copy2)
    (tree["src"] / NAMES[0]).write_bytes(b"new content")
    r = run_rsync(local_argv(tree, basis_dir=str(live)))
    assert r.exit_code == 0, r.stderr_tail
    assert [c.path for c in r.changes if c.transferred] == [NAMES[0]]
    for name in NAMES:
        assert (tree["dst"] / name).read_bytes() == (tree["src"] / name).read_bytes()


@needs_rsync
def test_missing_source_is_exit_23(tree: dict[str, Path]):
    write_list(tree["list"], [NAMES[0], "missing-file.txt"])
    r = run_rsync(local_argv(tree))
    assert r.exit_code == 23
    assert "missing-file.txt" in r.stderr_tail
    assert r.files == 1
    assert "partial transfer" in explain_exit(r.exit_code)


@needs_rsync
def test_usage_error_is_returned_not_raised(tree: dict[str, Path]):
    argv = local_argv(tree)
    argv.insert(1, "--no-such-option")
    r = run_rsync(argv)
    assert r.exit_code == 1 and "no-such-option" in r.stderr_tail


def test_missing_binary(tmp_path: Path):
    with pytest.raises(RsyncSetupError):
        run_rsync([str(tmp_path / "no-rsync"), "--version"])


def live_group_members(pgid: int) -> list[int]:
    """Non-zombie processes of a process group, from /proc."""
    return [pid for pid in rigmod.pids()
            if (fields := rigmod.proc_stat(pid)) and int(fields[2]) == pgid and fields[0] not in ("Z", "X")]


@needs_rsync
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_cancel_kills_the_process_group(tree: dict[str, Path]):
    big = tree["src"] / "big.bin"
    big.write_bytes(os.urandom(8 * 1024 * 1024))
    write_list(tree["list"], ["big.bin"])
    argv = local_argv(tree)
    argv.insert(1, "--bwlimit=64")  # KiB/s: ~2 minutes for 8 MiB
    cancel = threading.Event()
    box: dict[str, RsyncResult] = {}
    worker = threading.Thread(target=lambda: box.update(r=run_rsync(argv, cancel=cancel)))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive()
    t0 = time.monotonic()
    cancel.set()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert time.monotonic() - t0 < 5
    r = box["r"]
    assert r.cancelled and r.exit_code != 0 and r.pid
    assert r.files == 0  # the file was never completed, so it is not reported
    assert live_group_members(r.pid) == []
    # zombies of orphaned children vanish once init reaps them
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(r.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "process group still exists"
        time.sleep(0.05)
    assert not (tree["dst"] / "big.bin").exists()


def test_cancel_before_start(tree: dict[str, Path]):
    cancel = threading.Event()
    cancel.set()
    r = run_rsync(["rsync", "--version"], cancel=cancel)
    assert r.cancelled and r.pid is None


@needs_rsync
def test_callback_error_stops_and_propagates(tree: dict[str, Path]):
    def boom(change: ItemizedChange) -> None:
        raise RuntimeError(f"callback failed on {change.path}")

    with pytest.raises(RuntimeError, match="callback failed"):
        run_rsync(local_argv(tree), on_change=boom)


@needs_rsync
async def test_runs_in_a_worker_thread(tree: dict[str, Path]):
    r = await asyncio.to_thread(run_rsync, local_argv(tree), env={"USRSYNC_TEST": "1"})
    assert r.exit_code == 0 and r.files == 3


def rsync_processes_mentioning(marker: str) -> list[int]:
    """Live (non-zombie) rsync processes whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if b"rsync" in cmdline and marker.encode() in cmdline and state not in (b"Z", b"X"):
                found.append(int(entry))
    return found


@needs_rsync
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_rsync_dies_with_a_killed_orchestrator(tree: dict[str, Path]):
    (tree["src"] / "big.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    write_list(tree["list"], ["big.bin"])
    argv = local_argv(tree)
    argv.insert(1, "--bwlimit=64")
    script = "import sys, json; from usrsync.rsync import run_rsync; run_rsync(json.loads(sys.argv[1]))"
    orchestrator = subprocess.Popen([sys.executable, "-c", script, json.dumps(argv)])
    try:
        deadline = time.monotonic() + 10
        while not rsync_processes_mentioning(str(tree["src"])):
            assert time.monotonic() < deadline, "rsync did not start"
            time.sleep(0.05)
        orchestrator.kill()
        orchestrator.wait(10)
        deadline = time.monotonic() + 10
        while left := rsync_processes_mentioning(str(tree["src"])):
            assert time.monotonic() < deadline, f"rsync left running: {left}"
            time.sleep(0.05)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
            orchestrator.wait(10)


@needs_rsync
def test_a_listed_directory_with_a_slash_moves_its_own_files_only(tmp_path: Path):
    """What sync relies on for plan.whole_dirs: under -d, "dir/" copies the files directly in
    dir, creates its subdirectories empty, and skips a symlink, without failing the run."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d" / "sub").mkdir(parents=True)
    dst.mkdir()
    for name in ("d/a", "d/b", "d/sub/deep", "top"):
        (src / name).write_bytes(name.encode())
    (src / "d" / "link").symlink_to("a")
    listed = write_list(tmp_path / "list", ["d/"])
    r = run_rsync(build_argv(local=local_rsync_info(), remote=None, source=f"{src}/", dest=f"{dst}/",
                             files_from=listed, rsh=None, rsync_path=None))
    assert r.exit_code == 0, r.stderr_tail
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == ["d", "d/a", "d/b", "d/sub"]
    assert sorted(c.path for c in r.changes if c.transferred) == ["d/a", "d/b"]
