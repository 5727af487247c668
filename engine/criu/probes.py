"""CRIU's probe children, orphaned when CRIU dies in that instant, must not hang runc.

Why: at start CRIU checks kernel features by forking a child that ptraces
itself and then sleeps until CRIU kills it (criu/util.c
``fork_and_ptrace_attach``). If CRIU is killed in that instant (a fault, the
OOM killer), the child lives on, asleep for good, holding every descriptor it
inherited: among them runc's end of the ``swrk`` socket. runc learns that
its CRIU died only from that socket's end of file, so it waits forever, and
so does whoever waits for runc (measured in the fault matrix: a restore on
the destination hung for its whole phase timeout).

The signature is unambiguous: CRIU's main process is a zombie that runc has
not reaped (runc reaps it right after the socket ends), while another CRIU
process, reparented to runc, still lives. Seen on two looks in a row, that
one is an orphan: it is killed, runc gets its end of file and fails as it
does for any CRIU that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from tug.engine.criu.tool import criu_binary
from tug.engine.errors import PreconditionError
from tug.engine.proc import group_members
from tug.engine.procfs import stat_fields

#: Seconds between two looks at the group (the orphan is killed on the second).
INTERVAL_S = 0.25


def _is_criu(pid: int, criu: str) -> bool:
    """A live CRIU, by its binary (a zombie has no exe any more: :func:`_name`)."""
    try:
        return os.path.realpath(f"/proc/{pid}/exe") == criu
    except OSError:
        return False


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def orphaned_probes(pgid: int, criu: str) -> list[int]:
    """Live CRIU children of runc (``pgid``) beside a dead, unreaped CRIU child of it (module doc).

    Both must be runc's own children: runc reaps its CRIU right after the
    socket ends, so only a blocked runc keeps one as a zombie, and a live CRIU
    that is runc's child then was reparented to it (runc is a child subreaper)
    when its parent died. A CRIU's own short-lived children are never runc's.
    """
    dead, live = False, []
    for pid in group_members(pgid):
        fields = stat_fields(pid)  # state, ppid, ...
        if len(fields) < 2 or int(fields[1]) != pgid:
            continue
        if fields[0] == "Z":
            dead = dead or _name(pid) == "criu"
        elif _is_criu(pid, criu):
            live.append(pid)
    return live if dead else []


async def kill_orphaned_probes(pgid: int) -> None:
    """Watch a runc run's group (its pid is the group's id) until cancelled (module doc)."""
    try:
        criu = os.path.realpath(criu_binary())
    except PreconditionError:  # without a CRIU to compare with, there is nothing to watch
        return
    seen: set[int] = set()
    while True:
        await asyncio.sleep(INTERVAL_S)
        found = set(await asyncio.to_thread(orphaned_probes, pgid, criu))
        for pid in found & seen:  # on two looks in a row
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if pid in orphaned_probes(pgid, criu):  # still it (a pidfd pins the pid)
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os.close(pidfd)
        seen = found
