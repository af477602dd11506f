"""`usr remotes doctor`: everything the default sync path needs, checked one line at a time.

Local checks always run. The remote checks share one session; when it cannot be opened the
checks that need it are listed as not run instead of failing one after another.
"""

from __future__ import annotations

import asyncio
import os
import re

import asyncssh
import msgspec
import sh

from remote_agent import usrsync_agent as engine
from usrsync import config, rsync
from usrsync.errors import EXIT_OK, EXIT_REMOTE, EXIT_USAGE, UsrError
from usrsync.session import RemoteSession

MIN_REMOTE_PYTHON = (3, 6)
MIN_REMOTE_RSYNC = (3, 0, 0)
OPEN_TIMEOUT = 120.0  # connect, deploy and hello; a login shell waiting for input must not hang doctor
_SSH_VERSION = re.compile(r"OpenSSH[_-]\S+")


class Check(msgspec.Struct, kw_only=True):
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    exit_code: int = EXIT_OK
    #: False when an earlier failure made this check impossible (then ok is False too)
    ran: bool = True


def _ok(name: str, detail: str) -> Check:
    return Check(name=name, ok=True, detail=detail)


def _fail(name: str, detail: str, fix: str | None, exit_code: int) -> Check:
    return Check(name=name, ok=False, detail=detail, fix=fix, exit_code=exit_code)


def _version_text(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _rsync_detail(info: rsync.RsyncInfo) -> str:
    """`rsync 3.2.7 (protocol 31)`, with the security warning appended when there is one."""
    label = "openrsync" if info.flavour == "openrsync" else "rsync"
    text = f"{label} {_version_text(info.version)}"
    if info.protocol is not None:
        text += f" (protocol {info.protocol})"
    warning = rsync.security_warning(info)
    return f"{text}; warning: {warning}" if warning else text


async def check_local_rsync() -> Check:
    name = "local rsync"
    try:
        info = await asyncio.to_thread(rsync.local_rsync_info)
    except UsrError as exc:
        return _fail(name, exc.message, exc.hint, exc.exit_code)
    return _ok(name, _rsync_detail(info))


def _ssh_version() -> str:
    with open(os.devnull, "rb") as devnull:
        run = sh.Command("ssh")("-V", _in=devnull, _return_cmd=True, _ok_code=list(range(256)), _timeout=10)
    text = (run.stderr + run.stdout).decode("utf-8", "replace").strip()
    if run.exit_code != 0:
        raise UsrError(f"`ssh -V` exited {run.exit_code}: {text[:200]}", "reinstall the OpenSSH client")
    return text.splitlines()[0] if text else "unknown version"


async def check_ssh_client(remote: config.Remote) -> Check:
    name = "local ssh client"
    needed = not remote.is_local and remote.profile.transport == "openssh"
    try:
        version = await asyncio.to_thread(_ssh_version)
    except (sh.CommandNotFound, sh.TimeoutException, UsrError) as exc:
        if not needed:
            return _ok(name, f"not available (not needed: transport {_transport(remote)})")
        detail = exc.message if isinstance(exc, UsrError) else "`ssh` not found on PATH or did not answer"
        return _fail(name, detail, "install the OpenSSH client, or set transport = \"asyncssh\"", EXIT_USAGE)
    m = _SSH_VERSION.search(version)
    short = m.group(0) if m else version
    return _ok(name, short if needed else f"{short} (not needed: transport {_transport(remote)})")


def _transport(remote: config.Remote) -> str:
    return "local" if remote.is_local else remote.profile.transport


async def _open(remote: config.Remote) -> tuple[RemoteSession | None, Check]:
    name = "connect + host key"
    try:
        session = await asyncio.wait_for(RemoteSession.open(remote, require_base=False), OPEN_TIMEOUT)
    except UsrError as exc:
        return None, _fail(name, exc.message, exc.hint, exc.exit_code)
    except asyncio.TimeoutError:
        return None, _fail(name, f"no agent answer from {remote.display_host} within {OPEN_TIMEOUT:.0f} s",
                           f"check that `ssh {remote.profile.host} true` returns without prompting", EXIT_REMOTE)
    except (asyncssh.Error, OSError, asyncio.IncompleteReadError) as exc:
        return None, _fail(name, f"the connection to {remote.display_host} failed: {exc}",
                           "check host, port and network, then rerun", EXIT_REMOTE)
    if remote.is_local:
        return session, _ok(name, "local remote: no SSH, agent runs as a subprocess")
    known = remote.profile.known_hosts or str(config.default_known_hosts())
    return session, _ok(name, f"{remote.display_host}, host key trusted by {known}")


def _python_version(text: str) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_python(name: str, session: RemoteSession) -> Check:
    python, found = session.remote.profile.python, session.hello.python
    version = _python_version(found)
    if version is None or version < MIN_REMOTE_PYTHON:
        return _fail(name, f"{python} is Python {found}; the agent needs >= 3.6",
                     f"set python = \"/path/to/python3.6+\" in remote {session.remote.name!r}", EXIT_REMOTE)
    return _ok(name, f"{python} is Python {found}")


def check_agent(name: str, session: RemoteSession) -> Check:
    hello = session.hello
    if hello.version != engine.AGENT_VERSION:
        return _fail(name, f"agent version {hello.version} answered, this usrsync speaks {engine.AGENT_VERSION}",
                     "remove ~/.cache/usrsync/agent on the remote and rerun", EXIT_REMOTE)
    return _ok(name, f"version {hello.version} deployed and answering on {hello.hostname} "
                     f"as {hello.user} (pid {hello.pid})")


def check_hash_algo(name: str, session: RemoteSession) -> Check:
    remote_xxh = "xxh3_128" in session.hello.hash_algos
    local_xxh = engine.xxhash is not None
    if remote_xxh and local_xxh:
        return _ok(name, "xxh3_128: xxhash is available on both ends")
    missing = " and ".join(side for side, has in (("this machine", local_xxh), ("the remote", remote_xxh))
                           if not has)
    return _ok(name, f"sha256: no xxhash module on {missing} (just as exact, slower than xxh3_128)")


def check_remote_rsync(name: str, session: RemoteSession) -> Check:
    path = session.remote.profile.rsync_path
    fix = f"install rsync >= 3.0 there, or set rsync_path in remote {session.remote.name!r}"
    if not session.hello.rsync:
        return _fail(name, f"{path!r} is not runnable on {session.remote.display_host}", fix, EXIT_REMOTE)
    try:
        info = rsync.parse_version(session.hello.rsync)
    except rsync.RsyncSetupError as exc:
        return _fail(name, f"{path}: {exc.message}", fix, EXIT_REMOTE)
    if info.flavour == "rsync" and info.version < MIN_REMOTE_RSYNC:
        return _fail(name, f"{path} is rsync {_version_text(info.version)}; usrsync needs >= 3.0", fix, EXIT_REMOTE)
    return _ok(name, f"{path} is {_rsync_detail(info)}")


def check_base_dir(name: str, session: RemoteSession) -> Check:
    base = session.base
    where = f"on {session.remote.display_host}"
    if not base.exists:
        return _fail(name, f"{base.base_dir} does not exist {where}",
                     f"create it there (mkdir -p {base.base_dir}) or fix base_dir of remote "
                     f"{session.remote.name!r}", EXIT_USAGE)
    if not base.writable:
        return _fail(name, f"{base.base_dir} exists {where} but is not writable by {session.hello.user}",
                     f"make it writable (chmod u+w {base.base_dir}) or choose another base_dir", EXIT_USAGE)
    return _ok(name, f"{base.base_dir} exists and is writable{filesystem_note(base.fs_type)}")


def filesystem_note(fs_type: str | None) -> str:
    """What the filesystem type means for a scan there, for the base_dir line."""
    if fs_type is None:
        return ""
    if engine.is_network_fs(fs_type):
        return (f" ({fs_type}, a network filesystem: scans stat and hash files on "
                f"{engine.STAT_THREADS_PER_JOB} threads per --jobs)")
    return f" ({fs_type})"


REMOTE_CHECKS = (
    ("remote python", check_python),
    ("agent", check_agent),
    ("hash algorithm", check_hash_algo),
    ("remote rsync", check_remote_rsync),
    ("base_dir", check_base_dir),
)


async def run_doctor(remote: config.Remote) -> list[Check]:
    """Every check in order; the exit code of the first failure is the command's."""
    checks = [await check_local_rsync(), await check_ssh_client(remote)]
    session, opened = await _open(remote)
    checks.append(opened)
    if session is None:
        reason = f"not run: {opened.name} failed"
        checks += [Check(name=name, ok=False, detail=reason, exit_code=opened.exit_code, ran=False)
                   for name, _ in REMOTE_CHECKS]
        return checks
    try:
        checks += [check(name, session) for name, check in REMOTE_CHECKS]
    finally:
        await session.close()
    return checks
