"""`usr demo` (what `make demo` runs) and its decision lines, which must equal the runbook's jq lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from usrsync import audit
from usrsync.demo import decision_lines

# The runbook's three jq lines, verbatim.
SEED_JQ = [
    [".data | [.action, .transfer_state, .primary.changed, ._derived.changed, ._auxiliary.changed] | @tsv"],
    ["[.usr_output_version, .data.verify.primary, .data.verify.sidecars, .data.verify.content_hashes] | @tsv"],
    [".data | {derived_local_only: ._derived.local_only, derived_remote_only: ._derived.remote_only, "
     "aux_local_only: ._auxiliary.local_only, aux_remote_only: ._auxiliary.remote_only}"],
]


def test_demo_runs_the_audit_loop_and_cleans_up(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "usrsync", "demo"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    # stderr carries at most warnings (e.g. an rsync older than 3.4 on this machine), never an error.
    assert [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")] == []
    # The commands as the runbook spells them, then the tool's own verdicts.
    assert '$ usr diff densegen/demo_dataset demo --audit-json-out "$AUDIT_DIR/diff-before-transfer.json"' in out
    assert '$ usr pull densegen/demo_dataset demo -y --audit-json-out "$AUDIT_DIR/pull.json"' in out
    assert '$ usr push densegen/demo_dataset demo -y --audit-json-out "$AUDIT_DIR/push.json"' in out
    assert "DIFF-ONLY: differs in primary, meta, .events.log, _snapshots, _derived, _auxiliary" in out
    assert "PULL: TRANSFERRED 6 files" in out
    assert "PUSH: TRANSFERRED 3 files" in out
    assert "PULL: NO-OP, already in sync" in out
    assert "DIFF-ONLY: up to date" in out
    # The jq decision lines, computed from each step's audit JSON.
    assert "    diff\tDIFF-ONLY\ttrue\ttrue\ttrue\n" in out
    assert "    pull\tTRANSFERRED\ttrue\ttrue\ttrue\n" in out
    assert "    push\tTRANSFERRED\tfalse\ttrue\ttrue\n" in out
    assert "    pull\tNO-OP\tfalse\tfalse\tfalse\n" in out
    assert "    diff\tDIFF-ONLY\tfalse\tfalse\tfalse\n" in out
    assert out.count("    1\thash\tstrict\ton\n") == 5
    assert '"aux_local_only": ["_artifacts/notes.txt"]' in out
    assert '"aux_remote_only": ["_registry/registry.abc.yaml"]' in out
    assert "local and remote densegen/demo_dataset are byte-identical: 8 files" in out
    assert out.rstrip().endswith("demo OK: every step exited 0 and the final diff found nothing to move")
    # Without --keep the workspace is gone.
    assert list(tmp_path.iterdir()) == []


def _doc(state: str, with_sections: bool) -> audit.AuditDocument:
    data = audit.AuditData(
        action="push", transfer_state=state, dataset="densegen/d",
        remote=audit.RemoteInfo(name="r", host="h", base_dir="/b"),
        verify=audit.VerifyInfo(primary="hash", sidecars="strict", content_hashes="off", hash_algo="sha256"),
        started_at="2026-01-01T00:00:00Z",
    )
    if with_sections:
        data.primary = audit.PrimaryReport(changed=False)
        data.derived = audit.FilesReport(changed=True, local_files=2, remote_files=1, local_only=["ns/p.parquet"],
                                         remote_only=[], differing=[])
        data.auxiliary = audit.FilesReport(changed=True, local_files=1, remote_files=1, local_only=[],
                                           remote_only=["a b.txt"], differing=["x/y.txt"])
    return audit.AuditDocument(usr_output_version=1, data=data)


@pytest.mark.parametrize(("state", "with_sections"), [("TRANSFERRED", True), ("FAILED", False)])
def test_decision_lines_equal_the_runbook_jq_output(tmp_path: Path, state: str, with_sections: bool) -> None:
    jq = shutil.which("jq")
    if jq is None:
        pytest.skip("jq is not installed (scripts/bootstrap.sh --test installs it)")
    path = tmp_path / "audit.json"
    raw = audit.encode(_doc(state, with_sections))
    path.write_bytes(raw)
    ours = decision_lines(json.loads(raw))
    theirs = [subprocess.run([jq, "-r", *args, str(path)], capture_output=True, text=True, check=True,
                             timeout=30).stdout for args in SEED_JQ]
    assert ours[0] + "\n" == theirs[0]
    assert ours[1] + "\n" == theirs[1]
    # jq pretty-prints arrays across lines; the object itself must be the same.
    assert json.loads(ours[2]) == json.loads(theirs[2])
    if with_sections:
        assert theirs[0] == "push\tTRANSFERRED\tfalse\ttrue\ttrue\n"
    else:  # a failure before the comparison: jq prints null sections as empty fields
        assert theirs[0] == "push\tFAILED\t\t\t\n"
        assert json.loads(ours[2]) == dict.fromkeys(
            ["derived_local_only", "derived_remote_only", "aux_local_only", "aux_remote_only"])
    assert theirs[1] == "1\thash\tstrict\toff\n"
