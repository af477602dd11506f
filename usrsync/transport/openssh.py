"""rsync over the system `ssh` (ControlMaster), the agent over asyncssh.

For big transfers to non-MFA hosts on fast links: OpenSSH's C crypto and one process per
stream beat the relay through our one Python thread. Costs a second authentication.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import tempfile

from usrsync.config import default_known_hosts, expand_local_path
from usrsync.transport.ssh import ENCRYPTION_ALGS, SshTransport


class OpenSshTransport(SshTransport):
    _control_dir: str | None = None

    def ssh_argv(self) -> list[str]:
        profile = self.remote.profile
        known_hosts = expand_local_path(profile.known_hosts) if profile.known_hosts else default_known_hosts()
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={known_hosts}", "-c", ",".join(ENCRYPTION_ALGS)]
        if self._control_dir:
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self._control_dir}/cm-%C",
                     "-o", "ControlPersist=60"]
        if profile.port:
            argv += ["-p", str(profile.port)]
        if profile.user:
            argv += ["-l", profile.user]
        if profile.identity_file:
            argv += ["-i", str(expand_local_path(profile.identity_file)), "-o", "IdentitiesOnly=yes"]
        return argv

    def rsync_endpoint(self, path: str) -> str:
        return f"{self.remote.profile.host}:{path}"

    def rsync_rsh(self) -> str | None:
        return " ".join(shlex.quote(w) for w in self.ssh_argv())

    async def prepare_rsync(self) -> None:
        if self._control_dir is None:
            self._control_dir = tempfile.mkdtemp(prefix="usrsync-cm-")

    async def close(self) -> None:
        if self._control_dir is not None:
            stop = await asyncio.create_subprocess_exec(
                *self.ssh_argv(), "-O", "exit", self.remote.profile.host or "",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            await asyncio.wait_for(stop.wait(), 15)
            shutil.rmtree(self._control_dir, ignore_errors=True)
            self._control_dir = None
        await super().close()
