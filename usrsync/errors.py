"""The error kinds a user can see, each with its exit code (README: exit codes)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_USAGE = 2
EXIT_REMOTE = 3
EXIT_LOCKED = 4
EXIT_VERIFY = 5
EXIT_REFUSED = 6
EXIT_INTERRUPTED = 130


class UsrError(Exception):
    """An expected failure: one line of what happened, one line of what to do."""

    exit_code = EXIT_USAGE
    kind = "usage"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(UsrError):
    kind = "config"


class RemoteError(UsrError):
    """Unreachable host, failed authentication, an agent that cannot start or misbehaves."""

    exit_code = EXIT_REMOTE
    kind = "remote"


class ProtocolError(RemoteError):
    """The remote sent something that is not a valid agent frame."""

    kind = "protocol"


class LockedError(UsrError):
    exit_code = EXIT_LOCKED
    kind = "locked"


class VerificationError(UsrError):
    exit_code = EXIT_VERIFY
    kind = "verification"


class TransferError(VerificationError):
    """rsync failed: nothing was promoted, so it shares the verification exit code."""

    kind = "transfer"


class RefusedError(UsrError):
    exit_code = EXIT_REFUSED
    kind = "refused"


class InterruptedByUser(UsrError):
    exit_code = EXIT_INTERRUPTED
    kind = "interrupted"
