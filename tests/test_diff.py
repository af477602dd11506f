"""`usr diff` over the real sshd: the exact DESIGN §5 audit fields, section by section, by content."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import BASE_FILES, DATASET, Sides, load_audit, run_usr, set_mtimes, tree_state, write_tree

from remote_agent import usrsync_agent as engine

OLD_MTIME = 1_700_000_000  # far outside the hash cache's racy window

# The three decision checks of the seed runbook (seed/usr-sync-audit-loop.md), verbatim.
SEED_JQ_LINES = (
    """jq -r '.data | [.action, .transfer_state, .primary.changed, ._derived.changed, ._auxiliary.changed] | @tsv' \\
  "$AUDIT_DIR/pull.json\"""",
    """jq -r '[.usr_output_version, .data.verify.primary, .data.verify.sidecars, .data.verify.content_hashes] | @tsv' \\
  "$AUDIT_DIR/pull.json\"""",
    """jq -r '.data | {derived_local_only: ._derived.local_only, derived_remote_only: ._derived.remote_only, aux_local_only: ._auxiliary.local_only, aux_remote_only: ._auxiliary.remote_only}' \\
  "$AUDIT_DIR/pull.json\"""",
)

# Both ends start from COMMON, then every section differs in every way it can.
COMMON = {
    "records.parquet": b"PAR1" + b"rows" * 64 + b"PAR1",
    "meta.md": b"# my_dataset\n",
    ".events.log": b'{"event":"init"}\n{"event":"attach"}\n',
    "_snapshots/records-20260101T000000.parquet": b"PAR1snap-jan",
    "_derived/ns/part-0001.parquet": b"PAR1derived-1",
    "_registry/x.yaml": b"name: x\n",
}
LOCAL_CHANGES = {
    "records.parquet": b"PAR1" + b"rows" * 65 + b"PAR1",
    "meta.md": b"# my_dataset (local notes)\n",
    "_snapshots/records-20251201T000000.parquet": b"PAR1snap-dec",
    "_snapshots/records-20260101T000000.parquet": b"PAR1snap-JAN",
    "_derived/ns/part-0001.parquet": b"PAR1derived-L",
    "_derived/ns/part-0002.parquet": b"PAR1derived-2",
    "_registry/x.yaml": b"name: local\n",
    "notes/local.txt": b"local only\n",
}
REMOTE_CHANGES = {
    ".events.log": COMMON[".events.log"] + b'{"event":"remote"}\n',
    "_snapshots/records-20260301T000000.parquet": b"PAR1snap-mar",
    "_derived/other/part-0001.parquet": b"PAR1other",
    "_registry/y.yaml": b"name: y\n",
}


def digest(algo: str, data: bytes) -> str:
    hasher = engine.new_hasher(algo)
    hasher.update(data)
    return hasher.hexdigest()


def diff(sides: Sides, audit_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = sides.run("diff", "--audit-json-out", str(audit_path), *args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc, load_audit(audit_path)


def seed(sides: Sides, local: dict[str, bytes], remote: dict[str, bytes]) -> None:
    write_tree(sides.local, local)
    sides.seed_remote(remote)
    set_mtimes(sides.local, OLD_MTIME)
    set_mtimes(sides.remote, OLD_MTIME)


def assert_common_fields(data: dict[str, Any]) -> str:
    """Fields every successful diff has; returns the negotiated hash algorithm."""
    assert data["action"] == "diff"
    assert data["transfer_state"] == "DIFF-ONLY"
    assert data["dataset"] == DATASET
    assert data["remote"]["name"] == "rig"
    assert data["remote"]["host"] == "127.0.0.1"
    algo = data["verify"]["hash_algo"]
    assert algo in ("xxh3_128", "sha256")
    assert {k: data["verify"][k] for k in ("primary", "sidecars", "content_hashes")} == {
        "primary": "hash", "sidecars": "strict", "content_hashes": "on"}
    assert data["agent"]["hash_algo"] == algo
    assert data["transfer"] == {"files": 0, "bytes": 0, "deleted": 0, "linked": 0, "rsync_exit": None,
                                "seconds": 0.0, "promote": None, "subtree": None}
    assert data["post"]["verified"] is False
    assert data["error"] is None
    return algo


def test_bootstrap_dataset_only_on_the_remote(sides: Sides, tmp_path: Path) -> None:
    sides.seed_remote(BASE_FILES)
    remote_before = tree_state(sides.remote)
    proc, data = diff(sides, tmp_path / "audit.json", "--exit-code")
    assert proc.returncode == 1
    algo = assert_common_fields(data)
    records = BASE_FILES["records.parquet"]
    assert data["primary"] == {"changed": True, "local_hash": None, "remote_hash": digest(algo, records),
                               "local_size": None, "remote_size": len(records), "local_shape": None,
                               "remote_shape": None, "skipped": False}
    assert data["meta"] == {"changed": True, "local_hash": None,
                            "remote_hash": digest(algo, BASE_FILES["meta.md"]), "skipped": False}
    assert data[".events.log"] == {"changed": True, "local": 0, "remote": 2, "relation": "remote_ahead",
                                   "common": 0, "local_past_common": 0, "remote_past_common": 2,
                                   "skipped": False}
    assert data["_snapshots"] == {"changed": True, "remote_count": 1, "local_count": 0, "newer_than_local": 1,
                                  "local_only": [], "remote_only": ["records-20260101T000000Z.parquet"],
                                  "differing": [], "skipped": False}
    assert data["_derived"] == {"changed": True, "local_files": 0, "remote_files": 1, "local_only": [],
                                "remote_only": ["ns/part-0001.parquet"], "differing": [], "skipped": False}
    assert data["_auxiliary"] == {"changed": True, "local_files": 0, "remote_files": 1, "local_only": [],
                                  "remote_only": ["notes/readme.txt"], "differing": [], "skipped": False}
    assert data["post"]["in_sync"] is False
    # Read-only: nothing appeared locally, nothing changed remotely.
    assert not sides.local.exists()
    assert tree_state(sides.remote) == remote_before


def test_identical_trees(sides: Sides, tmp_path: Path) -> None:
    sides.seed_both(BASE_FILES)
    proc, data = diff(sides, tmp_path / "audit.json", "--exit-code")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "DIFF-ONLY: up to date"
    algo = assert_common_fields(data)
    records = BASE_FILES["records.parquet"]
    assert data["primary"] == {"changed": False, "local_hash": digest(algo, records),
                               "remote_hash": digest(algo, records), "local_size": len(records),
                               "remote_size": len(records), "local_shape": None, "remote_shape": None,
                               "skipped": False}
    meta = digest(algo, BASE_FILES["meta.md"])
    assert data["meta"] == {"changed": False, "local_hash": meta, "remote_hash": meta, "skipped": False}
    assert data[".events.log"] == {"changed": False, "local": 2, "remote": 2, "relation": "equal", "common": 2,
                                   "local_past_common": 0, "remote_past_common": 0, "skipped": False}
    assert data["_snapshots"] == {"changed": False, "remote_count": 1, "local_count": 1, "newer_than_local": 0,
                                  "local_only": [], "remote_only": [], "differing": [], "skipped": False}
    for section in ("_derived", "_auxiliary"):
        assert data[section] == {"changed": False, "local_files": 1, "remote_files": 1, "local_only": [],
                                 "remote_only": [], "differing": [], "skipped": False}
    assert data["post"]["in_sync"] is True

    # DATASET may also be the path of the local dataset dir under the root.
    by_path = run_usr(sides.cfg, "diff", str(sides.local), "rig", "--exit-code", "--json")
    assert by_path.returncode == 0, by_path.stderr
    assert json.loads(by_path.stdout)["data"]["dataset"] == DATASET


def test_every_section_differs(sides: Sides, tmp_path: Path) -> None:
    seed(sides, {**COMMON, **LOCAL_CHANGES}, {**COMMON, **REMOTE_CHANGES})
    proc, data = diff(sides, tmp_path / "audit.json", "--exit-code")
    assert proc.returncode == 1
    algo = assert_common_fields(data)
    local_records, remote_records = LOCAL_CHANGES["records.parquet"], COMMON["records.parquet"]
    assert data["primary"] == {"changed": True, "local_hash": digest(algo, local_records),
                               "remote_hash": digest(algo, remote_records), "local_size": len(local_records),
                               "remote_size": len(remote_records), "local_shape": None, "remote_shape": None,
                               "skipped": False}
    assert data["meta"] == {"changed": True, "local_hash": digest(algo, LOCAL_CHANGES["meta.md"]),
                            "remote_hash": digest(algo, COMMON["meta.md"]), "skipped": False}
    assert data[".events.log"] == {"changed": True, "local": 2, "remote": 3, "relation": "remote_ahead",
                                   "common": 2, "local_past_common": 0, "remote_past_common": 1,
                                   "skipped": False}
    # newer_than_local: the March snapshot sorts after the newest local one (January).
    assert data["_snapshots"] == {"changed": True, "remote_count": 2, "local_count": 2, "newer_than_local": 1,
                                  "local_only": ["records-20251201T000000.parquet"],
                                  "remote_only": ["records-20260301T000000.parquet"],
                                  "differing": ["records-20260101T000000.parquet"], "skipped": False}
    assert data["_derived"] == {"changed": True, "local_files": 2, "remote_files": 2,
                                "local_only": ["ns/part-0002.parquet"], "remote_only": ["other/part-0001.parquet"],
                                "differing": ["ns/part-0001.parquet"], "skipped": False}
    assert data["_auxiliary"] == {"changed": True, "local_files": 2, "remote_files": 2,
                                  "local_only": ["notes/local.txt"], "remote_only": ["_registry/y.yaml"],
                                  "differing": ["_registry/x.yaml"], "skipped": False}
    assert data["post"]["in_sync"] is False
    assert proc.stdout.splitlines()[-1] == (
        "DIFF-ONLY: differs in primary, meta, .events.log, _snapshots, _derived, _auxiliary")

    # Without --exit-code a diff that found differences still succeeds.
    assert sides.run("diff").returncode == 0


def test_seed_jq_lines_read_the_diff_audit(sides: Sides, tmp_path: Path) -> None:
    seed(sides, {**COMMON, **LOCAL_CHANGES}, {**COMMON, **REMOTE_CHANGES})
    audit_dir = tmp_path / ".usr-sync-audit"
    audit_dir.mkdir()
    diff(sides, audit_dir / "pull.json")
    env = {**os.environ, "AUDIT_DIR": str(audit_dir)}
    out = [subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, timeout=30, check=True)
           .stdout for line in SEED_JQ_LINES]
    assert out[0] == "diff\tDIFF-ONLY\ttrue\ttrue\ttrue\n"
    assert out[1] == "1\thash\tstrict\ton\n"
    assert json.loads(out[2]) == {
        "derived_local_only": ["ns/part-0002.parquet"], "derived_remote_only": ["other/part-0001.parquet"],
        "aux_local_only": ["notes/local.txt"], "aux_remote_only": ["_registry/y.yaml"],
    }


def test_json_prints_the_audit_and_history_lists_it(sides: Sides, tmp_path: Path) -> None:
    sides.seed_both(BASE_FILES)
    audit_path = tmp_path / "audit.json"
    proc = sides.run("diff", "--json", "--audit-json-out", str(audit_path))
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)  # stdout is the document and nothing else
    assert printed == json.loads(audit_path.read_text())
    data = printed["data"]
    assert data["transfer_state"] == "DIFF-ONLY" and data["post"]["in_sync"] is True

    archived = [json.loads(p.read_text()) for p in (Path(os.environ["XDG_STATE_HOME"]) / "usrsync" / "audit"
                                                      / DATASET).glob(f"*{data['txid']}.json")]
    assert archived == [printed]

    # Other tests archive audits of the same dataset id: find this run by its txid.
    history = run_usr(sides.cfg, "history", DATASET, "--limit", "1000", "--json")
    assert history.returncode == 0, history.stderr
    assert [d for d in json.loads(history.stdout) if d["data"]["txid"] == data["txid"]] == [printed]
    listing = run_usr(sides.cfg, "history", DATASET, "--remote", "rig", "--limit", "1000")
    assert listing.returncode == 0, listing.stderr
    # Compared word by word: the console expands the tabs between the fields.
    expected = [data["started_at"], "diff", "DIFF-ONLY", "rig", "0", "files", "0", "B"]
    assert expected in [line.split() for line in listing.stdout.splitlines()]


@pytest.mark.parametrize("warm_cache", [False, True], ids=["cold-cache", "warm-cache"])
def test_same_size_rewrite_with_restored_mtime_differs(sides: Sides, tmp_path: Path, warm_cache: bool) -> None:
    sides.seed_both(BASE_FILES)
    if warm_cache:
        _, data = diff(sides, tmp_path / "warm.json")
        assert data["post"]["in_sync"] is True
        algo = data["verify"]["hash_algo"]
        local_cache = engine.HashCache(engine.default_cache_dir(), str(sides.local), algo)
        remote_cache = engine.HashCache(str(sides.rig.home / ".cache" / "usrsync"), str(sides.remote), algo)
        assert local_cache.loaded_ok and "records.parquet" in local_cache.paths
        assert remote_cache.loaded_ok and "notes/readme.txt" in remote_cache.paths

    rewrites = [(sides.local / "records.parquet", b"PAR1" + bytes(reversed(range(256))) * 4 + b"PAR1"),
                (sides.remote / "notes/readme.txt", b"AUXILIARY\n")]
    for path, data_bytes in rewrites:
        before = path.stat()
        assert len(data_bytes) == before.st_size
        path.write_bytes(data_bytes)  # in place: same inode, same name, same size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)

    proc, data = diff(sides, tmp_path / "audit.json", "--exit-code")
    assert proc.returncode == 1
    algo = data["verify"]["hash_algo"]
    assert data["primary"]["changed"] is True
    assert data["primary"]["local_hash"] == digest(algo, rewrites[0][1])
    assert data["primary"]["remote_hash"] == digest(algo, BASE_FILES["records.parquet"])
    assert data["primary"]["local_size"] == data["primary"]["remote_size"]
    assert data["_auxiliary"]["differing"] == ["notes/readme.txt"]
    assert data["_auxiliary"]["changed"] is True
    for section in ("meta", ".events.log", "_snapshots", "_derived"):
        assert data[section]["changed"] is False, section


EVENTS_BASE = b'{"n":1}\n{"n":2}\n'


@pytest.mark.parametrize(
    ("local", "remote", "expected"),
    [
        (EVENTS_BASE, EVENTS_BASE + b'{"n":3}\n',
         {"relation": "remote_ahead", "local": 2, "remote": 3, "common": 2, "local_past_common": 0,
          "remote_past_common": 1}),
        (EVENTS_BASE + b'{"n":3}\n{"n":4}\n', EVENTS_BASE,
         {"relation": "local_ahead", "local": 4, "remote": 2, "common": 2, "local_past_common": 2,
          "remote_past_common": 0}),
        (EVENTS_BASE + b'{"local":3}\n{"local":4}\n', EVENTS_BASE + b'{"remote":3}\n',
         {"relation": "diverged", "local": 4, "remote": 3, "common": 2, "local_past_common": 2,
          "remote_past_common": 1}),
        # A torn (partial) last line is past the common prefix, but not a counted line.
        (EVENTS_BASE + b'{"n":3', EVENTS_BASE,
         {"relation": "local_ahead", "local": 2, "remote": 2, "common": 2, "local_past_common": 1,
          "remote_past_common": 0}),
    ],
    ids=["remote-ahead", "local-ahead", "diverged", "local-partial-line"],
)
def test_events_log_prefix_relation(sides: Sides, tmp_path: Path, local: bytes, remote: bytes,
                                    expected: dict[str, Any]) -> None:
    files = {k: v for k, v in BASE_FILES.items() if k != ".events.log"}
    seed(sides, {**files, ".events.log": local}, {**files, ".events.log": remote})
    proc, data = diff(sides, tmp_path / "audit.json", "--exit-code")
    assert proc.returncode == 1
    assert data[".events.log"] == {"changed": True, **expected, "skipped": False}
    assert [s for s in ("primary", "meta", "_snapshots", "_derived", "_auxiliary") if data[s]["changed"]] == []
