#!/usr/bin/env python3
"""`make bench`: usrsync against what users would run instead, on the same trees, over one sshd.

Builds the trees in a temp dir (small trees on a tmpfs when we may mount one: fresh ext4 dirs
suffer the `recently_deleted` inode stall; big trees on disk, so dropping the page cache means
something), starts a throwaway loopback sshd (tests/rig.py) and runs every scenario several
times, alternating ours with the competitor. Both use the same sshd, user and key. Prints a
Markdown table of medians and ratios and writes it, with every single run, as JSON (and .md).

    uv run python scripts/bench.py [--quick] [--only S1,S7] [--out bench-results.json]

Needs root (the rig creates a login user; dropping the page cache needs it too).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import platform
import pwd
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import rig as rigmod  # noqa: E402

SCENARIOS = ("S1", "S1n", "S2", "S3", "S4", "S4b", "S5", "S5s", "S6", "S7")
BLOCK = 4096
# S1n: what latencyfs adds to every metadata request, as a network filesystem's round trip does
# (Lustre: ~2,500 stats a second per client).
METADATA_DELAY = 0.0004


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    small_files: int  # S1/S4 tree: this many 4 KiB files
    small_dirs: int
    big_files: int  # S2-S5 tree: this many files of big_size bytes
    big_size: int
    s6_entries: int  # entries per manifest in S6
    s6_run_files: int  # S6 as a run: empty files in the tree usr diff scans on both sides
    reps: int  # runs per side of the cheap scenarios
    big_reps: int  # runs per side of the scenarios that read or move the big files
    anchor_sample: int  # S1 anchor: files actually hashed over ssh (the rest is extrapolated)
    big_anchor_sample: int  # S2 anchor: the same for the big files


FULL = Scale("full", 100_000, 100, 8, 1 << 30, 1_000_000, 1_000_000, reps=5, big_reps=3, anchor_sample=100,
             big_anchor_sample=2)
QUICK = Scale("quick", 5_000, 10, 4, 64 << 20, 100_000, 50_000, reps=3, big_reps=3, anchor_sample=30,
              big_anchor_sample=5)


@dataclasses.dataclass
class Row:
    scenario: str
    ours_what: str
    theirs_what: str
    unit: str  # of ours/theirs: "s", "GB/s" or "MB"
    ours: list[float]
    theirs: list[float]
    target: str  # as the issue states it; "" for informational rows
    bound: float | None = None  # on the ratio (or on ours when `absolute`)
    higher_is_better: bool = False
    absolute: bool = False
    note: str = ""
    checks: list[str] = dataclasses.field(default_factory=list)

    def ours_median(self) -> float | None:
        return statistics.median(self.ours) if self.ours else None

    def theirs_median(self) -> float | None:
        return statistics.median(self.theirs) if self.theirs else None

    def ratio(self) -> float | None:
        ours, theirs = self.ours_median(), self.theirs_median()
        if ours is None or not theirs or self.absolute:
            return None
        return ours / theirs

    def met(self) -> bool | None:
        value = self.ours_median() if self.absolute else self.ratio()
        if self.bound is None or value is None:
            return None
        return value >= self.bound if self.higher_is_better else value <= self.bound

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ours_median": self.ours_median(),
                "theirs_median": self.theirs_median(), "ratio": self.ratio(), "met": self.met()}


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value:.3f} {unit}" if value < 10 else f"{value:.2f} {unit}"


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "",
             "| scenario | ours | median | against | median | ratio | target | met? |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row.ratio()
        met = row.met()
        lines.append(" | ".join([
            f"| {row.scenario}", row.ours_what, _fmt(row.ours_median(), row.unit), row.theirs_what or "—",
            _fmt(row.theirs_median(), row.unit), f"{ratio:.2f}" if ratio is not None else "—",
            row.target or "—", {True: "yes", False: "**no**", None: "—"}[met],
        ]) + " |")
    notes = [f"- {row.scenario}: {row.note}" for row in rows if row.note]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


# --------------------------------------------------------------------------- trees


def write_small_tree(root: Path, files: int, dirs: int) -> None:
    """A dataset of `files` distinct 4 KiB files in `dirs` dirs under _derived/."""
    (root / "_derived").mkdir(parents=True)
    (root / "records.parquet").write_bytes(os.urandom(BLOCK))
    (root / "meta.md").write_bytes(b"# bench dataset\n")
    pool = os.urandom(BLOCK + files)  # file i is the window at offset i: distinct, cheap to make
    per_dir = -(-files // dirs)
    for i in range(files):
        d = root / "_derived" / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir()
        (d / f"f{i:06d}.bin").write_bytes(pool[i:i + BLOCK])


def write_empty_tree(root: Path, files: int) -> None:
    """A dataset of `files` empty files, 1000 per dir under _derived/: entries without bytes."""
    (root / "_derived").mkdir(parents=True)
    (root / "records.parquet").write_bytes(os.urandom(BLOCK))
    for i in range(files):
        d = root / "_derived" / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir()
        os.close(os.open(d / f"part-{i:07d}", os.O_WRONLY | os.O_CREAT, 0o644))


def write_big_tree(root: Path, files: int, size: int) -> None:
    """records.parquet plus `files` incompressible, pairwise distinct files of `size` bytes."""
    (root / "_derived").mkdir(parents=True)
    (root / "records.parquet").write_bytes(os.urandom(BLOCK))
    chunk = 1 << 20
    pool = os.urandom(8 << 20)
    for i in range(files):
        with open(root / "_derived" / f"big{i:02d}.bin", "wb") as out:
            for k in range(size // chunk):
                off = ((i * 7919 + k * 104729) % (len(pool) - chunk)) & ~15
                out.write(struct.pack(">QQ", i, k) + pool[off + 16:off + chunk])


def warm(files: list[Path] | list[str]) -> None:
    """Read files once so they are in the page cache."""
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def dataset_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, scale: Scale, rig: rigmod.SshRig, work: Path, small: Path, notes: list[str]):
        self.scale = scale
        self.rig = rig
        self.work = work
        self.small = small
        self.big = work / "big"
        self.latency_mount = work / "latency"  # S1n: the small remote trees behind latencyfs
        self.notes = notes
        self.rows: list[Row] = []
        self.counter = 0
        self.root_ok = os.geteuid() == 0
        self.env = self._env()
        self.remote_python, self.algo_note = self._remote_python()
        self.config = work / "remotes.toml"
        self._write_config()

    # ----------------------------------------------------------------- setup

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Installed code normally runs from bytecode; a PYTHONDONTWRITEBYTECODE left in the
        # environment would make every run compile asyncssh, rich, click... from source.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME"):
            path = self.work / "xdg" / var.lower()
            path.mkdir(parents=True, exist_ok=True)
            env[var] = str(path)
        return env

    def _remote_python(self) -> tuple[str, str]:
        """A Python the test user can run that has xxhash (rsync hashes with xxh128 too).

        A venv over the system python3 (the test user's), with xxhash from uv's cache. Without
        it the agent falls back to sha256, which only matters where files are hashed.
        """
        venv = self.work / "remote-python"
        uv = shutil.which("uv")
        system = shutil.which("python3", path="/usr/bin:/bin") or "python3"
        if uv:
            ok = subprocess.run([uv, "venv", "-q", "--python", system, str(venv)], capture_output=True, check=False).returncode == 0
            for extra in (["--offline"], []):
                if ok and subprocess.run([uv, "pip", "install", "-q", *extra, "--python", str(venv / "bin" / "python"),
                                          "xxhash"], capture_output=True, check=False).returncode == 0:
                    return str(venv / "bin" / "python"), "xxh3_128 on both ends (remote: system python3 + xxhash)"
        self.notes.append("no xxhash for the remote python: the agent hashes with sha256")
        return "python3", "sha256 (the remote python has no xxhash)"

    def _write_config(self) -> None:
        import tomli_w

        remotes = {name: self.rig.remote_profile(base_dir=base / "remote", python=self.remote_python)
                   for name, base in (("small", self.small), ("big", self.big))}
        remotes["big-openssh"] = {**remotes["big"], "transport": "openssh"}
        remotes["small-latency"] = {**remotes["small"], "base_dir": str(self.latency_mount)}
        self.config.write_text(tomli_w.dumps({"remotes": remotes}))

    def remote_dir(self, kind: str, dataset: str) -> Path:
        return (self.small if kind == "small" else self.big) / "remote" / dataset

    # ----------------------------------------------------------------- runners

    def usr_argv(self, action: str, dataset: str, remote: str, root: Path, *extra: str) -> tuple[list[str], Path]:
        """The CLI's command line for one run, and where it writes its audit."""
        self.counter += 1
        audit = self.work / "audits" / f"{self.counter:04d}.json"
        audit.parent.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "usrsync", "--remotes-config", str(self.config), "--root", str(root),
                action, dataset, remote, "--audit-json-out", str(audit), *extra]
        return argv + ["-y"] if action != "diff" else argv, audit

    def usr(self, action: str, dataset: str, remote: str, root: Path, *extra: str) -> tuple[float, dict[str, Any]]:
        """One CLI run as a subprocess (like a user or cron would); (seconds, audit data)."""
        argv, audit = self.usr_argv(action, dataset, remote, root, *extra)
        started = time.perf_counter()
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=self.env, text=True, check=False)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"usr {action} {dataset} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return elapsed, json.loads(audit.read_text())["data"]

    def timed(self, argv: list[str], *, env: dict[str, str] | None = None) -> tuple[float, str]:
        started = time.perf_counter()
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env or self.env,
                              check=False)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return elapsed, proc.stdout

    def rsync(self, src: Path, dst: Path, *flags: str) -> tuple[float, str]:
        return self.timed(["rsync", *flags, "-e", self.rig.rsh(), f"{self.rig.host}:{src}/", f"{dst}/"])

    def drop_caches(self) -> bool:
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            return False
        return True

    def rotate(self, reps: int, runs: list[Callable[[int], float]],
               before: Callable[[], None] | None = None) -> list[list[float]]:
        """Every run `reps` times, rotating which goes first; the results per run."""
        out: list[list[float]] = [[] for _ in runs]
        order = list(range(len(runs)))
        for i in range(reps):
            for k in order[i % len(runs):] + order[:i % len(runs)]:
                if before is not None:
                    before()
                out[k].append(runs[k](i))
        return out

    def expect_in_sync(self, data: dict[str, Any], what: str) -> None:
        if not data["post"]["in_sync"]:
            raise RuntimeError(f"{what}: usr diff does not see equal trees; the bench setup is wrong")

    def chown(self, path: Path) -> None:
        self.rig.chown_tree(path)

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # ----------------------------------------------------------------- scenarios

    def setup_small(self) -> None:
        s = self.scale
        self.log(f"building S1: {s.small_files} x 4 KiB (remote), copy with cp -a (local)")
        remote = self.remote_dir("small", "s1")
        write_small_tree(remote, s.small_files, s.small_dirs)
        (self.small / "local").mkdir(exist_ok=True)
        subprocess.run(["cp", "-a", str(remote), str(self.small / "local" / "s1")], check=True)
        one = self.remote_dir("small", "s7")
        one.mkdir(parents=True)
        (one / "records.parquet").write_bytes(os.urandom(BLOCK))
        subprocess.run(["cp", "-a", str(one), str(self.small / "local" / "s7")], check=True)
        self.chown(self.small / "remote")

    def s7(self) -> None:
        self.log("S7: fixed cost")
        root = self.small / "local"
        _, data = self.usr("diff", "s7", "small", root)  # deploys the agent, fills caches
        self.expect_in_sync(data, "S7")
        ssh = self.rig.ssh_argv("true")
        ours, theirs = self.rotate(self.scale.reps + 2, [lambda i: self.usr("diff", "s7", "small", root)[0],
                                                         lambda i: self.timed(ssh)[0]])
        self.rows.append(Row("S7 fixed cost, one-file dataset", "`usr diff`", "`ssh HOST true`", "s", ours, theirs,
                             "≤ 3", 3.0))

    def s1(self) -> None:
        s = self.scale
        root = self.small / "local"
        local, remote = root / "s1", self.remote_dir("small", "s1")
        self.log("S1: warming the hash caches (first usr diff hashes everything)")
        _, data = self.usr("diff", "s1", "small", root)
        self.expect_in_sync(data, "S1")
        self.rsync(remote, local, "-a", "--checksum", "--dry-run")
        self.log("S1: no-op usr diff vs rsync -a --checksum --dry-run vs rsync -a --dry-run")
        ours, checksum, quick = self.rotate(s.reps, [
            lambda i: self.usr("diff", "s1", "small", root)[0],
            lambda i: self.rsync(remote, local, "-a", "--checksum", "--dry-run")[0],
            lambda i: self.rsync(remote, local, "-a", "--dry-run")[0],
        ])
        files = f"{s.small_files:,} × 4 KiB"
        self.rows.append(Row(f"S1 no-op, {files}, caches warm", "`usr diff`", "`rsync -a --checksum --dry-run`",
                             "s", ours, checksum, "≤ 0.5", 0.5))
        self.rows.append(Row("S1b same tree", "`usr diff`", "`rsync -a --dry-run` (size+mtime)", "s", ours, quick,
                             "≤ 1.5", 1.5))
        self.rows.append(self.anchor("S1", local, remote, s.anchor_sample, ours, "page cache warm"))

    def s1n(self) -> None:
        """S1 with the remote tree behind latencyfs, as if on a network filesystem: there the agent
        stats and hashes on threads, where rsync's sender stats one file after another."""
        missing = latency_fs_missing()
        if missing:
            self.notes.append(f"S1n skipped: {missing}")
            return
        root = self.small / "local"
        with latency_fs(self.small / "remote", self.latency_mount, METADATA_DELAY) as mount:
            self.log("S1n: warming the remote hash cache through latencyfs (it hashes every file)")
            _, data = self.usr("diff", "s1", "small-latency", root)
            self.expect_in_sync(data, "S1n")
            self.log("S1n: no-op usr diff vs rsync -a --dry-run, remote behind latencyfs")
            # A pause first: no run finds the kernel's attribute cache (1 s) warm from the one before.
            ours, theirs = self.rotate(self.scale.big_reps, [
                lambda i: self.usr("diff", "s1", "small-latency", root)[0],
                lambda i: self.rsync(mount / "s1", root / "s1", "-a", "--dry-run")[0],
            ], before=lambda: time.sleep(1.5))
        self.rows.append(Row(f"S1n S1 no-op, remote behind {METADATA_DELAY * 1000:g} ms per metadata request",
                             "`usr diff`", "`rsync -a --dry-run`", "s", ours, theirs, "",
                             note="the remote tree through scripts/latencyfs.py (FUSE), as on a network "
                                  "filesystem; the agent stats and hashes there on 4 threads per --jobs"))

    def anchor(self, scenario: str, local: Path, remote: Path, sample: int, ours: list[float], how: str,
               before: Callable[[], None] | None = None) -> Row:
        """The per-file way (`ssh HOST sha256sum F` plus a local sha256sum, file by file) on an even
        sample of the files, one run, extrapolated to all files by bytes."""
        files = dataset_files(remote)
        chosen = files[::max(1, len(files) // sample)][:sample]
        if before is not None:
            before()
        started = time.perf_counter()
        for path in chosen:
            rel = path.relative_to(remote)
            _, theirs = self.timed(self.rig.ssh_argv("sha256sum", str(path)))
            _, mine = self.timed(["sha256sum", str(local / rel)])
            if theirs.split()[0] != mine.split()[0]:
                raise RuntimeError(f"anchor: {rel} differs, but the trees should be equal")
        elapsed = time.perf_counter() - started
        total = sum(p.stat().st_size + BLOCK for p in files)  # + a block: per-file cost, not only bytes
        share = sum(p.stat().st_size + BLOCK for p in chosen) / total
        note = (f"anchor: one run over {len(chosen)} of {len(files)} files ({elapsed:.1f} s, {how}), "
                f"extrapolated by size" if len(chosen) < len(files) else f"anchor: one run, {how}")
        return Row(f"{scenario} anchor-style baseline", "`usr diff`", "ssh + `sha256sum` per file", "s", ours,
                   [elapsed / share], "", note=note)

    def s4(self) -> None:
        s = self.scale
        root = self.small / "local"
        local, remote = root / "s1", self.remote_dir("small", "s1")
        files = [p for p in dataset_files(remote) if "_derived" in p.parts]
        self.log("S4: one 4 KiB file changed; warm-up runs first (rsync -a replays owner/perms once)")
        self.rsync(remote, local, "-a", "--checksum")
        self.usr("diff", "s1", "small", root)

        def change(i: int, side: str) -> None:
            target = files[(i * 2 + (side == "theirs")) * 7919 % len(files)]
            target.write_bytes(hashlib.sha256(f"{side}-{i}-{time.time_ns()}".encode()).digest() * (BLOCK // 32))

        def ours(i: int) -> float:
            change(i, "ours")
            elapsed, data = self.usr("pull", "s1", "small", root)
            moved = data["transfer"]["files"]
            if moved != 1 or data["transfer_state"] != "TRANSFERRED" or not data["post"]["in_sync"]:
                raise RuntimeError(f"S4: usr pull moved {moved} files ({data['transfer_state']}), expected exactly 1")
            return elapsed

        def theirs(i: int) -> float:
            change(i, "theirs")
            elapsed, out = self.rsync(remote, local, "-a", "--checksum", "--itemize-changes")
            moved = sum(1 for line in out.splitlines() if line.startswith(">f"))
            if moved != 1:
                raise RuntimeError(f"S4: rsync moved {moved} files, expected exactly 1")
            return elapsed

        a, b = self.rotate(s.reps, [ours, theirs])
        self.rows.append(Row("S4 one 4 KiB file changed in S1", "`usr pull`", "`rsync -a --checksum`", "s", a, b,
                             "≤ 1.0, exactly 1 file moved", 1.0, checks=["audit transfer.files == 1 in every run"]))

    def s6(self) -> None:
        self.log(f"S6: peak RSS comparing two {self.scale.s6_entries:,}-entry manifests")
        runs = []
        for _ in range(max(1, self.scale.reps // 2)):
            _, out = self.timed([sys.executable, __file__, "--s6-child", str(self.scale.s6_entries)])
            runs.append(json.loads(out))
        self.rows.append(Row(f"S6 two {self.scale.s6_entries:,}-entry manifests compared + planned", "peak RSS", "",
                             "MB", [r["peak_mb"] for r in runs], [], "≤ 400 MB", 400.0, absolute=True,
                             note=f"peak RSS of the whole process (interpreter and imports: "
                                  f"{runs[0]['baseline_mb']:.0f} MB; after the compare, before the plan: "
                                  f"{runs[0]['compared_peak_mb']:.0f} MB); compare {runs[0]['compare_s']:.1f} s, "
                                  f"plan {runs[0]['plan_s']:.1f} s"))

    def s6_run(self) -> None:
        """Peak RSS of both processes of a real usr diff over a tree of many (empty) files."""
        n = self.scale.s6_run_files
        self.log(f"S6 as a run: building {n:,} empty files (remote), copy with cp -a (local)")
        remote = self.remote_dir("small", "s6")
        write_empty_tree(remote, n)
        (self.small / "local").mkdir(exist_ok=True)
        subprocess.run(["cp", "-a", str(remote), str(self.small / "local" / "s6")], check=True)
        self.chown(self.small / "remote")
        for what, how in (("first", "every file hashed, every entry sent"),
                          ("no-op", "hash caches and the manifest copy warm")):
            self.log(f"S6 as a run: {what} usr diff, polling both processes' peak RSS")
            peaks, data = self.usr_peaks("diff", "s6", "small", self.small / "local")
            self.expect_in_sync(data, "S6 as a run")
            self.rows.append(Row(f"S6 as a run: {what} `usr diff` of {n:,} files", "`usr` peak RSS", "agent peak RSS",
                                 "MB", [peaks["usr"]], [peaks["agent"]], "", absolute=True,
                                 note=f"{how}; empty files (the memory is per entry); peaks sampled every 20 ms"))
        # A transfer holds more than a diff: the plan, the verification of the staged copy and
        # of the promoted tree, and what the digests it proved are remembered under. A push also
        # sends the staged tree to verify, and the digests its rescan trusts, in one call each: a
        # million files make the largest requests the agent gets.
        self.s6_transfer("pull", remote, 0, "verified (staged copy and promoted tree) and promoted")
        self.s6_transfer("push", self.small / "local" / "s6", 50,
                         "staged, verified, promoted and re-verified on the remote")
        shutil.rmtree(remote)
        shutil.rmtree(self.small / "local" / "s6")

    def s6_transfer(self, action: str, source: Path, first: int, how: str) -> None:
        """Change every 100th file of the S6 tree in `source` (from `first` on), then time `usr
        action` and sample both processes' peak RSS."""
        n = self.scale.s6_run_files
        changed = range(first, n, 100)
        for i in changed:
            (source / "_derived" / f"d{i // 1000:04d}" / f"part-{i:07d}").write_bytes(action.encode())
        self.log(f"S6 as a run: usr {action} of {len(changed):,} changed files, polling both processes' peak RSS")
        started = time.perf_counter()
        peaks, data = self.usr_peaks(action, "s6", "small", self.small / "local")
        seconds = time.perf_counter() - started
        if data["transfer"]["files"] != len(changed) or not data["post"]["in_sync"]:
            raise RuntimeError(f"S6 as a run: the {action} moved {data['transfer']['files']} files, "
                               f"expected {len(changed)}, in sync: {data['post']['in_sync']}")
        self.rows.append(Row(f"S6 as a run: `usr {action}` of 1% of {n:,} files, changed", "`usr` peak RSS",
                             "agent peak RSS", "MB", [peaks["usr"]], [peaks["agent"]], "", absolute=True,
                             note=f"{how} in {seconds:.1f} s; caches warm; peaks sampled every 20 ms"))

    def usr_peaks(self, action: str, dataset: str, remote: str, root: Path) -> tuple[dict[str, float], dict[str, Any]]:
        """Run usr like usr() while sampling the peak RSS (VmHWM) of it and of the remote agent."""
        argv, audit = self.usr_argv(action, dataset, remote, root)
        peaks = {"usr": 0.0, "agent": 0.0}
        uid = pwd.getpwnam(self.rig.user).pw_uid

        def agents() -> set[int]:  # they run as the login user, started by sshd (again after a first deployment)
            return {pid for pid, cmd in rigmod.processes_of_uid(uid) if "usrsync_agent" in cmd and " serve " in cmd}

        earlier = agents()  # a previous run's agent may still be exiting: its peak is not this run's
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=self.env, text=True)
        deadline = time.monotonic() + 3600
        while proc.poll() is None and time.monotonic() < deadline:
            for who, pid in [("usr", proc.pid)] + [("agent", pid) for pid in agents() - earlier]:
                hwm = rigmod.proc_status(pid).get("VmHWM", "")
                if hwm.endswith(" kB"):
                    peaks[who] = max(peaks[who], int(hwm[:-3]) * 1024 / 1e6)
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"usr {action} {dataset} did not finish within an hour")
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"usr {action} {dataset} exited {proc.returncode}: {stderr.strip()[-2000:]}")
        return peaks, json.loads(audit.read_text())["data"]

    def setup_big(self) -> Path:
        """The big tree on disk (remote), and its copy on disk (local root returned)."""
        s = self.scale
        self.log(f"building S2: {s.big_files} x {s.big_size >> 20} MiB on disk, local copy with cp -a")
        remote = self.remote_dir("big", "s2")
        write_big_tree(remote, s.big_files, s.big_size)
        root = self.big / "local"
        root.mkdir()
        subprocess.run(["cp", "-a", str(remote), str(root / "s2")], check=True)
        self.chown(self.big / "remote")
        os.sync()
        self.log("S2: warming the hash caches (first usr diff hashes everything)")
        _, data = self.usr("diff", "s2", "big", root)
        self.expect_in_sync(data, "S2")
        return root

    def first_pulls(self, what: str, dataset: str, remote: Path,
                    dest: Path) -> tuple[Callable[[str], float], Callable[[int], float]]:
        """Runs of a first pull of `dataset` into a fresh root below `dest` (given a remote's
        name), and of `rsync -a` of `remote` into a fresh dir there: seconds each."""
        files = len(dataset_files(remote))

        def pull(remote_name: str) -> float:
            root = dest / "ours"
            root.mkdir(parents=True)
            elapsed, data = self.usr("pull", dataset, remote_name, root)
            shutil.rmtree(root)
            if data["transfer"]["files"] != files or not data["post"]["in_sync"]:
                raise RuntimeError(f"{what}: usr pull moved {data['transfer']['files']} files, expected {files}")
            return elapsed

        def rsync(i: int) -> float:
            target = dest / "rsync" / dataset
            target.mkdir(parents=True)
            elapsed = self.rsync(remote, target, "-a")[0]
            shutil.rmtree(target.parent)
            return elapsed

        return pull, rsync

    def s5(self) -> None:
        """First pull of the big tree into a fresh root, each run on its own."""
        s = self.scale
        remote = self.remote_dir("big", "s2")
        total = sum(p.stat().st_size for p in dataset_files(remote))
        with dest_fs(self.work / "s5", total, self.notes) as dest:
            warm(dataset_files(remote))  # source page cache warm for every run
            self.log("S5: first pull of the big tree, usr pull vs rsync -a")
            pull, rsync = self.first_pulls("S5", "s2", remote, dest)
            # `sync` first: the previous run's writeback must not slow this one.
            asyncssh, openssh, theirs = self.rotate(
                s.big_reps, [lambda i: pull("big"), lambda i: pull("big-openssh"), rsync], before=os.sync)
            where = "a fresh dir on tmpfs" if dest_is_tmpfs(dest) else "a fresh dir on disk"
            self.rows.append(Row(f"S5 first pull of S2 ({s.big_files} × {s.big_size >> 20} MiB)", "`usr pull`",
                                 "`rsync -a`", "s", asyncssh, theirs, "≤ 1.3", 1.3,
                                 note=f"source page cache warm, destination {where}"))
            self.rows.append(Row("S5 with `transport = \"openssh\"`", "`usr pull`", "`rsync -a`", "s", openssh, theirs,
                                 "", note="informational: rsync over system ssh (ControlMaster) instead of the "
                                          "asyncssh relay; same rsync runs as S5"))

    def s5_small(self) -> None:
        """First pull of the S1 tree into a fresh root: many small files, where per-file costs show."""
        s = self.scale
        self.log("S5s: first pull of the S1 tree, usr pull vs rsync -a")
        pull, rsync = self.first_pulls("S5s", "s1", self.remote_dir("small", "s1"), self.small / "s5-small")
        ours, theirs = self.rotate(s.big_reps, [lambda i: pull("small"), rsync])
        self.rows.append(Row(f"S5s first pull of S1 ({s.small_files:,} × 4 KiB)", "`usr pull`",
                             "`rsync -a`", "s", ours, theirs, "",
                             note="informational (the issue's S5 is the big files): usr also rereads and "
                                  "hashes every file it staged, and checks the promoted tree; destination on "
                                  f"{'tmpfs' if dest_is_tmpfs(self.small) else 'disk'}, like the source"))

    def s2(self, root: Path) -> None:
        s = self.scale
        local, remote = root / "s2", self.remote_dir("big", "s2")
        self.rsync(remote, local, "-a", "--checksum", "--dry-run")
        dropped = self.drop_caches()
        how = "page cache dropped before each run" if dropped else "page cache NOT dropped (not root?)"
        self.log(f"S2: no-op on the big tree, {how}")
        before = self.drop_caches if dropped else None
        a, b = self.rotate(s.big_reps, [lambda i: self.usr("diff", "s2", "big", root)[0],
                                        lambda i: self.rsync(remote, local, "-a", "--checksum", "--dry-run")[0]],
                           before=before)
        self.rows.append(Row(f"S2 no-op, {s.big_files} × {s.big_size >> 20} MiB", "`usr diff`",
                             "`rsync -a --checksum --dry-run`", "s", a, b, "≤ 0.1", 0.1, note=how))
        self.rows.append(self.anchor("S2", local, remote, s.big_anchor_sample, a, how, before))

    def s3(self, root: Path) -> None:
        s = self.scale
        local = root / "s2"
        files = [str(p) for p in dataset_files(local)]
        total = sum(os.path.getsize(p) for p in files)
        warm(files)  # page cache warm for both
        self.log("S3: hashing throughput, no hash cache, page cache warm")

        def ours(i: int) -> float:
            _, out = self.timed([sys.executable, __file__, "--s3-child", str(local)])
            seconds = json.loads(out)["seconds"]
            return total / seconds / 1e9

        def theirs(i: int) -> float:
            return total / self.timed(["xxhsum", "-H2", *files])[0] / 1e9

        a, b = self.rotate(s.big_reps, [ours, theirs])
        self.rows.append(Row("S3 first manifest of the S2 files", "hashing (`--jobs 2`, no cache)", "`xxhsum -H2`",
                             "GB/s", a, b, "≥ 0.9", 0.9, higher_is_better=True,
                             note="ours: scan + hash of the whole dataset in a fresh process; xxhsum: one process "
                                  "over the same files"))

    def s4b(self, root: Path) -> None:
        s = self.scale
        local, remote = root / "s2", self.remote_dir("big", "s2")
        dropped = self.drop_caches()
        self.log("S4b: one 4 KiB file added to the big tree")

        def add(i: int, side: str) -> None:
            path = remote / "_derived" / f"added-{side}-{i}.bin"
            path.write_bytes(os.urandom(BLOCK))
            self.chown(path)

        def ours(i: int) -> float:
            add(i, "ours")
            elapsed, data = self.usr("pull", "s2", "big", root)
            if data["transfer"]["files"] != 1 or not data["post"]["in_sync"]:
                raise RuntimeError(f"S4b: usr pull moved {data['transfer']['files']} files, expected exactly 1")
            return elapsed

        def theirs(i: int) -> float:
            add(i, "theirs")
            return self.rsync(remote, local, "-a", "--checksum")[0]

        self.rsync(remote, local, "-a", "--checksum")  # rsync -a replays owner/perms once
        self.usr("diff", "s2", "big", root)
        a, b = self.rotate(s.big_reps, [ours, theirs], before=self.drop_caches if dropped else None)
        self.rows.append(Row("S4b one 4 KiB file added to S2", "`usr pull`", "`rsync -a --checksum`", "s", a, b,
                             "≤ 0.2", 0.2, note="page cache dropped before each run, as in S2" if dropped else
                             "page cache NOT dropped (not root?)"))


# --------------------------------------------------------------------------- children


def s6_child(entries: int) -> dict[str, Any]:
    """Peak RSS of building two manifests the way a run gets them, then compare + plan."""
    import msgspec

    from usrsync.compare import Policy, compare
    from usrsync.manifest import Entry, EntryPool, Manifest
    from usrsync.plan import MaxDelete, plan_transfer

    baseline = _vm_hwm_mb()
    per_dir = 1000

    def raw(i: int, side: str) -> list[Any]:
        digest = hashlib.blake2b(b"%d" % i, digest_size=16).hexdigest()
        if side == "remote" and i % 100 == 0:
            digest = digest[::-1]  # 1% of the files differ
        return [f"_derived/d{i // per_dir:04d}/part-{i:07d}.parquet", "_derived", 4096 + i % 7919,
                1_700_000_000_000_000_000 + i, "file", digest]

    # Local: typed entries built from the fields, as a warm scan for usrsync.manifest.local_manifest
    # builds them. Remote: JSON chunks as the agent sends them, decoded into typed entries as
    # usrsync.protocol does, each chunk's entries equal to local ones then exchanged for those as
    # usrsync.session does.
    primary = ["records.parquet", "primary", 4096, 1_700_000_000_000_000_000, "file", "0" * 32]
    local_entries = list(itertools.starmap(Entry, itertools.chain((raw(i, "local") for i in range(entries)),
                                                                  [primary])))
    pool = EntryPool(local_entries)
    remote_entries: list[Entry] = []
    chunk = 5000
    for start in range(0, entries, chunk):
        body = msgspec.json.encode([raw(i, "remote") for i in range(start, min(entries, start + chunk))])
        remote_entries.extend(pool.share(msgspec.json.decode(body, type=list[Entry])))
    remote_entries.append(msgspec.convert(primary, Entry))
    local = Manifest(exists=True, algo="xxh3_128", entries=local_entries)
    remote = Manifest(exists=True, algo="xxh3_128", entries=remote_entries)
    del local_entries, remote_entries
    policy = Policy()
    started = time.perf_counter()
    cmp = compare(local, remote, policy)
    compared = time.perf_counter() - started
    compared_peak = _vm_hwm_mb()
    started = time.perf_counter()
    plan = plan_transfer(cmp, "pull", policy, MaxDelete(percent=50.0))
    planned = time.perf_counter() - started
    assert len(plan.copy) == -(-entries // 100), len(plan.copy)
    return {"peak_mb": _vm_hwm_mb(), "compared_peak_mb": compared_peak, "baseline_mb": baseline,
            "compare_s": compared, "plan_s": planned}


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def s3_child(root: str) -> dict[str, Any]:
    from remote_agent import usrsync_agent as engine

    started = time.perf_counter()
    entries = engine.build_manifest(root, "xxh3_128", jobs=2, use_cache=False)
    return {"seconds": time.perf_counter() - started, "files": len(entries)}


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def small_fs(work: Path, notes: list[str]) -> Iterator[Path]:
    """A tmpfs for the small trees when we may mount one, else a fresh dir."""
    path = work / "small"
    path.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8g,nr_inodes=10m,mode=0755", "tmpfs", str(path)], capture_output=True,
        check=False).returncode == 0
    notes.append("small trees on tmpfs" if mounted else "small trees in fresh dirs on " + str(work))
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def dest_fs(path: Path, need: int, notes: list[str]) -> Iterator[Path]:
    """Where S5 pulls to: a tmpfs when we may mount one and memory allows (this VM's disk writes at
    ~190 MB/s and would dominate both tools), else a dir next to the big trees."""
    path.mkdir()
    available = 0
    with contextlib.suppress(OSError, StopIteration, ValueError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        available = int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1]) * 1024
    # Room for the copy plus the processes (the relay keeps at most ~2 channel windows per rsync).
    mounted = os.geteuid() == 0 and available > need + (2 << 30) and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={need + (1 << 30)},mode=0755", "tmpfs", str(path)],
        capture_output=True, check=False).returncode == 0
    if not mounted:
        notes.append("S5 pulls to disk (no tmpfs, or too little free memory for one)")
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], capture_output=True, check=False)


def latency_fs_missing() -> str:
    """Why latencyfs cannot run here ("" when it can)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not shutil.which("fusermount3"):
        return "no libfuse3 (Debian: apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401 - loads libfuse3
    except (ImportError, OSError) as exc:
        return f"mfusepy does not load ({exc}; `uv sync --group bench`)"
    return ""


def is_mount_point(path: Path) -> bool:
    return any(len(line.split()) > 4 and line.split()[4] == str(path)
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


@contextlib.contextmanager
def latency_fs(source: Path, mountpoint: Path, delay: float) -> Iterator[Path]:
    """`source` seen through scripts/latencyfs.py at `mountpoint`, unmounted and stopped afterwards."""
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "latencyfs.py"), str(source), str(mountpoint),
                             str(delay)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not is_mount_point(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"latencyfs did not mount {mountpoint}")
            time.sleep(0.05)
        yield mountpoint
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dest_is_tmpfs(path: Path) -> bool:
    return any(line.split()[1] == str(path) and line.split()[2] == "tmpfs"
               for line in Path("/proc/mounts").read_text().splitlines() if len(line.split()) > 2)


def machine_info() -> dict[str, Any]:
    rsync = subprocess.run(["rsync", "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    return {"cpus": os.cpu_count(), "cpu": model, "kernel": platform.release(), "python": platform.python_version(),
            "rsync": rsync, "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="scaled-down smoke run (about 2 minutes)")
    parser.add_argument("--only", default="", help="comma-separated scenarios, e.g. S1,S7")
    parser.add_argument("--out", type=Path, help="JSON output (default: bench-results[-quick].json in the repo)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (big trees go there)")
    parser.add_argument("--s6-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--s3-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.s6_child:
        print(json.dumps(s6_child(args.s6_child)))
        return 0
    if args.s3_child:
        print(json.dumps(s3_child(args.s3_child)))
        return 0

    ok, why = rigmod.rig_available()
    if not ok:
        print(f"bench: {why}", file=sys.stderr)
        return 2
    scale = QUICK if args.quick else FULL
    only = {s.strip() for s in args.only.split(",") if s.strip()} or set(SCENARIOS)
    unknown = only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    out = args.out or REPO / ("bench-results-quick.json" if args.quick else "bench-results.json")
    notes: list[str] = []
    rows: list[Row] = []
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="usrsync-bench-", dir=args.workdir))
    work.chmod(0o755)  # the test user reaches its base dirs through here
    compile_project(notes)
    try:
        with small_fs(work, notes) as small, rigmod.temporary_rig() as rig:
            bench = Bench(scale, rig, work, small, notes)
            rows = bench.rows  # filled as scenarios finish: a failure still reports the others
            notes.append(f"hash: {bench.algo_note}")
            run_scenarios(bench, only)
    except Exception as exc:  # noqa: BLE001 - report what was measured, then fail
        traceback.print_exc()
        notes.append(f"ABORTED: {type(exc).__name__}: {exc}")
        failed = True
    else:
        failed = False
    finally:
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - started) / 60
    info = machine_info()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"usrsync bench, scale **{scale.name}** ({date}; {info['cpus']} cores, {info['cpu'] or 'unknown CPU'}, "
              f"{info['mem_gb']} GB RAM; {info['rsync']}; medians of {scale.reps} runs per side, "
              f"{scale.big_reps} for the big-file scenarios; {minutes:.1f} min)")
    table = markdown(rows, header) + "".join(f"- {n}\n" for n in notes)
    print(table)
    doc = {"scale": dataclasses.asdict(scale), "date": date, "machine": info, "notes": notes, "minutes": minutes,
           "rows": [r.as_json() for r in rows]}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(f"written: {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 1 if failed else 0


def compile_project(notes: list[str]) -> None:
    """Byte-compile the tool's own modules, as installing it does: a checkout run under
    PYTHONDONTWRITEBYTECODE (as CI machines set it) would compile them again in every `usr` run,
    ~50 ms that no installed copy spends."""
    if all(compileall.compile_dir(REPO / package, quiet=1) for package in ("usrsync", "remote_agent")):
        notes.append("the tool's modules were byte-compiled first, as an installed copy's are")


def run_scenarios(bench: Bench, only: set[str]) -> None:
    (bench.small / "remote").mkdir()
    (bench.big / "remote").mkdir(parents=True)
    if only & {"S1", "S1n", "S4", "S5s", "S7"}:
        bench.setup_small()
    if "S7" in only:
        bench.s7()
    if "S1" in only:
        bench.s1()
    if "S1n" in only:
        bench.s1n()
    if "S4" in only:
        bench.s4()
    if "S5s" in only:
        bench.s5_small()
    if "S6" in only:
        bench.s6()
        bench.s6_run()
    if only & {"S2", "S3", "S4b", "S5"}:
        big_root = bench.setup_big()
        if "S2" in only:
            bench.s2(big_root)
        if "S3" in only:
            bench.s3(big_root)
        if "S4b" in only:
            bench.s4b(big_root)
        if "S5" in only:
            bench.s5()


if __name__ == "__main__":
    sys.exit(main())
