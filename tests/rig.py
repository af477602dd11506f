"""A real OpenSSH test rig: a throwaway sshd on 127.0.0.1 and a throwaway login user.

Used by the pytest fixtures (tests/conftest.py) and by scripts/bench.py. Everything here
needs root (useradd, sshd with privilege separation, runuser). Every process it starts is
stopped by its PID; nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tomli_w

SSHD = "/usr/sbin/sshd"
INTERNAL_SFTP = "internal-sftp"
EXTERNAL_SFTP = "/usr/lib/openssh/sftp-server"  # breaks under a noisy shell, like on many clusters
DEFAULT_BANNER = "Welcome to the usrsync test cluster"

_READY_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_AUTH_RE = re.compile(r"\bAccepted (?:publickey|keyboard-interactive)\S* for ")


class RigError(RuntimeError):
    """The rig could not be set up (the message says what and includes the sshd log tail)."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature; start_sshd retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rig_available() -> tuple[bool, str]:
    """Whether this machine can run the rig, and if not, why."""
    if os.geteuid() != 0:
        return False, "the sshd test rig needs root (useradd, sshd privilege separation)"
    missing = [SSHD] if not os.access(SSHD, os.X_OK) else []
    missing += [t for t in ("ssh", "ssh-keygen", "rsync", "runuser", "useradd") if not shutil.which(t)]
    if missing:
        return False, "missing for the sshd test rig: " + ", ".join(missing) + " (run scripts/bootstrap.sh --test)"
    return True, ""


# --------------------------------------------------------------------------- processes


def proc_status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: [1] ppid, [2] pgrp, [11] utime, [12] stime,
    [16] nice. Empty when the process is gone. (The command name may hold spaces and parens.)"""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return raw[raw.rindex(")") + 2:].split()


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def processes_of_uid(uid: int) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose real or effective uid is `uid`, as (pid, cmdline)."""
    found = []
    for pid in pids():
        st = proc_status(pid)
        uids = st.get("Uid", "").split()
        if str(uid) not in uids[:2] or st.get("State", "").startswith("Z"):
            continue
        found.append((pid, cmdline(pid) or f"[{st.get('Name', '?')}]"))
    return found


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in pids():
        ppid = proc_status(pid).get("PPid")
        if ppid and ppid.isdigit():
            children.setdefault(int(ppid), []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    st = proc_status(pid)
    return bool(st) and not st.get("State", "").startswith("Z")


def _signal_pids(pids: Sequence[int], timeout: float = _STOP_TIMEOUT) -> None:
    """SIGTERM each PID, then SIGKILL whatever is still alive after `timeout` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- users


def _run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, **kw)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def chown_tree(path: Path, user: str) -> None:
    """Recursively chown `path` to `user` and the user's primary group (no symlink following)."""
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


@contextlib.contextmanager
def test_user(prefix: str = "usrsync-t", shell: str = "/bin/sh") -> Iterator[tuple[str, Path]]:
    """A fresh unlocked login user; on exit its processes are killed (by PID) and it is deleted."""
    name = f"{prefix}{secrets.token_hex(3)}"
    r = _run(["useradd", "-m", "-s", shell, name])
    if r.returncode != 0:
        raise RigError(f"useradd {name} failed: {r.stderr.strip()}")
    try:
        # useradd leaves '!' in shadow; with UsePAM no, sshd then refuses the "locked" account.
        r = _run(["usermod", "-p", "*", name])
        if r.returncode != 0:
            raise RigError(f"usermod -p '*' {name} failed: {r.stderr.strip()}")
        yield name, Path(pwd.getpwnam(name).pw_dir)
    finally:
        delete_user(name)


test_user.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name


def delete_user(name: str) -> None:
    """Kill every process of `name` by PID, then `userdel -r` (a missing mail spool is fine)."""
    if not _user_exists(name):
        return
    uid = pwd.getpwnam(name).pw_uid
    _signal_pids([pid for pid, _ in processes_of_uid(uid)])
    r = _run(["userdel", "-r", name])
    if _user_exists(name):
        # userdel refuses while a process it sees is still logged in; a forced retry handles
        # the window where sshd session processes are still exiting.
        time.sleep(0.5)
        _signal_pids([pid for pid, _ in processes_of_uid(uid)])
        r = _run(["userdel", "-f", "-r", name])
    if _user_exists(name):
        raise RigError(f"userdel -r {name} failed: {r.stderr.strip()}")


def make_noisy(home: Path, banner: str = DEFAULT_BANNER) -> None:
    """Make a bash user's shell print `banner` on every command, like many HPC login nodes.

    bash sources ~/.bashrc for ssh commands; the echo goes before Debian's skeleton
    "not interactive: return" guard so it fires for non-interactive commands too.
    """
    line = f"echo {_sh_quote(banner)}\n"
    st = home.stat()
    for rc in (".bashrc", ".profile"):
        path = home / rc
        old = path.read_text() if path.exists() else ""
        path.write_text(line + old)
        os.chown(path, st.st_uid, st.st_gid)


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------- pythons


_PY_VERSION_RE = re.compile(r"/python3(?:\.\d+)?$")


@functools.cache
def oldest_python3(runnable_by: str | None = None) -> str | None:
    """Path of the oldest Python 3 on this machine that actually runs, or None.

    With `runnable_by`, the interpreter must also run as that user (e.g. pyenv under a 0700
    /root is invisible to a test user).
    """
    roots = {Path("/root/.pyenv"), Path.home() / ".pyenv"}
    if os.environ.get("PYENV_ROOT"):
        roots.add(Path(os.environ["PYENV_ROOT"]))
    if shutil.which("pyenv"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = _run(["pyenv", "root"]).stdout.strip()
            if out:
                roots.add(Path(out))
    candidates: set[str] = set()
    for root in roots:
        candidates.update(glob.glob(str(root / "versions" / "*" / "bin" / "python3")))
    for d in ("/usr/bin", "/usr/local/bin"):
        candidates.update(p for p in glob.glob(f"{d}/python3.*") if _PY_VERSION_RE.search(p))

    prefix = ["runuser", "-u", runnable_by, "--"] if runnable_by else []
    found: list[tuple[tuple[int, ...], str]] = []
    for exe in sorted(candidates):
        try:
            r = _run([*prefix, exe, "-c", "import sys; print(*sys.version_info[:3])"], cwd="/")
        except (OSError, subprocess.SubprocessError):
            continue
        parts = r.stdout.split()
        if r.returncode == 0 and len(parts) == 3 and parts[0] == "3":
            found.append((tuple(int(p) for p in parts), exe))
    return min(found)[1] if found else None


# --------------------------------------------------------------------------- sshd


@dataclasses.dataclass(frozen=True)
class SshRig:
    """A running loopback sshd and the user that may log in to it."""

    host: str
    port: int
    user: str
    home: Path
    key: Path  # client private key (root-owned, 0600)
    known_hosts: Path  # holds "[127.0.0.1]:PORT <host key>"
    base_dir: Path  # remote datasets base dir, owned by `user`
    workdir: Path  # the rig's temp dir (keys, config, log)
    log: Path  # sshd's -e log
    pid: int  # the listening sshd
    netns: str | None = None

    def with_base_dir(self, base_dir: Path) -> SshRig:
        return dataclasses.replace(self, base_dir=base_dir)

    def remote_profile(self, **overrides: Any) -> dict[str, Any]:
        """The DESIGN §4 keys for this rig; an override of None drops that key."""
        profile: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "base_dir": str(self.base_dir),
            "identity_file": str(self.key),
            "known_hosts": str(self.known_hosts),
        }
        for k, v in overrides.items():
            if v is None:
                profile.pop(k, None)
            else:
                profile[k] = str(v) if isinstance(v, Path) else v
        return profile

    def remotes_toml(self, name: str = "rig", **overrides: Any) -> str:
        """A TOML document with one `[remotes.<name>]` table pointing at this rig."""
        return tomli_w.dumps({"remotes": {name: self.remote_profile(**overrides)}})

    def ssh_argv(self, *remote_command: str) -> list[str]:
        """System ssh to the test user, host key checked, ignoring any ~/.ssh/config."""
        argv = [
            "ssh", "-F", "/dev/null", "-p", str(self.port), "-i", str(self.key),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "LogLevel=ERROR", "-l", self.user,
        ]  # fmt: skip
        return [*argv, self.host, *remote_command] if remote_command else argv

    def rsh(self) -> str:
        """The ssh command line for `rsync -e` (rsync appends host and command itself)."""
        return shlex.join(self.ssh_argv())

    def chown_tree(self, path: Path) -> None:
        chown_tree(path, self.user)

    def run_as_user(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run locally as the test user with a clean login-like env (cwd = home).

        Defaults: capture_output, text, timeout 60 s; any subprocess.run keyword overrides.
        """
        env = {
            "HOME": str(self.home), "USER": self.user, "LOGNAME": self.user,
            "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
        }  # fmt: skip
        kw.setdefault("env", env)
        kw.setdefault("cwd", str(self.home))
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"  # resolved before env's PATH applies
        return subprocess.run([runuser, "-u", self.user, "--", *argv], **kw)

    def asyncssh_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `asyncssh.connect(rig.host, **kw)` (host key checked, no ssh config)."""
        return {
            "port": self.port, "username": self.user, "client_keys": [str(self.key)],
            "known_hosts": str(self.known_hosts), "config": [],
        }  # fmt: skip

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def auth_count(self) -> int:
        """Successful authentications (one per SSH connection) logged by sshd so far."""
        return len(_AUTH_RE.findall(self.log_text()))

    def wait_auth_count(self, at_least: int, timeout: float = 5.0) -> int:
        """auth_count(), waiting (bounded) until it reaches `at_least`."""
        deadline = time.monotonic() + timeout
        while (n := self.auth_count()) < at_least and time.monotonic() < deadline:
            time.sleep(0.02)
        return n

    def user_processes(self) -> list[tuple[int, str]]:
        """Live processes of the test user as (pid, cmdline); zombies are left out."""
        return processes_of_uid(pwd.getpwnam(self.user).pw_uid)


_SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_ed25519
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp {sftp}
LogLevel INFO
MaxStartups 100:30:200
MaxSessions 20
AllowUsers {user}
"""


def _merge_config(defaults: str, extra: str) -> str:
    """Append `extra`, dropping the defaults it redefines (sshd keeps a keyword's FIRST value)."""
    overridden = set()
    for line in extra.splitlines():
        words = line.split()
        if words and words[0].lower() == "match":
            break  # keywords inside Match blocks are conditional; they override nothing globally
        if words and not words[0].startswith("#"):
            overridden.add(words[0].lower())
    kept = [line for line in defaults.splitlines() if line.split() and line.split()[0].lower() not in overridden]
    return "\n".join(kept) + "\n" + extra.strip("\n") + "\n"


def _keygen(path: Path) -> None:
    r = _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "usrsync-rig", "-f", str(path)])
    if r.returncode != 0:
        raise RigError(f"ssh-keygen {path} failed: {r.stderr.strip()}")


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _launch(argv: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start sshd, wait (bounded) for it to listen; return it and why it failed ('' if ok)."""
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        # Own session: a ^C aimed at pytest must not hit sshd before our cleanup does.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if "Server listening" in text:
            return proc, ""
        if proc.poll() is not None:
            return proc, f"sshd exited with {proc.returncode}"
        time.sleep(0.005)
    return proc, f"sshd not listening after {_READY_TIMEOUT:.0f} s"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the listener and its session children, all by PID."""
    if proc.poll() is None:
        # Sessions outlive a SIGTERMed listener, so collect them first.
        _signal_pids([proc.pid, *descendants(proc.pid)])
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_STOP_TIMEOUT)


@contextlib.contextmanager
def start_sshd(
    *,
    user: str,
    extra_config: str = "",
    sftp: str = INTERNAL_SFTP,
    netns: str | None = None,
    base_dir: Path | None = None,
) -> Iterator[SshRig]:
    """Run a throwaway sshd on 127.0.0.1:<free port> that lets only `user` in, by key.

    `extra_config` lines replace the defaults with the same keyword and may end in Match blocks.

    `base_dir` (default `<home>/datasets`) is created, owned by the user. With `netns`, sshd
    runs inside that (existing) network namespace, so only clients in it can reach it.
    """
    home = Path(pwd.getpwnam(user).pw_dir)
    workdir = Path(tempfile.mkdtemp(prefix="usrsync-rig-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        # sshd reads AuthorizedKeysFile as the user: the dir and file must be world-readable.
        workdir.chmod(0o755)
        _keygen(workdir / "host_ed25519")
        _keygen(workdir / "client_ed25519")
        auth = workdir / "authorized_keys"
        auth.write_text((workdir / "client_ed25519.pub").read_text())
        auth.chmod(0o644)
        base = base_dir or home / "datasets"
        base.mkdir(parents=True, exist_ok=True)
        chown_tree(base, user)

        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        os.chmod("/run/sshd", 0o755)
        cfg, log = workdir / "sshd_config", workdir / "sshd.log"
        failure = ""
        for _attempt in range(3):  # free_port() can race with other processes
            port = free_port()
            defaults = _SSHD_CONFIG.format(port=port, d=workdir, sftp=sftp, user=user)
            cfg.write_text(_merge_config(defaults, extra_config))
            r = _run([SSHD, "-t", "-f", str(cfg)])
            if r.returncode != 0:
                raise RigError(f"sshd -t rejected {cfg}:\n{r.stderr.strip()}")
            argv = [SSHD, "-f", str(cfg), "-D", "-e"]
            proc, failure = _launch(["ip", "netns", "exec", netns, *argv] if netns else argv, log)
            if not failure:
                break
            _stop(proc)
            if "Address already in use" not in _log_tail(log, 5):
                break
        if failure:
            raise RigError(f"{failure}; sshd log tail:\n{_log_tail(log)}")
        assert proc is not None

        host_key = (workdir / "host_ed25519.pub").read_text().split()
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        yield SshRig(
            host="127.0.0.1", port=port, user=user, home=home, key=workdir / "client_ed25519",
            known_hosts=known_hosts, base_dir=base, workdir=workdir, log=log, pid=proc.pid,
            netns=netns,
        )  # fmt: skip
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def network_namespace(prefix: str = "usrsync-t") -> Iterator[str]:
    """A fresh network namespace with only loopback up; deleted on exit."""
    name = f"{prefix}{secrets.token_hex(3)}"
    r = _run(["ip", "netns", "add", name])
    if r.returncode != 0:
        raise RigError(f"ip netns add {name} failed: {r.stderr.strip()}")
    try:
        r = _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        if r.returncode != 0:
            raise RigError(f"bringing up lo in {name} failed: {r.stderr.strip()}")
        yield name
    finally:
        _run(["ip", "netns", "del", name])


@contextlib.contextmanager
def temporary_rig(
    *,
    shell: str = "/bin/sh",
    noisy: bool = False,
    extra_config: str = "",
    sftp: str = INTERNAL_SFTP,
    netns: str | None = None,
) -> Iterator[SshRig]:
    """test_user + start_sshd in one step (for scripts/bench.py and one-off variants)."""
    with test_user(shell=shell) as (name, home):
        if noisy:
            make_noisy(home)
        with start_sshd(user=name, extra_config=extra_config, sftp=sftp, netns=netns) as r:
            yield r
