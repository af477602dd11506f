"""The test rig itself: a real sshd, real ssh/asyncssh/rsync clients, a real /bin/sh user."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import rig as rigmod
from rig import SshRig

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _ssh(r: SshRig, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(r.ssh_argv(*command), capture_output=True, text=True, timeout=30)


def test_ssh_with_strict_host_key_checking(sshd_rig: SshRig) -> None:
    r = _ssh(sshd_rig, "echo", "ok")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"


def test_unknown_host_key_is_refused(sshd_rig: SshRig, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    argv = [a.replace(str(sshd_rig.known_hosts), str(empty)) for a in sshd_rig.ssh_argv("true")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr


async def test_asyncssh_connects_with_known_hosts(sshd_rig: SshRig) -> None:
    async with asyncssh.connect(
        sshd_rig.host,
        port=sshd_rig.port,
        username=sshd_rig.user,
        client_keys=[str(sshd_rig.key)],
        known_hosts=str(sshd_rig.known_hosts),
        config=[],  # ignore any ~/.ssh/config on this machine
    ) as conn:
        result = await conn.run("id -un", check=True)
    assert result.stdout == f"{sshd_rig.user}\n"


def test_rsync_over_ssh(sshd_rig: SshRig, fresh_remote_base: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    files = {"one.txt": b"one\n", "a/blob.bin": bytes(range(256)) * 400, "a/b/two.txt": b"two\n"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    dest = fresh_remote_base / "ds"
    r = subprocess.run(
        ["rsync", "-a", "--checksum", "-e", sshd_rig.rsh(), f"{src}/", f"{sshd_rig.user}@{sshd_rig.host}:{dest}/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    uid = pwd.getpwnam(sshd_rig.user).pw_uid
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data
        assert (dest / rel).stat().st_uid == uid


def test_user_login_shell_is_sh(sshd_rig: SshRig) -> None:
    assert pwd.getpwnam(sshd_rig.user).pw_shell == "/bin/sh"
    assert sshd_rig.user != "root"
    r = sshd_rig.run_as_user(["id", "-un"])
    assert r.stdout == f"{sshd_rig.user}\n"


def test_auth_count_is_one_per_connection(sshd_rig: SshRig) -> None:
    before = sshd_rig.auth_count()
    for i in range(1, 3):
        assert _ssh(sshd_rig, "true").returncode == 0
        assert sshd_rig.wait_auth_count(before + i) == before + i


def test_base_dirs_are_owned_by_the_user(sshd_rig: SshRig, fresh_remote_base: Path) -> None:
    uid = pwd.getpwnam(sshd_rig.user).pw_uid
    assert sshd_rig.base_dir.stat().st_uid == uid
    assert fresh_remote_base.stat().st_uid == uid
    assert list(fresh_remote_base.iterdir()) == []
    r = sshd_rig.run_as_user(["touch", str(fresh_remote_base / "x")])
    assert r.returncode == 0, r.stderr


def test_remotes_config(remotes_config: Path, sshd_rig: SshRig, fresh_remote_base: Path) -> None:
    doc = tomllib.loads(remotes_config.read_text())
    assert Path(doc["root"]).is_dir()
    assert doc["remotes"]["rig"] == {
        "host": "127.0.0.1",
        "port": sshd_rig.port,
        "user": sshd_rig.user,
        "base_dir": str(fresh_remote_base),
        "identity_file": str(sshd_rig.key),
        "known_hosts": str(sshd_rig.known_hosts),
    }
    other = tomllib.loads(sshd_rig.remotes_toml("x", user=None, python="/usr/bin/python3"))["remotes"]["x"]
    assert "user" not in other and other["python"] == "/usr/bin/python3"


def test_xdg_dirs_are_isolated(isolated_xdg_dirs: dict[str, Path]) -> None:
    for var, path in isolated_xdg_dirs.items():
        assert os.environ[var] == str(path)
    assert isolated_xdg_dirs["XDG_RUNTIME_DIR"].stat().st_mode & 0o777 == 0o700


def test_user_processes_sees_a_remote_command(sshd_rig: SshRig) -> None:
    proc = subprocess.Popen(sshd_rig.ssh_argv("sleep", "30"), stdin=subprocess.DEVNULL)
    seen: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            seen = [p for p in sshd_rig.user_processes() if p[1] == "sleep 30"]
            time.sleep(0.02)
        assert seen, sshd_rig.user_processes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for pid, _ in seen:  # a non-pty remote command outlives its dropped connection
            os.kill(pid, signal.SIGTERM)


def test_merge_config_overrides_defaults() -> None:
    merged = rigmod._merge_config(
        "Port 1\nSubsystem sftp internal-sftp\nLogLevel INFO\n", "LogLevel VERBOSE\nMatch User x\n  Port 2\n"
    )
    assert merged.splitlines() == [
        "Port 1",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        "Match User x",
        "  Port 2",
    ]


def test_noisy_user_and_netns_variant(rig_machine: None) -> None:
    """A bash user with a banner, sshd inside a private network namespace."""
    with rigmod.network_namespace() as ns, rigmod.temporary_rig(shell="/bin/bash", noisy=True, netns=ns) as r:
        outside = subprocess.run(r.ssh_argv("true"), capture_output=True, text=True, timeout=30)
        assert outside.returncode == 255  # nothing listens on the root namespace's loopback
        inside = subprocess.run(
            ["ip", "netns", "exec", ns, *r.ssh_argv("echo", "ok")], capture_output=True, text=True, timeout=30
        )
        assert inside.returncode == 0, inside.stderr
        assert inside.stdout == f"{rigmod.DEFAULT_BANNER}\nok\n"
        user = r.user
    assert subprocess.run(["getent", "passwd", user], capture_output=True).returncode == 2


async def test_second_sshd_with_external_sftp(sshd_rig: SshRig) -> None:
    with rigmod.start_sshd(user=sshd_rig.user, sftp=rigmod.EXTERNAL_SFTP, extra_config="LogLevel VERBOSE") as r:
        assert r.port != sshd_rig.port
        config = (r.workdir / "sshd_config").read_text()
        assert "LogLevel VERBOSE" in config and "LogLevel INFO" not in config
        async with (
            asyncssh.connect(r.host, **r.asyncssh_kwargs()) as conn,
            conn.start_sftp_client() as sftp,
        ):
            assert await sftp.isdir(str(r.base_dir))
        assert r.wait_auth_count(1) == 1
        workdir, pid = r.workdir, r.pid
    assert not workdir.exists()
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped


def test_oldest_python3_runs() -> None:
    exe = rigmod.oldest_python3()
    if exe is None:
        return
    out = subprocess.run(
        [exe, "-c", "import sys; print(sys.version_info[0])"], capture_output=True, text=True, timeout=30
    )
    assert out.stdout == "3\n"
