"""A pod's SysV segments attached to a member restored after the first one.

CRIU restores each container of a pod on its own; only the first restore
into their shared IPC namespace makes the namespace's SysV objects, and CRIU
can map an attached segment only in the restore that made it
(criu/mmimage.py says why). So for every later member tug cuts the SysV
VMAs out of its mm images before CRIU reads them (CRIU leaves those ranges
empty), CRIU restores its processes stopped (``leave-stopped``), and tug
attaches each segment at its old address by running ``shmat`` (then the
VMAs' ``mprotect`` and ``madvise``) inside the stopped process
(engine/ptrace.py). Only then may the process run.

Why in the agent and not in a helper process, as the uffd tracker does: the
target here never ran and has no client yet. If the agent dies between
setting and restoring its registers, the kernel lets the thread go from the
``syscall`` gadget and it crashes; that copy was going to be undone anyway
(its marker says it never ran, see restore.py), and the source resumes.
A seccomp filter is no reason to refuse here either: a syscall it denies
fails the attach, and the migration rolls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import re
import time
from pathlib import Path

from tug.engine.criu.mmimage import Attach, strip_sysv
from tug.engine.destination.incoming import Incoming, write_marker
from tug.engine.errors import ImageFormatError, MigrationError
from tug.engine.procfs import ns_pid, parse_maps, thread_state
from tug.engine.ptrace import (
    USER_CS_64,
    InjectError,
    Regs,
    detach,
    find_gadget,
    getregs,
    pick_thread,
    run_syscall,
    seize_and_interrupt,
    setregs,
)
from tug.engine.runtime import ipcns

NR_MPROTECT = 10
NR_MADVISE = 28
NR_SHMAT = 30
SHM_RDONLY = 0o10000
SHM_EXEC = 0o100000
#: How long a restored process may take to reach its stop (CRIU sent SIGSTOP as it let go).
STOP_WAIT_S = 5.0
_MM_IMAGE = re.compile(r"mm-([1-9][0-9]*)\.img")


def take_attachments(images: Path) -> dict[int, list[Attach]]:
    """Cut the SysV VMAs out of every process's mm image in ``images``.

    Returns the attachments by the process's pid as dumped (its pid inside
    the container). Each changed image is replaced in one step.
    """
    plan: dict[int, list[Attach]] = {}
    for entry in os.scandir(images):
        m = _MM_IMAGE.fullmatch(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        try:
            stripped, attaches = strip_sysv(data)
        except ImageFormatError as exc:
            raise ImageFormatError(f"{entry.name}: {exc}") from exc
        if not attaches:
            continue
        tmp = Path(entry.path + ".tug-tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(stripped)
        os.replace(tmp, entry.path)
        plan[int(m.group(1))] = attaches
    return plan


def _wait_stopped(pid: int, tid: int) -> None:
    deadline = time.monotonic() + STOP_WAIT_S
    while (state := thread_state(pid, tid)) != "T":
        if state in ("", "Z", "X"):
            raise InjectError(f"process {pid} is gone")
        if time.monotonic() > deadline:
            raise InjectError(f"process {pid} never stopped (state {state}): it is not held for the attach")
        time.sleep(0.001)


def attach_process(pid: int, attaches: list[Attach]) -> None:
    """Attach ``attaches`` inside the stopped process ``pid``, which stays stopped.

    One thread does every ptrace call (ptrace binds a tracee to the tracer
    thread), so this runs whole in one worker thread.
    """
    gadget = find_gadget(pid)
    tid = pick_thread(pid)
    _wait_stopped(pid, tid)
    seize_and_interrupt(tid, stopped=True)
    try:
        saved = getregs(tid)
        try:
            if saved.cs != USER_CS_64:
                raise InjectError(f"thread {tid} runs 32-bit code (cs {saved.cs:#x})")
            for a in attaches:
                _attach_one(tid, saved, gadget, a)
        finally:
            setregs(tid, saved)
    finally:
        detach(tid)
    _check_maps(pid, attaches)


def _attach_one(tid: int, saved: Regs, gadget: int, a: Attach) -> None:
    flags = (SHM_RDONLY if a.readonly else 0) | (SHM_EXEC if any(v.prot & mmap.PROT_EXEC for v in a.vmas) else 0)
    addr = run_syscall(tid, saved, gadget, NR_SHMAT, (a.shmid, a.start, flags))
    if addr != a.start:
        raise InjectError(f"segment {a.shmid} was attached at {addr:#x}, not {a.start:#x}")
    default = mmap.PROT_READ | (0 if a.readonly else mmap.PROT_WRITE)
    for v in a.vmas:
        if v.prot != default:
            run_syscall(tid, saved, gadget, NR_MPROTECT, (v.start, v.end - v.start, v.prot))
        for advice in range(64):
            if v.madv >> advice & 1:
                run_syscall(tid, saved, gadget, NR_MADVISE, (v.start, v.end - v.start, advice))


def _check_maps(pid: int, attaches: list[Attach]) -> None:
    """Each range is one SysV mapping now, as the kernel shows it."""
    shown = {r.start: r for r in parse_maps(Path(f"/proc/{pid}/maps").read_text())}
    for a in attaches:
        for v in a.vmas:
            r = shown.get(v.start)
            if r is None or r.end != v.end or not r.path.startswith("/SYSV"):
                raise InjectError(f"{v.start:#x}-{v.end:#x} of process {pid} is not segment {a.shmid} after the attach")


async def attach_all(plan: dict[int, list[Attach]], host_pids: list[int], container: str) -> int:
    """Attach every planned segment in the container's stopped processes; returns how many.

    Any failure is a MigrationError: the restore fails and the copy goes.
    """
    by_ns = {}
    for pid in host_pids:
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile: "missing" below if it mattered
            by_ns[ns_pid(pid)] = pid
    missing = sorted(set(plan) - set(by_ns))
    if missing:
        raise MigrationError(f"{container}: restored processes {missing} (container pids) are missing: "
                             "their SysV segments cannot be attached")
    done = 0
    for ns, attaches in sorted(plan.items()):
        try:
            await asyncio.to_thread(attach_process, by_ns[ns], attaches)
        except (InjectError, OSError) as exc:
            raise MigrationError(
                f"{container}: attaching the pod's SysV segments {sorted({a.shmid for a in attaches})} in process "
                f"{ns} (container pid) failed: {exc}"
            ) from exc
        done += len(attaches)
    return done


async def prepare(inc: Incoming) -> bool:
    """Before the restore of a member whose IPC namespace an earlier member's
    restore filled: its SysV object images emptied (the same objects exist
    there, runtime/ipcns.py) and its SysV VMAs cut out (``inc.sysv``). True if
    it attaches any, i.e. CRIU must leave its processes stopped."""
    inc.stats["ipc_images_emptied"] = await asyncio.to_thread(ipcns.empty_object_images, inc.images)
    inc.sysv = await asyncio.to_thread(take_attachments, inc.images)
    if inc.sysv and inc.podman is not None:
        raise MigrationError(f"{inc.name}: a podman container restored into a shared IPC namespace with SysV "
                             "segments attached is not supported (podman restores it itself)")
    return bool(inc.sysv)


async def attach_restored(inc: Incoming, host_pids: list[int]) -> bool:
    """After its restore: attach the segments while its processes are stopped.

    A copy held by itself (``held_until`` its own name, restore.py: its
    marker said so from before its restore, so ``tug recover`` undoes it if
    the agent dies before it ran) is marked as restoring once attached and
    no longer held: the caller then lets it run. Returns whether the caller
    must continue it."""
    t0 = time.monotonic()
    inc.stats["sysv_attached"] = await attach_all(inc.sysv, host_pids, inc.name)
    inc.stats["sysv_attach_ms"] = int((time.monotonic() - t0) * 1000)
    if inc.held_until != inc.name:
        return False  # held for its group: let go with it (restore.py call_release)
    write_marker(inc.bundle, "restoring")
    inc.held, inc.held_until = False, None
    return True
