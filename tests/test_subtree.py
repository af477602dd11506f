"""Promotion of the changed directory only, end to end over the real sshd.

A daily increment changes a few files in one corner of a big dataset. The run stages and swaps
just the deepest directory that holds every change (`transfer.subtree`): its unchanged files are
hard-linked into staging (`transfer.linked`), everything outside it is never touched, and the
post-run proof still covers the whole dataset.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import (
    BASE_FILES,
    Sides,
    leftovers,
    load_audit,
    pause_env,
    paused_pid,
    synced,
    tree_state,
    wait_for,
    write_tree,
)

PARTS = {f"_derived/d{d}/part-{i:02d}.parquet": b"PAR1-%d-%d" % (d, i) for d in range(3) for i in range(20)}
FILES = {**BASE_FILES, **PARTS}
CHANGED = "_derived/d1/part-07.parquet"
NEW_DIR = {"_derived/d3/part-00.parquet": b"PAR1-new-0", "_derived/d3/part-01.parquet": b"PAR1-new-1"}


def inodes(root: Path) -> dict[str, int]:
    """The inode of the dataset dir (".") and of every file and directory below it."""
    found = {".": root.stat().st_ino}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(dirpath, name)
            found[path.relative_to(root).as_posix()] = path.lstat().st_ino
    return found


class Scenario(NamedTuple):
    change: Callable[[Path], None]  # applied to the source end
    transfer: dict[str, object]  # the audit's transfer fields
    moved: list[str]  # _derived paths (section-relative) whose bytes move
    deleted: list[str]  # and that go
    swapped: set[str]  # destination paths that get a new inode: the directories rebuilt in staging, new bytes


def _one_file_changed(source: Path) -> None:
    (source / CHANGED).write_bytes(b"PAR1-rewritten-in-place")


def _dir_replaced(source: Path) -> None:
    for i in range(20):
        (source / f"_derived/d2/part-{i:02d}.parquet").unlink()
    (source / "_derived/d2").rmdir()
    write_tree(source, NEW_DIR)


SCENARIOS = {
    "one-file-in-one-dir": Scenario(
        _one_file_changed,
        {"files": 1, "bytes": len(b"PAR1-rewritten-in-place"), "deleted": 0, "linked": 19, "subtree": "_derived/d1"},
        ["d1/part-07.parquet"], [], {"_derived/d1", CHANGED},
    ),
    "dir-deleted-and-dir-added": Scenario(
        _dir_replaced,
        {"files": 2, "bytes": sum(map(len, NEW_DIR.values())), "deleted": 20, "linked": 41, "subtree": "_derived"},
        ["d3/part-00.parquet", "d3/part-01.parquet"], [f"d2/part-{i:02d}.parquet" for i in range(20)],
        {"_derived", "_derived/d0", "_derived/d1", "_derived/ns"},
    ),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("action", ["pull", "push"])
def test_only_the_changed_directory_is_staged_and_swapped(sides: Sides, tmp_path: Path, action: str,
                                                          scenario: str) -> None:
    expect = SCENARIOS[scenario]
    sides.seed_both(FILES)
    source, dest = (sides.remote, sides.local) if action == "pull" else (sides.local, sides.remote)
    expect.change(source)
    sides.chown_remote()
    before = inodes(dest)

    out = tmp_path / f"{action}.json"
    r = sides.run(action, "--audit-json-out", str(out))

    assert r.returncode == 0, r.stderr
    audit = load_audit(out)
    assert audit["transfer_state"] == "TRANSFERRED"
    assert audit["transfer"] == {**audit["transfer"], **expect.transfer, "rsync_exit": 0, "promote": "exchange"}
    source_only, dest_only = ("remote_only", "local_only") if action == "pull" else ("local_only", "remote_only")
    derived = audit["_derived"]
    assert (sorted(derived["differing"] + derived[source_only]), derived[dest_only]) == (expect.moved, expect.deleted)
    assert [s for s in ("primary", "meta", ".events.log", "_snapshots", "_auxiliary") if audit[s]["changed"]] == []
    assert audit["post"] == {"verified": True, "in_sync": True, "checked_files": expect.transfer["files"],
                             "checked_bytes": expect.transfer["bytes"], "problems": []}
    sides.assert_in_sync()  # the whole dataset, byte for byte
    # Outside the swapped directory nothing was touched; inside it, unchanged files kept their inode.
    after = inodes(dest)
    assert set(after) == set(inodes(source))  # the same files and directories (no empty d2/ left behind)
    assert {p for p in before if p in after and after[p] != before[p]} == expect.swapped
    assert leftovers(sides.root) == [] and leftovers(sides.base) == []


@pytest.mark.parametrize(("action", "phase", "live"), [
    ("pull", "mid-promote", "old"), ("pull", "after-promote", "new"),
    ("push", "mid-promote", "old"), ("push", "after-promote", "new"),
])
def test_a_crash_in_a_subtree_promotion_leaves_old_or_new_and_the_rerun_repairs(sides: Sides, tmp_path: Path,
                                                                               action: str, phase: str,
                                                                               live: str) -> None:
    """SIGKILL with the journal written, before or after the swap of _derived/d1 (pull: in the
    orchestrator; push: the remote agent, which dies with its session)."""
    sides.seed_both(FILES)
    source, dest = (sides.remote, sides.local) if action == "pull" else (sides.local, sides.remote)
    old = synced(tree_state(dest))
    _one_file_changed(source)
    sides.chown_remote()
    new = synced(tree_state(source))
    remote = action == "push"  # the agent is the one to pause; its marker must be writable by the rig's user
    marker = sides.rig.home / f"paused-{tmp_path.name}" if remote else tmp_path / "paused"
    proc = sides.start(action, env=pause_env(phase, marker, remote=remote))
    try:
        paused = paused_pid(marker, proc)
        proc.kill()
        proc.wait(timeout=30)
        wait_for(lambda: not Path(f"/proc/{paused}").exists(), "the paused process to be gone")
    finally:
        marker.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)

    assert synced(tree_state(dest)) == (old if live == "old" else new)
    [journal] = [p for p in leftovers(sides.root if action == "pull" else sides.base) if p.startswith("journal/")]
    out = tmp_path / "rerun.json"
    r = sides.run(action, "--audit-json-out", str(out))
    assert r.returncode == 0, r.stderr
    audit = load_audit(out)
    assert audit["transfer_state"] == ("TRANSFERRED" if live == "old" else "NO-OP")
    assert f"recovered: removed journal {journal.removeprefix('journal/')}" in audit["warnings"]
    assert audit["post"] == {**audit["post"], "verified": True, "in_sync": True}
    sides.assert_in_sync()
    assert synced(tree_state(dest)) == new
    assert leftovers(sides.root) == [] and leftovers(sides.base) == []
