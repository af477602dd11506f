"""Nothing is lost on failure: a pull or push that dies at any point leaves the live dataset on
both sides exactly as it was, and rerunning the same command finishes the job.

Failures are injected with the pause points (USRSYNC_PAUSE_AT / USRSYNC_REMOTE_PAUSE_AT) and
real signals to real processes over the real sshd.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import (
    BASE_FILES,
    Sides,
    Tree,
    child_pids,
    load_audit,
    pause_env,
    paused_pid,
    tree_state,
    wait_for,
    write_tree,
)
from rig import SshRig


def _finish(proc: subprocess.Popen[str], marker: Path) -> tuple[int, str]:
    """Release the pause point (if still held) and collect the run's exit code and stderr."""
    marker.unlink(missing_ok=True)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _failed(out: Path, code: int, stderr: str, kind: str) -> dict:
    """The run failed with exit 5 and said so the same way in the audit and on stderr."""
    assert code == 5, stderr
    audit = load_audit(out)
    assert audit["transfer_state"] == "FAILED"
    assert audit["error"] == {**audit["error"], "kind": kind, "exit_code": 5}
    error, hint = stderr.strip().splitlines()[-2:]
    assert error == "error: " + audit["error"]["message"]
    assert hint == "hint: " + audit["error"]["hint"]
    return audit


def _no_staging_left(root: Path) -> None:
    staging = root / ".usrsync" / "staging"
    assert not staging.exists() or list(staging.iterdir()) == []


def _rerun_succeeds(sides: Sides, action: str, tmp_path: Path) -> dict:
    """Rerunning the same command finishes the job and leaves no staging behind."""
    out = tmp_path / "rerun.json"
    r = sides.run(action, "--audit-json-out", str(out))
    assert r.returncode == 0, r.stderr
    audit = load_audit(out)
    assert audit["transfer_state"] == "TRANSFERRED"
    assert audit["post"] == {**audit["post"], "verified": True, "in_sync": True}
    sides.assert_in_sync()
    _no_staging_left(sides.root)
    _no_staging_left(sides.base)
    return audit


def _source_ahead(sides: Sides, action: str, files: dict[str, bytes]) -> tuple[Tree, Tree]:
    """Both ends in sync, then `files` written on the source end; the states before the run."""
    sides.seed_both()
    source = sides.remote if action == "pull" else sides.local
    write_tree(source, files)
    sides.chown_remote()
    return sides.states()


# --- a) rsync killed mid-transfer ---------------------------------------------------------------

# rsync reports each file on a pipe the orchestrator reads; paused at the first report, the pipe
# fills up (64 KiB) and rsync blocks, so it is certainly still running when we kill it.
MANY_LONG_NAMES = {f"_derived/ns/{i:04d}-{'x' * 200}.parquet": b"PAR1-%d" % i for i in range(400)}


@pytest.mark.parametrize("action", ["pull", "push"])
def test_rsync_killed_mid_transfer(sides: Sides, tmp_path: Path, action: str) -> None:
    before = _source_ahead(sides, action, MANY_LONG_NAMES)
    marker = tmp_path / "paused"
    env = pause_env("mid-rsync", marker)
    out = tmp_path / "failed.json"
    proc = sides.start(action, "--audit-json-out", str(out), env=env)
    try:
        orchestrator = paused_pid(marker, proc)
        assert orchestrator == proc.pid
        rsyncs = child_pids(orchestrator, "rsync")
        assert len(rsyncs) == 1
        os.kill(rsyncs[0], signal.SIGKILL)
    finally:
        code, err = _finish(proc, marker)

    audit = _failed(out, code, err, "transfer")
    assert audit["transfer"]["rsync_exit"] == -signal.SIGKILL
    assert audit["error"]["message"].startswith("rsync failed with exit -9 (rsync was killed by SIGKILL)")
    assert sides.states() == before
    _no_staging_left(sides.root)  # rsync's leftover processes were stopped before the cleanup
    assert _rerun_succeeds(sides, action, tmp_path)["transfer"]["files"] == len(MANY_LONG_NAMES)


# --- b) a staged file corrupted before verification ------------------------------------------


def test_corrupted_staged_file_fails_verification(sides: Sides, tmp_path: Path) -> None:
    before = _source_ahead(sides, "pull", {"meta.md": b"# my_dataset v2\n"})
    marker = tmp_path / "paused"
    env = pause_env("after-rsync", marker)
    out = tmp_path / "failed.json"
    proc = sides.start("pull", "--audit-json-out", str(out), env=env)
    try:
        paused_pid(marker, proc)
        [staged] = (sides.root / ".usrsync" / "staging").glob("*/meta.md")
        assert staged.read_bytes() == b"# my_dataset v2\n"
        staged.write_bytes(b"# my_dataset v3\n")  # same size: only the content check can tell
    finally:
        code, err = _finish(proc, marker)

    audit = _failed(out, code, err, "verification")
    assert audit["error"]["message"] == (
        "the staged copy does not match the source manifest: meta.md: content differs from the source manifest")
    assert sides.states() == before
    _no_staging_left(sides.root)
    _rerun_succeeds(sides, "pull", tmp_path)
    assert (sides.local / "meta.md").read_bytes() == b"# my_dataset v2\n"


# --- c) the source changing during the transfer --------------------------------------------------


def test_remote_changing_during_pull_is_not_promoted(sides: Sides, tmp_path: Path) -> None:
    _source_ahead(sides, "pull", {"meta.md": b"# my_dataset v2\n"})
    local_before = tree_state(sides.local)
    marker = tmp_path / "paused"
    env = pause_env("after-rsync", marker)
    out = tmp_path / "failed.json"
    proc = sides.start("pull", "--audit-json-out", str(out), env=env)
    try:
        paused_pid(marker, proc)
        with open(sides.remote / ".events.log", "ab") as log:  # a batch job appends on the cluster
            log.write(b'{"event":"attach","rows":99}\n')
    finally:
        code, err = _finish(proc, marker)

    audit = _failed(out, code, err, "verification")
    assert audit["error"]["message"] == "the remote dataset changed during the transfer"
    assert tree_state(sides.local) == local_before
    _no_staging_left(sides.root)
    audit = _rerun_succeeds(sides, "pull", tmp_path)
    assert audit[".events.log"] == {**audit[".events.log"], "local": 2, "remote": 3, "relation": "remote_ahead"}


@pytest.mark.parametrize("where", ["outside", "inside"])
@pytest.mark.parametrize("action", ["pull", "push"])
def test_destination_written_during_the_transfer_is_not_overwritten(sides: Sides, tmp_path: Path, action: str,
                                                                    where: str) -> None:
    """Only `_derived/ns` is promoted. A write elsewhere on the destination, or a file replaced in
    that directory after staging linked the old one, makes the run refuse before the exchange:
    the exchange would silently drop the replacement, and in_sync could not hold."""
    _source_ahead(sides, action, {"_derived/ns/part-0002.parquet": b"PAR1derived-2"})
    dest, dest_side = (sides.local, "local") if action == "pull" else (sides.remote, "remote")
    written = "notes/readme.txt" if where == "outside" else "_derived/ns/part-0001.parquet"
    marker = tmp_path / "paused"
    out = tmp_path / "failed.json"
    proc = sides.start(action, "--audit-json-out", str(out), env=pause_env("after-rsync", marker))
    try:
        paused_pid(marker, proc)
        replacement = dest / (written + ".new")
        replacement.write_bytes(b"PAR1derived-X" if where == "inside" else b"edited by hand\n")
        replacement.rename(dest / written)  # a new inode, as editors and writers do
        sides.chown_remote()
        dest_before = tree_state(dest)
    finally:
        code, err = _finish(proc, marker)

    audit = _failed(out, code, err, "verification")
    assert audit["error"]["message"] == f"the {dest_side} dataset changed during the transfer"
    assert tree_state(dest) == dest_before  # the write survives, nothing was promoted
    assert "_derived/ns/part-0002.parquet" not in dest_before
    _no_staging_left(sides.root)
    _no_staging_left(sides.base)
    _rerun_succeeds(sides, action, tmp_path)


# --- d) the connection dropped before promotion ---------------------------------------------------


def test_orchestrator_killed_during_remote_verify(sides: Sides, sshd_rig: SshRig, tmp_path: Path) -> None:
    before = _source_ahead(sides, "push", {"_derived/ns/part-0002.parquet": b"PAR1derived-2"})
    # The agent runs as the rig's user: its marker must be somewhere that user can write.
    marker = sshd_rig.home / f"paused-{tmp_path.name}"
    proc = sides.start("push", env=pause_env("before-verify", marker, remote=True))
    try:
        agent = paused_pid(marker, proc)
        assert agent in {pid for pid, _ in sshd_rig.user_processes()}
        proc.kill()  # SIGKILL: no cleanup of any kind, the TCP connection just drops
        proc.wait(timeout=30)
        # The agent must not outlive its session, even held in the middle of a call (the pause
        # is not released before it is gone).
        wait_for(lambda: agent not in {pid for pid, _ in sshd_rig.user_processes()},
                 "the orphaned agent to exit", timeout=10)
    finally:
        code, _ = _finish(proc, marker)

    assert code == -signal.SIGKILL
    assert sides.states() == before
    [leftover] = (sides.base / ".usrsync" / "staging").iterdir()

    audit = _rerun_succeeds(sides, "push", tmp_path)
    assert f"recovered: removed leftover staging {leftover.name}" in audit["warnings"]


# --- e) readers during promotion ------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "promoted"), [
    ("_derived/ns/a.bin", "_derived/ns/b.bin", "_derived/ns"),  # the swap replaces one directory
    ("_derived/x/a.bin", "_derived/y/b.bin", "_derived"),  # their parent
    ("meta.md", "_derived/ns/a.bin", ""),  # the whole dataset
])
def test_reader_sees_old_or_new_tree_never_a_mix(sides: Sides, tmp_path: Path, a: str, b: str, promoted: str) -> None:
    """A reader that opens the deepest directory holding the files it reads, and reads them
    relative to that fd, sees them all old or all new. That directory is the promotion root or
    lies below it (the root holds every change), so the fd pins one side of the swap."""
    old = {a: b"old-a" * 100, b: b"old-b" * 100}
    new = {a: b"new-a" * 100, b: b"new-b" * 100}
    sides.seed_both({**BASE_FILES, **old})
    write_tree(sides.remote, new)
    sides.chown_remote()
    pinned = sides.local / os.path.commonpath([os.path.dirname(a), os.path.dirname(b)])
    rel_a, rel_b = (os.path.relpath(sides.local / p, pinned) for p in (a, b))

    pairs: list[tuple[bytes, bytes]] = []
    stop = threading.Event()

    def read(dir_fd: int, rel: str) -> bytes:
        fd = os.open(rel, os.O_RDONLY, dir_fd=dir_fd)
        try:
            return os.read(fd, 1 << 16)
        finally:
            os.close(fd)

    def reader() -> None:
        for _ in range(1_000_000):
            if stop.is_set():
                return
            dir_fd = os.open(pinned, os.O_RDONLY | os.O_DIRECTORY)
            try:
                pairs.append((read(dir_fd, rel_a), read(dir_fd, rel_b)))
            except FileNotFoundError:
                pass  # the old tree is being removed after the swap: gone, never mixed
            finally:
                os.close(dir_fd)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        r = sides.run("pull", "--audit-json-out", str(tmp_path / "pull.json"))
        wait_for(lambda: bool(pairs) and pairs[-1][0].startswith(b"new"), "the reader to see the new tree")
    finally:
        stop.set()
        thread.join(30)

    assert r.returncode == 0, r.stderr
    assert load_audit(tmp_path / "pull.json")["transfer"]["subtree"] == promoted
    old_pair, new_pair = (old[a], old[b]), (new[a], new[b])
    assert set(pairs) == {old_pair, new_pair}
    # Reads are ordered: the old tree until the swap, the new one after it.
    first_new = pairs.index(new_pair)
    assert set(pairs[first_new:]) == {new_pair}
    sides.assert_in_sync()


@pytest.mark.parametrize(("path", "mode", "named"), [
    ("_derived/ns", 0, "_derived/ns"),  # cannot be opened
    ("_derived/ns", 0o644, "_derived/ns/part-0001.parquet"),  # listed, but its entries cannot be stat'ed
    ("_derived/ns/part-0001.parquet", 0, "_derived/ns/part-0001.parquet"),  # cannot be read
], ids=["directory", "directory without x", "file"])
def test_an_unreadable_remote_path_is_named_with_a_hint_that_helps(sides: Sides, tmp_path: Path, path: str,
                                                                   mode: int, named: str) -> None:
    """Files the remote login user cannot read fail the run (skipping them would make a pull delete
    their local copies). The error names the path below the dataset, not just the entry's name."""
    sides.seed_both()
    os.chmod(sides.remote / path, mode)
    try:
        r = sides.run("pull", "--audit-json-out", str(tmp_path / "audit.json"))
    finally:
        os.chmod(sides.remote / path, 0o755)
    assert r.returncode == 3, r.stderr
    error, hint = r.stderr.strip().splitlines()
    assert error.startswith("error: remote agent: manifest failed: [Errno 13] Permission denied: ")
    assert error.endswith(f"{named}'") and "'ns'" not in error and "'part-0001.parquet'" not in error
    assert hint == ("hint: give the remote login user access to that path (e.g. `chmod -R u+rwX`, or ask its "
                    "owner), then rerun")
    assert load_audit(tmp_path / "audit.json")["error"]["kind"] == "remote"
    sides.assert_in_sync()  # nothing was moved or deleted on either side
