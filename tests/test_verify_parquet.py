"""`--verify parquet|auto`: row/column counts through pyarrow when both ends have it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import Sides, load_audit, local_sides


def write_table(path: Path, rows: int, columns: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({f"c{i}": [seed + r for r in range(rows)] for i in range(columns)})
    pq.write_table(table, path)


def parquet_sides(tmp_path: Path) -> Sides:
    # The "remote" agent runs under this interpreter, which has pyarrow like the orchestrator.
    sides = local_sides(tmp_path, python=sys.executable)
    for root in (sides.local, sides.remote):
        (root / ".events.log").parent.mkdir(parents=True, exist_ok=True)
        (root / ".events.log").write_bytes(b'{"e": 1}\n')
    return sides


def test_same_shape_different_bytes_is_unchanged_under_parquet(tmp_path: Path) -> None:
    sides = parquet_sides(tmp_path)
    write_table(sides.local / "records.parquet", rows=5, columns=3, seed=0)
    write_table(sides.remote / "records.parquet", rows=5, columns=3, seed=100)
    out = tmp_path / "diff.json"
    proc = sides.run("diff", "--verify", "parquet", "--audit-json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    primary = load_audit(out)["primary"]
    assert load_audit(out)["verify"]["primary"] == "parquet"
    assert primary["local_shape"] == [5, 3] and primary["remote_shape"] == [5, 3]
    assert primary["changed"] is False
    assert primary["local_hash"] != primary["remote_hash"]  # by bytes they differ; by shape they don't

    proc = sides.run("diff", "--audit-json-out", str(out))  # the default, hash, sees the difference
    assert load_audit(out)["primary"]["changed"] is True


def test_pull_moves_a_primary_whose_shape_changed(tmp_path: Path) -> None:
    sides = parquet_sides(tmp_path)
    write_table(sides.local / "records.parquet", rows=5, columns=3)
    write_table(sides.remote / "records.parquet", rows=7, columns=3)
    out = tmp_path / "pull.json"
    proc = sides.run("pull", "--verify", "parquet", "--audit-json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = load_audit(out)
    assert data["transfer_state"] == "TRANSFERRED" and data["post"]["in_sync"] is True
    assert data["primary"]["local_shape"] == [5, 3] and data["primary"]["remote_shape"] == [7, 3]
    assert pq.ParquetFile(sides.local / "records.parquet").metadata.num_rows == 7


def test_parquet_without_pyarrow_on_the_remote_is_a_clear_error(tmp_path: Path) -> None:
    sides = local_sides(tmp_path, python="/usr/bin/python3")  # Debian's python3: no pyarrow
    write_table(sides.remote / "records.parquet", rows=1, columns=1)
    out = tmp_path / "diff.json"
    proc = sides.run("diff", "--verify", "parquet", "--audit-json-out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-2] == "error: --verify parquet needs pyarrow on both ends; the remote has none"
    assert lines[-1].startswith("hint: use --verify hash")
    assert load_audit(out)["error"]["exit_code"] == 2


def test_auto_resolves_to_hash_and_records_why(tmp_path: Path) -> None:
    sides = parquet_sides(tmp_path)
    write_table(sides.remote / "records.parquet", rows=2, columns=2)
    out = tmp_path / "diff.json"
    proc = sides.run("diff", "--verify", "auto", "--audit-json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    verify = load_audit(out)["verify"]
    assert verify["primary"] == "hash"
    assert verify["notes"] == ["--verify auto resolved to hash: content digests are available on both ends"]


def test_the_agent_imports_pyarrow_only_when_asked() -> None:
    """Importing pyarrow costs a good part of a second; hello runs at every connection."""
    code = ("import io, sys; from remote_agent import usrsync_agent as a; agent = a.Agent(io.BytesIO()); "
            "agent.call_hello({}); before = 'pyarrow' in sys.modules; "
            "print(before, agent.call_pyarrow({})['pyarrow'], 'pyarrow' in sys.modules)")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo).stdout
    assert out.split() == ["False", "True", "True"]
