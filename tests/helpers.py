"""Helpers shared by the integration tests: run the CLI, build datasets, snapshot trees, wait."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import rig as rigmod
import tomli_w

from remote_agent import usrsync_agent as engine
from usrsync.dataset import classify
from usrsync.manifest import Entry, Manifest

DATASET = "densegen/my_dataset"
REMOTE = "rig"

Tree = dict[str, tuple[bytes, int]]  # relpath -> (bytes, mtime in whole seconds)


def usr_argv(cfg: Path, *args: str) -> list[str]:
    """The CLI as a user runs it, with this test's remotes config."""
    return [sys.executable, "-m", "usrsync", "--remotes-config", str(cfg), *args]


def usr_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **(extra or {})}


def run_usr(cfg: Path, *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion as a non-TTY subprocess."""
    return subprocess.run(usr_argv(cfg, *args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=usr_env(env), cwd=cwd, timeout=timeout)


def start_usr(cfg: Path, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """Start the CLI in the background (collect it with `.communicate(timeout=...)`)."""
    return subprocess.Popen(usr_argv(cfg, *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=usr_env(env))


def write_tree(root: Path, files: Mapping[str, bytes]) -> None:
    """Create (or overwrite) `files` below `root`, making parent dirs."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def tree_state(root: Path) -> Tree:
    """Every non-directory below `root` with its mtime to the second, and its bytes: a regular
    file's content, a symlink's target (`symlink:<target>`), else `special:<mode>` (a FIFO
    must never be opened: that blocks)."""
    state: Tree = {}
    for dirpath, dirs, names in os.walk(root):
        for name in names + [d for d in dirs if Path(dirpath, d).is_symlink()]:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = b"symlink:" + os.fsencode(os.readlink(path))
            else:
                content = b"special:%o" % stat.S_IFMT(st.st_mode)
            state[path.relative_to(root).as_posix()] = (content, int(st.st_mtime))
    return state


def synced(state: Tree) -> Tree:
    """The part of a tree that sync moves: runtime files (locks, leases) left out."""
    return {rel: value for rel, value in state.items() if classify(rel) is not None}


def set_mtimes(root: Path, seconds: int) -> None:
    """Give every file below `root` one old mtime (no file looks freshly written)."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            os.utime(Path(dirpath, name), (seconds, seconds))


def load_audit(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    assert doc["usr_output_version"] == 1
    return doc["data"]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0, step: float = 0.02) -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def child_pids(parent: int, name: str | None = None) -> list[int]:
    """Live direct children of `parent` (optionally only those whose comm is `name`), from /proc."""
    found = []
    for pid in rigmod.pids():
        fields = rigmod.proc_status(pid)
        if fields.get("PPid") != str(parent) or fields.get("State", "Z").startswith("Z"):
            continue
        if name is None or fields.get("Name") == name:
            found.append(pid)
    return found


BASE_FILES: dict[str, bytes] = {
    "records.parquet": b"PAR1" + bytes(range(256)) * 4 + b"PAR1",
    "meta.md": b"# my_dataset\n",
    ".events.log": b'{"event":"init"}\n{"event":"attach","rows":10}\n',
    "_snapshots/records-20260101T000000Z.parquet": b"PAR1snapshot",
    "_derived/ns/part-0001.parquet": b"PAR1derived-1",
    "notes/readme.txt": b"auxiliary\n",
}


class Sides:
    """One dataset seen from both ends: the local root and the rig's remote base dir
    (or, with rig None, a `type = "local"` remote's base dir: see local_sides)."""

    def __init__(self, cfg: Path, root: Path, base: Path, rig: rigmod.SshRig | None):
        self.cfg = cfg
        self.root = root
        self.base = base
        self.rig = rig
        self.local = root / DATASET
        self.remote = base / DATASET

    def run(self, action: str, *args: str, env: Mapping[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`usr ACTION densegen/my_dataset rig ARGS...` (pull/push get -y)."""
        confirm = ["-y"] if action in ("pull", "push") else []
        return run_usr(self.cfg, action, DATASET, REMOTE, *confirm, *args, env=env, timeout=timeout)

    def start(self, action: str, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        confirm = ["-y"] if action in ("pull", "push") else []
        return start_usr(self.cfg, action, DATASET, REMOTE, *confirm, *args, env=env)

    def seed_remote(self, files: Mapping[str, bytes] = BASE_FILES) -> None:
        write_tree(self.remote, files)
        self.chown_remote()

    def chown_remote(self) -> None:
        """Hand the remote base dir to the rig's login user (we write as root); no-op for local remotes."""
        if self.rig is not None:
            self.rig.chown_tree(self.base)

    def seed_local(self, files: Mapping[str, bytes] = BASE_FILES) -> None:
        write_tree(self.local, files)

    def seed_both(self, files: Mapping[str, bytes] = BASE_FILES) -> None:
        """The same bytes and mtimes on both ends: in sync before the test starts."""
        self.seed_local(files)
        self.seed_remote(files)
        set_mtimes(self.local, 1_700_000_000)
        set_mtimes(self.remote, 1_700_000_000)

    def states(self) -> tuple[Tree, Tree]:
        return tree_state(self.local), tree_state(self.remote)

    def assert_in_sync(self) -> None:
        """Both ends hold the same synced files (runtime files such as `.usr.lock` stay per host)."""
        local, remote = (synced(state) for state in self.states())
        assert local == remote
        assert local, "the dataset is empty"


def leftovers(root: Path) -> list[str]:
    """What runs left in a datasets root's (or base dir's) state dir: staging dirs, journals,
    locks, rsync file lists, as `<kind>/<name>`; empty when nothing is in flight."""
    state = root / ".usrsync"
    return sorted(f"{sub}/{p.name}" for sub in ("staging", "journal", "locks", "tmp")
                  for p in (state / sub).glob("*")) if state.is_dir() else []


def local_sides(workdir: Path, **profile: Any) -> Sides:
    """Sides over a `type = "local"` remote (no SSH): `<workdir>/local` and `<workdir>/base`.

    `profile` adds keys to the remote's profile (e.g. python, agent_timeout, lock_timeout).
    """
    root, base = workdir / "local", workdir / "base"
    root.mkdir(parents=True)
    base.mkdir()
    cfg = workdir / "remotes.toml"
    cfg.write_text(tomli_w.dumps({"root": str(root),
                                  "remotes": {REMOTE: {"type": "local", "base_dir": str(base), **profile}}}))
    return Sides(cfg, root, base, None)


# --- in-memory manifests for the pure compare/plan tests ---------------------------------

OLD_MTIME_NS = 1_700_000_000 * 10**9


def manifest_entry(path: str, data: bytes, *, mtime_ns: int = OLD_MTIME_NS, kind: str = "file",
                   hashed: bool = True) -> Entry:
    """The manifest entry the engine would produce for `data` at `path` (sha256 digest)."""
    digest = hashlib.sha256(data).hexdigest() if hashed and kind == "file" else ""
    return Entry(path=path, section=classify(path), size=len(data), mtime_ns=mtime_ns, kind=kind, digest=digest)


def manifest_of(files: Mapping[str, bytes], *, exists: bool = True, hash_sections: set[str] | None = None,
                **entry_kw: Any) -> Manifest:
    """A sorted sha256 manifest of `files` (relpath -> bytes), as local_manifest would build it."""
    entries = [manifest_entry(p, files[p], hashed=hash_sections is None or classify(p) in hash_sections, **entry_kw)
               for p in sorted(files)]
    return Manifest(exists=exists, algo="sha256", entries=entries)


def pause_env(phase: str, marker: Path, seconds: float = 60, remote: bool = False) -> dict[str, str]:
    """Environment that holds the orchestrator (or, with `remote`, the remote agent) at a pause
    point: it writes "<phase> <pid>" to `marker`, then waits until the test deletes `marker`
    (at most `seconds`)."""
    prefix = "USRSYNC_REMOTE_PAUSE_" if remote else "USRSYNC_PAUSE_"
    return {prefix + "AT": phase, prefix + "FILE": str(marker), prefix + "SECONDS": str(seconds)}


def paused_pid(marker: Path, proc: subprocess.Popen[str], timeout: float = 60) -> int:
    """Wait (bounded) until `proc` reaches its pause point; the pid of the paused process."""

    def reached() -> bool:
        return marker.exists() and marker.read_text().endswith("\n")

    wait_for(lambda: reached() or proc.poll() is not None, f"pause marker {marker}", timeout=timeout)
    assert reached(), f"exited {proc.returncode} before its pause point: {proc.communicate()[1]}"
    return int(marker.read_text().split()[1])


def agent_double(directory: Path, script: Path, variant: str) -> Path:
    """A `python` for a `type = "local"` profile that runs `script VARIANT serve NONCE` instead
    of the agent (LocalTransport runs `<python> <agent path> serve NONCE`; the path is dropped)."""
    wrapper = directory / f"python-{script.stem}"
    wrapper.write_text(f"#!/bin/sh\nshift\nexec {shlex.quote(sys.executable)} {shlex.quote(str(script))} "
                       f'{shlex.quote(variant)} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def write_to_terminal(config: pytest.Config, title: str, lines: Sequence[str]) -> None:
    """Write a report to the terminal past pytest's output capture, so it shows on success too."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        print(title, *lines, sep="\n")
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.ensure_newline()
        reporter.write_sep("-", title)
        for line in lines:
            reporter.write_line(line)


def cache_entries(paths: list[str], keys: bytes, digests: bytes) -> dict[str, tuple[bytes, str]]:
    """A hash cache's columns (engine.HashCache, or its file) as {relpath: (packed key, hex digest)}."""
    width = len(digests) // len(paths) if paths else 0
    size = engine.KEY_SIZE
    return {rel: (keys[i * size:(i + 1) * size], digests[i * width:(i + 1) * width].hex())
            for i, rel in enumerate(paths)}


def loaded_cache(cache: engine.HashCache) -> dict[str, tuple[bytes, str]]:
    return cache_entries(cache.paths, cache.keys, cache.digests)


def cache_columns(entries: Mapping[str, tuple[bytes, str]]) -> dict[str, Any]:
    """{relpath: (packed key, hex digest)} as a cache file's columns."""
    rels = sorted(entries)
    return {"paths": rels, "keys": b"".join(entries[rel][0] for rel in rels),
            "digests": b"".join(bytes.fromhex(entries[rel][1]) for rel in rels)}


def trusted_digests(known: Mapping[str, Sequence[Any]], *, as_sent: bool = False) -> Any:
    """engine.TrustedDigests of {relpath: (inode, size, mtime_ns, digest)}; `as_sent`: its columns
    as a call's argument arrives in the agent (the keys base64 text, as the JSON encoder writes them)."""
    paths = sorted(known)
    trusted = engine.TrustedDigests(paths, b"".join(engine.TRUSTED_KEY.pack(*known[p][:3]) for p in paths),
                                    [known[p][3] for p in paths])
    return json.loads(msgspec.json.encode(trusted.columns())) if as_sent else trusted
