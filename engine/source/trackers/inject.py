"""Create a userfaultfd inside another process by ptrace syscall injection.

Why: ``userfaultfd(2)`` binds the new fd to the *caller's* mm, so the uffd
tracker's fd must be created by the target itself. Everything after that
(``UFFDIO_API``, ``UFFDIO_REGISTER``, write-protect, ``PAGEMAP_SCAN``) works
on the fd from outside: measured on kernel 6.18, the ioctls act on the fd's
mm, not the caller's.

How (the idea of CRIU's ``compel_execute_syscall``, rewritten, not copied):
seize one thread of the target, interrupt it, save its registers, point its
instruction pointer at a ``syscall`` instruction (``0f 05``) found in an
executable mapping (the vDSO first), single-step exactly that instruction,
read the result, and put every register back. Nothing is written into the
target's memory, so no text page is copied-on-write. Two syscalls are run:
``userfaultfd(O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY)``, then (after ``pidfd_getfd`` took a
duplicate) ``close`` of the target's fd, so the container holds no extra fd
when CRIU dumps it.

Interrupted syscalls: at the interrupt stop the thread may be inside a
syscall that will restart (``rax`` = -ERESTART*). The injected registers
carry ``orig_rax = -1`` so the kernel's restart fix-up leaves the injected
instruction alone; the saved registers are restored before the thread
resumes for good, so its own syscall restarts exactly as if only a signal
had interrupted it.

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

import ctypes
import json
import os
import platform
import signal
import socket
import sys
from collections.abc import Sequence

PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_CONT = 7
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000
NR_CLOSE = 3
NR_USERFAULTFD = 323
NR_PIDFD_OPEN = 434
NR_PIDFD_GETFD = 438
SYSCALL_INSN = b"\x0f\x05"
#: The code segment of 64-bit user mode (a 32-bit process runs with 0x23).
USER_CS_64 = 0x33
#: userfaultfd(2) flag: without it a process lacking CAP_SYS_PTRACE (a
#: container's) gets EPERM where vm.unprivileged_userfaultfd is 0 (the
#: default). It only limits *synchronous* faults to user mode: the async
#: write-protect path never reaches that check, so the kernel's own writes
#: into user memory (read(2), getrandom(2)) are still tracked (tested).
UFFD_USER_MODE_ONLY = 1
GROUP_STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)

_REG_NAMES = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss fs_base gs_base ds es fs gs"
).split()


class Regs(ctypes.Structure):
    """x86_64 ``struct user_regs_struct``."""

    _fields_ = [(n, ctypes.c_uint64) for n in _REG_NAMES]

    def copy(self) -> Regs:
        return Regs.from_buffer_copy(bytes(self))


class InjectError(Exception):
    """The injection failed; the target was restored (or never touched)."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


def _ptrace(req: int, tid: int, addr: int = 0, data: int | ctypes.c_void_p = 0) -> int:
    r = _libc.ptrace(req, tid, ctypes.c_void_p(addr), data if isinstance(data, ctypes.c_void_p) else ctypes.c_void_p(data))
    if r < 0:
        err = ctypes.get_errno()
        raise InjectError(f"ptrace({req}) on {tid}: {os.strerror(err)}")
    return int(r)


def sys_call(nr: int, *args: int) -> int:
    """A raw syscall in this process; OSError on failure."""
    r = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(r)


def getregs(tid: int) -> Regs:
    regs = Regs()
    _ptrace(PTRACE_GETREGS, tid, 0, ctypes.c_void_p(ctypes.addressof(regs)))
    return regs


def setregs(tid: int, regs: Regs) -> None:
    _ptrace(PTRACE_SETREGS, tid, 0, ctypes.c_void_p(ctypes.addressof(regs)))


def _wait(tid: int) -> tuple[int, int]:
    """(signal, ptrace event) of the next stop; InjectError if the thread died."""
    _, status = os.waitpid(tid, WALL)
    if not os.WIFSTOPPED(status):
        raise InjectError(f"thread {tid} exited during the injection")
    return os.WSTOPSIG(status), status >> 16


def seize_and_interrupt(tid: int) -> None:
    """Seize ``tid`` and wait until it sits in the interrupt stop.

    Signals that arrive first are passed on unchanged. A thread in a
    group-stop is detached again (InjectError): resuming it from here would
    not be ours to do.
    """
    _ptrace(PTRACE_SEIZE, tid)
    try:
        _ptrace(PTRACE_INTERRUPT, tid)
        while True:
            sig, event = _wait(tid)
            if event == PTRACE_EVENT_STOP:
                if sig in GROUP_STOP_SIGNALS:
                    raise InjectError(f"thread {tid} is stopped (signal {sig}); not injecting")
                return
            _ptrace(PTRACE_CONT, tid, 0, sig)  # a real signal: deliver it as if we were not here
    except BaseException:
        detach(tid)
        raise


def detach(tid: int) -> None:
    """Detach, ignoring a thread that is already gone."""
    try:
        _ptrace(PTRACE_DETACH, tid)
    except InjectError:
        pass


def find_gadget(pid: int) -> int:
    """Address of a ``syscall`` instruction in an executable mapping: the vDSO first.

    The target's maps and memory are untrusted: whatever sits at the address
    is executed for one instruction as the target itself, and the step's
    outcome is checked (the instruction pointer must land right after it).
    """
    with open(f"/proc/{pid}/maps") as f:
        lines = f.read().splitlines()
    execs: list[tuple[int, int, str]] = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) >= 5 and parts[1][2] == "x":
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            execs.append((lo, hi, parts[5].strip() if len(parts) > 5 else ""))
    execs.sort(key=lambda r: r[2] != "[vdso]")
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for lo, hi, path in execs:
            if path == "[vsyscall]":
                continue
            try:
                data = os.pread(fd, min(hi - lo, 1 << 20), lo)
            except OSError:
                continue
            at = data.find(SYSCALL_INSN)
            if at >= 0:
                return lo + at
    finally:
        os.close(fd)
    raise InjectError(f"no syscall instruction found in {pid}'s executable mappings")


def run_syscall(tid: int, saved: Regs, gadget: int, nr: int, args: Sequence[int] = ()) -> int:
    """Run one syscall in the stopped thread; the caller restores ``saved`` after."""
    regs = saved.copy()
    regs.rip = gadget
    regs.rax = nr
    regs.orig_rax = 2**64 - 1  # -1: no syscall-restart fix-up of the injected registers
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(regs, name, value)
    setregs(tid, regs)
    _ptrace(PTRACE_SINGLESTEP, tid)
    sig, event = _wait(tid)
    after = getregs(tid)
    if sig != signal.SIGTRAP or event or after.rip != gadget + len(SYSCALL_INSN):
        raise InjectError(f"injected syscall {nr} did not complete (stop signal {sig}, rip {after.rip:#x})")
    res = ctypes.c_int64(after.rax).value
    if -4096 < res < 0:
        raise InjectError(f"injected syscall {nr} failed in the target: {os.strerror(-res)}")
    return res


def seccomp_mode(pid: int, tid: int) -> str:
    """The thread's seccomp mode (0: none, 1: strict, 2: filter)."""
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return line.split()[1]
    return "0"


def pick_thread(pid: int) -> int:
    """A live thread of ``pid`` (the leader, unless it is a zombie)."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    for tid in sorted(tids, key=lambda t: t != pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            return tid
    raise InjectError(f"process {pid} has no live thread")


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
