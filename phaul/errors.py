"""The one exception hierarchy of phaul, with the CLI's exit codes.

Every error a user can see derives from :class:`PhaulError`. Each class carries a stable ``code``
(also used on the wire, see ``protobuf/phaul.proto`` ``Error.code``) and the exit code that
``phaul`` returns for it. OS errors are translated where /proc, ptrace and syscalls are touched,
with ``raise ... from err``.
"""

from __future__ import annotations

from typing import ClassVar


class PhaulError(Exception):
    """Base class. ``str(err)`` is one line that says what happened and what to do."""

    code: ClassVar[str] = "error"
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, detail: str = "", log_path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.log_path = log_path

    def __str__(self) -> str:
        text = self.message
        if self.log_path:
            text += f" (log: {self.log_path})"
        return text


class UsageError(PhaulError):
    """Bad command-line input or configuration."""

    code = "usage"
    exit_code = 2


class ProcessGone(PhaulError):
    """The process does not exist (any more), or its PID was reused."""

    code = "process-gone"
    exit_code = 3


class NotMigratable(PhaulError):
    """The process exists but cannot be migrated (kernel thread, PID 1, ...)."""

    code = "not-migratable"
    exit_code = 3


class AccessDenied(PhaulError):
    """The kernel refused an operation on the process (ptrace, /proc)."""

    code = "access-denied"
    exit_code = 4


class CriuNotFound(PhaulError):
    """No working CRIU >= 4.2 was found."""

    code = "criu-missing"
    exit_code = 5


class CriuError(PhaulError):
    """A CRIU request failed; ``log_path`` names CRIU's log file for it."""

    code = "criu"
    exit_code = 6

    def __init__(
        self, message: str, *, detail: str = "", log_path: str = "", criu_errno: int = 0
    ) -> None:
        super().__init__(message, detail=detail, log_path=log_path)
        self.criu_errno = criu_errno


class ConnectError(PhaulError):
    """The target host could not be reached."""

    code = "unreachable"
    exit_code = 7


class AuthError(PhaulError):
    """Authentication failed (wrong token, certificate, key) or was refused."""

    code = "auth"
    exit_code = 8


class ProtocolError(PhaulError):
    """The peer sent something malformed, oversized or out of order."""

    code = "protocol"
    exit_code = 9


class PreflightFailed(PhaulError):
    """A check before the migration failed; nothing was changed."""

    code = "preflight"
    exit_code = 10


class MigrationAborted(PhaulError):
    """The migration failed after it started and was rolled back: the tree runs on the source."""

    code = "aborted"
    exit_code = 11

    def __init__(
        self, message: str, *, phase: str = "", detail: str = "", log_path: str = ""
    ) -> None:
        super().__init__(message, detail=detail, log_path=log_path)
        self.phase = phase

    def __str__(self) -> str:
        where = f" during {self.phase}" if self.phase else ""
        return f"migration aborted{where}: {super().__str__()}; the process runs on the source"


class TargetError(PhaulError):
    """The target reported an error (rebuilt from the wire)."""

    code = "target"
    exit_code = 12


class CommitUncertain(PhaulError):
    """The commit could not be confirmed: the target may hold a copy. Operator must check."""

    code = "commit-uncertain"
    exit_code = 13


EXIT_CODES: dict[str, int] = {
    cls.code: cls.exit_code
    for cls in (
        PhaulError,
        UsageError,
        ProcessGone,
        NotMigratable,
        AccessDenied,
        CriuNotFound,
        CriuError,
        ConnectError,
        AuthError,
        ProtocolError,
        PreflightFailed,
        MigrationAborted,
        TargetError,
        CommitUncertain,
    )
}

_BY_CODE: dict[str, type[PhaulError]] = {
    cls.code: cls
    for cls in (
        UsageError,
        ProcessGone,
        NotMigratable,
        AccessDenied,
        CriuNotFound,
        CriuError,
        ConnectError,
        AuthError,
        ProtocolError,
        PreflightFailed,
        TargetError,
        CommitUncertain,
    )
}


def error_from_wire(code: str, message: str, detail: str = "", log_path: str = "") -> PhaulError:
    """Rebuild an exception sent by the peer as the right class (unknown codes: TargetError)."""
    cls = _BY_CODE.get(code, TargetError)
    return cls(message, detail=detail, log_path=log_path)
