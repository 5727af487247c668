"""Create a userfaultfd inside another process by ptrace syscall injection.

Why: ``userfaultfd(2)`` binds the new fd to the *caller's* mm, so the uffd
tracker's fd must be created by the target itself. Everything after that
(``UFFDIO_API``, ``UFFDIO_REGISTER``, write-protect, ``PAGEMAP_SCAN``) works
on the fd from outside: measured on kernel 6.18, the ioctls act on the fd's
mm, not the caller's.

How: by ptrace syscall injection (engine/ptrace.py, which also says how an
interrupted syscall of the target's survives it). Two syscalls are run:
``userfaultfd(O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY)``, then (after
``pidfd_getfd`` took a duplicate) ``close`` of the target's fd, so the
container holds no extra fd when CRIU dumps it.

A signal that arrives while the thread is being interrupted is passed on
unchanged (the thread handles it as it would have) and the interrupt still
comes. A thread in a group-stop (SIGSTOP) is left alone, and so is one
under a seccomp filter (the filter could kill it for the injected syscall):
injection fails and the tracker compares that process by content.

When the tracer dies: the kernel detaches its tracees and resumes them with
*whatever registers they hold*. Seized and interrupted but unmodified, the
thread just goes on (tested); with injected registers it would run on from
the ``syscall`` gadget and crash. So the injection runs in a helper process
(``python -m tug.engine.source.trackers.inject PID``) in its own session that
ignores SIGINT/SIGTERM/SIGHUP: killing tug (even with SIGKILL) does not kill
the helper, which finishes, restores and detaches in a few ms and then
finds tug gone (the fd it would hand over is closed with it). Only a SIGKILL
aimed at the helper itself, inside the microseconds between setting and
restoring the registers, could still harm the target.

The helper reports one message on the fd named by its second argument (a unix socket): a JSON status and,
on success, the userfaultfd attached with SCM_RIGHTS. Only x86_64.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import sys

from tug.engine.ptrace import (
    NR_CLOSE,
    NR_PIDFD_OPEN,
    USER_CS_64,
    InjectError,
    detach,
    find_gadget,
    getregs,
    pick_thread,
    run_syscall,
    seccomp_mode,
    seize_and_interrupt,
    setregs,
    sys_call,
)

NR_USERFAULTFD = 323
NR_PIDFD_GETFD = 438
#: userfaultfd(2) flag: without it a process lacking CAP_SYS_PTRACE (a
#: container's) gets EPERM where vm.unprivileged_userfaultfd is 0 (the
#: default). It only limits *synchronous* faults to user mode: the async
#: write-protect path never reaches that check, so the kernel's own writes
#: into user memory (read(2), getrandom(2)) are still tracked (tested).
UFFD_USER_MODE_ONLY = 1


def take_userfaultfd(pid: int) -> int:
    """Create a userfaultfd in ``pid``, return this process's duplicate of it.

    The target's own fd is closed again before the target resumes; on any
    failure its registers are restored and the fd (if made) closed.
    """
    if platform.machine() != "x86_64":
        raise InjectError(f"syscall injection is implemented for x86_64 only, not {platform.machine()}")
    gadget = find_gadget(pid)
    tid = pick_thread(pid)
    if seccomp_mode(pid, tid) != "0":
        # The filter decides what our syscalls do: SECCOMP_RET_KILL would
        # kill the process, RET_TRAP deliver a SIGSYS to it. Not worth it.
        raise InjectError(f"thread {tid} runs under a seccomp filter: an injected syscall could kill it")
    pidfd = sys_call(NR_PIDFD_OPEN, pid, 0)
    try:
        seize_and_interrupt(tid)
        saved = getregs(tid)
        ours = target_fd = -1
        try:
            if saved.cs != USER_CS_64:
                raise InjectError(f"thread {tid} runs 32-bit code (cs {saved.cs:#x}): not injecting x86_64 syscalls")
            target_fd = run_syscall(tid, saved, gadget, NR_USERFAULTFD, (os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY,))
            try:
                ours = sys_call(NR_PIDFD_GETFD, pidfd, target_fd, 0)
            finally:
                run_syscall(tid, saved, gadget, NR_CLOSE, (target_fd,))
        except BaseException:
            if ours >= 0:
                os.close(ours)
            raise
        finally:
            setregs(tid, saved)
            detach(tid)
    finally:
        os.close(pidfd)
    return ours


def main(argv: list[str]) -> int:
    """The helper: inject into pid argv[0], report on the socket fd argv[1]."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    report = socket.socket(fileno=int(argv[1]))
    try:
        fd = take_userfaultfd(int(argv[0]))
    except (InjectError, OSError, ValueError, IndexError) as exc:
        msg = {"ok": False, "error": str(exc)}
        try:
            report.sendmsg([json.dumps(msg).encode()])
        except OSError:
            pass
        return 1
    try:
        socket.send_fds(report, [json.dumps({"ok": True}).encode()], [fd])
    except OSError:
        return 1  # tug is gone: our duplicate closes with us, the target holds nothing
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
