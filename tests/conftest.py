"""Shared fixtures: isolated XDG dirs for every test, and the real loopback sshd rig."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import rig as rigmod
import tomli_w
from helpers import Sides
from rig import SshRig

_XDG_VARS = ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything using the rig is an sshd test, so `-m "not sshd"` runs the fast unit tests only.
    for item in items:
        if {"sshd_rig", "rig_machine"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.sshd)


@pytest.fixture(scope="session", autouse=True)
def isolated_xdg_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Point the XDG dirs at temp dirs so no test touches the real user's config/cache/state."""
    base = tmp_path_factory.mktemp("xdg")
    dirs = {var: base / var.removeprefix("XDG_").lower() for var in _XDG_VARS}
    with pytest.MonkeyPatch.context() as mp:
        for var, path in dirs.items():
            path.mkdir(mode=0o700)
            path.chmod(0o700)  # XDG_RUNTIME_DIR must be 0700; the others may as well be
            mp.setenv(var, str(path))
        yield dirs


@pytest.fixture(scope="session")
def rig_machine() -> None:
    """Skip unless this machine can run the sshd rig; under CI, FAIL instead of skipping,
    so CI can never pass without the integration tests. For tests building their own rig."""
    ok, reason = rigmod.rig_available()
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the sshd test rig is unavailable: {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def sshd_rig(rig_machine: None) -> Iterator[SshRig]:
    """A real sshd on 127.0.0.1 and a /bin/sh test user with `<home>/datasets` as base_dir."""
    with rigmod.test_user() as (user, home), rigmod.start_sshd(user=user, base_dir=home / "datasets") as r:
        yield r


@pytest.fixture
def fresh_remote_base(sshd_rig: SshRig, request: pytest.FixtureRequest) -> Iterator[Path]:
    """An empty remote base dir for this test only, owned by the test user; removed afterwards."""
    parent = sshd_rig.home / "bases"
    parent.mkdir(exist_ok=True)
    sshd_rig.chown_tree(parent)
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    base = parent / f"{label}-{secrets.token_hex(3)}"
    base.mkdir()
    sshd_rig.chown_tree(base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def remotes_config(tmp_path: Path, sshd_rig: SshRig, fresh_remote_base: Path) -> Path:
    """A remotes.toml with `root = <tmp_path>/local` and remote `rig` using this test's base dir."""
    local = tmp_path / "local"
    local.mkdir()
    path = tmp_path / "remotes.toml"
    path.write_text(tomli_w.dumps({"root": str(local)}) + "\n" + sshd_rig.remotes_toml(base_dir=fresh_remote_base))
    return path


@pytest.fixture
def sides(remotes_config: Path, fresh_remote_base: Path, sshd_rig: SshRig, tmp_path: Path) -> Sides:
    """densegen/my_dataset under this test's local root and remote base dir (both empty)."""
    return Sides(remotes_config, tmp_path / "local", fresh_remote_base, sshd_rig)
