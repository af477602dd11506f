"""rsync: version probing, the argv we run, running it through `sh`, parsing its output.

One responsibility: everything that knows rsync's command line and output formats lives here.
Callers (sync.py) decide what to transfer and what an exit code means for the run.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec
import structlog

if TYPE_CHECKING:
    import sh

from usrsync.errors import ConfigError

__all__ = [
    "EXIT_MEANINGS",
    "OUT_FORMAT",
    "ItemizedChange",
    "RsyncInfo",
    "RsyncResult",
    "RsyncSetupError",
    "build_argv",
    "explain_exit",
    "list_entries",
    "lists_on_remote",
    "local_rsync_info",
    "parse_out_line",
    "parse_version",
    "run_rsync",
    "security_warning",
]

log = structlog.get_logger(__name__)

#: Per-file line we ask rsync for: item code, file length, bytes on the wire, name. The name is
#: last because it may contain spaces; rsync escapes newlines and other unprintable bytes in it
#: as `\#ooo`. `%b` makes rsync print the line after the file is complete, not when it starts,
#: so a cancelled or failed file is never reported as transferred.
OUT_FORMAT = "%i %l %b %n"
#: Where rsync keeps partial files (relative: inside the destination, auto-excluded by rsync).
DEFAULT_PARTIAL_DIR = ".usrsync-partial"
#: New files/dirs get the destination's default permissions (umask / default ACL), keeping only
#: the source's executability: permissions are not replayed across hosts (DESIGN §3), and the
#: syncing user can always read, replace and delete what was staged (no 0555 dirs, 0444 files).
CHMOD = "ugo=rwX"
STDERR_TAIL_LINES = 20
_POLL_SECONDS = 0.02
_KILL_GRACE_SECONDS = 2.0
# Every exit status is returned, not raised: 0-255, and a negative signal number if killed.
_OK_CODES = list(range(256)) + [-s for s in range(1, 65)]


class RsyncSetupError(ConfigError):
    """This rsync cannot be used: missing, unrecognised, or lacking a required option."""


# --- version probing ------------------------------------------------------------------------


class RsyncInfo(msgspec.Struct, frozen=True):
    """What one rsync binary is and which of the options we use it understands."""

    flavour: Literal["rsync", "openrsync"]
    #: rsync's release; for openrsync the "rsync version X compatible" it claims, else (0, 0, 0)
    version: tuple[int, int, int]
    protocol: int | None
    #: `-s` / `--protect-args` (rsync >= 3.0.0), spelled `--secluded-args` from 3.2.6
    secluded_args: bool
    #: `--checksum-choice` (rsync >= 3.2.0)
    checksum_choice: bool
    #: `--from0` for a NUL-separated `--files-from` list
    from0: bool
    #: the version line itself, for logs and the audit
    raw: str
    #: the compiled-in "Checksum list" (rsync >= 3.2.0 prints it); empty when not known
    checksums: tuple[str, ...] = ()


_RSYNC_LINE = re.compile(
    r"^\s*rsync\s+version\s+v?(\d+)\.(\d+)(?:\.(\d+))?\S*\s+protocol\s+version\s+(\d+)", re.M
)
_OPENRSYNC_LINE = re.compile(r"^\s*openrsync:\s+protocol\s+version\s+(\d+)", re.M)
_OPENRSYNC_COMPAT = re.compile(r"^\s*rsync\s+version\s+v?(\d+)\.(\d+)(?:\.(\d+))?\S*\s+compatible", re.M)


def _version3(m: re.Match[str]) -> tuple[int, int, int]:
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _checksum_list(text: str) -> tuple[str, ...]:
    """Names under "Checksum list:" (indented lines), without the "(xxhash)" annotations."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().lower().startswith("checksum list:"):
            names: list[str] = []
            for cont in lines[i + 1 :]:
                if not cont.startswith((" ", "\t")) or not cont.strip():
                    break
                names += [w for w in cont.split() if not w.startswith("(")]
            return tuple(names)
    return ()


def parse_version(text: str) -> RsyncInfo:
    """Parse `rsync --version` output (rsync 2.6.9 to 3.5.x, or macOS openrsync).

    Lines before the version line are skipped, so a login banner in front does no harm.
    """
    m = _RSYNC_LINE.search(text)
    if m:
        version = _version3(m)
        return RsyncInfo(
            flavour="rsync",
            version=version,
            protocol=int(m.group(4)),
            secluded_args=version >= (3, 0, 0),
            checksum_choice=version >= (3, 2, 0),
            from0=version >= (2, 6, 0),
            raw=m.group(0).strip(),
            checksums=_checksum_list(text),
        )
    # macOS openrsync: "openrsync: protocol version 29" and/or "rsync version 2.6.9 compatible".
    # Genuine rsync never says "compatible", so either line identifies it.
    om, cm = _OPENRSYNC_LINE.search(text), _OPENRSYNC_COMPAT.search(text)
    if om or cm:
        first = min((x for x in (om, cm) if x is not None), key=lambda x: x.start())
        return RsyncInfo(
            flavour="openrsync",
            version=_version3(cm) if cm else (0, 0, 0),
            protocol=int(om.group(1)) if om else None,
            secluded_args=False,
            checksum_choice=False,
            from0=True,  # Apple's openrsync (macOS 15.4+) takes --files-from with --from0
            raw=first.group(0).strip(),
        )
    sample = " | ".join(line.strip() for line in text.strip().splitlines()[:2])[:160]
    what = f"not recognisable as `rsync --version` output: {sample!r}" if sample else "`rsync --version` printed nothing"
    raise RsyncSetupError(
        what,
        hint="install rsync >= 3.0 (remote: set rsync_path in the remote profile)",
    )


def security_warning(info: RsyncInfo) -> str | None:
    """One line worth showing the user about this rsync's security, or None."""
    if info.flavour == "openrsync":
        return (
            "this rsync is openrsync (macOS), not GNU rsync: no --secluded-args or --checksum-choice;"
            " install rsync >= 3.4 (e.g. `brew install rsync`) and put it first on PATH"
        )
    if info.version < (3, 4, 0):
        v = ".".join(map(str, info.version))
        return (
            f"rsync {v} predates 3.4.0 (January 2025), which fixed CVE-2024-12084..12088;"
            " upgrade unless your distribution backported the fixes"
        )
    return None


def local_rsync_info(binary: str = "rsync") -> RsyncInfo:
    """Run `<binary> --version` here and parse it."""
    import sh  # here, not at the top: `usr diff` never runs rsync and need not import it

    try:
        cmd = sh.Command(binary)
        with open(os.devnull, "rb") as devnull:
            run = cmd("--version", _in=devnull, _return_cmd=True, _tty_out=False, _ok_code=_OK_CODES, _timeout=30)
    except sh.CommandNotFound:
        raise RsyncSetupError(
            f"rsync not found: {binary!r}", hint="install rsync >= 3.0 (apt install rsync, brew install rsync)"
        ) from None
    except sh.TimeoutException:
        raise RsyncSetupError(f"`{binary} --version` did not finish in 30 s") from None
    out = run.stdout.decode("utf-8", "replace")
    if run.exit_code != 0:
        err = run.stderr.decode("utf-8", "replace").strip()
        raise RsyncSetupError(f"`{binary} --version` exited {run.exit_code}: {err or out.strip()}"[:300])
    return parse_version(out)


# --- argv -----------------------------------------------------------------------------------


def _secluded_flag(local: RsyncInfo, remote: RsyncInfo) -> str | None:
    """How to keep names away from the remote shell, or None when one end cannot."""
    if not (local.flavour == remote.flavour == "rsync" and local.secluded_args and remote.secluded_args):
        return None
    # `--secluded-args` is the 3.2.6+ name; older ends know it as `--protect-args` (same `-s`).
    if local.version >= (3, 2, 6) and remote.version >= (3, 2, 6):
        return "--secluded-args"
    return "--protect-args"


def lists_on_remote(local: RsyncInfo, remote: RsyncInfo | None, pull: bool) -> bool:
    """Whether a transfer's file list should be a file on the remote host (`remote_list`).

    A pull's sender is the remote rsync. Given a local list, the local rsync forwards it to the
    sender a name at a time, and that costs more CPU per file than the copy itself: 100k empty
    files over ssh took 20.7 s of user CPU here with a local list, 1.05 s with the same list read
    on the remote host (26 s and 13 s wall). A push's sender is local: its list stays local.
    rsync has read remote lists (`--files-from=:PATH`) since 2.6; openrsync is left as it is.
    """
    return pull and remote is not None and local.flavour == "rsync" and remote.flavour == "rsync"


def list_entries(files: list[str], whole_dirs: set[str]) -> list[tuple[str, int]]:
    """rsync's list entries for copying `files` (sorted), with the files each one moves. Files
    of a directory in `whole_dirs` (every entry there is to be copied) are one entry, "dir/":
    under `-d` a listed directory with a trailing slash has its files copied (its subdirectories
    are created, not filled). rsync reads a list a byte at a time, a poll and a read each (strace),
    so 100k names (2.7 MB) cost ~5 s before the first byte moves."""
    entries: list[str] = []
    moved: dict[str, int] = {}  # whole directory -> its files (not contiguous: "d/a" < "d/s/x" < "d/z")
    for path in files:
        parent = path.rpartition("/")[0]
        if parent not in whole_dirs:
            entries.append(path)
            continue
        if parent not in moved:
            moved[parent] = 0
            entries.append(parent + "/")
        moved[parent] += 1
    return [(entry, moved[entry[:-1]] if entry.endswith("/") else 1) for entry in entries]


def _has_xxh128(info: RsyncInfo) -> bool:
    return info.flavour == "rsync" and info.checksum_choice and (not info.checksums or "xxh128" in info.checksums)


def build_argv(
    *,
    local: RsyncInfo,
    remote: RsyncInfo | None,
    source: str,
    dest: str,
    files_from: str | Path,
    rsh: str | None,
    rsync_path: str | None,
    partial_dir: str = DEFAULT_PARTIAL_DIR,
    basis_dir: str | None = None,
    dry_run: bool = False,
    io_timeout: int | None = 300,
    binary: str = "rsync",
    remote_list: bool = False,
    checksum: bool = True,
) -> list[str]:
    """The rsync command line that copies the files listed in `files_from` from source to dest.

    `files_from` is a NUL-separated list of paths relative to `source`: a local path, or with
    `remote_list` an absolute path on the remote host (where a pull's sender reads it; see
    `lists_on_remote`). `remote` is None for a local-to-local copy. `source`/`dest` are passed
    verbatim (`host:/path/` or `/local/path/`).
    No `-a` (owner/group/perms are not replayed), no `-z` (data sets are mostly compressed,
    and it costs login-node CPU), no `--delete` (staging starts empty but for our hard links;
    deletions are ours). The list names every parent directory before its files: with implied
    directories rsync's receiver slows down superlinearly with the files per directory
    (20k files in 20 dirs over ssh: 9.3 s implied, 4.7 s listed).
    `checksum` false leaves out `--checksum`, for a `dest` that holds none of the listed files and
    no `basis_dir`: rsync then has nothing to compare, and the flag would only make the sender
    read every file once more, to checksum it while it builds the file list.
    """
    if not local.from0:
        raise RsyncSetupError(
            f"{local.raw!r} has no --from0, which usrsync needs for its file lists",
            hint="install rsync >= 3.0",
        )
    peer = remote or local
    argv = [
        binary,
        "-d",  # listed directories are created, never recursed into: only listed files move
        "--no-implied-dirs",
        "-t",  # keep mtimes
        *(["--checksum"] if checksum else []),  # content decides, not size+mtime (a same-size rewrite is a change)
        "--from0",
        # ":path" names a list on the remote host; a local one is absolute: "x:y" would mean a remote list
        f"--files-from=:{files_from}" if remote_list else f"--files-from={os.path.abspath(files_from)}",
        "--itemize-changes",
        f"--out-format={OUT_FORMAT}",
        f"--chmod={CHMOD}",
        f"--partial-dir={partial_dir}",
    ]
    secluded = _secluded_flag(local, peer)
    if secluded:
        argv.append(secluded)
    if _has_xxh128(local) and _has_xxh128(peer):
        argv.append("--checksum-choice=xxh128")
    if local.flavour == "rsync" and local.version >= (3, 1, 0):
        argv.append("--outbuf=L")  # one line per file as it happens, not 4 KiB blocks on a pipe
    if io_timeout is not None:
        argv.append(f"--timeout={int(io_timeout)}")
    if rsh:
        argv += ["-e", rsh]
    if rsync_path and rsync_path != "rsync":
        argv.append(f"--rsync-path={rsync_path}")
    if basis_dir:
        argv.append(f"--copy-dest={basis_dir}")
    if dry_run:
        argv.append("--dry-run")
    argv += ["--", source, dest]
    return argv


# --- output parsing -------------------------------------------------------------------------


class ItemizedChange(msgspec.Struct, frozen=True):
    """One OUT_FORMAT line: what rsync did (or, with --dry-run, would do) to one path."""

    path: str  # relative to the transfer root; no trailing "/" for directories
    item: str  # the itemize code, e.g. ">f+++++++++" (11 chars; 9 from openrsync)
    size: int  # the file's length
    is_file: bool
    transferred: bool  # file data was sent ("<" or ">"), not just attributes or a local copy
    wire_bytes: int = 0  # bytes rsync moved for it (small for a delta; 0 on --dry-run)


# Update type, file type, then attribute flags which may all be spaces (".d          ").
# Attribute flags never contain digits, so the length field delimits the code unambiguously.
_OUT_LINE = re.compile(r"^([<>ch.][fdLDS][ .+?A-Za-z]{7,10}?) (\d+) (\d+) (.+)$")
_ESCAPE = re.compile(rb"\\#([0-7]{3})")


def _unescape(name: str) -> str:
    # rsync writes unprintable bytes (and "\#" itself) as \#ooo; undo it at byte level so
    # the result equals os.fsdecode() of the real name.
    raw = name.encode("utf-8", "surrogateescape")
    if b"\\#" not in raw:
        return name
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), raw).decode("utf-8", "surrogateescape")


def parse_out_line(line: str) -> ItemizedChange | None:
    """Parse a line of our --out-format; None for anything else (warnings, "created directory")."""
    m = _OUT_LINE.match(line.rstrip("\r\n"))
    if not m:
        return None
    item, name = m.group(1), _unescape(m.group(4))
    if item[1] == "d":
        name = name.rstrip("/") or "."
    return ItemizedChange(
        path=name,
        item=item,
        size=int(m.group(2)),
        is_file=item[1] == "f",
        transferred=item[0] in "<>",
        wire_bytes=int(m.group(3)),
    )


# --- running --------------------------------------------------------------------------------


class RsyncResult(msgspec.Struct):
    exit_code: int  # rsync's status; negative signal number if it was killed by one
    changes: list[ItemizedChange]
    files: int  # regular files whose data was transferred
    bytes: int  # sum of their sizes (file sizes, not bytes on the wire)
    stderr_tail: str  # the last STDERR_TAIL_LINES lines
    seconds: float
    cancelled: bool = False
    pid: int | None = None  # rsync's pid, which is also its process group id


_PR_SET_PDEATHSIG = 1


def _die_with_parent_fn() -> Callable[[], None] | None:
    """A pre-exec hook that makes rsync get SIGTERM if the thread that started it dies.

    rsync runs in its own session, out of reach of the terminal's signals; without this a
    SIGKILLed orchestrator would leave it running into a staging dir the next run cleans up.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the hook ran
            os._exit(1)

    return hook


def _live_group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies (zombies cannot hold anything)."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs (macOS): fall back to "does the group exist at all"
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # comm may contain spaces and ")"
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def _stop_group(proc: sh.RunningCommand, pgid: int, grace: float) -> None:
    """SIGTERM the whole group (rsync, its forked halves, ssh or the shim), SIGKILL after grace."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.process.is_alive()  # reaps rsync itself once it exits
        if not _live_group_members(pgid):
            return
        time.sleep(0.02)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_rsync(
    argv: list[str],
    *,
    on_change: Callable[[ItemizedChange], None] | None = None,
    cancel: threading.Event | None = None,
    env: Mapping[str, str] | None = None,
) -> RsyncResult:
    """Run rsync (blocking) and return what it did. A non-zero exit is returned, not raised.

    Meant for a worker thread (`await asyncio.to_thread(run_rsync, ...)`); it touches no event
    loop. `on_change` is called for each parsed line, from sh's reader thread: keep it cheap.
    If it raises, rsync is stopped and the exception is re-raised here. Setting `cancel` stops
    the whole process group (SIGTERM, then SIGKILL after a grace period) and returns promptly
    with `cancelled=True`. `env` adds variables to the inherited environment.
    """
    if not argv:
        raise ValueError("empty rsync argv")
    started = time.monotonic()
    if cancel is not None and cancel.is_set():
        return RsyncResult(
            exit_code=20, changes=[], files=0, bytes=0, stderr_tail="cancelled before start", seconds=0.0,
            cancelled=True,
        )
    import sh  # see local_rsync_info

    try:
        cmd = sh.Command(argv[0])
    except sh.CommandNotFound:
        raise RsyncSetupError(f"rsync not found: {argv[0]!r}", hint="install rsync >= 3.0") from None

    changes: list[ItemizedChange] = []
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    failure: list[BaseException] = []

    def on_out(line: str) -> None:
        if failure:
            return
        change = parse_out_line(line)
        if change is None:
            if line.strip():
                log.debug("rsync.stdout", line=line.rstrip("\n"))
            return
        changes.append(change)
        if on_change is not None:
            try:
                on_change(change)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                failure.append(exc)

    def on_err(line: str) -> None:
        tail.append(line.rstrip("\n"))

    # stdin from /dev/null: nothing may wait on it, and sh then needs no stdin feeder thread.
    with open(os.devnull, "rb") as devnull:
        proc = cmd(
            *argv[1:],
            _in=devnull,
            _bg=True,
            _bg_exc=False,
            _out=on_out,
            _err=on_err,
            _out_bufsize=1,
            _err_bufsize=1,
            _tty_out=False,
            _new_session=True,  # own session and process group: killpg reaches ssh/shim children
            _preexec_fn=_die_with_parent_fn(),
            _ok_code=_OK_CODES,
            _decode_errors="surrogateescape",  # names are bytes; keep them lossless
            _env={**os.environ, **env} if env else None,
        )
        pid = proc.process.pid
        pgid = proc.process.pgid or pid
        log.debug("rsync.start", pid=pid, argv=argv)

        cancelled = False
        try:
            while proc.process.is_alive()[0]:
                if failure or (cancel is not None and cancel.wait(_POLL_SECONDS)):
                    cancelled = not failure
                    log.info("rsync.stop", pid=pid, reason="callback failed" if failure else "cancelled")
                    _stop_group(proc, pgid, _KILL_GRACE_SECONDS)
                    break
                if cancel is None:
                    time.sleep(_POLL_SECONDS)
        except BaseException:  # e.g. KeyboardInterrupt in a caller's thread: leave nothing behind
            _stop_group(proc, pgid, _KILL_GRACE_SECONDS)
            raise
        if _live_group_members(pgid):
            # rsync died (killed, crashed) and left its forked receiver or the remote shell running,
            # still writing into the destination: they must be gone before the caller cleans it up.
            _stop_group(proc, pgid, _KILL_GRACE_SECONDS)
        proc.wait()  # reaps it and joins sh's reader threads, so every line has been handled
    exit_code = proc.exit_code
    if failure:
        raise failure[0]

    sent = [c for c in changes if c.is_file and c.transferred]
    result = RsyncResult(
        exit_code=exit_code,
        changes=changes,
        files=len(sent),
        bytes=sum(c.size for c in sent),
        stderr_tail="\n".join(tail),
        seconds=round(time.monotonic() - started, 3),
        cancelled=cancelled,
        pid=pid,
    )
    log.debug("rsync.exit", pid=pid, exit_code=exit_code, files=result.files, bytes=result.bytes,
              seconds=result.seconds, cancelled=cancelled)
    return result


# --- exit codes -----------------------------------------------------------------------------

EXIT_MEANINGS: dict[int, str] = {
    0: "success",
    1: "syntax or usage error",
    2: "protocol incompatibility",
    3: "errors selecting input/output files or directories",
    4: "requested action not supported (an option one end does not know)",
    5: "error starting the client-server protocol",
    6: "daemon unable to append to its log file",
    10: "error in socket I/O",
    11: "error in file I/O",
    12: "error in the rsync protocol data stream",
    13: "errors with program diagnostics",
    14: "error in IPC code",
    15: "sibling process crashed",
    16: "sibling process terminated abnormally",
    19: "received SIGUSR1",
    20: "received SIGINT, SIGTERM or SIGHUP",
    21: "some error returned by waitpid()",
    22: "error allocating core memory buffers",
    23: "partial transfer due to error",
    24: "partial transfer due to vanished source files",
    25: "the --max-delete limit stopped deletions",
    30: "timeout in data send/receive",
    35: "timeout waiting for daemon connection",
    124: "remote shell failed",
    125: "remote shell killed",
    126: "remote command could not be run",
    127: "remote command not found",
    255: "the remote shell (ssh) failed",
}

_EXIT_HINTS: dict[int, str] = {
    2: "is the remote login shell clean? (a banner on stdout breaks rsync)",
    12: "is the remote login shell clean? (a banner on stdout breaks rsync)",
    23: "see the rsync errors above for the files concerned",
    24: "a source file vanished while copying; run again",
    30: "no data moved for --timeout seconds; check the network and run again",
    127: "set rsync_path in the remote profile to the remote rsync",
    255: "check that `ssh` to the host works",
}


def explain_exit(code: int) -> str:
    """A one-line human explanation of an rsync exit status (negative: killed by a signal)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rsync was killed by {name}"
    meaning = EXIT_MEANINGS.get(code, "unknown rsync exit code")
    hint = _EXIT_HINTS.get(code)
    return f"rsync exit {code}: {meaning}" + (f" ({hint})" if hint else "")
