"""MFA (publickey + keyboard-interactive through PAM) and the warm-auth broker, over a real sshd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pexpect
import pytest
import rig

MFA_CONFIG = (
    "UsePAM yes\nKbdInteractiveAuthentication yes\n"
    "AuthenticationMethods publickey,keyboard-interactive\n"
)
ANSWER = "s3cret-otp"


@pytest.fixture(scope="module")
def mfa_rig(rig_machine):
    with rig.temporary_rig(extra_config=MFA_CONFIG) as r:
        subprocess.run(["chpasswd"], input=f"{r.user}:{ANSWER}\n", text=True, check=True)
        yield r


@pytest.fixture
def mfa_env(mfa_rig, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    cfg = tmp_path / "remotes.toml"
    cfg.write_text(f'root = "{local}"\n' + mfa_rig.remotes_toml("mfa"))
    dataset = mfa_rig.base_dir / "mfa_ds"
    dataset.mkdir(parents=True, exist_ok=True)
    (dataset / "records.parquet").write_bytes(os.urandom(4096))
    (dataset / ".events.log").write_text('{"e": 1}\n')
    mfa_rig.chown_tree(mfa_rig.base_dir)
    usr = [sys.executable, "-m", "usrsync", "--remotes-config", str(cfg)]
    yield usr, local, dataset
    stop = subprocess.run(usr + ["remotes", "status", "--json"], capture_output=True, text=True)
    if '"pid"' in stop.stdout:  # never leave a broker behind, whatever the test did
        import json

        pid = json.loads(stop.stdout)["mfa"]["pid"]
        os.kill(pid, signal.SIGTERM)


def accepted(r: rig.SshRig) -> int:
    return r.log_text().count("Accepted keyboard-interactive")


def test_non_tty_fails_fast_with_hint(mfa_env):
    usr, _, _ = mfa_env
    started = time.monotonic()
    proc = subprocess.run(usr + ["diff", "mfa_ds", "mfa"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("error: authentication to ")
    assert "warm-auth" in lines[-1] and lines[-1].startswith("hint: ")
    assert time.monotonic() - started < 30  # it never waits for an answer nobody can give


def test_prompt_answered_on_tty(mfa_env, mfa_rig):
    usr, _, _ = mfa_env
    before = accepted(mfa_rig)
    child = pexpect.spawn(usr[0], usr[1:] + ["diff", "mfa_ds", "mfa"], timeout=60, encoding="utf-8")
    child.expect("Password:")
    child.sendline(ANSWER)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "DIFF-ONLY" in child.before
    assert mfa_rig.wait_auth_count(1) and accepted(mfa_rig) == before + 1


def test_warm_auth_then_cron_runs_without_prompt(mfa_env, mfa_rig):
    usr, local, dataset = mfa_env
    before = accepted(mfa_rig)
    child = pexpect.spawn(usr[0], usr[1:] + ["remotes", "warm-auth", "--remote", "mfa", "--idle-timeout", "120"],
                          timeout=60, encoding="utf-8")
    child.expect("Password:")
    child.sendline(ANSWER)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "connected to" in child.before

    status = subprocess.run(usr + ["remotes", "status"], capture_output=True, text=True, timeout=30)
    assert status.stdout.startswith("mfa\tconnected to ")

    # What cron does: no TTY, no prompt, two runs, the connection reused.
    for _ in range(2):
        proc = subprocess.run(usr + ["pull", "mfa_ds", "mfa", "-y"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert (local / "mfa_ds" / "records.parquet").read_bytes() == (dataset / "records.parquet").read_bytes()
    assert accepted(mfa_rig) == before + 1  # one MFA for the broker, none for the runs

    stop = subprocess.run(usr + ["remotes", "warm-auth", "--remote", "mfa", "--stop"], capture_output=True,
                          text=True, timeout=30)
    assert "closed the kept connection" in stop.stdout
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = subprocess.run(usr + ["remotes", "status"], capture_output=True, text=True, timeout=30)
        if "not connected" in status.stdout:
            break
        time.sleep(0.2)
    assert status.stdout.startswith("mfa\tnot connected")
