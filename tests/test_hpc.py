"""HPC realities (DESIGN §6.4, §7), each against a real sshd: one authentication per run,
noisy login shells, an external sftp-server, an old remote Python, an old remote rsync,
login-node etiquette, filesystems without flock, and ~/.ssh/config aliases with ProxyJump."""

from __future__ import annotations

import asyncio
import hashlib
import marshal
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import rig as rigmod
import tomli_w
from helpers import BASE_FILES, DATASET, Sides, load_audit, wait_for, write_tree
from rig import SshRig

from remote_agent import usrsync_agent as engine
from usrsync.transport.ssh import LOADER, agent_source


def configure(sides: Sides, **profile: Any) -> None:
    """Rewrite the test's remotes.toml: same local root and base dir, these profile overrides."""
    doc = {"root": str(sides.root), "remotes": {"rig": sides.rig.remote_profile(base_dir=sides.base, **profile)}}
    sides.cfg.write_text(tomli_w.dumps(doc))


def sides_on(rig: SshRig, workdir: Path, **profile: Any) -> Sides:
    """A fresh local root under `workdir` and a fresh remote base dir on `rig` (any rig)."""
    base = rig.home / "bases" / secrets.token_hex(4)
    base.mkdir(parents=True)
    rig.chown_tree(base.parent)
    root = workdir / "local"
    root.mkdir(parents=True)
    sides = Sides(workdir / "remotes.toml", root, base, rig)
    configure(sides, **profile)
    return sides


def audited(sides: Sides, action: str, out: Path, *args: str,
            env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ACTION with --audit-json-out and return the process and the audit's data."""
    r = sides.run(action, "--no-progress", "--audit-json-out", str(out), *args, env=env)
    return r, load_audit(out)


def error_lines(stderr: str) -> tuple[str, str]:
    """The CLI's final `error:` and `hint:` lines."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    hints = [line for line in stderr.splitlines() if line.startswith("hint: ")]
    assert errors and hints, stderr
    return errors[-1], hints[-1]


def change_locally(sides: Sides) -> None:
    write_tree(sides.local, {"_derived/ns/part-0002.parquet": b"PAR1derived-2", "meta.md": b"# edited\n"})


# --------------------------------------------------------------------------- one authentication


def test_pull_and_push_authenticate_once(sides: Sides, tmp_path: Path) -> None:
    rig = sides.rig
    sides.seed_remote()
    before = rig.auth_count()
    r, data = audited(sides, "pull", tmp_path / "pull.json")
    assert r.returncode == 0, r.stderr
    assert (data["transfer_state"], data["transfer"]["files"]) == ("TRANSFERRED", len(BASE_FILES))
    # Agent channel plus rsync's channel ride one connection: exactly one `Accepted publickey`.
    assert rig.wait_auth_count(before + 1) == before + 1
    sides.assert_in_sync()

    change_locally(sides)
    before = rig.auth_count()
    r, data = audited(sides, "push", tmp_path / "push.json")
    assert r.returncode == 0, r.stderr
    assert (data["transfer_state"], data["transfer"]["files"]) == ("TRANSFERRED", 2)
    assert rig.wait_auth_count(before + 1) == before + 1
    sides.assert_in_sync()


def test_openssh_transport_pulls_with_a_second_authentication(sides: Sides, tmp_path: Path) -> None:
    rig = sides.rig
    configure(sides, transport="openssh")
    sides.seed_remote()
    before = rig.auth_count()
    r, data = audited(sides, "pull", tmp_path / "pull.json")
    assert r.returncode == 0, r.stderr
    assert (data["remote"]["transport"], data["transfer_state"]) == ("openssh", "TRANSFERRED")
    sides.assert_in_sync()
    # The agent's asyncssh connection, then one ControlMaster connection for every rsync.
    assert rig.wait_auth_count(before + 2) == before + 2


# --------------------------------------------------------------------------- noisy login shells


@pytest.fixture(scope="module")
def noisy_rig(rig_machine: None) -> Iterator[SshRig]:
    """A bash user whose startup files print a banner on every command, behind an sshd with the
    external sftp-server (which runs through that shell, so SFTP is broken too)."""
    with rigmod.temporary_rig(shell="/bin/bash", noisy=True, sftp=rigmod.EXTERNAL_SFTP) as r:
        probe = subprocess.run(r.ssh_argv("true"), capture_output=True, text=True, timeout=30)
        assert probe.stdout.startswith(rigmod.DEFAULT_BANNER), probe  # the shell really is noisy
        yield r


def test_noisy_shell_diff_pull_push(noisy_rig: SshRig, tmp_path: Path) -> None:
    sides = sides_on(noisy_rig, tmp_path)
    sides.seed_remote()
    r, data = audited(sides, "diff", tmp_path / "diff.json")
    assert r.returncode == 0, r.stderr
    assert (data["transfer_state"], data["post"]["in_sync"]) == ("DIFF-ONLY", False)
    assert data["primary"]["changed"] is True

    r, data = audited(sides, "pull", tmp_path / "pull.json")
    assert r.returncode == 0, r.stderr
    assert (data["transfer_state"], data["transfer"]["rsync_exit"]) == ("TRANSFERRED", 0)
    sides.assert_in_sync()

    change_locally(sides)
    r, data = audited(sides, "push", tmp_path / "push.json")
    assert r.returncode == 0, r.stderr
    assert (data["transfer_state"], data["post"]["in_sync"]) == ("TRANSFERRED", True)
    sides.assert_in_sync()


def test_noisy_shell_breaks_openssh_rsync_with_a_hint(noisy_rig: SshRig, tmp_path: Path) -> None:
    sides = sides_on(noisy_rig, tmp_path, transport="openssh")
    sides.seed_remote()
    r, data = audited(sides, "pull", tmp_path / "pull.json")
    assert r.returncode == 5, r.stderr
    error, hint = error_lines(r.stderr)
    assert error.startswith("error: rsync failed with exit 2 ("), error
    assert 'transport = "asyncssh"' in hint and "startup files" in hint, hint
    assert (data["error"]["kind"], data["transfer"]["rsync_exit"]) == ("transfer", 2)
    assert not sides.local.exists()  # nothing was promoted


# --------------------------------------------------------------------------- external sftp-server


def _sftp_works(r: SshRig) -> bool:
    async def probe() -> bool:
        async with asyncssh.connect(r.host, **r.asyncssh_kwargs()) as conn:
            try:
                async with conn.start_sftp_client() as sftp:
                    await sftp.listdir(".")
            except asyncssh.Error:
                return False
            return True

    return asyncio.run(asyncio.wait_for(probe(), 30))


def test_agent_deploys_over_exec_channel_when_sftp_is_broken(noisy_rig: SshRig, tmp_path: Path) -> None:
    assert not _sftp_works(noisy_rig)  # the banner corrupts the SFTP stream
    source = agent_source()
    digest = hashlib.sha256(source).hexdigest()
    agents = noisy_rig.home / ".cache" / "usrsync" / "agent"
    shutil.rmtree(agents, ignore_errors=True)
    sides = sides_on(noisy_rig, tmp_path)
    sides.seed_remote()

    r, data = audited(sides, "diff", tmp_path / "diff-1.json")
    assert r.returncode == 0, r.stderr
    assert data["transfer_state"] == "DIFF-ONLY"
    deployed = agents / digest[:16] / "usrsync_agent.py"
    files = sorted(p for p in agents.rglob("*") if p.is_file())
    assert files[0] == deployed and len(files) == 2, files  # and the loader's compiled code
    assert files[1].name.startswith("usrsync_agent.py.") and files[1].suffix == ".code"
    assert hashlib.sha256(deployed.read_bytes()).hexdigest() == digest

    # A corrupted copy fails the loader's hash check: it is uploaded again, never run.
    deployed.write_bytes(b"raise SystemExit('corrupted agent ran')\n")
    r, data = audited(sides, "diff", tmp_path / "diff-2.json")
    assert r.returncode == 0, r.stderr
    assert data["transfer_state"] == "DIFF-ONLY"
    assert hashlib.sha256(deployed.read_bytes()).hexdigest() == digest
    assert sorted(p for p in agents.rglob("*") if p.is_file()) == files


def _load(agent: Path, digest: str) -> subprocess.CompletedProcess:
    """The loader as the remote runs it (with no serve arguments the agent prints its usage, exit 2)."""
    return subprocess.run([sys.executable, "-c", LOADER, str(agent), digest], capture_output=True, text=True,
                          timeout=60, check=False)


def test_the_loader_runs_only_the_agent_it_was_told_and_keeps_its_compiled_code(tmp_path: Path) -> None:
    source = agent_source()
    digest = hashlib.sha256(source).hexdigest()
    agent = tmp_path / "usrsync_agent.py"
    assert _load(agent, digest).returncode == engine.EXIT_AGENT_MISSING
    agent.write_bytes(source + b"\n")
    assert _load(agent, digest).returncode == engine.EXIT_AGENT_MISMATCH
    agent.write_bytes(source)

    first = _load(agent, digest)
    assert (first.returncode, first.stderr) == (2, "usage: usrsync_agent.py serve NONCE\n")
    [code] = [p for p in tmp_path.iterdir() if p.suffix == ".code"]  # nothing else: no temporary left

    # Kept code is what runs next time, as long as it is bound to this very source.
    foreign = marshal.dumps(compile("raise SystemExit('kept code ran')", "x", "exec"))
    code.write_bytes(hashlib.sha256(foreign + source).hexdigest().encode() + foreign)
    assert _load(agent, digest).stderr == "kept code ran\n"
    # Code kept for another source, or damaged, is compiled again from the checked source.
    for stale in (hashlib.sha256(foreign + b"another agent").hexdigest().encode() + foreign,
                  code.read_bytes()[:-7], b""):
        code.write_bytes(stale)
        again = _load(agent, digest)
        assert (again.returncode, again.stderr) == (2, "usage: usrsync_agent.py serve NONCE\n")
        kept = code.read_bytes()
        assert kept[:64] == hashlib.sha256(kept[64:] + source).hexdigest().encode() and foreign not in kept


def test_the_loader_runs_when_its_code_cannot_be_kept(tmp_path: Path) -> None:
    source = agent_source()
    agent = tmp_path / "usrsync_agent.py"
    agent.write_bytes(source)
    blocked = tmp_path / f"usrsync_agent.py.{sys.implementation.name}-{sys.hexversion:x}.code"
    blocked.mkdir()  # neither readable as a file nor replaceable: like a full or read-only home
    done = _load(agent, hashlib.sha256(source).hexdigest())
    assert (done.returncode, done.stderr) == (2, "usage: usrsync_agent.py serve NONCE\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [agent.name, blocked.name]  # no temporary left


# --------------------------------------------------------------------------- old remote Python


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="session")
def old_python(sshd_rig: SshRig) -> Iterator[str]:
    """The oldest Python on this machine, copied where the test user can run it.

    pyenv lives under the 0700 /root, and its binaries carry an absolute RUNPATH into it, so the
    copy gets a launcher that points the loader at the copied libpython (like an HPC module's
    wrapper). CPython then finds its stdlib relative to the executable.
    """
    exe = rigmod.oldest_python3()
    if exe is None:
        pytest.skip("no Python 3 interpreter found on this machine")
    real = Path(os.path.realpath(exe))
    probe = subprocess.run([str(real), "-c", "import sys; print(*sys.version_info[:2])"],
                           capture_output=True, text=True, timeout=30, check=True)
    major, minor = map(int, probe.stdout.split())
    if (major, minor) >= (3, 10):
        pytest.skip(f"the oldest Python here is {major}.{minor}; no Python older than 3.10 to test with")
    copy = Path(tempfile.mkdtemp(prefix="usrsync-oldpy-"))
    try:
        copy.chmod(0o755)  # mkdtemp makes it 0700
        prefix = real.parent.parent
        # Hard links where possible (same filesystem): a copy of ~100 MB would dominate the test.
        shutil.copytree(prefix, copy / "py", symlinks=True, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns("test", "site-packages", "ensurepip", "idlelib", "config-*",
                                                      "*.a"))
        launcher = copy / "python3"
        launcher.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH={copy}/py/lib exec {copy}/py/bin/{real.name} "$@"\n')
        launcher.chmod(0o755)
        check = sshd_rig.run_as_user([str(launcher), "-c", "import hashlib, json, sys; print(sys.version)"])
        assert check.returncode == 0 and check.stdout.startswith(f"{major}.{minor}."), check
        yield str(launcher)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_old_remote_python(sides: Sides, old_python: str, tmp_path: Path) -> None:
    version = subprocess.run([old_python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    configure(sides, python=old_python)
    sides.seed_remote()
    r, data = audited(sides, "diff", tmp_path / "diff.json")
    assert r.returncode == 0, r.stderr
    assert data["agent"]["python"] == version
    r, data = audited(sides, "pull", tmp_path / "pull.json")
    assert r.returncode == 0, r.stderr
    assert data["agent"]["python"] == version
    # No xxhash on that interpreter: both ends fall back to sha256.
    assert (data["agent"]["hash_algo"], data["verify"]["hash_algo"]) == ("sha256", "sha256")
    assert data["transfer_state"] == "TRANSFERRED"
    sides.assert_in_sync()


# --------------------------------------------------------------------------- old remote rsync

OLD_RSYNC_VERSION = """\
rsync  version 3.1.3  protocol version 31
Copyright (C) 1996-2018 by Andrew Tridgell, Wayne Davison, and others.
Web site: http://rsync.samba.org/
"""


def test_old_remote_rsync_is_warned_about(sides: Sides, tmp_path: Path) -> None:
    rig = sides.rig
    wrapper = sides.base / "bin" / "rsync-old"  # not a dataset: base_dir/bin is never synced
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then\n  cat <<\'EOF\'\n{OLD_RSYNC_VERSION}EOF\n  exit 0\nfi\n'
        'exec rsync "$@"\n'
    )
    wrapper.chmod(0o755)
    rig.chown_tree(wrapper.parent)
    configure(sides, rsync_path=str(wrapper))
    sides.seed_remote()
    r, data = audited(sides, "pull", tmp_path / "pull.json")
    assert r.returncode == 0, r.stderr
    assert data["agent"]["rsync"] == "rsync  version 3.1.3  protocol version 31"
    assert ("rsync 3.1.3 predates 3.4.0 (January 2025), which fixed CVE-2024-12084..12088;"
            " upgrade unless your distribution backported the fixes") in data["warnings"]
    assert data["transfer_state"] == "TRANSFERRED"
    sides.assert_in_sync()


# --------------------------------------------------------------------------- login-node etiquette


def _nice(pid: int) -> int:
    return int(rigmod.proc_stat(pid)[16])


def _descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid` with its command line (to recognise it later, not a reused PID)."""
    return {child: rigmod.cmdline(child) for child in rigmod.descendants(pid)}


def _survivors(processes: dict[int, str]) -> list[int]:
    """Those still running (a zombie's or a reused PID's command line differs)."""
    return [pid for pid, cmdline in processes.items() if cmdline and rigmod.cmdline(pid) == cmdline]


def test_agent_is_niced_and_a_killed_orchestrator_leaves_nothing(sides: Sides, tmp_path: Path) -> None:
    rig = sides.rig
    wait_for(lambda: rig.user_processes() == [], "earlier tests' remote processes to exit", timeout=10)
    sides.seed_remote({**BASE_FILES, "_derived/ns/big.bin": os.urandom(8 << 20)})
    pause = tmp_path / "paused"
    env = {"USRSYNC_PAUSE_AT": "mid-rsync", "USRSYNC_PAUSE_FILE": str(pause), "USRSYNC_PAUSE_SECONDS": "120"}
    proc = sides.start("pull", "--no-progress", env=env)
    local: dict[int, bytes | None] = {}
    try:
        wait_for(pause.exists, "the orchestrator to pause mid-rsync", timeout=60)
        agents = [pid for pid, cmd in rig.user_processes() if "usrsync_agent.py" in cmd and " serve " in cmd]
        assert len(agents) == 1, rig.user_processes()
        assert _nice(agents[0]) == 10
        # rsync and its shim, unless the relay (which keeps running) already let them finish.
        local = _descendants(proc.pid)

        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        # The dropped connection ends the agent and the rsync server: nothing stays on the login
        # node; locally, rsync and the shim lose their peers and exit too.
        wait_for(lambda: rig.user_processes() == [], "the test user's processes to exit", timeout=10)
        wait_for(lambda: not _survivors(local), "the local rsync and shim to exit", timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        for pid in _survivors(local):
            os.kill(pid, signal.SIGKILL)
    assert not sides.local.exists()  # nothing was promoted


# --------------------------------------------------------------------------- locks without flock


def _flocked_inodes() -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file with an flock(2) lock, from /proc/locks."""
    found = set()
    for line in Path("/proc/locks").read_text().splitlines():
        words = line.split()
        if len(words) > 5 and words[1] == "FLOCK":
            major, minor, inode = words[5].split(":")
            found.add((int(major, 16), int(minor, 16), int(inode)))
    return found


def _flocked(path: Path) -> bool:
    st = path.stat()
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in _flocked_inodes()


def test_remote_lock_without_flock_excludes_concurrent_pulls(sides: Sides, tmp_path: Path) -> None:
    sides.seed_remote()
    env = {"USRSYNC_REMOTE_NO_FLOCK": "1"}  # the remote behaves like Lustre/NFS without flock
    pause = tmp_path / "paused"
    holder = sides.start("pull", "--no-progress", env={**env, "USRSYNC_PAUSE_AT": "after-lock",
                                                         "USRSYNC_PAUSE_FILE": str(pause),
                                                         "USRSYNC_PAUSE_SECONDS": "120"})
    remote_lock = sides.base / ".usrsync" / "locks" / "densegen%2Fmy_dataset.lock"
    try:
        wait_for(pause.exists, "the first pull to hold its locks", timeout=60)
        # Only O_EXCL and the heartbeat hold the remote lock; the local one still uses flock.
        assert not _flocked(remote_lock)
        assert _flocked(sides.root / ".usrsync" / "locks" / "densegen%2Fmy_dataset.lock")

        # A second machine (its own local root, so only the remote lock can stop it).
        other = Sides(tmp_path / "other.toml", tmp_path / "other-root", sides.base, sides.rig)
        other.root.mkdir()
        configure(other)
        r = other.run("pull", "--no-progress", env=env)
        assert r.returncode == 4, r.stderr
        error, hint = error_lines(r.stderr)
        assert error.startswith(f"error: dataset '{DATASET}' on remote 'rig' is locked by "), error
        assert "--wait SECONDS" in hint
        assert not other.local.exists()
    finally:
        holder.kill()  # it sleeps at the pause point; a hard kill is what a crash looks like
        holder.communicate(timeout=30)
    # The dropped session ends the agent, which removes its lock file on the way out.
    wait_for(lambda: not remote_lock.exists(), "the remote lock to be released", timeout=10)


# --------------------------------------------------------------------------- ~/.ssh/config aliases


def _ssh_home(tmp_path: Path, config: str, *rigs: SshRig) -> tuple[dict[str, str], Path]:
    """A HOME holding .ssh/config and a known_hosts with these rigs' host keys (always checked)."""
    ssh_dir = tmp_path / "home" / ".ssh"
    ssh_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    (ssh_dir / "config").write_text(config)
    known_hosts = ssh_dir / "known_hosts"
    known_hosts.write_text("".join(r.known_hosts.read_text() for r in rigs))
    return {"HOME": str(ssh_dir.parent)}, known_hosts


def _host_block(alias: str, r: SshRig, *extra: str) -> str:
    lines = [f"Host {alias}", "  HostName 127.0.0.1", f"  Port {r.port}", f"  User {r.user}",
             f"  IdentityFile {r.key}", "  IdentitiesOnly yes", *(f"  {line}" for line in extra)]
    return "\n".join(lines) + "\n"


def _alias_sides(sides: Sides, known_hosts: Path) -> None:
    """A profile that names only the alias: port, user and key must come from ~/.ssh/config."""
    doc = {"root": str(sides.root),
           "remotes": {"rig": {"host": "rigalias", "base_dir": str(sides.base), "known_hosts": str(known_hosts)}}}
    sides.cfg.write_text(tomli_w.dumps(doc))


def test_ssh_config_host_alias(sides: Sides, tmp_path: Path) -> None:
    env, known_hosts = _ssh_home(tmp_path, _host_block("rigalias", sides.rig), sides.rig)
    _alias_sides(sides, known_hosts)
    sides.seed_remote()
    r, data = audited(sides, "diff", tmp_path / "diff.json", env=env)
    assert r.returncode == 0, r.stderr
    assert (data["remote"]["host"], data["transfer_state"]) == ("rigalias", "DIFF-ONLY")
    assert data["primary"]["remote_size"] == len(BASE_FILES["records.parquet"])


def test_ssh_config_proxy_jump(sides: Sides, tmp_path: Path) -> None:
    target = sides.rig
    with rigmod.start_sshd(user=target.user) as jump:
        config = _host_block("rigjump", jump) + _host_block("rigalias", target, "ProxyJump rigjump")
        sides.seed_remote()
        before = target.auth_count()

        # The jump host's key is checked too (asyncssh looks it up in ~/.ssh/known_hosts, which
        # is also the profile's file here): without it, nothing reaches the target.
        env, known_hosts = _ssh_home(tmp_path, config, target)
        _alias_sides(sides, known_hosts)
        r = sides.run("diff", env=env)
        assert r.returncode == 3, r.stderr
        error, _ = error_lines(r.stderr)
        assert "(Host key is not trusted for host 127.0.0.1)" in error, error
        assert (jump.auth_count(), target.auth_count()) == (0, before)

        env, known_hosts = _ssh_home(tmp_path, config, target, jump)
        r, data = audited(sides, "pull", tmp_path / "pull.json", env=env)
        assert r.returncode == 0, r.stderr
        assert data["transfer_state"] == "TRANSFERRED"
        sides.assert_in_sync()
        # One authentication at the jump host, one at the target through the tunnel.
        assert jump.wait_auth_count(1) == 1
        assert target.wait_auth_count(before + 1) == before + 1
        assert "Accepted publickey for " + target.user in jump.log_text()
