"""A full disk where staging lives: a clean failure, the live dataset intact, nothing left behind.

The local datasets root (where pull stages, on the same filesystem as the live dataset) is a
2 MiB tmpfs mounted by the test; it needs root, and the test skips with the reason otherwise.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BASE_FILES, Sides, leftovers, load_audit, tree_state, wait_for

SIZE = 2 << 20


@pytest.fixture
def small_root(sides: Sides) -> Iterator[Path]:
    """sides.root on a fresh 2 MiB tmpfs; unmounted afterwards."""
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "usrsync-diskfull", str(sides.root)],
                       capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root and mount rights): {r.stderr.strip()}")
    try:
        yield sides.root
    finally:
        def unmounted() -> bool:
            return subprocess.run(["umount", str(sides.root)], capture_output=True, timeout=30, check=False).returncode == 0
        wait_for(unmounted, f"umount {sides.root}", timeout=20, step=0.2)


def fill(root: Path) -> Path:
    """Write zeros until the filesystem is full; the filler file, to delete later."""
    filler = root / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def test_pull_larger_than_the_free_space(sides: Sides, small_root: Path, tmp_path: Path) -> None:
    sides.seed_both()
    big = os.urandom(3 << 20)  # incompressible, and more than the whole filesystem
    (sides.remote / "_derived" / "ns" / "part-big.parquet").write_bytes(big)
    sides.chown_remote()
    before = tree_state(sides.local)

    out = tmp_path / "pull.json"
    r = sides.run("pull", "--audit-json-out", str(out))

    assert r.returncode == 5, r.stderr
    audit = load_audit(out)
    assert audit["error"]["kind"] == "transfer"
    assert audit["error"]["message"].startswith("rsync failed with exit ")
    assert "No space left on device" in r.stderr or audit["transfer"]["rsync_exit"] in (11, 23)
    assert r.stderr.strip().splitlines()[-2] == "error: " + audit["error"]["message"]
    assert tree_state(sides.local) == before
    assert leftovers(small_root) == []

    # Once there is room (the big part is gone again), the same command just works.
    (sides.remote / "_derived" / "ns" / "part-big.parquet").unlink()
    (sides.remote / "meta.md").write_bytes(b"# my_dataset v2\n")
    r = sides.run("pull", "--audit-json-out", str(out))
    assert r.returncode == 0, r.stderr
    assert load_audit(out)["transfer_state"] == "TRANSFERRED"
    sides.assert_in_sync()


def test_pull_onto_a_completely_full_filesystem(sides: Sides, small_root: Path, tmp_path: Path) -> None:
    sides.seed_both()
    (sides.remote / "meta.md").write_bytes(b"# my_dataset v2 " + b"x" * 8192 + b"\n")
    sides.chown_remote()
    before = tree_state(sides.local)
    filler = fill(small_root)

    out = tmp_path / "pull.json"
    r = sides.run("pull", "--audit-json-out", str(out))

    assert r.returncode in (3, 5), r.stderr
    audit = load_audit(out)
    assert audit["transfer_state"] == "FAILED"
    assert "No space left on device" in audit["error"]["message"] + r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert r.stderr.strip().splitlines()[-2] == "error: " + audit["error"]["message"]
    assert tree_state(sides.local) == before
    assert leftovers(small_root) == []

    filler.unlink()
    r = sides.run("pull", "--audit-json-out", str(out))
    assert r.returncode == 0, r.stderr
    assert load_audit(out)["transfer_state"] == "TRANSFERRED"
    assert {p: b for p, (b, _) in tree_state(sides.local).items()} == {
        **BASE_FILES, "meta.md": b"# my_dataset v2 " + b"x" * 8192 + b"\n"}
