"""warm-auth: authenticate once (MFA) and keep the connection for later runs.

A small per-user process holds one asyncssh connection to one remote and serves the relay
protocol on a 0600 socket in our 0700 runtime dir. Runs of `usr` find the socket and open
their agent and rsync channels through it, so cron and repeated commands never prompt.
It exits after `idle_timeout` seconds without a run, when the connection drops, or on stop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from usrsync import config
from usrsync.errors import RemoteError, UsrError
from usrsync.relay import RelayServer, broker_socket, relay_request
from usrsync.transport.ssh import AGENT_COMMAND_PREFIX, MAX_CHANNELS, SshTransport, deploy_prefix

STATUS = "usrsync:status"
STOP = "usrsync:stop"
READY_TIMEOUT = 600  # seconds a person may take to answer MFA prompts


class BrokerStatus(msgspec.Struct):
    remote: str
    host: str
    pid: int
    started_at: str
    idle_timeout: float
    active_channels: int
    idle_seconds: float


async def status(remote_name: str) -> BrokerStatus | None:
    raw = await relay_request(broker_socket(remote_name), STATUS)
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=BrokerStatus)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


async def stop(remote_name: str) -> bool:
    return await relay_request(broker_socket(remote_name), STOP) is not None


def start(remotes_config: Path, remote: config.Remote, idle_timeout: float) -> BrokerStatus:
    """Spawn the broker with this terminal for its prompts; return once it is authenticated."""
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "usrsync.broker", "--remotes-config", str(remotes_config),
            "--remote", remote.name, "--idle-timeout", str(idle_timeout), "--ready-fd", str(write_end)]
    process = subprocess.Popen(argv, pass_fds=(write_end,))
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        line = ready.readline()  # EOF when the broker fails: it has printed why
    if line.strip() != b"ok":
        try:
            process.wait(timeout=READY_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
        raise RemoteError(f"warm-auth to {remote.display_host} failed", "see the message above; then retry")
    found = asyncio.run(status(remote.name))
    if found is None:
        raise RemoteError("the warm-auth broker started but does not answer", "run `usr remotes status`")
    return found


def allowed_command(remote: config.Remote):
    rsync = f"{remote.profile.rsync_path} --server"
    prefixes = (rsync, AGENT_COMMAND_PREFIX, deploy_prefix())
    return lambda command: command.startswith(prefixes)


async def serve(remote: config.Remote, idle_timeout: float, ready_fd: int) -> int:
    transport = SshTransport(remote, use_broker=False)
    await transport.connect()  # prompts for MFA on the terminal we were started from
    assert transport.conn is not None
    relay = RelayServer(transport.open_session, allowed=allowed_command(remote), max_channels=MAX_CHANNELS - 1)
    stopping = asyncio.Event()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    loop = asyncio.get_running_loop()

    def describe() -> bytes:
        return msgspec.json.encode(BrokerStatus(
            remote=remote.name, host=remote.display_host, pid=os.getpid(), started_at=started_at,
            idle_timeout=idle_timeout, active_channels=max(0, relay.active - 1),
            idle_seconds=round(loop.time() - relay.last_activity, 1)))

    def request_stop() -> bytes:
        stopping.set()
        return b"stopping\n"

    relay.special = {STATUS: describe, STOP: request_stop}
    path = broker_socket(remote.name)
    if await relay_request(path, STATUS) is not None:
        print(f"error: a warm-auth broker for {remote.name} is already running", file=sys.stderr)
        return 2
    Path(path).unlink(missing_ok=True)
    await relay.start(path)
    os.write(ready_fd, b"ok\n")
    os.close(ready_fd)
    _detach()
    closed = asyncio.ensure_future(transport.conn.wait_closed())
    try:
        while not stopping.is_set() and not closed.done():
            idle = loop.time() - relay.last_activity
            if relay.active == 0 and idle >= idle_timeout:
                break
            try:
                await asyncio.wait_for(stopping.wait(), min(5.0, max(0.1, idle_timeout - idle)))
            except asyncio.TimeoutError:
                pass
    finally:
        relay.close()
        await transport.close()
    return 0


def _detach() -> None:
    """Leave the terminal's session and stdio: Ctrl-C or closing it must not end the broker."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usrsync.broker")
    parser.add_argument("--remotes-config", required=True)
    parser.add_argument("--remote", required=True)
    parser.add_argument("--idle-timeout", type=float, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        path = Path(args.remotes_config)
        remote = config.get_remote(config.load_remotes(path), args.remote, path)
        return asyncio.run(serve(remote, args.idle_timeout, args.ready_fd))
    except UsrError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
