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
    assert [e["runs"] for e in events if e["event"] == "rsync"] == [-(-len(files) // 4)]
    assert audit["transfer_state"] == "TRANSFERRED"
    assert (audit["transfer"]["files"], audit["transfer"]["bytes"], audit["transfer"]["rsync_exit"]) == (
        len(files), sum(map(len, files.values())), 0)
    assert audit["post"]["in_sync"] is True
    sides.assert_in_sync()
    assert leftovers(sides.root) == [] and leftovers(sides.base) == []
