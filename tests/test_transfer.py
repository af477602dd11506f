"""Pull and push over the real sshd: the runbook's loop verbatim, incremental transfers,
safety refusals, locks and flags. Failure injection lives in test_failures.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rig as rigmod
from click.testing import CliRunner
from helpers import (
    BASE_FILES,
    DATASET,
    REMOTE,
    Sides,
    leftovers,
    load_audit,
    pause_env,
    paused_pid,
    run_usr,
    tree_state,
    wait_for,
    write_tree,
)
from rig import SshRig

from remote_agent import usrsync_agent as engine
from usrsync import sync
from usrsync.cli import cli

# The seed runbook's "Quick loop" block (seed/usr-sync-audit-loop.md), verbatim but for
# `uv run usr` -> `usr` (a function running this checkout) and REMOTE="rig". The comment of
# step 3 is where users make their local changes; `local_updates` is that hook.
QUICK_LOOP = """\
# Set dataset id used by pull/push calls.
DATASET_ID="densegen/my_dataset"
# Set configured remote profile name.
REMOTE="rig"
# Set local directory for audit JSON artifacts.
AUDIT_DIR="${PWD}/.usr-sync-audit"
# Create directory for audit JSON outputs.
mkdir -p "$AUDIT_DIR"

# 1) Preview before transfer and persist machine-readable diff state.
usr diff "$DATASET_ID" "$REMOTE" \\
  --audit-json-out "$AUDIT_DIR/diff-before-transfer.json"

# 2) Pull remote -> local and capture machine-readable audit.
usr pull "$DATASET_ID" "$REMOTE" -y \\
  --audit-json-out "$AUDIT_DIR/pull.json"

# 3) Optional local updates (notebook, infer write-back, overlay attach, etc.).
local_updates
# 4) Push local -> remote and capture machine-readable audit.
usr push "$DATASET_ID" "$REMOTE" -y \\
  --audit-json-out "$AUDIT_DIR/push.json"
"""

# The runbook's three decision checks, verbatim; AUDIT_JSON is pull.json or push.json.
JQ_CHECKS = """\
# Show transfer state and high-level change indicators.
jq -r '.data | [.action, .transfer_state, .primary.changed, ._derived.changed, ._auxiliary.changed] | @tsv' \\
  "$AUDIT_DIR/AUDIT_JSON"

# Show contract version and verify profile.
jq -r '[.usr_output_version, .data.verify.primary, .data.verify.sidecars, .data.verify.content_hashes] | @tsv' \\
  "$AUDIT_DIR/AUDIT_JSON"

# Show concrete file deltas for sidecar decisions.
jq -r '.data | {derived_local_only: ._derived.local_only, derived_remote_only: ._derived.remote_only, aux_local_only: ._auxiliary.local_only, aux_remote_only: ._auxiliary.remote_only}' \\
  "$AUDIT_DIR/AUDIT_JSON"
"""

LOCAL_UPDATES = """\
printf 'PAR1derived-2' > _derived/ns/part-0002.parquet
printf '{"event":"overlay","name":"ns"}\\n' >> .events.log
mkdir -p _artifacts && printf '{"score": 1}\\n' > _artifacts/x.json
"""


def _bash(script: str, cwd: Path, sides: Sides, updates: str = "") -> subprocess.CompletedProcess[str]:
    prelude = (
        "set -euo pipefail\n"
        f'usr() {{ "{sys.executable}" -m usrsync --remotes-config "{sides.cfg}" "$@"; }}\n'
        f'local_updates() {{ ( cd "{sides.local}" && {updates or ":"}\n ); }}\n'
    )
    return subprocess.run(["bash", "-c", prelude + script], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)


def _quick_loop(sides: Sides, workdir: Path, updates: str = "") -> tuple[dict, dict, dict]:
    workdir.mkdir()
    r = _bash(QUICK_LOOP, workdir, sides, updates)
    assert r.returncode == 0, r.stderr
    audits = workdir / ".usr-sync-audit"
    return (load_audit(audits / "diff-before-transfer.json"), load_audit(audits / "pull.json"),
            load_audit(audits / "push.json"))


def _jq(workdir: Path, name: str) -> tuple[str, str, dict]:
    script = f'AUDIT_DIR="{workdir}/.usr-sync-audit"\n' + JQ_CHECKS.replace("AUDIT_JSON", name)
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    state_line, verify_line, deltas = r.stdout.split("\n", 2)
    return state_line, verify_line, json.loads(deltas)


def test_quick_loop_verbatim(sides: Sides, tmp_path: Path) -> None:
    sides.seed_remote()

    # Bootstrap: nothing local yet, so the pull brings everything and the push has nothing to do.
    diff, pull, push = _quick_loop(sides, tmp_path / "run1")
    assert diff["transfer_state"] == "DIFF-ONLY" and diff["post"]["in_sync"] is False
    assert pull["transfer_state"] == "TRANSFERRED"
    assert pull["transfer"]["files"] == len(BASE_FILES)
    assert pull["transfer"]["bytes"] == sum(map(len, BASE_FILES.values()))
    assert pull["post"] == {**pull["post"], "verified": True, "in_sync": True}
    assert push["transfer_state"] == "NO-OP"
    sides.assert_in_sync()
    assert {p: b for p, (b, _) in tree_state(sides.local).items()} == BASE_FILES

    assert _jq(tmp_path / "run1", "pull.json") == (
        "pull\tTRANSFERRED\ttrue\ttrue\ttrue",
        "1\thash\tstrict\ton",
        {"derived_local_only": [], "derived_remote_only": ["ns/part-0001.parquet"],
         "aux_local_only": [], "aux_remote_only": ["notes/readme.txt"]},
    )

    # Local work between pull and push: a new overlay part, an event line, an artifact.
    diff, pull, push = _quick_loop(sides, tmp_path / "run2", LOCAL_UPDATES)
    assert diff["transfer_state"] == "DIFF-ONLY" and diff["post"]["in_sync"] is True
    assert pull["transfer_state"] == "NO-OP"
    assert push["transfer_state"] == "TRANSFERRED"
    assert push["transfer"]["files"] == 3
    assert push["transfer"]["linked"] == len(BASE_FILES) - 1  # all but the grown .events.log
    assert push[".events.log"] == {**push[".events.log"], "changed": True, "local": 3, "remote": 2,
                                   "relation": "local_ahead"}
    assert push["post"] == {**push["post"], "verified": True, "in_sync": True}
    sides.assert_in_sync()
    local = tree_state(sides.local)
    assert local["_artifacts/x.json"][0] == b'{"score": 1}\n'
    assert local[".events.log"][0].endswith(b'{"event":"overlay","name":"ns"}\n')

    assert _jq(tmp_path / "run2", "push.json") == (
        "push\tTRANSFERRED\tfalse\ttrue\ttrue",
        "1\thash\tstrict\ton",
        {"derived_local_only": ["ns/part-0002.parquet"], "derived_remote_only": [],
         "aux_local_only": ["_artifacts/x.json"], "aux_remote_only": []},
    )

    # Steady state: every step is a no-op and the final diff finds nothing.
    diff, pull, push = _quick_loop(sides, tmp_path / "run3")
    assert diff["post"]["in_sync"] is True
    assert [diff[s]["changed"] for s in ("primary", "meta", ".events.log", "_snapshots", "_derived",
                                         "_auxiliary")] == [False] * 6
    assert (pull["transfer_state"], push["transfer_state"]) == ("NO-OP", "NO-OP")
    assert _jq(tmp_path / "run3", "pull.json")[0] == "pull\tNO-OP\tfalse\tfalse\tfalse"
    r = sides.run("diff", "--exit-code")
    assert r.returncode == 0, r.stderr
    sides.assert_in_sync()


def test_pull_moves_only_the_changed_file_of_many(sides: Sides) -> None:
    files = {**BASE_FILES, **{f"_derived/ns/part-{i:04d}.parquet": b"PAR1-%d" % i for i in range(2, 196)}}
    assert len(files) == 200
    sides.seed_both(files)
    inodes = {p: (sides.local / p).stat().st_ino for p in files}
    changed = "_derived/ns/part-0100.parquet"
    (sides.remote / changed).write_bytes(b"PAR1-rewritten-in-place")

    r = sides.run("pull", "--audit-json-out", str(sides.root / "pull.json"))

    assert r.returncode == 0, r.stderr
    audit = load_audit(sides.root / "pull.json")
    assert audit["transfer_state"] == "TRANSFERRED"
    # Only _derived/ns/, the directory holding the change, was staged and swapped in: its 194
    # unchanged files were hard-linked into staging (`linked`); the 5 files outside it were not
    # touched at all, so they are not counted.
    assert audit["transfer"] == {**audit["transfer"], "files": 1, "bytes": len(b"PAR1-rewritten-in-place"),
                                 "deleted": 0, "linked": 194, "rsync_exit": 0, "subtree": "_derived/ns"}
    assert audit["_derived"] == {**audit["_derived"], "changed": True, "differing": ["ns/part-0100.parquet"],
                                 "local_only": [], "remote_only": []}
    assert [s for s in ("primary", "meta", ".events.log", "_snapshots", "_auxiliary") if audit[s]["changed"]] == []
    sides.assert_in_sync()
    # Linked or left in place, all 199 unchanged files are the very same inodes.
    after = {p: (sides.local / p).stat().st_ino for p in files}
    assert [p for p in files if after[p] != inodes[p]] == [changed]


def test_without_a_local_rsync_a_copy_fails_cleanly_and_a_no_op_or_diff_does_not_need_one(sides: Sides) -> None:
    sides.seed_both()
    no_rsync = {"PATH": str(sides.root / "empty-bin")}  # the CLI runs by absolute path; rsync is not found
    for action in ("diff", "pull", "push"):
        r = sides.run(action, "--audit-json-out", str(sides.root / f"{action}-noop.json"), env=no_rsync)
        assert (r.returncode, r.stderr) == (0, "")
    (sides.remote / "meta.md").write_bytes(b"# changed on the remote\n")
    before = tree_state(sides.local)

    r = sides.run("pull", "--audit-json-out", str(sides.root / "pull.json"), env=no_rsync)

    assert r.returncode == 2, r.stderr
    assert "rsync not found: 'rsync'" in r.stderr and "install rsync" in r.stderr
    assert "Traceback" not in r.stderr
    audit = load_audit(sides.root / "pull.json")
    assert (audit["transfer_state"], audit["error"]["kind"]) == ("FAILED", "config")
    assert tree_state(sides.local) == before  # nothing promoted
    assert leftovers(sides.root) == [] and leftovers(sides.base) == []


@pytest.mark.parametrize("action", ["pull", "push"])
def test_a_pulls_rsync_reads_its_file_lists_on_the_remote_and_a_push_here(
        sides: Sides, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str) -> None:
    """A list on the receiving side is forwarded to the sender name by name (see
    rsync.lists_on_remote): a pull writes each batch's list on the remote, and removes it."""
    monkeypatch.setattr(sync, "RSYNC_BATCH_FILES", 3)
    files = {**BASE_FILES, **{f"_derived/ns/part-{i}.parquet": b"PAR1-%d" % i for i in range(4)}}
    (sides.seed_remote if action == "pull" else sides.seed_local)(files)
    out = tmp_path / "audit.json"
    result = CliRunner().invoke(cli, ["--log-format", "json", "-v", "--remotes-config", str(sides.cfg), action,
                                      DATASET, REMOTE, "-y", "--no-progress", "--audit-json-out", str(out)])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    lists = [a for e in events if e["event"] == "rsync.start" for a in e["argv"] if a.startswith("--files-from=")]
    assert len(lists) == [e["runs"] for e in events if e["event"] == "rsync"][0] > 1
    audit = load_audit(out)
    name = f"{engine.dataset_key(DATASET)}.{audit['txid']}.files"
    where = f":{sides.base}" if action == "pull" else str(sides.root)
    assert set(lists) == {f"--files-from={where}/.usrsync/tmp/{name}"}
    assert (audit["transfer_state"], audit["transfer"]["files"], audit["post"]["in_sync"]) == (
        "TRANSFERRED", len(files), True)
    sides.assert_in_sync()
    assert leftovers(sides.root) == [] and leftovers(sides.base) == []


def test_a_pull_whose_list_cannot_be_written_on_the_remote_keeps_it_here(sides: Sides, tmp_path: Path) -> None:
    """A full quota or a read-only state dir on the cluster must not stop a pull."""
    sides.seed_remote()
    tmp = sides.base / ".usrsync" / "tmp"
    tmp.mkdir(parents=True)
    sides.chown_remote()
    tmp.chmod(0o500)  # the login user cannot create its list there
    try:
        out = tmp_path / "audit.json"
        r = run_usr(sides.cfg, "--log-format", "json", "-v", "pull", DATASET, REMOTE, "-y", "--audit-json-out", str(out))
    finally:
        tmp.chmod(0o700)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert [e["reason"] for e in events if e["event"] == "file_list_here"] != []
    lists = [a for e in events if e["event"] == "rsync.start" for a in e["argv"] if a.startswith("--files-from=")]
    assert lists and all(a.startswith(f"--files-from={sides.root}/.usrsync/tmp/") for a in lists)
    audit = load_audit(out)
    assert (audit["transfer_state"], audit["post"]["in_sync"]) == ("TRANSFERRED", True)
    sides.assert_in_sync()
    assert leftovers(sides.root) == [] and leftovers(sides.base) == []


# --- locks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["pull", "push"])
def test_a_first_transfer_leaves_out_checksum_and_a_later_one_compares_content(sides: Sides, tmp_path: Path,
                                                                               action: str) -> None:
    """With no destination dataset there is nothing for --checksum to compare: it would only make
    the sender read every file twice. Once there is one (rsync's --copy-dest basis), content
    decides: a same-size rewrite with its mtime put back still moves."""
    source = sides.remote if action == "pull" else sides.local
    (sides.seed_remote if action == "pull" else sides.seed_local)()

    def run() -> tuple[list[list[str]], dict]:
        out = tmp_path / "audit.json"
        r = run_usr(sides.cfg, "--log-format", "json", "-v", action, DATASET, REMOTE, "-y", "--audit-json-out", str(out))
        assert r.returncode == 0, r.stderr
        events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
        return [e["argv"] for e in events if e["event"] == "rsync.start"], load_audit(out)

    argvs, audit = run()
    assert argvs and all("--checksum" not in argv for argv in argvs)
    assert audit["transfer"]["files"] == len(BASE_FILES) and audit["post"]["in_sync"]
    sides.assert_in_sync()

    target = source / "_derived" / "ns" / "part-0001.parquet"
    before = target.stat()
    target.write_bytes(bytes(reversed(target.read_bytes())))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    sides.chown_remote()
    argvs, audit = run()
    assert argvs and all("--checksum" in argv and any(a.startswith("--copy-dest=") for a in argv) for argv in argvs)
    assert audit["transfer"]["files"] == 1 and audit["post"]["in_sync"]
    sides.assert_in_sync()


def test_concurrent_pull_is_refused_naming_the_holder(sides: Sides, tmp_path: Path) -> None:
    sides.seed_remote()
    marker = tmp_path / "paused"
    first = sides.start("pull", env=pause_env("after-lock", marker))
    try:
        holder_pid = paused_pid(marker, first)
        r = sides.run("pull", "--wait", "0", "--audit-json-out", str(tmp_path / "second.json"))
    finally:
        marker.unlink(missing_ok=True)
        _, err = first.communicate(timeout=120)

    assert r.returncode == 4, r.stderr
    error, hint = r.stderr.strip().splitlines()[-2:]
    assert error.startswith(f"error: dataset '{DATASET}' is locked on this machine by ")
    assert f" pid {holder_pid} " in error
    assert hint.startswith("hint: ") and "--wait" in hint
    second = load_audit(tmp_path / "second.json")
    assert second["transfer_state"] == "FAILED"
    assert second["error"] == {**second["error"], "kind": "locked", "exit_code": 4}
    assert first.returncode == 0, err
    sides.assert_in_sync()


def _agents(rig: SshRig) -> int:
    return sum("usrsync_agent.py" in cmd and " serve " in cmd for _, cmd in rig.user_processes())


def _idle(pid: int) -> bool:
    """No CPU time used by `pid` for 0.3 s (utime + stime from /proc)."""
    def cpu() -> int:
        fields = rigmod.proc_stat(pid)
        return int(fields[11]) + int(fields[12])

    before = cpu()
    time.sleep(0.3)
    return cpu() == before


def test_concurrent_pull_with_wait_runs_after_the_holder(sides: Sides, sshd_rig: SshRig, tmp_path: Path) -> None:
    sides.seed_remote()
    marker = tmp_path / "paused"
    first = sides.start("pull", "--audit-json-out", str(tmp_path / "first.json"), env=pause_env("after-lock", marker))
    second = None
    try:
        paused_pid(marker, first)
        second = sides.start("pull", "--wait", "60", "--audit-json-out", str(tmp_path / "second.json"))
        # The local lock is taken before connecting: the second pull waits there, agentless and
        # idle (its CPU time stops growing once it has started up and sleeps between attempts).
        wait_for(lambda: _idle(second.pid), "the second pull to wait for the lock")
        time.sleep(0.6)
        assert second.poll() is None and _agents(sshd_rig) == 1
    finally:
        marker.unlink(missing_ok=True)
        _, first_err = first.communicate(timeout=120)
        _, second_err = second.communicate(timeout=120) if second else ("", "")

    assert first.returncode == 0, first_err
    assert second is not None and second.returncode == 0, second_err
    assert load_audit(tmp_path / "first.json")["transfer_state"] == "TRANSFERRED"
    audit = load_audit(tmp_path / "second.json")
    assert audit["transfer_state"] == "NO-OP"
    assert audit["lock"]["waited_seconds"] >= 0.5
    sides.assert_in_sync()


# --- safety refusals --------------------------------------------------------------------------

EVENTS = BASE_FILES[".events.log"]


def _refused(sides: Sides, action: str, tmp_path: Path, *args: str) -> tuple[str, dict]:
    """Run an action that must refuse (exit 6) and change nothing on either side."""
    before = sides.states()
    out = tmp_path / f"{action}.json"
    r = sides.run(action, "--audit-json-out", str(out), *args)
    assert r.returncode == 6, r.stderr
    assert sides.states() == before
    audit = load_audit(out)
    assert audit["transfer_state"] == "FAILED"
    assert audit["error"] == {**audit["error"], "kind": "refused", "exit_code": 6}
    error, hint = r.stderr.strip().splitlines()[-2:]
    assert error == "error: " + audit["error"]["message"]
    assert hint.startswith("hint: ")
    return audit["error"]["message"], audit


def test_diverged_events_log_refuses_both_directions(sides: Sides, tmp_path: Path) -> None:
    sides.seed_both()
    (sides.local / ".events.log").write_bytes(EVENTS + b'{"event":"local"}\n')
    (sides.remote / ".events.log").write_bytes(EVENTS + b'{"event":"remote-1"}\n{"event":"remote-2"}\n')
    expected = ".events.log has diverged: local has 1 and remote has 2 lines past the 2 lines they share"
    for action in ("pull", "push"):
        message, audit = _refused(sides, action, tmp_path)
        assert message == expected
        assert audit[".events.log"] == {**audit[".events.log"], "relation": "diverged", "local": 3, "remote": 4,
                                        "common": 2}


def test_pull_refuses_when_local_events_log_is_ahead(sides: Sides, tmp_path: Path) -> None:
    sides.seed_both()
    (sides.local / ".events.log").write_bytes(EVENTS + b'{"event":"local"}\n')
    message, _ = _refused(sides, "pull", tmp_path)
    assert message == ".events.log on the local side has 1 lines the other side lacks; a pull would drop them"


def test_push_refuses_when_remote_events_log_is_ahead(sides: Sides, tmp_path: Path) -> None:
    sides.seed_both()
    (sides.remote / ".events.log").write_bytes(EVENTS + b'{"event":"remote"}\n')
    message, _ = _refused(sides, "push", tmp_path)
    assert message == ".events.log on the remote side has 1 lines the other side lacks; a push would drop them"


def test_max_delete_guards_a_mirroring_pull(sides: Sides, tmp_path: Path) -> None:
    files = {"records.parquet": b"PAR1", "meta.md": b"# m\n", "_derived/ns/p.parquet": b"d", "notes/n.txt": b"n"}
    sides.seed_both(files)
    for name in ("meta.md", "_derived/ns/p.parquet", "notes/n.txt"):
        (sides.remote / name).unlink()

    message, _ = _refused(sides, "pull", tmp_path)
    assert message == "the pull would delete 3 of 4 local files, more than --max-delete 50%"
    message, _ = _refused(sides, "pull", tmp_path, "--max-delete", "2")
    assert message == "the pull would delete 3 of 4 local files, more than --max-delete 2"

    r = sides.run("pull", "--max-delete", "100%", "--audit-json-out", str(tmp_path / "ok.json"))
    assert r.returncode == 0, r.stderr
    audit = load_audit(tmp_path / "ok.json")
    assert audit["transfer"] == {**audit["transfer"], "files": 0, "deleted": 3, "linked": 1}
    sides.assert_in_sync()
    assert sorted(tree_state(sides.local)) == ["records.parquet"]


def test_pull_refuses_when_the_remote_primary_is_missing(sides: Sides, tmp_path: Path) -> None:
    sides.seed_both()
    (sides.remote / "records.parquet").unlink()
    message, _ = _refused(sides, "pull", tmp_path)
    assert message == "the remote dataset has no records.parquet; a pull would remove the local primary"


def test_push_refuses_when_the_local_primary_is_missing(sides: Sides, tmp_path: Path) -> None:
    sides.seed_both()
    (sides.local / "records.parquet").unlink()
    message, _ = _refused(sides, "push", tmp_path)
    assert message == "the local dataset has no records.parquet; a push would remove the remote primary"


def test_push_without_primary_bootstraps_a_new_remote_dataset(sides: Sides, tmp_path: Path) -> None:
    files = {k: v for k, v in BASE_FILES.items() if k != "records.parquet"}
    sides.seed_local(files)
    r = sides.run("push", "--audit-json-out", str(tmp_path / "push.json"))
    assert r.returncode == 0, r.stderr
    audit = load_audit(tmp_path / "push.json")
    assert audit["transfer_state"] == "TRANSFERRED"
    assert audit["transfer"] == {**audit["transfer"], "files": len(files), "linked": 0, "promote": "rename"}
    sides.assert_in_sync()


# --- push ---------------------------------------------------------------------------------------


def test_push_verifies_the_promoted_remote_tree(sides: Sides, tmp_path: Path) -> None:
    sides.seed_both()
    write_tree(sides.local, {"meta.md": b"# my_dataset, revised\n", "_derived/ns/part-0002.parquet": b"PAR1-2"})
    (sides.local / "notes/readme.txt").unlink()
    inode = (sides.remote / "records.parquet").stat().st_ino

    r = sides.run("push", "--audit-json-out", str(tmp_path / "push.json"))

    assert r.returncode == 0, r.stderr
    audit = load_audit(tmp_path / "push.json")
    assert audit["transfer_state"] == "TRANSFERRED"
    assert audit["transfer"] == {**audit["transfer"], "files": 2, "deleted": 1, "linked": 4, "rsync_exit": 0,
                                 "promote": "exchange"}
    # The re-verification after promotion reread both moved files on the remote.
    assert audit["post"] == {"verified": True, "in_sync": True, "checked_files": 2,
                             "checked_bytes": len(b"# my_dataset, revised\n") + len(b"PAR1-2"), "problems": []}
    assert audit["_auxiliary"] == {**audit["_auxiliary"], "changed": True, "remote_only": ["notes/readme.txt"]}
    sides.assert_in_sync()
    assert (sides.remote / "records.parquet").stat().st_ino == inode  # linked, not copied
    # The remote's staging area is gone after a successful push.
    assert list((sides.base / ".usrsync" / "staging").iterdir()) == []


# --- flags --------------------------------------------------------------------------------------


def _remote_ahead(sides: Sides) -> None:
    """In sync, then the remote gets a new primary, meta, event, snapshot and overlay part."""
    sides.seed_both()
    write_tree(sides.remote, {
        "records.parquet": b"PAR1-more-rows",
        "meta.md": b"# my_dataset v2\n",
        ".events.log": EVENTS + b'{"event":"attach","rows":4}\n',
        "_snapshots/records-20260202T000000Z.parquet": b"PAR1snapshot-2",
        "_derived/ns/part-0002.parquet": b"PAR1derived-2",
    })
    sides.chown_remote()


def test_dry_run_reports_what_would_move_and_changes_nothing(sides: Sides, tmp_path: Path) -> None:
    _remote_ahead(sides)
    before = sides.states()
    r = sides.run("pull", "--dry-run", "--audit-json-out", str(tmp_path / "dry.json"))
    assert r.returncode == 0, r.stderr
    assert sides.states() == before
    audit = load_audit(tmp_path / "dry.json")
    assert audit["transfer_state"] == "DRY-RUN"
    moved = len(b"PAR1-more-rows" + b"# my_dataset v2\n" + EVENTS + b'{"event":"attach","rows":4}\n'
                + b"PAR1snapshot-2" + b"PAR1derived-2")
    assert audit["transfer"] == {**audit["transfer"], "files": 5, "bytes": moved, "deleted": 0, "linked": 3,
                                 "rsync_exit": None}
    assert not (sides.root / ".usrsync" / "staging").exists()


def test_primary_only_moves_records_parquet_alone(sides: Sides, tmp_path: Path) -> None:
    _remote_ahead(sides)
    before, _ = sides.states()
    r = sides.run("pull", "--primary-only", "--audit-json-out", str(tmp_path / "pull.json"))
    assert r.returncode == 0, r.stderr
    audit = load_audit(tmp_path / "pull.json")
    assert audit["transfer_state"] == "TRANSFERRED"
    assert audit["transfer"] == {**audit["transfer"], "files": 1, "bytes": len(b"PAR1-more-rows")}
    assert audit["primary"]["changed"] is True
    for section in ("meta", ".events.log", "_snapshots", "_derived", "_auxiliary"):
        assert audit[section] == {**audit[section], "skipped": True, "changed": False}, section
    # A skipped section is still reported as it stands: the remote log is one line ahead.
    lines = EVENTS.count(b"\n")
    assert audit[".events.log"] == {**audit[".events.log"], "local": lines, "remote": lines + 1, "common": lines,
                                    "relation": "remote_ahead", "remote_past_common": 1}
    assert audit["post"] == {**audit["post"], "verified": True, "in_sync": True}
    after = tree_state(sides.local)
    assert after["records.parquet"][0] == b"PAR1-more-rows"
    assert {p: s for p, s in after.items() if p != "records.parquet"} == \
        {p: s for p, s in before.items() if p != "records.parquet"}


def test_skip_snapshots_leaves_snapshots_out(sides: Sides, tmp_path: Path) -> None:
    _remote_ahead(sides)
    r = sides.run("pull", "--skip-snapshots", "--audit-json-out", str(tmp_path / "pull.json"))
    assert r.returncode == 0, r.stderr
    audit = load_audit(tmp_path / "pull.json")
    assert audit["transfer"]["files"] == 4
    assert audit["_snapshots"] == {**audit["_snapshots"], "skipped": True, "changed": False}
    local, remote = sides.states()
    assert sorted(set(remote) - set(local)) == ["_snapshots/records-20260202T000000Z.parquet"]
    assert {p: s for p, s in remote.items() if not p.startswith("_snapshots/")} == \
        {p: s for p, s in local.items() if not p.startswith("_snapshots/")}


def test_relaxed_verification_is_reflected_in_the_audit(sides: Sides, tmp_path: Path) -> None:
    """Without content hashes, _derived compares by size and mtime: a same-size, same-mtime
    rewrite goes unnoticed, exactly what the runbook warns about."""
    sides.seed_both()
    part = sides.remote / "_derived/ns/part-0001.parquet"
    part.write_bytes(b"PAR1derived-X")
    os.utime(part, (1_700_000_000, 1_700_000_000))

    profiles = {
        (): ("strict", "on", ["ns/part-0001.parquet"]),
        ("--no-verify-derived-hashes",): ("strict", "off", []),
        ("--no-verify-sidecars",): ("off", "off", []),
    }
    for flags, (sidecars, content_hashes, differing) in profiles.items():
        out = tmp_path / f"diff{'-'.join(flags)}.json"
        r = sides.run("diff", *flags, "--audit-json-out", str(out))
        assert r.returncode == 0, r.stderr
        audit = load_audit(out)
        assert audit["verify"] == {**audit["verify"], "primary": "hash", "sidecars": sidecars,
                                   "content_hashes": content_hashes}, flags
        assert audit["_derived"]["differing"] == differing, flags

    r = sides.run("pull", "--no-verify-sidecars", "--audit-json-out", str(tmp_path / "pull.json"))
    assert r.returncode == 0, r.stderr
    audit = load_audit(tmp_path / "pull.json")
    assert (audit["transfer_state"], audit["verify"]["sidecars"], audit["verify"]["content_hashes"]) == \
        ("NO-OP", "off", "off")


def test_verify_size_compares_the_primary_by_size(sides: Sides, tmp_path: Path) -> None:
    sides.seed_both()
    primary = BASE_FILES["records.parquet"]
    (sides.remote / "records.parquet").write_bytes(primary[:-4] + b"PAR2")  # same size, new bytes

    r = sides.run("pull", "--verify", "size", "--audit-json-out", str(tmp_path / "size.json"))
    assert r.returncode == 0, r.stderr
    audit = load_audit(tmp_path / "size.json")
    assert (audit["transfer_state"], audit["verify"]["primary"], audit["primary"]["changed"]) == \
        ("NO-OP", "size", False)

    r = sides.run("pull", "--audit-json-out", str(tmp_path / "hash.json"))
    assert r.returncode == 0, r.stderr
    audit = load_audit(tmp_path / "hash.json")
    assert (audit["transfer_state"], audit["verify"]["primary"], audit["primary"]["changed"]) == \
        ("TRANSFERRED", "hash", True)
    sides.assert_in_sync()
