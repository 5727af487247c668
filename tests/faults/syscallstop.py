"""Stop a process at the entry of one chosen syscall: a fault at an exact instant.

Why: some fault windows last a few milliseconds (the agent lists a restored
container's processes, then sends each one SIGCONT). Stopping the agent with
a signal once a marker says the window opened is a race a slow or a fast
machine loses. Here the harness ptrace-seizes the process's main thread (the
one running its event loop, where the agent's calls run), traces its
syscalls, and leaves it stopped at the entry of the first that matches: the
syscall has not run, and a SIGKILL then ends the process without it ever
running. Signals the thread receives meanwhile are delivered unchanged.
Test harness only; production code knows nothing of it.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Sequence

from tug.engine.ptrace import PTRACE_EVENT_STOP, WALL, InjectError, _ptrace, detach

PTRACE_SYSCALL = 24
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_O_TRACESYSGOOD = 1
SYSCALL_INFO_ENTRY = 1
SYSCALL_TRAP = 0x80 | 5  # SIGTRAP | 0x80: a syscall stop under TRACESYSGOOD

#: x86_64 syscall numbers the tests match on.
NR_SHUTDOWN = 48
NR_KILL = 62
NR_TGKILL = 234


class _SyscallInfo(ctypes.Structure):
    """``struct ptrace_syscall_info`` up to the entry's arguments."""

    _fields_ = [
        ("op", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("arch", ctypes.c_uint32),
        ("ip", ctypes.c_uint64),
        ("sp", ctypes.c_uint64),
        ("nr", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
    ]


Match = Callable[[int, Sequence[int]], bool]


def stop_at_syscall(pid: int, match: Match, timeout: float) -> list[int] | None:
    """Trace ``pid``'s main thread until a syscall entry with ``match(nr, args)``.

    Returns that syscall's arguments with the thread left stopped there (traced
    by this thread of the caller: :func:`kill_stopped` it, or
    :func:`release_stopped` it to let the syscall run), None if none came
    within ``timeout`` (detached then) or the process ended."""
    _ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACESYSGOOD)
    try:
        _ptrace(PTRACE_INTERRUPT, pid)
        deadline = time.monotonic() + timeout
        info = _SyscallInfo()
        while time.monotonic() < deadline:
            got, status = os.waitpid(pid, WALL | os.WNOHANG)
            if got == 0:  # running, maybe blocked in a syscall for long: the deadline is ours
                time.sleep(0.0002)
                continue
            if not os.WIFSTOPPED(status):
                return None
            sig, event = os.WSTOPSIG(status), status >> 16
            if sig == SYSCALL_TRAP:
                _ptrace(PTRACE_GET_SYSCALL_INFO, pid, ctypes.sizeof(info), ctypes.c_void_p(ctypes.addressof(info)))
                args = [int(a) for a in info.args]
                if info.op == SYSCALL_INFO_ENTRY and match(int(info.nr), args):
                    return args
                sig = 0
            elif event == PTRACE_EVENT_STOP:
                sig = 0  # our interrupt, or a group-stop: go on tracing
            _ptrace(PTRACE_SYSCALL, pid, 0, sig)
        _interrupt_and_detach(pid)
        return None
    except InjectError:
        detach(pid)
        raise


def kill_stopped(pid: int) -> None:
    """SIGKILL a process left stopped by :func:`stop_at_syscall`, and take its
    end as its tracer (its parent is told of it only then)."""
    os.kill(pid, 9)
    try:
        os.waitpid(pid, WALL)
    except ChildProcessError:
        pass


def release_stopped(pid: int) -> None:
    """Let a process left stopped by :func:`stop_at_syscall` go: the syscall runs."""
    detach(pid)


def _interrupt_and_detach(pid: int) -> None:
    """Let a traced thread that runs go (detaching needs a ptrace stop: interrupt it first)."""
    try:
        _ptrace(PTRACE_INTERRUPT, pid)
        os.waitpid(pid, WALL)
    except (InjectError, ChildProcessError):
        pass
    detach(pid)


def sends_signal(sig: int) -> Match:
    """A ``kill``/``tgkill`` of signal ``sig`` to a positive pid."""

    def match(nr: int, args: Sequence[int]) -> bool:
        if nr == NR_KILL:
            return 0 < args[0] < 1 << 31 and args[1] == sig
        return nr == NR_TGKILL and args[2] == sig

    return match
