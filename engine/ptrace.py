"""Running a syscall inside another process by ptrace, from outside.

The idea of CRIU's ``compel_execute_syscall``, rewritten, not copied: seize
one thread of the target, stop it, save its registers, point its
instruction pointer at a ``syscall`` instruction (``0f 05``) found in an
executable mapping (the vDSO first), single-step exactly that instruction,
read the result, and put every register back. Nothing is written into the
target's memory. Two users: the uffd tracker (source/trackers/inject.py,
which makes a userfaultfd in a running container) and the destination's
SysV attach (destination/sysvattach.py, which maps a pod's shared segments
into a restored process that CRIU left stopped).

Interrupted syscalls: at the stop the thread may be inside a syscall that
will restart (``rax`` = -ERESTART*). The injected registers carry
``orig_rax = -1`` so the kernel's restart fix-up leaves the injected
instruction alone; the saved registers are restored before the thread
resumes for good, so its own syscall restarts exactly as if only a signal
had interrupted it. Only x86_64.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from tug.engine.procfs import parse_maps, thread_state

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
NR_PIDFD_OPEN = 434
SYSCALL_INSN = b"\x0f\x05"
#: The code segment of 64-bit user mode (a 32-bit process runs with 0x23).
USER_CS_64 = 0x33
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


def seize_and_interrupt(tid: int, *, stopped: bool = False) -> None:
    """Seize ``tid`` and wait until it sits in a ptrace stop.

    Signals that arrive first are passed on unchanged. A thread found in a
    group-stop (SIGSTOP) is detached again (InjectError): resuming it from
    here would not be ours to do. With ``stopped``, a group-stop is what the
    caller expects (a process CRIU restored with ``leave-stopped``): the
    kernel traps a seized stopped thread into a ptrace stop by itself, the
    thread runs only the injected instructions, and once detached it
    re-enters the group-stop (the stop is still in effect for its group)
    until a SIGCONT. The caller checks that it is stopped (``thread_state``):
    no PTRACE_INTERRUPT is sent then, since a second trap request pending
    while it sits in the first would stop the injected step before it ran.
    """
    _ptrace(PTRACE_SEIZE, tid)
    try:
        if not stopped:
            _ptrace(PTRACE_INTERRUPT, tid)
        while True:
            sig, event = _wait(tid)
            if event == PTRACE_EVENT_STOP:
                if (sig in GROUP_STOP_SIGNALS) != stopped:
                    what = "is stopped" if not stopped else "is not stopped"
                    raise InjectError(f"thread {tid} {what} (signal {sig}); not injecting")
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
    execs = [r for r in parse_maps(Path(f"/proc/{pid}/maps").read_text()) if r.perms[2:3] == "x"]
    execs.sort(key=lambda r: r.path != "[vdso]")
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for r in execs:
            if r.path == "[vsyscall]":
                continue
            try:
                data = os.pread(fd, min(r.end - r.start, 1 << 20), r.start)
            except OSError:
                continue
            at = data.find(SYSCALL_INSN)
            if at >= 0:
                return r.start + at
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
        if thread_state(pid, tid) not in ("", "Z", "X"):
            return tid
    raise InjectError(f"process {pid} has no live thread")
