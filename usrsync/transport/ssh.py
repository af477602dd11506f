"""One asyncssh connection carrying the agent and, through the rsh shim, every rsync."""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import os
import secrets
import shlex
import shutil
import sys
from typing import Any

import asyncssh
import structlog

from remote_agent import usrsync_agent as engine
from usrsync.config import default_known_hosts, expand_local_path
from usrsync.errors import RemoteError
from usrsync.protocol import await_sentinel
from usrsync.relay import (
    Channel,
    RelayProcess,
    RelayServer,
    SessionFactory,
    broker_socket,
    private_socket_dir,
    relay_request,
)
from usrsync.transport.base import AGENT_PATH, Transport

# AES-GCM costs half the CPU of chacha20 in asyncssh; keep the others for old servers.
ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                   "aes128-ctr", "aes256-ctr"]
AGENT_DIR = ".cache/usrsync/agent"
CHANNEL_WINDOW = 16 << 20  # asyncssh's 2 MiB default is slower than OpenSSH on real RTTs
MAX_CHANNELS = 8  # sshd's default MaxSessions is 10: agent + rsync channels stay below
AGENT_COMMAND_PREFIX = "if command -v ionice"
log = structlog.get_logger(__name__)
# Runs the deployed agent if its hash is right (else exits 96/97: the caller uploads it). The
# compiled code is kept beside it, bound to the source by a hash: compiling the agent took ~30 ms
# of every session here, and more on a loaded login node.
LOADER = """import hashlib,marshal,os,sys
p,h=sys.argv[1],sys.argv[2]
try:
    d=open(p,'rb').read()
except IOError:
    sys.exit(96)
if hashlib.sha256(d).hexdigest()!=h:
    sys.exit(97)
c='%s.%s-%x.code'%(p,sys.implementation.name,sys.hexversion)
try:
    b=open(c,'rb').read()
    if b[:64]!=hashlib.sha256(b[64:]+d).hexdigest().encode():
        raise ValueError(c)
    k=marshal.loads(b[64:])
except Exception:
    k=compile(d,p,'exec')
    b=marshal.dumps(k)
    t='%s.%d'%(c,os.getpid())
    try:
        with open(t,'wb') as f:
            f.write(hashlib.sha256(b+d).hexdigest().encode()+b)
        os.rename(t,c)
    except OSError:
        try:
            os.unlink(t)
        except OSError:
            pass
sys.argv=[p]+sys.argv[3:]
exec(k,{'__name__':'__main__','__file__':p})
"""


class _Client(asyncssh.SSHClient):
    """Answers keyboard-interactive (MFA) prompts on the terminal; never stores answers."""

    def kbdint_auth_requested(self) -> str | None:
        return "" if sys.stdin.isatty() else None

    def kbdint_challenge_received(self, name, instructions, lang, prompts):
        if not sys.stdin.isatty():
            return None
        if instructions:
            print(instructions, file=sys.stderr)
        answers = []
        for prompt, echo in prompts:
            answers.append(input(prompt) if echo else getpass.getpass(prompt))
        return answers


def agent_source() -> bytes:
    return AGENT_PATH.read_bytes()


class SshTransport(Transport):
    """Direct asyncssh connection, or the connection a warm-auth broker holds for this remote."""

    conn: asyncssh.SSHClientConnection | None = None
    broker: str | None = None
    agent_process: Any = None
    _relay: RelayServer | None = None
    _relay_dir: str | None = None
    _socket_path: str | None = None

    def _host(self) -> str:
        profile = self.remote.profile
        assert profile.host is not None
        return profile.host

    def __init__(self, remote, use_broker: bool = True):
        super().__init__(remote)
        self.use_broker = use_broker

    async def connect(self) -> None:
        if self.use_broker:
            path = broker_socket(self.remote.name)
            if os.path.exists(path) and await relay_request(path, "usrsync:status") is not None:
                self.broker = path
                return
        profile = self.remote.profile
        known_hosts = expand_local_path(profile.known_hosts) if profile.known_hosts else default_known_hosts()
        if not known_hosts.is_file():
            raise RemoteError(
                f"known_hosts file {known_hosts} does not exist, so the host key of {profile.host} cannot be checked",
                f"connect once with `ssh {profile.host}` and accept the key, or set known_hosts in the profile",
            )
        options: dict[str, Any] = dict(
            known_hosts=str(known_hosts), encryption_algs=ENCRYPTION_ALGS, keepalive_interval=30,
            connect_timeout=30, client_factory=_Client,
        )
        if profile.port:
            options["port"] = profile.port
        if profile.user:
            options["username"] = profile.user
        if profile.identity_file:
            options["client_keys"] = [str(expand_local_path(profile.identity_file))]
        where = self.remote.display_host
        try:
            self.conn = await asyncssh.connect(self._host(), **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise RemoteError(
                f"the host key of {where} is not trusted by {known_hosts} ({exc.reason})",
                f"verify the fingerprint with your admins, then add it: ssh-keyscan -p {profile.port or 22} "
                f"{profile.host} >> {known_hosts}",
            ) from None
        except asyncssh.PermissionDenied:
            raise RemoteError(
                f"authentication to {where} failed",
                "check user and identity_file in the profile (and that the key is in the remote "
                "~/.ssh/authorized_keys); for MFA run from a terminal or use `usr remotes warm-auth`",
            ) from None
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise RemoteError(f"cannot reach {where}: {reason}",
                              "check host and port in the profile, your network/VPN, and that sshd runs there") from None
        # All crypto runs in our one thread, so the cipher matters (AES-GCM: half of chacha20's CPU).
        log.debug("ssh.connected", host=where, cipher=self.conn.get_extra_info("recv_cipher"))

    def _agent_paths(self, digest: str) -> tuple[str, str]:
        directory = f"{AGENT_DIR}/{digest[:16]}"
        return directory, f"{directory}/usrsync_agent.py"

    def _agent_command(self, path: str, digest: str, nonce: str) -> str:
        python = self.remote.profile.python
        run = " ".join(shlex.quote(w) for w in ["nice", "-n", "10", python, "-c", LOADER, path, digest,
                                                 "serve", nonce])
        # ionice where the login node has it: hashing must not starve interactive users' I/O.
        return f"{AGENT_COMMAND_PREFIX} >/dev/null 2>&1; then exec ionice -c2 -n7 {run}; else exec {run}; fi"

    async def exec(self, command: str) -> Any:
        """Start a remote command; the process has stdin/stdout/stderr streams and wait()."""
        if self.broker is not None:
            return await RelayProcess.open(self.broker, command)
        assert self.conn is not None
        return await self.conn.create_process(command, encoding=None)

    async def open_session(self, factory: SessionFactory, command: str) -> Channel:
        """An exec channel for the relay, with the window bulk data needs."""
        assert self.conn is not None
        return await self.conn.create_session(factory, command, encoding=None, window=CHANNEL_WINDOW)

    async def start_agent(self, nonce: str) -> tuple[Any, Any]:
        source = agent_source()
        digest = hashlib.sha256(source).hexdigest()
        directory, path = self._agent_paths(digest)
        for attempt in range(2):
            process = await self.exec(self._agent_command(path, digest, nonce))
            try:
                await await_sentinel(process.stdout, nonce)
            except RemoteError as failure:
                try:
                    status = (await asyncio.wait_for(process.wait(check=False), 10)).exit_status
                except asyncio.TimeoutError:  # still running but silent: not an agent we can use
                    process.close()
                    raise failure from None
                stderr = (await process.stderr.read()).decode("utf-8", "replace").strip()
                if attempt == 0 and status in (engine.EXIT_AGENT_MISSING, engine.EXIT_AGENT_MISMATCH):
                    await self._deploy(source, directory, path)
                    continue
                if status == engine.EXIT_AGENT_MISMATCH:
                    raise RemoteError("the deployed agent's hash does not match after upload",
                                      f"check the remote home's disk space and remove ~/{directory}") from None
                last = stderr.splitlines()[-1] if stderr else f"exit status {status}"
                raise RemoteError(
                    f"the agent could not start on {self.remote.display_host}: {last}",
                    f"check that `{self.remote.profile.python}` is Python >= 3.6 there "
                    "(set `python` in the profile)",
                ) from None
            self.agent_process = process
            asyncio.create_task(_drain_quietly(process.stderr))
            return process.stdout, process.stdin
        raise AssertionError("unreachable")

    async def _deploy(self, source: bytes, directory: str, path: str) -> None:
        """Upload over SFTP; over an exec channel when SFTP is broken (noisy shells, old servers)."""
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        if self.conn is not None:
            try:
                async with self.conn.start_sftp_client() as sftp:
                    await sftp.makedirs(directory, exist_ok=True)
                    async with sftp.open(tmp, "wb") as handle:
                        await handle.write(source)
                    await sftp.posix_rename(tmp, path)
                return
            except (asyncssh.Error, OSError, AttributeError, TypeError, ValueError):
                pass  # fall back below; the loader checks the hash either way
        process = await self.exec(deploy_command(directory, tmp, path))
        process.stdin.write(source)
        await process.stdin.drain()
        process.stdin.write_eof()
        await _drain_quietly(process.stdout)
        status = (await process.wait(check=False)).exit_status
        process.close()
        if status != 0:
            raise RemoteError(f"cannot upload the agent to {self.remote.display_host}",
                              "check that the remote home directory is writable and not full")

    def rsync_endpoint(self, path: str) -> str:
        return f"usrsync:{path}"

    def rsync_path(self) -> str | None:
        return self.remote.profile.rsync_path

    def rsync_rsh(self) -> str | None:
        assert self._socket_path is not None
        return " ".join(shlex.quote(w) for w in [sys.executable, "-m", "usrsync.rsh", self._socket_path])

    async def prepare_rsync(self) -> None:
        if self.broker is not None:
            self._socket_path = self.broker  # the shim talks to the broker directly
            return
        if self._relay is not None:
            return
        self._relay_dir = private_socket_dir()
        self._socket_path = os.path.join(self._relay_dir, "rsh.sock")
        self._relay = RelayServer(self.open_session, allowed=self.is_rsync_server, max_channels=MAX_CHANNELS - 1)
        await self._relay.start(self._socket_path)

    def is_rsync_server(self, command: str) -> bool:
        return command.startswith(f"{self.remote.profile.rsync_path} --server")

    async def close(self) -> None:
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        if self._relay_dir is not None:
            shutil.rmtree(self._relay_dir, ignore_errors=True)
            self._relay_dir = None
        if self.agent_process is not None:
            self.agent_process.stdin.write_eof()
            self.agent_process.close()
            self.agent_process = None
        if self.conn is not None:
            self.conn.close()
            await self.conn.wait_closed()
            self.conn = None


def deploy_prefix() -> str:
    return f"mkdir -p {AGENT_DIR}/"


def deploy_command(directory: str, tmp: str, path: str) -> str:
    q = shlex.quote
    return f"mkdir -p {q(directory)} && cat > {q(tmp)} && mv -f {q(tmp)} {q(path)}"


async def _drain_quietly(reader: Any) -> None:
    try:
        while await reader.read(65536):
            pass
    except (asyncssh.Error, OSError):
        pass
