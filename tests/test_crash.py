"""Crash at every step, and writers racing a sync: the live dataset is the old one or the new one.

Every pause point of a pull and a push is reached over the real sshd, and there the
orchestrator, the remote agent or the sshd session is SIGKILLed. Then: the live dataset on both
ends is byte-identical to the state before or after the sync (never a mix), and rerunning the
same command recovers (journal, staging, stale locks), completes, and ends in sync. The matrix
is printed as a table at the end of the module.

Writers: a thread appending to `.events.log` and adding `_derived` parts on the source during
a sync gets a snapshot the source really had, or a clean refusal; a USR writer holding the
destination's `.usr.lock` makes promotion wait (--wait) or refuse (exit 4).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import rig as rigmod
from helpers import (
    BASE_FILES,
    DATASET,
    REMOTE,
    Sides,
    child_pids,
    leftovers,
    load_audit,
    pause_env,
    paused_pid,
    run_usr,
    tree_state,
    wait_for,
    write_to_terminal,
    write_tree,
)

from usrsync.dataset import classify

Content = dict[str, bytes]

OLD: Content = dict(BASE_FILES)
# The source's side of every crash: each section changes, one file goes away.
NEW: Content = {
    **{p: b for p, b in BASE_FILES.items() if p != "notes/readme.txt"},
    "records.parquet": b"PAR1" + bytes(range(255, -1, -1)) * 8 + b"PAR1",
    "meta.md": b"# my_dataset, revised\n",
    ".events.log": BASE_FILES[".events.log"] + b'{"event":"attach","rows":5}\n',
    "_snapshots/records-20260202T000000Z.parquet": b"PAR1snapshot-2",
    "_derived/ns/part-0002.parquet": b"PAR1derived-2" * 64,
}


class Crash(NamedTuple):
    action: str  # pull | push
    phase: str  # the pause point
    paused: str  # orchestrator | agent: which process holds at the phase
    kill: str  # orchestrator | agent | sshd: what is SIGKILLed there
    live: str  # old | new: the destination's live dataset right after the kill
    exits: tuple[int, ...]  # the interrupted run's exit status (-9: it was the one killed)

    @property
    def id(self) -> str:
        return f"{self.action}-{self.phase}-paused:{self.paused}-kill:{self.kill}"


KILLED = (-signal.SIGKILL,)
PULL_PHASES = ["after-lock", "after-manifest", "after-stage", "mid-rsync", "after-rsync", "after-verify",
               "mid-promote"]
PUSH_PHASES = ["after-lock", "after-manifest", "after-stage", "mid-rsync", "after-rsync"]
CRASHES = [
    # pull: everything up to the local promotion runs in the orchestrator
    *(Crash("pull", p, "orchestrator", "orchestrator", "old", KILLED) for p in PULL_PHASES),
    Crash("pull", "after-promote", "orchestrator", "orchestrator", "new", KILLED),
    Crash("pull", "after-lock", "orchestrator", "agent", "old", (3,)),
    Crash("pull", "mid-rsync", "orchestrator", "agent", "old", (3,)),
    Crash("pull", "after-verify", "orchestrator", "agent", "new", (0,)),  # the agent is not needed any more
    Crash("pull", "after-manifest", "orchestrator", "sshd", "old", (3,)),
    Crash("pull", "mid-rsync", "orchestrator", "sshd", "old", (3, 5)),  # rsync may or may not have finished
    # push: staging and promotion happen in the remote agent
    *(Crash("push", p, "orchestrator", "orchestrator", "old", KILLED) for p in PUSH_PHASES),
    Crash("push", "after-stage", "orchestrator", "agent", "old", (3,)),
    Crash("push", "before-verify", "agent", "orchestrator", "old", KILLED),
    Crash("push", "mid-promote", "agent", "orchestrator", "old", KILLED),
    Crash("push", "after-promote", "agent", "orchestrator", "new", KILLED),
    Crash("push", "before-verify", "agent", "agent", "old", (3,)),
    Crash("push", "mid-promote", "agent", "agent", "old", (3,)),
    Crash("push", "after-promote", "agent", "agent", "new", (3,)),
    Crash("push", "mid-promote", "agent", "sshd", "old", (3,)),
    Crash("push", "after-rsync", "orchestrator", "sshd", "old", (3,)),
]

TABLE: list[tuple[str, ...]] = []
REPAIRS = [("removed journal", "journal removed"), ("removed leftover staging", "staging removed"),
           ("removed leftover file list", "file list removed"), ("restored live dataset", "live restored")]


@pytest.fixture(scope="module", autouse=True)
def crash_table(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print what every crash left and what the rerun did, as a table, after the module."""
    yield
    if not TABLE:
        return
    header = ("action", "phase", "paused", "killed", "exit", "live after", "rerun", "repaired")
    widths = [max(len(str(row[i])) for row in [header, *TABLE]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *TABLE]]
    write_to_terminal(request.config, "crash matrix: SIGKILL at every pause point", lines)


# --- helpers ------------------------------------------------------------------------------------------


def content(root: Path) -> Content:
    """The dataset's files and bytes; runtime files (`.usr.lock`, ...) are not part of it."""
    return {p: b for p, (b, _) in tree_state(root).items() if classify(p) is not None}


def source_ahead(sides: Sides, action: str) -> None:
    """OLD on both ends, in sync; then the source end becomes NEW."""
    sides.seed_both(OLD)
    source = sides.remote if action == "pull" else sides.local
    (source / "notes" / "readme.txt").unlink()
    write_tree(source, {p: b for p, b in NEW.items() if OLD.get(p) != b})
    sides.chown_remote()


def agent_pids(sides: Sides) -> list[int]:
    return [pid for pid, cmd in sides.rig.user_processes() if "usrsync_agent.py" in cmd and " serve " in cmd]


def sshd_session_pids(sides: Sides) -> list[int]:
    """The sshd processes serving our connection: the listener's children and theirs."""
    top = child_pids(sides.rig.pid)
    return top + [pid for parent in top for pid in child_pids(parent, "sshd")]


def local_helpers(sides: Sides) -> list[int]:
    """rsync and rsh-shim processes still working on this test's local root."""
    return [pid for pid in rigmod.pids() if str(sides.root) in (cmd := rigmod.cmdline(pid)) and "rsync" in cmd]


def quiesce(sides: Sides) -> None:
    """Wait (bounded) until nothing of the interrupted run is alive on either end."""
    wait_for(lambda: not sides.rig.user_processes(), "the remote agent and rsync to exit", timeout=30)
    wait_for(lambda: not local_helpers(sides), "local rsync to exit", timeout=30)


def kill(pids: list[int]) -> None:
    assert pids, "nothing to kill"
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def snapshot_state(c: Content) -> str:
    return "old" if c == OLD else "new" if c == NEW else "MIXED"


# --- the crash matrix -----------------------------------------------------------------------------------


@pytest.mark.parametrize("crash", CRASHES, ids=[c.id for c in CRASHES])
def test_crash(sides: Sides, tmp_path: Path, crash: Crash) -> None:
    source_ahead(sides, crash.action)
    dest, source = (sides.local, sides.remote) if crash.action == "pull" else (sides.remote, sides.local)
    if crash.paused == "agent":  # the agent runs as the rig's user: its marker must be writable there
        marker = sides.rig.home / f"paused-{secrets.token_hex(4)}"
        env = pause_env(crash.phase, marker, remote=True)
    else:
        marker = tmp_path / "paused"
        env = pause_env(crash.phase, marker)
    proc = sides.start(crash.action, "--audit-json-out", str(tmp_path / "crashed.json"), env=env)
    try:
        paused = paused_pid(marker, proc)
        assert paused == (proc.pid if crash.paused == "orchestrator" else agent_pids(sides)[0])
        if crash.kill == "orchestrator":
            kill([proc.pid])
        elif crash.kill == "agent":
            kill(agent_pids(sides))
        else:
            kill(sshd_session_pids(sides))
        if crash.paused == "agent":
            # It must end with its session whatever was killed; releasing the pause before it has
            # noticed (SIGKILL and the teardown are asynchronous) would let it promote after all.
            wait_for(lambda: paused not in agent_pids(sides), "the paused agent to end with its session", timeout=30)
        marker.unlink()  # a paused process that survived carries on
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        marker.unlink(missing_ok=True)
    quiesce(sides)

    assert proc.returncode in crash.exits, err
    live = snapshot_state(content(dest))
    assert live in ("old", "new"), f"the live dataset is a mix: {sorted(content(dest))}"
    assert live == crash.live
    assert content(source) == NEW  # a sync never writes its source
    left = leftovers(sides.root) + [f"remote:{p}" for p in leftovers(sides.base)]

    out = tmp_path / "rerun.json"
    # -v: should the rerun fail, its logs say why
    r = run_usr(sides.cfg, "-v", crash.action, DATASET, REMOTE, "-y", "--audit-json-out", str(out))
    assert r.returncode == 0, r.stderr
    audit = load_audit(out)
    assert audit["transfer_state"] == ("NO-OP" if live == "new" else "TRANSFERRED")
    assert audit["post"] == {**audit["post"], "verified": True, "in_sync": True}
    assert content(sides.local) == content(sides.remote) == NEW
    assert leftovers(sides.root) == [] and leftovers(sides.base) == []
    # Everything the crash left was repaired by the rerun, and the audit says so.
    repaired = [w.removeprefix("recovered: ") for w in audit["warnings"] if w.startswith("recovered: ")]
    for item in left:
        where, _, name = item.removeprefix("remote:").partition("/")
        if where == "staging":
            assert f"removed leftover staging {name}" in repaired, (item, audit["warnings"])
        elif where == "journal":
            assert f"removed journal {name}" in repaired, (item, audit["warnings"])
        elif where == "tmp":
            assert f"removed leftover file list {name}" in repaired, (item, audit["warnings"])
    broken = sorted(b["side"] for b in audit["lock"]["broken_stale"])
    assert broken == sorted("remote" if i.startswith("remote:") else "local" for i in left if "locks/" in i)

    removed = [short for long, short in REPAIRS for line in repaired if line.startswith(long)]
    TABLE.append((crash.action, crash.phase, crash.paused, crash.kill, str(proc.returncode), live,
                  f"{r.returncode} {audit['transfer_state']}",
                  ", ".join([f"{s} lock broken" for s in broken] + removed) or "-"))


# --- writers on the source during a sync ------------------------------------------------------------------

LINE = b'{"event":"append","n":%d}\n'


class SourceWriter(threading.Thread):
    """Appends one line to .events.log, then adds one _derived part, again and again.

    Each write is atomic on its own (one O_APPEND write; a part renamed into place), so the
    states the source really has are exactly: k lines and k parts, or k+1 lines and k parts.
    """

    def __init__(self, dataset: Path, scratch: Path, limit: int = 2000):
        super().__init__(name="source-writer", daemon=True)
        self.dataset, self.scratch, self.limit = dataset, scratch, limit
        self.steps = 0
        self.stop = threading.Event()

    def run(self) -> None:
        parts = self.dataset / "_derived" / "w"
        for k in range(self.limit):
            if self.stop.wait(0.03):
                return
            with open(self.dataset / ".events.log", "ab", buffering=0) as log:
                log.write(LINE % k)
            tmp = self.scratch / f"part-{k:05d}"
            tmp.write_bytes(b"PAR1-w-%d" % k)
            os.rename(tmp, parts / f"part-{k:05d}.parquet")
            self.steps = k + 1


def assert_real_source_state(c: Content) -> tuple[int, int]:
    """`c` is a state the writer really produced on top of BASE_FILES; (lines, parts) appended."""
    base_events = BASE_FILES[".events.log"]
    events = c[".events.log"]
    assert events.startswith(base_events)
    appended = events[len(base_events):].splitlines(keepends=True)
    assert appended == [LINE % k for k in range(len(appended))]
    parts = sorted(p for p in c if p.startswith("_derived/w/"))
    assert parts == [f"_derived/w/part-{k:05d}.parquet" for k in range(len(parts))]
    assert all(c[p] == b"PAR1-w-%d" % k for k, p in enumerate(parts))
    assert len(appended) - len(parts) in (0, 1), (len(appended), len(parts))
    assert {p: b for p, b in c.items() if p != ".events.log" and not p.startswith("_derived/w/")} == \
        {p: b for p, b in BASE_FILES.items() if p != ".events.log"}
    return len(appended), len(parts)


@pytest.mark.parametrize("action", ["pull", "push"])
def test_writer_on_the_source_gives_a_real_snapshot_or_a_clean_refusal(sides: Sides, tmp_path: Path,
                                                                        action: str) -> None:
    sides.seed_both()
    source, dest = (sides.remote, sides.local) if action == "pull" else (sides.local, sides.remote)
    side = "remote" if action == "pull" else "local"
    (source / "_derived" / "w").mkdir()
    sides.chown_remote()
    scratch = source.parent / f".scratch-{secrets.token_hex(3)}"  # same filesystem: rename is atomic
    scratch.mkdir()
    writer = SourceWriter(source, scratch)
    outcomes: list[str] = []
    writer.start()
    try:
        for attempt in range(4):
            before = content(dest)
            out = tmp_path / f"{attempt}.json"
            r = sides.run(action, "--audit-json-out", str(out))
            after = content(dest)
            if r.returncode == 0:
                assert_real_source_state(after)
                outcomes.append("snapshot")
            else:
                assert r.returncode == 5, r.stderr
                assert load_audit(out)["error"]["message"] == f"the {side} dataset changed during the transfer"
                assert after == before  # nothing was promoted
                outcomes.append("refused")
            assert leftovers(sides.root) == [] and leftovers(sides.base) == []
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.steps > 0
    assert "refused" in outcomes, outcomes  # a writer this busy is caught at least once

    sides.chown_remote()
    r = sides.run(action, "--audit-json-out", str(tmp_path / "final.json"))
    assert r.returncode == 0, r.stderr
    lines, parts = assert_real_source_state(content(dest))
    assert (lines, parts) == (writer.steps, writer.steps)
    sides.assert_in_sync()


# --- a USR writer holding .usr.lock on the destination -----------------------------------------------------


class UsrLockHolder:
    """Holds flock(LOCK_EX) on <dataset>/.usr.lock, like a USR writer in the middle of a write."""

    def __init__(self, dataset: Path, sides: Sides):
        self.path = dataset / ".usr.lock"
        self.path.touch()
        sides.chown_remote()
        self.fd = os.open(self.path, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.mark.parametrize("action", ["pull", "push"])
def test_usr_writer_on_the_destination_makes_promotion_refuse_or_wait(sides: Sides, tmp_path: Path,
                                                                       action: str) -> None:
    source_ahead(sides, action)
    dest = sides.local if action == "pull" else sides.remote
    holder = UsrLockHolder(dest, sides)
    proc = None
    try:
        out = tmp_path / "refused.json"
        r = sides.run(action, "--wait", "0", "--audit-json-out", str(out))
        assert r.returncode == 4, r.stderr
        audit = load_audit(out)
        where = "" if action == "pull" else "remote 'rig': "
        assert audit["error"] == {**audit["error"], "kind": "locked", "exit_code": 4,
                                  "message": f"{where}a USR writer holds {dest / '.usr.lock'}"}
        assert r.stderr.strip().splitlines()[-2] == "error: " + audit["error"]["message"]
        assert content(dest) == OLD
        assert leftovers(sides.root) == [] and leftovers(sides.base) == []

        # With --wait, the sync holds just before promotion until the writer is done.
        phase = "after-verify" if action == "pull" else "after-rsync"
        marker = tmp_path / "paused"
        proc = sides.start(action, "--wait", "60", "--audit-json-out", str(tmp_path / "waited.json"),
                           env=pause_env(phase, marker))
        paused_pid(marker, proc)
        marker.unlink()
        time.sleep(3)  # the run is now waiting for our lock, past its pause point
        assert proc.poll() is None
        assert content(dest) == OLD
        holder.release()
        _, err = proc.communicate(timeout=120)
    finally:
        holder.release()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert load_audit(tmp_path / "waited.json")["transfer_state"] == "TRANSFERRED"
    assert content(dest) == NEW
    sides.assert_in_sync()


def test_usr_lock_symlink_is_not_followed(sides: Sides, tmp_path: Path) -> None:
    """A `.usr.lock` that is a symlink is never opened through (O_NOFOLLOW): the sync refuses."""
    source_ahead(sides, "pull")
    victim = tmp_path / "victim"
    victim.write_bytes(b"x")
    (sides.local / ".usr.lock").symlink_to(victim)
    r = sides.run("pull", "--audit-json-out", str(tmp_path / "a.json"))
    assert r.returncode == 5, r.stderr
    assert load_audit(tmp_path / "a.json")["error"]["message"] == (
        f"refusing to promote: {sides.local / '.usr.lock'} is not a regular file")
    assert victim.read_bytes() == b"x"
    assert (sides.local / ".usr.lock").is_symlink()
    (sides.local / ".usr.lock").unlink()
    assert content(sides.local) == OLD
    assert leftovers(sides.root) == []



# --- a sync that hangs, loses its locks, and wakes up ---------------------------------------------------


def test_a_hung_push_loses_its_locks_and_cannot_promote_when_it_wakes(sides: Sides, tmp_path: Path) -> None:
    """Heartbeats stop while a push is frozen inside the remote promotion (journal written): after
    lock_timeout the next push breaks both locks, repairs, and wins; the frozen push, thawed,
    fails cleanly and leaves the newer dataset alone."""
    sides.cfg.write_text(sides.cfg.read_text().replace("[remotes.rig]", "[remotes.rig]\nlock_timeout = 2"))
    source_ahead(sides, "push")
    marker = sides.rig.home / f"paused-{secrets.token_hex(4)}"
    frozen = sides.start("push", env=pause_env("mid-promote", marker, remote=True))
    stopped: list[int] = []
    try:
        agent = paused_pid(marker, frozen)
        stopped = [frozen.pid, agent]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)  # hung: alive, flock held, but no heartbeat any more
        time.sleep(3)  # older than lock_timeout
        newer = {**NEW, "meta.md": b"# my_dataset, revised again\n"}
        write_tree(sides.local, {"meta.md": newer["meta.md"]})

        out = tmp_path / "winner.json"
        r = sides.run("push", "--audit-json-out", str(out))
        assert r.returncode == 0, r.stderr
        audit = load_audit(out)
        assert sorted(b["side"] for b in audit["lock"]["broken_stale"]) == ["local", "remote"]
        repaired = " ".join(audit["warnings"])
        assert "removed journal" in repaired and "removed leftover staging" in repaired
        assert content(sides.remote) == newer
    finally:
        marker.unlink(missing_ok=True)  # thaw: the frozen push carries on from its pause point
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        _, err = frozen.communicate(timeout=120)

    assert frozen.returncode == 3, err
    assert "No such file or directory" in err.strip().splitlines()[-2]  # its staging is gone
    quiesce(sides)
    assert content(sides.local) == content(sides.remote) == newer
    assert leftovers(sides.root) == [] and leftovers(sides.base) == []
