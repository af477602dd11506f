"""How the orchestrator reaches a remote: the agent's byte streams and rsync's endpoints."""

from __future__ import annotations

from usrsync.config import Remote
from usrsync.transport.base import Transport


def transport_for(remote: Remote) -> Transport:
    if remote.is_local:
        from usrsync.transport.local import LocalTransport

        return LocalTransport(remote)
    if remote.profile.transport == "openssh":
        from usrsync.transport.openssh import OpenSshTransport

        return OpenSshTransport(remote)
    from usrsync.transport.ssh import SshTransport

    return SshTransport(remote)
