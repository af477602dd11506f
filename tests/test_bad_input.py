"""Bad input of every kind ends in one `error:` line, one `hint:` line and the DESIGN §2 exit code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import rig as rigmod
import tomli_w
from helpers import DATASET, REMOTE, agent_double, load_audit, local_sides, run_usr
from rig import SshRig

FAKE_AGENT = Path(__file__).with_name("fake_agent.py")


def assert_error(proc: subprocess.CompletedProcess[str], exit_code: int, *fragments: str) -> str:
    """Exactly one error line and one hint line on stderr, and the documented exit code."""
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    hints = [line for line in lines if line.startswith("hint: ")]
    assert len(errors) == 1 and len(hints) == 1 and len(lines) == 2, proc.stderr
    assert lines.index(hints[0]) == lines.index(errors[0]) + 1, proc.stderr
    assert proc.returncode == exit_code, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    return errors[0]


def write_config(path: Path, doc: dict) -> Path:
    path.write_text(tomli_w.dumps(doc))
    return path


@pytest.fixture
def unreachable_config(tmp_path: Path) -> Path:
    """A remote on a free loopback port with nothing listening: any connection attempt exits 3."""
    (tmp_path / "local").mkdir()
    profile = {"host": "127.0.0.1", "port": rigmod.free_port(), "user": "nobody", "base_dir": "/srv/datasets",
               "known_hosts": str(tmp_path / "known_hosts")}
    (tmp_path / "known_hosts").write_text("")
    return write_config(tmp_path / "remotes.toml", {"root": str(tmp_path / "local"), "remotes": {"far": profile}})


# --- configuration --------------------------------------------------------------------------


def test_malformed_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "remotes.toml"
    cfg.write_text('[remotes.rig\nhost = "x"\n')
    line = assert_error(run_usr(cfg, "diff", DATASET, "rig"), 2, f"remotes config {cfg}: not valid TOML")
    assert "line 1" in line


def test_unknown_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "remotes.toml",
                       {"remotes": {"rig": {"host": "127.0.0.1", "base_dir": "/srv", "hots": "typo"}}})
    proc = run_usr(cfg, "diff", DATASET, "rig")
    assert_error(proc, 2, f'remotes config {cfg}: remote "rig": unknown key "hots"')
    assert "hint: valid keys: type, host, user, port, base_dir" in proc.stderr


def test_unknown_remote(unreachable_config: Path) -> None:
    proc = run_usr(unreachable_config, "diff", DATASET, "nope")
    assert_error(proc, 2, 'no remote named "nope" (known: far)')
    assert "hint: usr remotes add nope --host HOST --base-dir DIR" in proc.stderr


# --- dataset arguments (rejected before connecting: the remote is unreachable) --------------


@pytest.mark.parametrize("dataset", ["densegen/../my_dataset", "../my_dataset"])
def test_dataset_id_with_dotdot(unreachable_config: Path, dataset: str) -> None:
    proc = run_usr(unreachable_config, "diff", dataset, "far")
    assert_error(proc, 2, f"unsafe dataset id {dataset!r}: '.', '..' or empty component")


def test_absolute_dataset_dir_outside_the_root(unreachable_config: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "my_dataset"
    elsewhere.mkdir(parents=True)
    proc = run_usr(unreachable_config, "diff", str(elsewhere), "far")
    assert_error(proc, 2, f"dataset directory {elsewhere} is not under the datasets root {tmp_path / 'local'}")


def test_absolute_path_that_does_not_exist(unreachable_config: Path) -> None:
    proc = run_usr(unreachable_config, "diff", "/nonexistent/my_dataset", "far")
    assert_error(proc, 2, "unsafe dataset id '/nonexistent/my_dataset': absolute path")


@pytest.mark.parametrize("action", ["pull", "push"])
def test_transfer_without_yes_on_a_non_tty_refuses_before_connecting(unreachable_config: Path, tmp_path: Path,
                                                                      action: str) -> None:
    audit = tmp_path / "audit.json"
    proc = run_usr(unreachable_config, action, DATASET, "far", "--audit-json-out", str(audit))
    assert_error(proc, 2, f"{action} changes files and needs confirmation, but there is no terminal to ask")
    assert "hint: add -y to confirm non-interactively" in proc.stderr
    assert not audit.exists()  # refused before a run started


# --- reaching the remote ----------------------------------------------------------------------


def test_unreachable_host(unreachable_config: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.json"
    proc = run_usr(unreachable_config, "diff", DATASET, "far", "--audit-json-out", str(audit))
    assert_error(proc, 3, "cannot reach nobody@127.0.0.1:")
    assert "hint: check host and port in the profile" in proc.stderr
    assert proc.stdout == ""  # nothing was compared, so no section table
    data = load_audit(audit)  # written on failure too
    assert data["transfer_state"] == "FAILED"
    assert data["error"]["exit_code"] == 3 and data["error"]["kind"] == "remote"


def rig_config(tmp_path: Path, sshd_rig: SshRig, base: Path, **overrides: object) -> Path:
    (tmp_path / "local").mkdir(exist_ok=True)
    path = tmp_path / "remotes.toml"
    path.write_text(tomli_w.dumps({"root": str(tmp_path / "local")}) + "\n"
                    + sshd_rig.remotes_toml(base_dir=base, **overrides))
    return path


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30,
                   capture_output=True)
    return path


def test_wrong_key(tmp_path: Path, sshd_rig: SshRig, fresh_remote_base: Path) -> None:
    cfg = rig_config(tmp_path, sshd_rig, fresh_remote_base, identity_file=keygen(tmp_path / "stranger"))
    proc = run_usr(cfg, "diff", DATASET, "rig")
    assert_error(proc, 3, f"authentication to {sshd_rig.user}@127.0.0.1:{sshd_rig.port} failed")


@pytest.mark.parametrize("known", ["empty", "other-key"])
def test_unknown_host_key(tmp_path: Path, sshd_rig: SshRig, fresh_remote_base: Path, known: str) -> None:
    known_hosts = tmp_path / "known_hosts"
    if known == "empty":
        known_hosts.write_text("")
    else:  # the same host and port, another key: what a man in the middle looks like
        other = keygen(tmp_path / "other_host_key").with_suffix(".pub").read_text().split()
        known_hosts.write_text(f"[127.0.0.1]:{sshd_rig.port} {other[0]} {other[1]}\n")
    cfg = rig_config(tmp_path, sshd_rig, fresh_remote_base, known_hosts=known_hosts)
    proc = run_usr(cfg, "diff", DATASET, "rig")
    assert_error(proc, 3, f"the host key of {sshd_rig.user}@127.0.0.1:{sshd_rig.port} is not trusted by {known_hosts}")
    assert f"ssh-keyscan -p {sshd_rig.port} 127.0.0.1 >> {known_hosts}" in proc.stderr


def test_remote_base_dir_missing(tmp_path: Path, sshd_rig: SshRig, fresh_remote_base: Path) -> None:
    missing = fresh_remote_base / "not-there"
    cfg = rig_config(tmp_path, sshd_rig, missing)
    proc = run_usr(cfg, "diff", DATASET, "rig")
    assert_error(proc, 2, f"remote 'rig': base_dir {missing} does not exist on {sshd_rig.user}@127.0.0.1")
    assert f"hint: create it there (mkdir -p {missing})" in proc.stderr


# --- a hostile or broken agent ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("evil-path", "the remote agent sent an unsafe path '../evil' ('.', '..' or empty component)"),
        ("garbage", "the remote agent sent a malformed frame"),
        ("bad-zlib", "the remote agent sent a corrupt compressed frame"),
        ("oversized", "the remote agent announced a 4294967295-byte frame, over the limit"),
    ],
)
def test_hostile_manifest_frame(tmp_path: Path, variant: str, message: str) -> None:
    sides = local_sides(tmp_path / "w", python=str(agent_double(tmp_path, FAKE_AGENT, variant)))
    audit = tmp_path / "audit.json"
    proc = run_usr(sides.cfg, "diff", DATASET, REMOTE, "--audit-json-out", str(audit), timeout=60)
    assert_error(proc, 3, message)
    data = load_audit(audit)
    assert data["transfer_state"] == "FAILED"
    assert data["error"]["kind"] == "protocol" and data["error"]["exit_code"] == 3
    assert not (tmp_path / "w" / "evil").exists() and not (sides.root / "evil").exists()


def test_diff_of_a_dataset_that_exists_nowhere(remotes_config: Path) -> None:
    # A typo in the dataset id must not pass a `diff --exit-code` gate as "up to date".
    proc = run_usr(remotes_config, "diff", "densegen/my_datset", "rig", "--exit-code")
    assert_error(proc, 2, "dataset 'densegen/my_datset' exists neither here nor on remote 'rig'")
