"""Child processes with deadlines, and no orphans.

Every external tool (runc, criu, tc, ssh-keygen) goes through :func:`run` so
that a timeout or a cancelled task always ends and reaps the whole process
group: a half-finished ``runc checkpoint`` left running would keep the source
container frozen behind our back.

Most tools are simply SIGKILLed. A few must undo something before they die:
a CRIU dump that is killed leaves its parasite mapped in the container's
processes and the cgroup freezer thawed (CRIU thaws it once the tasks are
seized). Such a call passes a :class:`GracefulStop`: the signal that makes
the tool clean up, sent first, then a bounded wait, and only then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tug.engine.errors import PreconditionError, RuntimeToolError
from tug.engine.procfs import stat_fields

#: How often a stopping process group is looked at.
_POLL_S = 0.05
#: How long the members of a SIGKILLed group may take to disappear (exit,
#: detach their tracees, be reaped) before we stop waiting for them.
_GONE_S = 2.0
#: How long the leader of a group gets to reap its killed helpers and exit.
_LEADER_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


@dataclass(frozen=True, slots=True, kw_only=True)
class GracefulStop:
    """How to stop a child that must clean up before it dies.

    On timeout or cancellation :func:`run` sends ``signal`` to every member
    of the child's process group that ``select`` accepts (all of them without
    ``select``), each pid at most once but also to members that appear while
    it waits (runc may not have spawned CRIU yet when the stop begins), and
    waits up to ``grace`` seconds for the whole group to exit. Only then is
    the group SIGKILLed. Once per pid because a tool may count the signals
    it gets (CRIU gives up after a few SIGALRMs: see criu/tool.py).
    """

    signal: int
    grace: float
    select: Callable[[int], bool] | None = None


def _pgrp(pid: int) -> int | None:
    fields = stat_fields(pid)  # state, ppid, pgrp, ...
    return int(fields[2]) if len(fields) > 2 else None  # (None: gone meanwhile)


def group_members(pgid: int) -> list[int]:
    """Pids of the processes whose process group is ``pgid`` (zombies included)."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _pgrp(int(e.name)) == pgid]


def _signal_member(pid: int, pgid: int, sig: int) -> None:
    """Signal ``pid`` if it is (still) in group ``pgid``: through a pidfd, so
    that a pid reused since the scan by another process is never hit."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if _pgrp(pid) == pgid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(pidfd, sig)
    finally:
        os.close(pidfd)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _interrupt_group(proc: asyncio.subprocess.Process, stop: GracefulStop) -> None:
    """Send ``stop.signal`` as :class:`GracefulStop` says, until the group is gone or the grace is up."""
    pgid = proc.pid
    signalled: set[int] = set()
    deadline = time.monotonic() + stop.grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        for pid in await asyncio.to_thread(group_members, pgid):
            if pid in signalled or (stop.select is not None and not stop.select(pid)):
                continue
            signalled.add(pid)
            _signal_member(pid, pgid, stop.signal)
        if proc.returncode is not None:
            await asyncio.sleep(_POLL_S)  # the leader is gone, some of its group is not
            continue
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_POLL_S):
                await proc.wait()


async def stop_group(proc: asyncio.subprocess.Process, stop: GracefulStop | None) -> None:
    """End the child's process group (gracefully first if ``stop``), reap the child,
    and wait (bounded) until no member of its group is left.

    The leader's helpers are killed before the leader, which gets a moment to
    reap them (runc waits for its CRIU once CRIU's socket closes): killed
    together, a helper's zombie would go to init, which need not reap it.
    """
    if stop is not None and _group_alive(proc.pid):
        await _interrupt_group(proc, stop)
    if proc.returncode is None:
        helpers = [pid for pid in await asyncio.to_thread(group_members, proc.pid) if pid != proc.pid]
        for pid in helpers:
            _signal_member(pid, proc.pid, signal.SIGKILL)
        if helpers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_LEADER_S):
                    await proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await wait_exit(proc)
    # A member whose parent died first is reparented away from us: we cannot
    # reap it, but we do not return while it may still run (or trace).
    deadline = time.monotonic() + _GONE_S
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.sleep(_POLL_S)


async def wait_exit(proc: asyncio.subprocess.Process) -> int:
    """``proc``'s exit code once it exited, whoever still holds its pipes.

    asyncio's ``wait()`` (3.11) returns only once the pipes closed too, so a
    stray that inherited them holds it up for good. Its fast path stays (it
    returns at exit in the usual case); a look at the exit code every
    :data:`_POLL_S` covers the other one.
    """
    async def polled() -> None:
        while proc.returncode is None:
            await asyncio.sleep(_POLL_S)

    waiting = {asyncio.ensure_future(proc.wait()), asyncio.ensure_future(polled())}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiting:
            task.cancel()
    assert proc.returncode is not None
    return proc.returncode


async def reap_group(
    proc: asyncio.subprocess.Process, input: bytes | None = None, grace: float = _LEADER_S
) -> tuple[bytes, bytes]:
    """``proc.communicate(input)`` for a session leader, whose strays cannot hold it up.

    A process it forked may keep its pipes open past its death: CRIU
    SIGKILLed during its kernel probes leaves a traced child asleep for good
    (seen here, under runc and as the lazy-pages daemon), and
    ``communicate()`` would wait for it forever. So once ``proc`` exited, a
    group still holding its pipes after ``grace`` is ended (:func:`stop_group`).
    """
    async def feed() -> None:
        if input is not None and proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(input)
                await proc.stdin.drain()
            proc.stdin.close()

    async def drain(stream: asyncio.StreamReader | None) -> bytes:
        return await stream.read() if stream is not None else b""

    out, err = asyncio.ensure_future(drain(proc.stdout)), asyncio.ensure_future(drain(proc.stderr))
    fed = asyncio.ensure_future(feed())
    try:
        await wait_exit(proc)
        _, pending = await asyncio.wait({out, err}, timeout=grace)
        if pending:
            await stop_group(proc, None)
            await asyncio.wait(pending, timeout=grace)
    finally:
        for task in (out, err, fed):
            task.cancel()

    def got(task: asyncio.Future[bytes]) -> bytes:
        return task.result() if task.done() and not task.cancelled() else b""

    return got(out), got(err)


async def run(
    argv: Sequence[str],
    *,
    timeout: float | None = 60.0,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdout_devnull: bool = False,
    stop: GracefulStop | None = None,
    via_files: bool = False,
    watch: Callable[[int], Coroutine[Any, Any, None]] | None = None,
) -> Completed:
    """Run ``argv`` to completion; raise :class:`RuntimeToolError` on failure.

    The child gets its own session so that the group kill on timeout or
    cancellation reaches grandchildren too (runc spawns criu, criu spawns
    helpers). With ``stop`` the group gets the chance to clean up first (see
    :class:`GracefulStop`). Cancellation is honoured, but the stopping and
    reaping are shielded: the cancellation propagates once the group is gone.
    ``via_files``: output goes to files read once the tool exited, for tools
    whose daemons inherit and keep its stdio (podman's conmon under uvloop,
    whose socketpairs then never reach EOF). ``watch`` runs beside it, given
    its pid (= its group's id), until it ends (criu/probes.py).
    """
    full_env = None if env is None else {**os.environ, **env}
    with contextlib.ExitStack() as stack:
        # Files only when asked: most runs are runc calls inside the downtime.
        out_f = stack.enter_context(tempfile.TemporaryFile()) if via_files else None
        err_f = stack.enter_context(tempfile.TemporaryFile()) if via_files else None
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL if stdout_devnull else out_f or asyncio.subprocess.PIPE,
                stderr=err_f or asyncio.subprocess.PIPE,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise PreconditionError(f"{argv[0]}: command not found (run 'tug doctor')") from exc
        watcher = asyncio.create_task(watch(proc.pid), name=f"tug-watch-{proc.pid}") if watch is not None else None
        try:
            return await _finish(proc, argv, timeout=timeout, check=check, input=input, stop=stop,
                                 files=(out_f, err_f) if out_f is not None and err_f is not None else None)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # best effort, never the run's error
                    await watcher


async def _finish(
    proc: asyncio.subprocess.Process, argv: Sequence[str], *, timeout: float | None, check: bool, input: bytes | None,
    stop: GracefulStop | None, files: tuple[IO[bytes], IO[bytes]] | None,
) -> Completed:
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await reap_group(proc, input)
            if files is not None:
                stdout, stderr = _read_back(files[0]), _read_back(files[1])
    except TimeoutError:
        await asyncio.shield(stop_group(proc, stop))
        raise RuntimeToolError(
            f"{' '.join(argv[:3])} timed out after {timeout:g} s", argv=argv, returncode=None
        ) from None
    except BaseException:
        await asyncio.shield(stop_group(proc, stop))
        raise
    result = Completed(argv=tuple(argv), returncode=proc.returncode or 0, stdout=stdout or b"", stderr=stderr or b"")
    if check and result.returncode != 0:
        msg = (result.err.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise RuntimeToolError(
            f"{os.path.basename(argv[0])} {argv[1] if len(argv) > 1 else ''} failed: {msg}".replace("  ", " "),
            argv=argv,
            returncode=result.returncode,
            stderr=result.err,
        )
    return result


def _read_back(f: IO[bytes]) -> bytes:
    f.seek(0)
    return f.read()
