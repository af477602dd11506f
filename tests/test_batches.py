"""A big delta moves in several rsync runs (sync.RSYNC_BATCH_FILES files each), as one transfer:
one staging dir, one verification, one promotion, one audit. The batch size is lowered in-process
so a small dataset takes several runs; the remote is a `type = "local"` one (no sshd needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import BASE_FILES, DATASET, REMOTE, leftovers, load_audit, local_sides

from usrsync import sync
from usrsync.cli import cli

MANY = {f"_derived/batch/part-{i:02d}.parquet": b"PAR1 part %d" % i for i in range(11)}


def run(sides, action: str, tmp_path: Path) -> tuple[dict, list[dict]]:
    out = tmp_path / f"{action}.json"
    result = CliRunner().invoke(cli, ["--log-format", "json", "-v", "--remotes-config", str(sides.cfg), action,
                                      DATASET, REMOTE, "-y", "--no-progress", "--audit-json-out", str(out)])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return load_audit(out), events


@pytest.mark.parametrize("action", ["pull", "push"])
def test_a_delta_larger_than_a_batch_moves_in_several_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           action: str) -> None:
    monkeypatch.setattr(sync, "RSYNC_BATCH_FILES", 4)
    sides = local_sides(tmp_path)
    files = {**BASE_FILES, **MANY}
    (sides.seed_remote if action == "pull" else sides.seed_local)(files)
    audit, events = run(sides, action, tmp_path)
    # A first transfer takes every directory below the top whole: one list entry moves all of
    # _derived/batch's 11 files, in a run of its own; the other 6 files come 1, then 4, then 1.
    assert [e["runs"] for e in events if e["event"] == "rsync"] == [4]
    assert len([e for e in events if e["event"] == "rsync.start"]) == 4
    assert audit["transfer_state"] == "TRANSFERRED"
    assert (audit["transfer"]["files"], audit["transfer"]["bytes"], audit["transfer"]["rsync_exit"]) == (
        len(files), sum(map(len, files.values())), 0)
    assert audit["post"]["in_sync"] is True
    sides.assert_in_sync()
    assert leftovers(sides.root) == [] and leftovers(sides.base) == []


def test_runs_are_cut_by_the_files_their_entries_move(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync, "RSYNC_BATCH_FILES", 3)
    entries = [("a", 1), ("d/", 5), ("b", 1), ("c", 1), ("e/", 2), ("f", 1)]
    assert sync.rsync_batches(entries) == [["a"], ["d/"], ["b", "c"], ["e/", "f"]]
    assert sync.rsync_batches([]) == []


def test_a_directory_listed_whole_is_not_listed_again_without_its_slash() -> None:
    # Listed as "a/b/" its files are copied; listed as "a/b" too, rsync would be told twice.
    assert sync.files_with_parents(["x", "a/b/c/f", "a/b/"]) == ["a", "a/b/", "a/b/c", "a/b/c/f", "x"]
    assert sync.files_with_parents(["a/b/c"]) == ["a", "a/b", "a/b/c"]
