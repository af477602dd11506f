"""A hostile or broken remote cannot write outside the dataset, promote a lie, or hang us.

The remote is a `type = "local"` profile whose `python` is a wrapper running
tests/hostile_agent.py (the real agent with one call subverted) instead of the real agent;
rsync and the filesystem are real. Every run is bounded by the subprocess timeout; each must
end in one `error:` + `hint:` pair with exit 3 (the remote misbehaved) or 5 (its data did not
verify), with the live datasets untouched and nothing left behind. tests/test_bad_input.py
covers `..`, garbage, bad zlib and a 4 GiB header on the manifest call.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    BASE_FILES,
    DATASET,
    REMOTE,
    Sides,
    agent_double,
    leftovers,
    load_audit,
    local_sides,
    pause_env,
    paused_pid,
    tree_state,
)

HOSTILE = Path(__file__).with_name("hostile_agent.py")
TIMEOUT = 60  # no run may take longer: a hang fails the test instead of stalling the suite


def hostile_sides(tmp_path: Path, variant: str, **profile: object) -> Sides:
    """Sides whose remote agent is hostile_agent.py VARIANT; both ends seeded in sync."""
    sides = local_sides(tmp_path / "w", python=str(agent_double(tmp_path, HOSTILE, variant)), **profile)
    sides.seed_both()
    return sides


def assert_clean_failure(sides: Sides, proc: subprocess.CompletedProcess[str], audit_path: Path, code: int,
                         message: str, before: tuple) -> dict:
    """Exit `code`, error line == audit message starting with `message`, nothing changed or left."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    error, hint = proc.stderr.strip().splitlines()[-2:]
    audit = load_audit(audit_path)
    assert audit["transfer_state"] == "FAILED"
    assert audit["error"]["exit_code"] == code
    assert audit["error"]["message"].startswith(message), audit["error"]["message"]
    assert error == "error: " + audit["error"]["message"]
    assert hint == "hint: " + audit["error"]["hint"]
    assert sides.states() == before
    assert leftovers(sides.root) == [] and leftovers(sides.base) == []
    return audit


# --- lies about paths and types: refused when the manifest arrives ---------------------------------


@pytest.mark.parametrize(("variant", "message"), [
    ("absolute-path", "the remote agent sent an unsafe path '/etc/passwd' (absolute path)"),
    ("nul-in-path", r"the remote agent sent an unsafe path 'notes/a\x00b' (control character in path)"),
    ("newline-in-path", r"the remote agent sent an unsafe path 'notes/a\nb' (control character in path)"),
    ("wrong-types", "the remote agent sent a malformed manifest entry (Expected `int`, got `str`"),
    ("huge-header", "the remote agent announced a 2147483648-byte frame, over the limit"),
    ("truncated", "the remote agent closed the connection mid-reply"),
])
def test_malformed_answers_are_refused(tmp_path: Path, variant: str, message: str) -> None:
    sides = hostile_sides(tmp_path, variant)
    before = sides.states()
    out = tmp_path / "audit.json"
    proc = sides.run("pull", "--audit-json-out", str(out), timeout=TIMEOUT)
    audit = assert_clean_failure(sides, proc, out, 3, message, before)
    assert audit["error"]["kind"] in ("protocol", "remote")
    assert "\n" not in audit["error"]["message"] and "\x00" not in audit["error"]["message"]


def test_a_push_refuses_malformed_verification_stats(tmp_path: Path) -> None:
    """The remote's check of a pushed staging copy comes with each file's packed stats; a reply
    whose stats do not fit the files checked is refused before anything is promoted."""
    sides = hostile_sides(tmp_path, "short-stats")
    (sides.local / "_derived" / "ns" / "part-0009.parquet").write_bytes(b"PAR1 pushed")
    before = sides.states()
    out = tmp_path / "audit.json"
    proc = sides.run("push", "--audit-json-out", str(out), timeout=TIMEOUT)
    audit = assert_clean_failure(sides, proc, out, 3, "the remote agent sent stats of ", before)
    assert audit["error"]["kind"] == "protocol"


# --- lies about content: caught by verification, nothing promoted -----------------------------------


@pytest.mark.parametrize(("variant", "message"), [
    ("lying-digest", ("the staged copy does not match the source manifest: "
                      "_derived/ns/part-0001.parquet: content differs from the source manifest")),
    ("lying-size", "the staged copy does not match the source manifest: meta.md: size 13, expected 20"),
])
def test_a_manifest_that_does_not_match_the_files_fails_verification(tmp_path: Path, variant: str,
                                                                     message: str) -> None:
    sides = hostile_sides(tmp_path, variant)
    before = sides.states()
    out = tmp_path / "audit.json"
    proc = sides.run("pull", "--audit-json-out", str(out), timeout=TIMEOUT)
    audit = assert_clean_failure(sides, proc, out, 5, message, before)
    assert audit["error"]["kind"] == "verification"
    assert audit["post"] is None or audit["post"]["verified"] is False


def _plant_specials(remote: Path, outside: Path) -> None:
    outside.write_bytes(b"secret outside the dataset\n")
    (remote / "notes" / "link.txt").symlink_to(outside)
    os.mkfifo(remote / "notes" / "fifo")


def test_symlinks_and_fifos_claimed_as_files_are_refused(tmp_path: Path) -> None:
    sides = hostile_sides(tmp_path, "specials-as-files")
    _plant_specials(sides.remote, tmp_path / "outside.txt")
    before = sides.states()
    out = tmp_path / "audit.json"
    proc = sides.run("pull", "--audit-json-out", str(out), timeout=TIMEOUT)
    assert_clean_failure(sides, proc, out, 5, "the staged copy does not match the source manifest: "
                         "notes/fifo: missing; notes/link.txt: missing", before)
    assert not (sides.local / "notes" / "link.txt").exists() and not (sides.local / "notes" / "fifo").exists()


def test_an_honest_remote_reports_specials_and_never_transfers_them(tmp_path: Path) -> None:
    sides = local_sides(tmp_path / "w")
    sides.seed_remote()
    _plant_specials(sides.remote, tmp_path / "outside.txt")
    out = tmp_path / "audit.json"
    proc = sides.run("pull", "--audit-json-out", str(out), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    audit = load_audit(out)
    assert audit["transfer_state"] == "TRANSFERRED"
    assert "2 symlinks or special files are not transferred" in audit["warnings"]
    assert {p: b for p, (b, _) in tree_state(sides.local).items()} == BASE_FILES
    assert sorted(p.name for p in (sides.local / "notes").iterdir()) == ["readme.txt"]


# --- endless and silent agents: bounded in time and memory ----------------------------------------


def test_an_endless_stream_of_chunks_is_cut_off(tmp_path: Path) -> None:
    """The CLI with its item cap lowered (the default, 10 million, takes GBs to reach)."""
    sides = hostile_sides(tmp_path, "endless")
    before = sides.states()
    out = tmp_path / "audit.json"
    lowered = "import sys; from usrsync import cli, protocol; protocol.MAX_CALL_ITEMS = 100_000; sys.exit(cli.main())"
    argv = [sys.executable, "-c", lowered, "--remotes-config", str(sides.cfg), "pull", DATASET, REMOTE, "-y",
            "--audit-json-out", str(out)]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    assert_clean_failure(sides, proc, out, 3, "the remote agent streamed over 100000 items for manifest", before)
    assert peak_mib < 512  # 100 000 entries are tens of MiB; an unbounded reader would not stop


@pytest.mark.parametrize(("variant", "message"), [
    ("silent", "the remote agent sent nothing for 2 s during manifest"),
    ("mute", "the remote agent did not start within 2 s"),
])
def test_an_agent_that_never_answers_times_out(tmp_path: Path, variant: str, message: str) -> None:
    sides = hostile_sides(tmp_path, variant, agent_timeout=2)
    before = sides.states()
    out = tmp_path / "audit.json"
    proc = sides.run("pull", "--audit-json-out", str(out), timeout=TIMEOUT)
    audit = assert_clean_failure(sides, proc, out, 3, message, before)
    assert audit["error"]["hint"].startswith(("the remote may be hung", "run `usr remotes doctor"))


def test_a_slow_but_working_agent_is_not_cut_off(tmp_path: Path) -> None:
    """The real agent paused 5 s inside a call under agent_timeout = 2: its progress frames
    keep the call alive, so only silence, not slowness, ends a run. (With a timeout of 1 s, a
    loaded machine could take longer than that just to start the agent.)"""
    sides = local_sides(tmp_path / "w", agent_timeout=2)
    sides.seed_remote()
    sides.seed_local({**BASE_FILES, "meta.md": b"# my_dataset, edited here\n"})
    env = pause_env("before-verify", tmp_path / "marker", seconds=5)  # the local agent inherits it
    out = tmp_path / "audit.json"
    proc = sides.run("push", "--audit-json-out", str(out), env=env, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "marker").read_text().startswith("before-verify ")  # the agent did pause
    assert load_audit(out)["transfer_state"] == "TRANSFERRED"
    sides.assert_in_sync()


# --- symlinks planted during a transfer cannot redirect a write ------------------------------------


def _paused_pull(sides: Sides, tmp_path: Path, phase: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "audit.json"
    proc = sides.start("pull", "--audit-json-out", str(out), env=pause_env(phase, tmp_path / "marker"))
    paused_pid(tmp_path / "marker", proc)
    return proc, out


def _staging(sides: Sides) -> Path:
    [staging] = (sides.root / ".usrsync" / "staging").iterdir()
    return staging


def _outside(tmp_path: Path) -> tuple[Path, dict]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_bytes(b"must not change\n")
    os.utime(outside / "precious.txt", (1_600_000_000, 1_600_000_000))
    return outside, tree_state(outside)


def _resume(proc: subprocess.Popen, tmp_path: Path) -> tuple[int, str]:
    """Release the pause (its marker gone) and collect the run."""
    (tmp_path / "marker").unlink()
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


def test_symlinked_dir_planted_in_staging_is_replaced_not_followed(tmp_path: Path) -> None:
    sides = local_sides(tmp_path / "w")
    sides.seed_both()
    (sides.remote / "_derived" / "new").mkdir()
    (sides.remote / "_derived" / "new" / "part.parquet").write_bytes(b"PAR1new")
    outside, outside_before = _outside(tmp_path)
    proc, out = _paused_pull(sides, tmp_path, "after-stage")
    (_staging(sides) / "new").symlink_to(outside, target_is_directory=True)  # staging mirrors _derived/
    code, err = _resume(proc, tmp_path)

    assert code == 0, err
    assert tree_state(outside) == outside_before  # rsync replaced the link with a directory
    audit = load_audit(out)
    assert (audit["transfer_state"], audit["transfer"]["subtree"]) == ("TRANSFERRED", "_derived")
    assert (sides.local / "_derived" / "new").is_dir() and not (sides.local / "_derived" / "new").is_symlink()
    sides.assert_in_sync()


@pytest.mark.parametrize("planted", ["symlink-inside-staging", "staging-replaced-by-symlink"])
def test_planted_symlink_fails_verification_and_never_goes_live(tmp_path: Path, planted: str) -> None:
    sides = local_sides(tmp_path / "w")
    sides.seed_both()
    (sides.remote / "meta.md").write_bytes(b"# my_dataset v2\n")
    before = tree_state(sides.local)
    outside, outside_before = _outside(tmp_path)
    proc, out = _paused_pull(sides, tmp_path, "after-stage")
    staging = _staging(sides)
    if planted == "symlink-inside-staging":
        (staging / "notes" / "evil").symlink_to(outside / "precious.txt")
        expected = "the staged copy does not match the source manifest: notes/evil: not a regular file (symlink)"
    else:  # only someone with our own uid can do this: rsync then writes where the link points
        staging.rename(staging.with_name(staging.name + ".moved"))
        staging.symlink_to(outside, target_is_directory=True)
        expected = "the staged copy does not match the source manifest: .: not a directory"
    code, err = _resume(proc, tmp_path)

    assert code == 5, err
    assert load_audit(out)["error"]["message"] == expected
    assert tree_state(sides.local) == before and not sides.local.is_symlink()
    assert (outside / "precious.txt").read_bytes() == b"must not change\n"
    if planted == "symlink-inside-staging":
        assert tree_state(outside) == outside_before


def test_symlink_planted_over_the_lock_file_touches_nothing(tmp_path: Path) -> None:
    """The heartbeat refreshes the lock through its own fd, and a lock path that is a symlink
    is only ever aged and broken, never followed."""
    sides = local_sides(tmp_path / "w", lock_timeout=1)
    sides.seed_remote()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"victim\n")
    os.utime(victim, (1_600_000_000, 1_600_000_000))
    proc, _ = _paused_pull(sides, tmp_path, "after-lock")
    [lock] = (sides.root / ".usrsync" / "locks").iterdir()
    planted = lock.with_name("planted")
    planted.symlink_to(victim)
    planted.replace(lock)
    time.sleep(1.5)  # three heartbeats (every 0.5 s under lock_timeout = 1) while the link is there
    code, err = _resume(proc, tmp_path)

    assert code == 0, err
    assert (victim.read_bytes(), victim.stat().st_mtime) == (b"victim\n", 1_600_000_000)
    assert lock.is_symlink()  # not ours any more: release leaves it alone

    r = sides.run("pull", "--audit-json-out", str(tmp_path / "next.json"), timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    audit = load_audit(tmp_path / "next.json")
    assert audit["transfer_state"] == "NO-OP"
    [broken] = audit["lock"]["broken_stale"]
    assert (broken["side"], broken["holder"]) == ("local", None) and broken["age_seconds"] >= 1
    assert (victim.read_bytes(), victim.stat().st_mtime) == (b"victim\n", 1_600_000_000)
    assert leftovers(sides.root) == []
