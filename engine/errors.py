"""One exception hierarchy for everything tug raises.

Callers catch :class:`MigrationError` and get a one-line ``str()`` fit for a
terminal; the subclasses carry the structured details a program needs. Nothing
from asyncssh, msgpack or subprocess leaks past the module that talks to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class MigrationError(Exception):
    """Root of every error tug raises on purpose."""

    #: Short machine-readable tag, stable across releases (used in JSON output).
    kind = "migration"


class ConfigError(MigrationError):
    """Bad input from the user: unknown container, malformed URL or option."""

    kind = "config"


class PreconditionError(MigrationError):
    """A host cannot take part in a migration (missing tool, version, feature)."""

    kind = "precondition"


class TransportError(MigrationError):
    """The connection to the peer failed: unreachable, auth, host key, I/O."""

    kind = "transport"


class HostKeyError(TransportError):
    """The peer's host key is unknown or does not match known_hosts."""

    kind = "host-key"


class AuthenticationError(TransportError):
    """The peer refused our credentials."""

    kind = "auth"


class ForwardingRefusedError(TransportError):
    """The destination's sshd does not allow TCP forwarding (AllowTcpForwarding)."""


class ProtocolError(MigrationError):
    """The peer sent bytes that do not follow the tug wire protocol."""

    kind = "protocol"


class UnsafePathError(ProtocolError):
    """A path in a container's tree would leave it (a symlink, ``..``) or is malformed."""

    kind = "unsafe-path"


class RemoteError(MigrationError):
    """The agent on the destination reported a failure for a request."""

    kind = "remote"

    def __init__(self, message: str, *, remote_kind: str = "migration", details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.remote_kind = remote_kind
        self.details = dict(details or {})


class RuntimeToolError(MigrationError):
    """A container runtime command (runc) failed."""

    kind = "runtime"

    def __init__(self, message: str, *, argv: Sequence[str] = (), returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


class CriuError(RuntimeToolError):
    """CRIU (directly or through runc) failed; carries its log's error lines."""

    kind = "criu"

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
        log_path: Path | None = None,
        error_lines: Sequence[str] = (),
    ) -> None:
        super().__init__(message, argv=argv, returncode=returncode, stderr=stderr)
        self.log_path = log_path
        self.error_lines = tuple(error_lines)

    def __str__(self) -> str:
        base = super().__str__()
        if self.error_lines:
            # CRIU's first error is the cause; later ones are its consequences.
            base += ": " + _strip_stamp(self.error_lines[0])
        if self.log_path is not None:
            base += f" (log: {self.log_path})"
        return base


class PhaseTimeoutError(MigrationError):
    """A migration phase ran past its deadline."""

    kind = "timeout"

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(f"phase {phase!r} did not finish within {seconds:g} s")
        self.phase = phase
        self.seconds = seconds


class NetworkError(MigrationError):
    """A container's network endpoint could not be created, locked or moved."""

    kind = "network"


class RanThenFailed(MigrationError):
    """The destination's restored processes ran, then a later step failed there.

    Clients may have been answered by the new copy, so the source must not
    resume on its own: see :mod:`tug.engine.source.outcome`.
    """

    kind = "ran-then-failed"


class RollbackError(MigrationError):
    """Rollback itself failed: the source may need manual attention."""

    kind = "rollback"


class AbortedByPolicy(MigrationError):
    """The convergence policy decided the migration will never converge."""

    kind = "policy-abort"


def _strip_stamp(line: str) -> str:
    """'(00.035190) Error (criu/bfd.c:330): bfd: BUG' -> 'Error (criu/bfd.c:330): bfd: BUG'."""
    line = line.strip()
    if line.startswith("(") and ") " in line:
        line = line.split(") ", 1)[1]
    return line


class IntegrityError(MigrationError):
    """Bytes that crossed from the source are not the bytes the source sent.

    A rootfs file, an image file or a page run whose digest (see
    :mod:`tug.engine.integrity`) or size differs between what the source read
    and sent and what the destination received and wrote. Raised before the
    restore uses them, so the failure rolls back like any other before the
    commit point and the source resumes. ``subject`` names the file or the
    page run (pid, vaddr); ``check`` is what differed (``crc32``, ``size``,
    ``mtime_ns``), with the ``expected`` and ``got`` values.
    """

    kind = "integrity"

    def __init__(self, message: str, *, subject: str = "", check: str = "", expected: int = 0, got: int = 0) -> None:
        super().__init__(message)
        self.subject = subject
        self.check = check
        self.expected = expected
        self.got = got

    def details(self) -> dict[str, object]:
        """The structured fields, for the wire (the session rebuilds the error from them)."""
        return {"subject": self.subject, "check": self.check, "expected": self.expected, "got": self.got}


class ImageFormatError(MigrationError):
    """A CRIU image file is malformed or uses a layout tug does not read or write."""

    kind = "image"


def primary_error(exc: BaseException) -> BaseException:
    """The error a failed TaskGroup stands for: its first MigrationError.

    Phases run concurrent steps in TaskGroups (rootfs sync next to pages or
    images), whose failure arrives as an exception group; the report and
    the CLI want the step's own error (a CriuError with its log), not
    "internal error: ExceptionGroup".
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves: list[BaseException] = []
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack[:0] = list(e.exceptions)
        else:
            leaves.append(e)
    for leaf in leaves:
        if isinstance(leaf, MigrationError):
            return leaf
    return leaves[0] if leaves else exc
