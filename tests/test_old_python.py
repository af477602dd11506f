"""The agent under the oldest Python 3 on this machine (login nodes run 3.6): a real diff, pull
and push through a `type = "local"` remote whose profile names that interpreter, and the engine's
manifest under it checked against hashlib. No sshd: the local transport runs the agent as
`<python> remote_agent/usrsync_agent.py serve NONCE`.

The runs use LC_ALL=C, the locale of a non-interactive SSH command on many clusters, under which
Python 3.6 decodes file names as ASCII; a UTF-8 file name must still be an ordinary file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import tomli_w
import xxhash
from helpers import BASE_FILES, DATASET, load_audit, run_usr, set_mtimes, tree_state, write_tree
from rig import oldest_python3

from remote_agent import usrsync_agent as engine

C_LOCALE = {"LC_ALL": "C", "LANG": "C"}
UTF8_NAME = "_derived/ns/Zürich-µM.parquet"
FILES = {**BASE_FILES, UTF8_NAME: b"PAR1 non-ascii name"}


def _interpreter() -> tuple[str, str, bool]:
    """(path, version, has xxhash) of the oldest Python 3 here; skip unless it is older than 3.10."""
    python = oldest_python3()
    if python is None:
        pytest.skip("no Python 3 interpreter found besides the one running the tests")
    probe = subprocess.run(
        [python, "-c", "import platform, importlib.util as u; "
                       "print(platform.python_version(), u.find_spec('xxhash') is not None)"],
        capture_output=True, text=True, timeout=60, check=True)
    version, has_xxhash = probe.stdout.split()
    if tuple(int(p) for p in version.split(".")[:2]) >= (3, 10):
        pytest.skip(f"the oldest Python 3 here is {version}; no interpreter older than 3.10 to test the agent under")
    return python, version, has_xxhash == "True"


@pytest.fixture(scope="module")
def old_python() -> tuple[str, str, bool]:
    return _interpreter()


def test_engine_manifest_under_the_old_interpreter(old_python: tuple[str, str, bool], tmp_path: Path) -> None:
    python, version, _ = old_python
    root = tmp_path / "ds"
    write_tree(root, {**FILES, ".usr.lock": b"", ".usrsync-partial/x": b"partial"})
    os.symlink("records.parquet", root / "link")
    set_mtimes(root, 1_700_000_000)
    script = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('usrsync_agent', sys.argv[1])\n"
        "engine = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(engine)\n"
        "first = engine.build_manifest(sys.argv[2], 'sha256', jobs=2, cache_dir=sys.argv[3])\n"
        "cached = engine.build_manifest(sys.argv[2], 'sha256', jobs=2, cache_dir=sys.argv[3])\n"
        "import platform\n"
        "print(json.dumps({'python': platform.python_version(), 'fs': sys.getfilesystemencoding(),\n"
        "                  'first': first, 'cached': cached}))\n"
    )
    proc = subprocess.run([python, "-c", script, engine.__file__, str(root), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **C_LOCALE}, cwd="/")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["python"] == version
    assert out["first"] == out["cached"]  # the second scan comes from its hash cache, identically
    digests = {e[0]: e[5] for e in out["first"] if e[4] == "file"}
    assert digests == {rel: hashlib.sha256(data).hexdigest() for rel, data in FILES.items()}
    assert [e[0] for e in out["first"] if e[4] != "file"] == ["link"]
    # Both ends scan, classify and hash identically: the orchestrator's own engine agrees.
    assert out["first"] == engine.build_manifest(str(root), "sha256", use_cache=False)


class LocalRemote:
    """A local datasets root and a `type = "local"` remote whose agent runs under `python`."""

    def __init__(self, tmp_path: Path, python: str):
        self.root = tmp_path / "local"
        self.base = tmp_path / "remote"
        self.root.mkdir()
        self.base.mkdir()
        self.cfg = tmp_path / "remotes.toml"
        self.cfg.write_text(tomli_w.dumps({
            "root": str(self.root),
            "remotes": {"old": {"type": "local", "base_dir": str(self.base), "python": python}},
        }))
        self.audits = tmp_path / "audits"

    def run(self, action: str, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
        audit = self.audits / f"{action}.json"
        confirm = ["-y"] if action in ("pull", "push") else []
        proc = run_usr(self.cfg, action, DATASET, "old", *confirm, "--audit-json-out", str(audit), *args,
                       env=C_LOCALE)
        return proc, load_audit(audit)


def test_diff_pull_push_with_the_agent_under_the_old_interpreter(old_python: tuple[str, str, bool],
                                                                  tmp_path: Path) -> None:
    python, version, has_xxhash = old_python
    sides = LocalRemote(tmp_path, python)
    local, remote = sides.root / DATASET, sides.base / DATASET
    write_tree(remote, FILES)
    set_mtimes(remote, 1_700_000_000)
    algo = "xxh3_128" if has_xxhash else "sha256"

    proc, diff = sides.run("diff")
    assert proc.returncode == 0, proc.stderr
    assert (diff["action"], diff["transfer_state"]) == ("diff", "DIFF-ONLY")
    assert diff["agent"]["python"] == version
    assert diff["agent"]["hash_algo"] == diff["verify"]["hash_algo"] == algo
    assert diff["remote"]["type"] == "local"
    primary = FILES["records.parquet"]
    assert diff["primary"]["remote_hash"] == (hashlib.sha256(primary).hexdigest() if algo == "sha256"
                                              else xxhash.xxh3_128(primary).hexdigest())
    assert diff["_derived"]["remote_only"] == ["ns/Zürich-µM.parquet", "ns/part-0001.parquet"]
    assert diff["special_files"] == []

    proc, pull = sides.run("pull")
    assert proc.returncode == 0, proc.stderr
    assert pull["transfer_state"] == "TRANSFERRED"
    assert (pull["agent"]["python"], pull["agent"]["hash_algo"]) == (version, algo)
    assert pull["post"]["in_sync"] is True and pull["post"]["verified"] is True
    assert pull["transfer"]["files"] == len(FILES)
    assert tree_state(local) == tree_state(remote)

    # Local edits, pushed: the old agent stages, verifies and promotes on its side.
    write_tree(local, {"_derived/ns/part-0002.parquet": b"PAR1derived-2", "records.parquet": b"PAR1-v2"})
    (local / "notes/readme.txt").unlink()
    proc, push = sides.run("push")
    assert proc.returncode == 0, proc.stderr
    assert push["transfer_state"] == "TRANSFERRED"
    assert push["agent"]["python"] == version
    assert push["primary"]["changed"] is True
    assert push["_derived"]["local_only"] == ["ns/part-0002.parquet"]
    assert push["_auxiliary"]["remote_only"] == ["notes/readme.txt"]
    assert (push["transfer"]["files"], push["transfer"]["deleted"]) == (2, 1)
    assert push["post"]["in_sync"] is True
    assert tree_state(local) == tree_state(remote)
    assert list((sides.base / ".usrsync" / "staging").iterdir()) == []  # promoted, nothing left behind

    proc, again = sides.run("diff", "--exit-code")
    assert proc.returncode == 0, proc.stderr
    assert again["post"]["in_sync"] is True
    assert [again[s]["changed"] for s in ("primary", "meta", ".events.log", "_snapshots", "_derived",
                                          "_auxiliary")] == [False] * 6
