"""CRIU processes that serve while something else runs: page servers, lazy-pages daemons.

Both are started before the step that needs them, report readiness with one
byte on ``--status-fd`` (CRIU writes it once its socket listens, so nothing
can connect too early), and must be reaped on every path: after their
session, or killed with their whole process group on cleanup, so nothing
CRIU forks outlives a migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import Callable
from pathlib import Path

from tug.engine.criu.tool import criu_binary, error_lines_from_text, log_error_lines
from tug.engine.errors import CriuError, MigrationError
from tug.engine.proc import reap_group, wait_exit


class CriuDaemon:
    #: How errors name this process ("CRIU page server", ...).
    what = "CRIU"

    def __init__(self, log: Path) -> None:
        self.log = log
        self.argv: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reaper: asyncio.Task[int] | None = None
        self._stderr = b""
        #: Set when we killed it on purpose (cleanup), not when a fault did.
        self.killed = False
        #: Set once its failure was raised to the source (no second report).
        self.reported = False

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def spawn(self, argv_for: Callable[[int], list[str]], timeout: float = 30.0) -> None:
        """Start CRIU with ``argv_for(status_fd)`` and wait until it says it is ready."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # Dies with us: an agent killed outright must not leave a page server
        # or lazy-pages daemon listening behind it.
        self._proc, r, self.argv = await spawn_with_status_fd(argv_for, die_with_parent=True)
        self._reaper = asyncio.create_task(self._reap(), name=f"tug-criu-{self._proc.pid}")
        try:
            async with asyncio.timeout(timeout):
                ready = await read_status(r, self._proc)
        except TimeoutError:
            await asyncio.shield(self.kill())
            raise self.failure(f"was not ready within {timeout:g} s") from None
        except BaseException:
            await asyncio.shield(self.kill())
            raise
        if ready != b"\0":
            await asyncio.shield(self.wait())
            raise self.failure("did not start")

    async def _reap(self) -> int:
        assert self._proc is not None
        _, err = await reap_group(self._proc)
        self._stderr = err
        return self._proc.returncode if self._proc.returncode is not None else -1

    async def wait(self) -> int:
        """The exit code once CRIU has exited (negative: killed by that signal)."""
        if self._reaper is None:
            raise MigrationError(f"{self.what} was never started")
        return await asyncio.shield(self._reaper)

    def signal(self, sig: int) -> None:
        """Signal the process group, if it still runs (test hooks, kill)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, sig)

    async def kill(self) -> None:
        """SIGKILL the process group (if still running) and reap it."""
        if self._proc is not None and self._proc.returncode is None:
            self.killed = True
            self.signal(signal.SIGKILL)
        if self._reaper is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._reaper)

    @property
    def failed_on_its_own(self) -> bool:
        """Exited non-zero (or killed by a signal) without us killing it."""
        rc = self.returncode
        return rc is not None and rc != 0 and not self.killed

    def failure(self, what: str | None = None, kept_log: Path | None = None) -> CriuError:
        """A CriuError describing how this process ended (call after it exited)."""
        rc = self.returncode
        if what is None:
            if rc is not None and rc < 0:
                try:
                    name = signal.Signals(-rc).name
                except ValueError:
                    name = f"signal {-rc}"
                what = f"was killed by {name}"
            else:
                what = f"exited with {rc}"
        log = kept_log or self.log
        # CRIU reports errors before its log exists (bad options, a missing
        # parent dir) on stderr.
        stderr = self._stderr.decode(errors="replace")
        lines = log_error_lines(log) or error_lines_from_text(stderr)
        if not lines:
            lines = [ln for ln in stderr.splitlines() if ln.strip()][-3:]
        return CriuError(
            f"{self.what} {what}",
            argv=self.argv,
            returncode=rc,
            stderr=stderr,
            log_path=log if log.exists() else None,
            error_lines=lines,
        )


async def spawn_with_status_fd(
    argv_for: Callable[[int], list[str]], *, die_with_parent: bool, stdout: int = asyncio.subprocess.DEVNULL,
    env: dict[str, str] | None = None,
) -> tuple[asyncio.subprocess.Process, int, list[str]]:
    """Start ``argv_for(status_fd)`` in a session of its own; returns it, the status pipe's read end and the argv.

    Only the child holds the write end afterwards, so its death reads as EOF
    (:func:`read_status`). The caller owns the read end.
    """
    r, w = os.pipe()
    argv = argv_for(w)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=(w,),
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
            env=None if env is None else {**os.environ, **env},
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return proc, r, argv


async def read_status(fd: int, proc: asyncio.subprocess.Process) -> bytes:
    """Read CRIU's one ready byte from the status pipe (b"" if CRIU died first).

    The exit of ``proc`` (the process that was given the pipe) counts as the
    end too: a CRIU SIGKILLed while a child it forked (its kernel probes
    fork and trace one) still holds the write end would otherwise never read
    as ended. Consumes ``fd``.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(fd, "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except BaseException:
        pipe.close()
        raise
    read = asyncio.ensure_future(reader.read(1))
    exited = asyncio.ensure_future(wait_exit(proc))
    try:
        await asyncio.wait({read, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not read.done():
            # A byte written just before the exit is in the pipe already.
            await asyncio.wait({read}, timeout=0.2)
        return read.result() if read.done() else b""
    finally:
        exited.cancel()
        read.cancel()
        transport.close()


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def kill_strays(work: Path) -> int:
    """SIGKILL every CRIU process whose command line names a path in ``work``; how many.

    Called once this migration's daemons were stopped, so any such process
    is a stray: a child a CRIU daemon forked for its kernel probes, orphaned
    when the daemon was killed in that instant (with the agent, by
    ``PR_SET_PDEATHSIG``, or by a fault), and asleep for good. Each candidate
    is pinned with a pidfd and checked again before the signal, so a pid
    reused meanwhile is never hit.
    """
    criu = os.path.realpath(criu_binary())
    prefix = str(work).rstrip("/") + "/"
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if os.path.realpath(f"/proc/{pid}/exe") != criu:
                continue
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(a.decode(errors="replace").startswith(prefix) for a in args):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed += 1
        except OSError:
            continue
        finally:
            os.close(pidfd)
    return killed
