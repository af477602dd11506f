"""The asyncssh relay under bulk data, against the real sshd: rsync's bytes arrive intact both
ways over one authentication, a slow reader cannot make the relay hoard what it moves (asyncssh
2.24.1 reopens a paused channel's whole window while it still holds data), a client that goes away
stops its remote command, and only allowed commands run."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import signal
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from rig import SshRig

from usrsync import config
from usrsync.relay import RelayServer, private_socket_dir
from usrsync.transport.ssh import CHANNEL_WINDOW, SshTransport

MIB = 1 << 20


@contextlib.asynccontextmanager
async def connected(rig: SshRig, base: Path, tmp_path: Path) -> AsyncIterator[SshTransport]:
    """The production transport to the rig, its rsync relay started."""
    path = tmp_path / "remotes.toml"
    path.write_text(rig.remotes_toml(base_dir=base))
    transport = SshTransport(config.get_remote(config.load_remotes(path), "rig", path), use_broker=False)
    await transport.connect()
    try:
        await transport.prepare_rsync()
        yield transport
    finally:
        await transport.close()


def random_file(path: Path, size: int) -> str:
    """Incompressible, distinct content; its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size // MIB):
            block = os.urandom(MIB)
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


async def run(*argv: str, timeout: float = 120) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@contextlib.asynccontextmanager
async def cat_relay(transport: SshTransport) -> AsyncIterator[RelayServer]:
    """A relay on the transport's connection that runs only `cat`."""
    relay = RelayServer(transport.open_session, allowed=lambda command: command.startswith("cat "))
    await relay.start(os.path.join(private_socket_dir(), "cat.sock"))
    try:
        yield relay
    finally:
        relay.close()


async def shim(relay: RelayServer, *command: str, stdout: Any = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    """The real rsh shim, as rsync starts it, asking `relay` to run `command`."""
    assert relay.path is not None
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "usrsync.rsh", relay.path, "host", *command,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=stdout)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll without blocking the loop the relay runs in."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(0.02)


async def test_rsync_pull_and_push_through_the_relay_are_byte_identical(
        sshd_rig: SshRig, fresh_remote_base: Path, tmp_path: Path) -> None:
    remote = fresh_remote_base / "bulk"
    sizes = {"big.bin": 96 * MIB, "small/b.bin": MIB, "small/empty": 0}
    files = {rel: random_file(remote / rel, size) for rel, size in sizes.items()}
    sshd_rig.chown_tree(remote)
    local = tmp_path / "local"
    before = sshd_rig.auth_count()
    async with connected(sshd_rig, fresh_remote_base, tmp_path) as transport:
        rsh = transport.rsync_rsh()
        assert rsh is not None
        status, err = await run("rsync", "-a", "-e", rsh, transport.rsync_endpoint(f"{remote}/"), f"{local}/")
        assert (status, err) == (0, "")
        assert {rel: sha256_of(local / rel) for rel in files} == files

        pushed = random_file(local / "pushed.bin", 64 * MIB)
        back = fresh_remote_base / "back"
        status, err = await run("rsync", "-a", "-e", rsh, f"{local}/", transport.rsync_endpoint(f"{back}/"))
        assert (status, err) == (0, "")
        assert sha256_of(back / "pushed.bin") == pushed
        assert sha256_of(back / "big.bin") == files["big.bin"]
    assert sshd_rig.wait_auth_count(before + 1) == before + 1  # both rsync runs rode the one connection


async def slow_read(stream: asyncio.StreamReader, chunk: int, pause: float) -> str:
    """Read to EOF at most `chunk` bytes per `pause` seconds; the sha256 of what came."""
    digest = hashlib.sha256()
    while data := await stream.read(chunk):
        digest.update(data)
        await asyncio.sleep(pause)
    return digest.hexdigest()


async def test_a_slow_reader_keeps_relay_memory_bounded(
        sshd_rig: SshRig, fresh_remote_base: Path, tmp_path: Path) -> None:
    size = 96 * MIB
    source = fresh_remote_base / "stream.bin"
    expected = random_file(source, size)
    sshd_rig.chown_tree(source)
    async with connected(sshd_rig, fresh_remote_base, tmp_path) as transport, cat_relay(transport) as relay:
        tracemalloc.start()
        try:
            proc = await shim(relay, "cat", str(source))
            assert proc.stdout is not None
            # About 64 MB/s: slower than the relay, so it must pause the channel, not buffer.
            got = await asyncio.wait_for(slow_read(proc.stdout, 256 * 1024, 0.004), 120)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert got == expected
    # The channel window (sshd may fill it while we pause) about twice over, never the stream.
    assert peak < 3 * CHANNEL_WINDOW, f"relay peaked at {peak / MIB:.0f} MiB for a {size // MIB} MiB stream"


async def test_a_client_going_away_stops_its_remote_command(
        sshd_rig: SshRig, fresh_remote_base: Path, tmp_path: Path) -> None:
    source = fresh_remote_base / "endless.bin"
    random_file(source, 64 * MIB)
    sshd_rig.chown_tree(source)
    async with connected(sshd_rig, fresh_remote_base, tmp_path) as transport, cat_relay(transport) as relay:
        proc = await shim(relay, "cat", str(source), str(source))
        assert proc.stdout is not None
        await proc.stdout.readexactly(MIB)  # flowing, and stalled on us from here on

        def remote_cat() -> bool:
            return any(f"cat {source}" in cmdline for _, cmdline in sshd_rig.user_processes())

        await until(remote_cat, "the remote cat to run")
        assert relay.active == 1
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.stdout.read(), 30)  # what the pipe still held, then EOF
        assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
        await until(lambda: relay.active == 0, "the relay to drop the client")
        await until(lambda: not remote_cat(), "the remote cat to end")


async def test_shim_output_to_a_file_opened_for_appending(
        sshd_rig: SshRig, fresh_remote_base: Path, tmp_path: Path) -> None:
    # splice(2) refuses O_APPEND files: the shim must fall back to copying, losing nothing.
    source = fresh_remote_base / "append.bin"
    expected = random_file(source, 8 * MIB)
    sshd_rig.chown_tree(source)
    out = tmp_path / "out.bin"
    out.write_bytes(b"kept\n")
    async with connected(sshd_rig, fresh_remote_base, tmp_path) as transport, cat_relay(transport) as relay:
        with out.open("ab") as sink:
            proc = await shim(relay, "cat", str(source), stdout=sink)
            assert await asyncio.wait_for(proc.wait(), 60) == 0
    with out.open("rb") as f:
        assert f.read(5) == b"kept\n"
        assert hashlib.sha256(f.read()).hexdigest() == expected


async def test_the_rsync_relay_refuses_other_commands(
        sshd_rig: SshRig, fresh_remote_base: Path, tmp_path: Path) -> None:
    async with connected(sshd_rig, fresh_remote_base, tmp_path) as transport:
        rsh = transport.rsync_rsh()
        assert rsh is not None
        shim = await asyncio.create_subprocess_exec(
            *shlex.split(rsh), "host", "touch", str(fresh_remote_base / "pwned"),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(shim.communicate(), 30)
    assert (shim.returncode, out, err) == (255, b"", b"usrsync relay: command not allowed\n")
    assert not (fresh_remote_base / "pwned").exists()
