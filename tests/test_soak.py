"""Soak: alternating pulls and pushes with random changes on both ends, faults injected, and a
reader checking the live datasets the whole time. Nothing may be lost, torn or mixed.

Every file is self-validating (its last 64 bytes are the sha256 of the rest), every
`.events.log` line carries its own digest, and `soak-manifest.json` lists the digest of every
other file the mutator wrote, so the reader can tell a torn file, a mixed tree (files of two
states side by side) or a missing primary from a consistent dataset.

Faults: SIGKILL of the whole sync (orchestrator, agent and rsync at once, like a power cut) at
a random pause point; a writer on the source during the run; a USR writer holding the
destination's `.usr.lock`; a stale lock of a dead holder.

Cycles: 30 over a `type = "local"` remote and 20 over the real sshd by default; with
USRSYNC_SOAK=1, 200 and 60. USRSYNC_SOAK_SEED picks the random seed (printed in the summary).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import (
    DATASET,
    REMOTE,
    Sides,
    load_audit,
    local_sides,
    pause_env,
    usr_argv,
    usr_env,
    wait_for,
    write_to_terminal,
)

from remote_agent import usrsync_agent as engine
from usrsync.cli import cli
from usrsync.dataset import classify

LONG = os.environ.get("USRSYNC_SOAK") == "1"
SEED = int(os.environ.get("USRSYNC_SOAK_SEED", "20261128"))
MANIFEST = "soak-manifest.json"
WRITER_PARTS = "_derived/w/"  # the source writer's files: validated by their own rules
PHASES = {
    "pull": ["after-lock", "after-manifest", "after-stage", "mid-rsync", "after-rsync", "after-verify",
             "mid-promote", "after-promote"],
    "push": ["after-lock", "after-manifest", "after-stage", "mid-rsync", "after-rsync", "before-verify",
             "mid-promote", "after-promote"],  # the last three pause the (local) agent
}
AGENT_PHASES = {"before-verify", "mid-promote", "after-promote"}
FAULTS = ["kill", "writer", "usr-lock", "stale-lock"]
Content = dict[str, bytes]


# --- self-validating content ------------------------------------------------------------------------------


def blob(rng: random.Random, path: str) -> bytes:
    body = f"{path} {rng.getrandbits(64):x}\n".encode() + rng.randbytes(rng.randint(0, 3000))
    return body + hashlib.sha256(body).hexdigest().encode()


def blob_ok(data: bytes) -> bool:
    return len(data) >= 64 and hashlib.sha256(data[:-64]).hexdigest().encode() == data[-64:]


def event_line(text: str) -> bytes:
    return json.dumps({"e": text, "h": hashlib.sha256(text.encode()).hexdigest()[:16]}).encode() + b"\n"


def events_ok(data: bytes) -> bool:
    if data and not data.endswith(b"\n"):
        return False
    for line in data.splitlines():
        doc = json.loads(line)
        if doc["h"] != hashlib.sha256(doc["e"].encode()).hexdigest()[:16]:
            return False
    return True


def with_manifest(files: Content) -> Content:
    listed = {p: hashlib.sha256(b).hexdigest() for p, b in files.items()
              if p not in (MANIFEST, ".events.log") and not p.startswith(WRITER_PARTS)}
    return {**files, MANIFEST: json.dumps(listed, sort_keys=True).encode()}


def problems(files: Content) -> list[str]:
    """Why `files` is not a consistent soak dataset (empty list: it is)."""
    found = []
    if "records.parquet" not in files:
        found.append("primary missing")
    for path, data in files.items():
        if path == ".events.log":
            if not events_ok(data):
                found.append("torn .events.log")
        elif path != MANIFEST and not blob_ok(data):
            found.append(f"torn {path}")
    try:
        listed = json.loads(files[MANIFEST])
    except (KeyError, ValueError):
        return [*found, "no readable manifest"]
    actual = {p: hashlib.sha256(b).hexdigest() for p, b in files.items()
              if p not in (MANIFEST, ".events.log") and not p.startswith(WRITER_PARTS)}
    if actual != listed:
        missing = sorted(set(listed) - set(actual))
        extra = sorted(set(actual) - set(listed))
        changed = sorted(p for p in set(listed) & set(actual) if listed[p] != actual[p])
        found.append(f"mixed tree: missing {missing}, extra {extra}, changed {changed}")
    return found


def read_dataset(root: Path) -> Content:
    found: Content = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if classify(rel) is not None:
                found[rel] = path.read_bytes()
    return found


def writer_snapshot_problems(dest: Content, source: Content, writer: int) -> list[str]:
    """Whether `dest` is a state the source really had while writer W ran: the source's files
    but for the writer's, and W's first k lines with its first k or k-1 parts."""
    found = []
    if {p: b for p, b in dest.items() if p != ".events.log" and not p.startswith(WRITER_PARTS)} != \
            {p: b for p, b in source.items() if p != ".events.log" and not p.startswith(WRITER_PARTS)}:
        found.append("writer snapshot: files other than the writer's differ from the source")
    if not source[".events.log"].startswith(dest[".events.log"]):
        found.append("writer snapshot: .events.log is not a prefix of the source's")
    mine = f"writer {writer} ".encode()
    lines = [line for line in dest[".events.log"].splitlines() if mine in line]
    parts = sorted(p for p in dest if p.startswith(f"{WRITER_PARTS}w-{writer:03d}-"))
    if parts != [f"{WRITER_PARTS}w-{writer:03d}-{k:05d}.bin" for k in range(len(parts))]:
        found.append(f"writer snapshot: parts are not a prefix: {parts}")
    if len(lines) - len(parts) not in (0, 1):
        found.append(f"writer snapshot: {len(lines)} lines but {len(parts)} parts: never a real state")
    if any(dest[p] != source.get(p) for p in parts):
        found.append("writer snapshot: a part differs from the source's")
    return found


# --- the reader -----------------------------------------------------------------------------------------


class Reader(threading.Thread):
    """Reads each live dataset through a directory fd, again and again, and checks it.

    A check counts only if the tree it read was the live one from start to end: the old tree
    of a promotion is deleted after the swap and may be seen half-deleted, which is fine.
    """

    def __init__(self, dirs: dict[str, Path], locks: dict[str, threading.Lock]):
        super().__init__(name="soak-reader", daemon=True)
        self.dirs, self.locks = dirs, locks
        self.stop = threading.Event()
        self.checks = 0
        self.swaps_seen = 0
        self.violations: list[str] = []

    def run(self) -> None:
        while not self.stop.wait(0.01):
            for side, path in self.dirs.items():
                if self.locks[side].acquire(blocking=False):  # the test is not mutating this side
                    try:
                        self.check(side, path)
                    except Exception as exc:  # noqa: BLE001 - a reader that dies must not go unnoticed
                        self.violations.append(f"{side}: reader failed: {exc!r}")
                    finally:
                        self.locks[side].release()

    def check(self, side: str, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            self.violations.append(f"{side}: the live dataset is missing")
            return
        try:
            inode = os.fstat(fd).st_ino
            files: Content = {}
            for top, _dirs, names, top_fd in os.fwalk(".", dir_fd=fd):
                for name in names:
                    rel = os.path.normpath(os.path.join(top, name))
                    if classify(rel) is None:
                        continue
                    file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=top_fd)
                    with os.fdopen(file_fd, "rb") as handle:
                        files[rel] = handle.read()
        except FileNotFoundError:
            self.swaps_seen += 1  # the tree we held was swapped out and is being removed
            return
        finally:
            os.close(fd)
        try:
            live = os.stat(path).st_ino
        except FileNotFoundError:
            live = None
        if live is None:
            self.violations.append(f"{side}: the live dataset is missing")
            return
        if live != inode:
            self.swaps_seen += 1
            return
        self.checks += 1
        self.violations.extend(f"{side}: {p}" for p in problems(files))


# --- the soak --------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, sides: Sides, workdir: Path, cycles: int, seed: int):
        self.sides, self.workdir, self.cycles, self.seed = sides, workdir, cycles, seed
        self.rng = random.Random(seed)
        self.dirs = {"local": sides.local, "remote": sides.remote}
        self.locks = {side: threading.Lock() for side in self.dirs}
        self.reader = Reader(self.dirs, self.locks)
        self.outcomes: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.events = 0
        self.lost: list[str] = []

    # -- changes ----------------------------------------------------------------------------------------

    def populate(self) -> None:
        files = with_manifest({
            "records.parquet": blob(self.rng, "records.parquet"), "meta.md": blob(self.rng, "meta.md"),
            ".events.log": self.new_events(3),
            **{f"_derived/ns/part-{i}.parquet": blob(self.rng, f"p{i}") for i in range(4)},
            "notes/a.txt": blob(self.rng, "a"),
        })
        for path in self.dirs.values():
            self.write(path, files, set())

    def new_events(self, n: int) -> bytes:
        lines = b"".join(event_line(f"event {self.events + i}") for i in range(n))
        self.events += n
        return lines

    def write(self, root: Path, files: Content, removed: set[str]) -> None:
        for rel in removed:
            (root / rel).unlink()
        for rel, data in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".soak-tmp")  # never seen half-written: renamed into place
            tmp.write_bytes(data)
            os.replace(tmp, path)
        self.sides.chown_remote()

    def mutate(self, side: str, *, source: bool) -> None:
        """Random changes; on a destination none to .events.log (that would diverge)."""
        root = self.dirs[side]
        rng = self.rng
        with self.locks[side]:
            files = read_dataset(root)
            changed: Content = {}
            removed: set[str] = set()
            for _ in range(rng.randint(1, 4)):
                what = rng.choice(["primary", "meta", "events", "add", "modify", "remove", "snapshot"])
                parts = sorted(p for p in files if p.startswith(("_derived/ns/", "notes/")) and p not in removed)
                if what == "primary":
                    changed["records.parquet"] = blob(rng, "records.parquet")
                elif what == "meta":
                    changed["meta.md"] = blob(rng, "meta.md")
                elif what == "events" and source:
                    changed[".events.log"] = changed.get(".events.log", files[".events.log"]) + \
                        self.new_events(rng.randint(1, 3))
                elif what == "add":
                    name = rng.choice(["_derived/ns", "_derived/deep/er", "notes", "notes/sub"])
                    changed[f"{name}/f-{rng.getrandbits(32):08x}.bin"] = blob(rng, name)
                elif what == "modify" and parts:
                    path = rng.choice(parts)
                    changed[path] = blob(rng, path)
                elif what == "remove" and len(parts) > 2:
                    path = rng.choice(parts)
                    removed.add(path)
                    changed.pop(path, None)
                elif what == "snapshot":
                    changed[f"_snapshots/records-{rng.getrandbits(32):08x}.parquet"] = files["records.parquet"]
            after = {**{p: b for p, b in files.items() if p not in removed}, **changed}
            manifest = with_manifest(after)[MANIFEST]
            self.write(root, {**changed, MANIFEST: manifest}, removed)

    # -- runs -------------------------------------------------------------------------------------------

    def run_in_process(self, action: str, *args: str) -> tuple[int, dict]:
        out = self.workdir / "audit.json"
        out.unlink(missing_ok=True)
        result = CliRunner().invoke(cli, ["--remotes-config", str(self.sides.cfg), action, DATASET, REMOTE, "-y",
                                          "--max-delete", "100%", "--no-progress", "--audit-json-out", str(out),
                                          *args])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        return result.exit_code, load_audit(out)

    def killed_run(self, action: str) -> int:
        """The sync SIGKILLed as a whole (its own process group) at a random pause point."""
        phase = self.rng.choice(PHASES[action])
        rig = self.sides.rig
        in_agent = phase in AGENT_PHASES and rig is not None  # a local remote's agent inherits our env
        marker = (rig.home if in_agent else self.workdir) / f"paused-{self.rng.getrandbits(32):08x}"
        proc = subprocess.Popen(usr_argv(self.sides.cfg, action, DATASET, REMOTE, "-y", "--max-delete", "100%"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=usr_env(pause_env(phase, marker, remote=in_agent)),
                                start_new_session=True)
        try:
            wait_for(lambda: (marker.exists() and marker.read_text().endswith("\n")) or proc.poll() is not None,
                     f"{action} to reach {phase}", timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
            marker.unlink(missing_ok=True)
        self.faults[f"SIGKILL at {phase}"] += 1
        self.wait_quiet()
        return proc.returncode

    def wait_quiet(self) -> None:
        """Nothing of a killed run may still be running (rsync dies with its parent, the remote
        agent with its session) when the next run starts."""
        paths = [str(self.sides.root).encode(), str(self.sides.base).encode()]

        def busy() -> bool:
            for entry in os.listdir("/proc"):
                try:
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes() if entry.isdigit() else b""
                except OSError:
                    continue
                if any(p in cmd for p in paths) and (b"rsync" in cmd or b"usrsync_agent" in cmd):
                    return True
            return self.sides.rig is not None and bool(self.sides.rig.user_processes())

        wait_for(lambda: not busy(), "the killed run's processes to exit", timeout=30)

    def cycle(self, n: int) -> None:
        action = "pull" if n % 2 == 0 else "push"
        source, dest = ("remote", "local") if action == "pull" else ("local", "remote")
        self.mutate(source, source=True)
        if self.rng.random() < 0.3:
            self.mutate(dest, source=False)  # local work the mirror will overwrite
        before = {side: read_dataset(path) for side, path in self.dirs.items()}
        fault = FAULTS[n // 3 % len(FAULTS)] if n % 3 == 2 else None  # every kind, again and again

        writer = None
        if fault == "kill":
            code = self.killed_run(action)
        elif fault == "writer":
            code, writer = self.with_source_writer(action, source)
            before[source] = read_dataset(self.dirs[source])  # the source is the writer's last state now
        elif fault == "usr-lock":
            code = self.with_usr_lock(action, dest)
        else:
            if fault == "stale-lock":
                self.plant_stale_lock()
            code, audit = self.run_in_process(action)
            if fault == "stale-lock":
                assert [b["side"] for b in audit["lock"]["broken_stale"]] == ["local"], audit["lock"]
                self.faults["stale lock of a dead holder: broken"] += 1
        self.outcomes[f"{action} exit {code}"] += 1
        self.check_after(code, before, source, dest, fault, writer)
        if code != 0:  # rerunning the same command finishes the job
            before = {side: read_dataset(path) for side, path in self.dirs.items()}
            code, _ = self.run_in_process(action)
            self.outcomes[f"{action} rerun exit {code}"] += 1
            self.check_after(code, before, source, dest, None, None)

    def check_after(self, code: int, before: dict[str, Content], source: str, dest: str, fault: str | None,
                    writer: int | None) -> None:
        """The source untouched; the destination the source's state (exit 0) or its own old one."""
        after = {side: read_dataset(path) for side, path in self.dirs.items()}
        what = f"{fault or 'plain'} run, exit {code}"
        for side, files in after.items():
            self.lost.extend(f"{what}: {side}: {p}" for p in problems(files))
        if after[source] != before[source]:
            self.lost.append(f"{what}: the source ({source}) changed")
        if code == 0 and writer is not None:
            self.lost.extend(f"{what}: {p}" for p in writer_snapshot_problems(after[dest], before[source], writer))
        elif code == 0 and after[dest] != before[source]:
            self.lost.append(f"{what}: the destination is not the source's state")
        elif code != 0 and after[dest] != before[dest] and not (fault == "kill" and after[dest] == before[source]):
            self.lost.append(f"{what}: the destination changed, and is not the source's state")

    # -- faults -----------------------------------------------------------------------------------------

    def with_source_writer(self, action: str, source: str) -> tuple[int, int]:
        """Step k appends the line "writer W k", then renames part w-W-k into place; (exit, W)."""
        root = self.dirs[source]
        writer = sum(v for k, v in self.faults.items() if k.startswith("source writer"))
        stop = threading.Event()

        def write() -> None:
            with self.locks[source]:  # the reader leaves the source alone while it is being written
                (root / WRITER_PARTS).mkdir(parents=True, exist_ok=True)
                for k in range(10_000):
                    if stop.wait(0.02):
                        break
                    with open(root / ".events.log", "ab", buffering=0) as log:
                        log.write(event_line(f"writer {writer} {k}"))
                    tmp = root.parent / f".soak-writer-{k}"
                    tmp.write_bytes(blob(self.rng, f"w-{writer}-{k}"))
                    os.replace(tmp, root / WRITER_PARTS / f"w-{writer:03d}-{k:05d}.bin")
                self.sides.chown_remote()

        thread = threading.Thread(target=write, name="soak-source-writer")
        thread.start()
        try:
            code, audit = self.run_in_process(action)
        finally:
            stop.set()
            thread.join(30)
        if code:
            assert (code, audit["error"]["message"]) == (5, f"the {source} dataset changed during the transfer")
        self.faults["source writer: " + ("refused" if code else "snapshot")] += 1
        return code, writer

    def with_usr_lock(self, action: str, dest: str) -> int:
        path = self.dirs[dest] / ".usr.lock"
        path.touch()
        self.sides.chown_remote()
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            code, audit = self.run_in_process(action, "--wait", "0")
        finally:
            os.close(fd)
        assert (code, audit["error"]["kind"]) == (4, "locked"), audit["error"]
        self.faults["USR writer held .usr.lock: refused"] += 1
        return code

    def plant_stale_lock(self) -> None:
        """A lock file of a sync that died: a pid that no longer exists, on this host."""
        dead = subprocess.Popen(["true"])
        dead.wait()
        lock = engine.Lock(str(self.sides.root / engine.STATE_DIR / "locks"), engine.dataset_key(DATASET),
                           "dead-txid", 300)
        os.makedirs(os.path.dirname(lock.path), exist_ok=True)
        info = {**lock.info(), "pid": dead.pid, "host": socket.gethostname()}
        Path(lock.path).write_text(json.dumps(info))

    # -- all of it --------------------------------------------------------------------------------------

    def run(self, report: Callable[[list[str]], None]) -> None:
        self.populate()
        self.reader.start()
        started = time.monotonic()
        try:
            for n in range(self.cycles):
                self.cycle(n)
                assert not self.lost, self.lost
        finally:
            self.reader.stop.set()
            self.reader.join(30)
            report([
                f"seed {self.seed}: {self.cycles} cycles in {time.monotonic() - started:.0f} s",
                "runs: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items())),
                f"faults injected: {sum(self.faults.values())} ("
                + ", ".join(f"{k}: {v}" for k, v in sorted(self.faults.items())) + ")",
                (f"reader: {self.reader.checks} consistent reads of a live dataset, {self.reader.swaps_seen} "
                 f"reads overtaken by a promotion, {len(self.reader.violations)} torn or mixed"),
                f"lost or torn files after runs: {len(self.lost)}",
            ])
        assert self.reader.violations == []
        assert self.reader.checks > self.cycles
        assert sum(self.faults.values()) > 0
        final = {side: read_dataset(path) for side, path in self.dirs.items()}
        assert all(problems(files) == [] for files in final.values())


@pytest.mark.timeout(1800 if LONG else 300)
def test_soak_local(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    sides = local_sides(tmp_path / "w", lock_timeout=30)
    soak = Soak(sides, tmp_path, 200 if LONG else 30, SEED)
    soak.run(lambda lines: write_to_terminal(request.config, "soak over a local remote", lines))


@pytest.mark.timeout(1800 if LONG else 300)
def test_soak_ssh(sides: Sides, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    soak = Soak(sides, tmp_path, 60 if LONG else 20, SEED + 1)
    soak.run(lambda lines: write_to_terminal(request.config, "soak over the real sshd", lines))
