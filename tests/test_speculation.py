"""The local scan that starts before the connection does (usrsync.sync, `_speculate_local_manifest`).

It runs in the algorithm of the dataset's newest local hash cache. These runs check that a right
guess is used, a wrong one is thrown away (the result is the same as without guessing), there is
no guess without a cache, and a run that fails while the early scan is going ends with the usual
one-line error, nothing else. Local remotes: no sshd needed, except a closed loopback port.
"""

from __future__ import annotations

import json
import marshal
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from helpers import BASE_FILES, DATASET, REMOTE, cache_entries, load_audit, local_sides, set_mtimes, write_tree
from rig import free_port, oldest_python3

from remote_agent import usrsync_agent as engine


def manifests_event(stderr: str, name: str = "manifests") -> dict:
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return next(e for e in events if e["event"] == name)


def python_without_xxhash() -> str:
    for python in (oldest_python3(), "/usr/bin/python3"):
        if python and subprocess.run([python, "-c", "import xxhash"], capture_output=True).returncode != 0:
            return python
    pytest.skip("every Python here has xxhash: cannot make a remote that negotiates sha256")


@pytest.fixture
def sides(tmp_path: Path):
    if engine.xxhash is None:
        pytest.skip("the orchestrator's Python has no xxhash")
    sides = local_sides(tmp_path, python=sys.executable)
    sides.seed_both()
    return sides


def logged_diff(sides, *extra: str, event: str = "manifests") -> tuple[dict, dict]:
    """`usr -v --log-format json diff ...`: (the audit, the "manifests" log event, or `event`)."""
    audit = sides.root.parent / "audit.json"
    r = subprocess.run([sys.executable, "-m", "usrsync", "--log-format", "json", "-v", "--remotes-config",
                        str(sides.cfg), "diff", DATASET, REMOTE, "--audit-json-out", str(audit), *extra],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return load_audit(audit), manifests_event(r.stderr, event)


def test_no_cache_no_guess_then_the_guess_is_used(sides) -> None:
    audit, first = logged_diff(sides)
    assert first["local_scan"] == "fresh"  # no local hash cache yet: nothing to guess from
    assert audit["post"]["in_sync"] is True
    audit, second = logged_diff(sides)
    assert second["local_scan"] == "early"
    assert audit["agent"]["hash_algo"] == "xxh3_128"
    assert audit["post"]["in_sync"] is True


def test_early_scan_sees_a_change_made_since_the_last_run(sides) -> None:
    logged_diff(sides)
    write_tree(sides.local, {"_derived/ns/part-0001.parquet": b"PAR1derived-X"})  # same size, new bytes
    set_mtimes(sides.local, 1_700_000_000)
    audit, event = logged_diff(sides)
    assert event["local_scan"] == "early"
    assert audit["post"]["in_sync"] is False
    assert audit["_derived"]["differing"] == ["ns/part-0001.parquet"]


def test_a_wrong_guess_is_thrown_away(sides) -> None:
    logged_diff(sides)  # leaves an xxh3_128 cache here
    write_tree(sides.local, {"_derived/ns/part-0001.parquet": b"PAR1derived-X"})
    set_mtimes(sides.local, 1_700_000_000)
    # The remote's Python now lacks xxhash: the run agrees on sha256, the early xxh3 scan is unusable.
    doc = {"root": str(sides.root), "remotes": {REMOTE: {"type": "local", "base_dir": str(sides.base),
                                                         "python": python_without_xxhash()}}}
    sides.cfg.write_text(tomli_w.dumps(doc))
    audit, event = logged_diff(sides)
    assert event["local_scan"] == "fresh (xxh3_128 guessed)"
    assert audit["agent"]["hash_algo"] == "sha256"
    assert audit["_derived"]["differing"] == ["ns/part-0001.parquet"]
    _, again = logged_diff(sides)  # the sha256 cache is now the newest: guessed right
    assert again["local_scan"] == "early"


def test_an_older_version_s_cache_is_guessed_from_too(sides) -> None:
    """Right after an upgrade only the format 2 file exists: the early scan still starts."""
    logged_diff(sides)
    cache_dir, local = engine.default_cache_dir(), str(sides.local)
    current = Path(engine.HashCache.path_for(cache_dir, local, "xxh3_128"))
    doc = marshal.loads(current.read_bytes())
    entries = cache_entries(doc.pop("paths"), doc.pop("keys"), doc.pop("digests"))
    doc["format"] = 2
    doc["entries"] = {rel: (engine.CACHE_KEY.unpack(key), digest) for rel, (key, digest) in entries.items()}
    Path(engine.HashCache.path_for(cache_dir, local, "xxh3_128", 2)).write_bytes(marshal.dumps(doc, 4))
    current.unlink()
    audit, event = logged_diff(sides)
    assert event["local_scan"] == "early"
    assert audit["post"]["in_sync"] is True
    assert current.exists()  # converted and written in the current format


def test_no_cache_flag_means_no_guess(sides) -> None:
    logged_diff(sides)
    _, event = logged_diff(sides, "--no-cache")
    assert event["local_scan"] == "fresh"


def test_a_failed_connection_during_the_early_scan_is_one_clean_error(tmp_path: Path) -> None:
    root = tmp_path / "local"
    write_tree(root / DATASET, {**BASE_FILES, **{f"_derived/many/{i:04d}": b"x" * 512 for i in range(300)}})
    cfg = tmp_path / "remotes.toml"
    cfg.write_text(tomli_w.dumps({"root": str(root), "remotes": {REMOTE: {
        "host": "127.0.0.1", "port": free_port(), "user": "nobody", "base_dir": "/srv/usr"}}}))
    engine.build_manifest(str(root / DATASET), "xxh3_128" if engine.xxhash else "sha256")  # a cache to guess from
    for name in list(BASE_FILES)[:3]:  # and files to hash, so the early scan has work when the connect fails
        (root / DATASET / name).write_bytes(b"changed " + name.encode())
    r = subprocess.run([sys.executable, "-m", "usrsync", "--remotes-config", str(cfg), "diff", DATASET, REMOTE],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["error", "hint"], r.stderr
    assert "127.0.0.1" in lines[0]


def test_a_no_op_diff_takes_the_remote_entries_from_the_local_manifest(sides) -> None:
    """Our copy of the remote manifest equals the local one: nothing is sent or decoded. A local
    change the remote lacks makes the copy differ: it is decoded, and the diff sees the change."""
    _, first = logged_diff(sides, event="remote_manifest")
    assert first["source"] == "sent"
    audit, second = logged_diff(sides, event="remote_manifest")
    assert second["source"] == "local" and audit["post"]["in_sync"] is True
    write_tree(sides.local, {"notes/readme.txt": b"changed here only"})
    set_mtimes(sides.local, 1_700_000_000)
    audit, third = logged_diff(sides, event="remote_manifest")
    assert third["source"] == "copy" and audit["post"]["in_sync"] is False
    assert audit["_auxiliary"]["differing"] == ["notes/readme.txt"]
