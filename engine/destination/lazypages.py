"""Lazy restore from local images: the restored processes run before their memory is in place.

CRIU's restore writes every page into the new processes before they run:
for a 1 GiB container on these VMs that is seconds of downtime spent
populating memory. With ``runc restore --lazy-pages`` CRIU instead registers
the container's anonymous private memory with userfaultfd and lets the
processes run at once; a ``criu lazy-pages`` daemon started beforehand then
fills every page, first those the processes fault on, then all the rest in
the background, and exits when none is left.

The pages are already on this host (pre-copied, or streamed during the
dump) and the daemon reads local images, or (post-copy) they are still in
the frozen source and the daemon fetches them through tug's reverse forward.
A lazy restore only counts as done once the daemon has exited successfully
(:meth:`LazyPages.settle`).

If the daemon dies first, the kernel releases the processes' userfaultfds
and every page still missing reads as zeros from then on: a running copy
with silently corrupted memory. A guard process (uffdguard.py), which
outlives the agent, holds duplicates of them until the fill is confirmed,
and freezes or kills the copy otherwise (:meth:`LazyPages.guarded`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from tug.engine.criu.daemon import CriuDaemon
from tug.engine.criu.tool import criu_binary

T = TypeVar("T")


def lazy_pages_argv(
    criu: str, images_dir: Path, work_dir: Path, log: Path, status_fd: int, remote_port: int | None = None
) -> list[str]:
    """The daemon's command line (pure, for tests).

    The restore finds the daemon through ``lazy-pages.socket`` in its work
    dir, so both get the same ``--work-dir``. With ``remote_port`` (post-copy)
    the pages come from the source's lazy dump, reached through tug's reverse
    forward on ``127.0.0.1:remote_port``, instead of the local images.
    """
    argv = [
        criu, "lazy-pages",
        "--images-dir", str(images_dir),
        "--work-dir", str(work_dir),
        "--status-fd", str(status_fd),
        "-v4", "--log-file", str(log),
    ]
    if remote_port is not None:
        argv += ["--page-server", "--address", "127.0.0.1", "--port", str(remote_port)]
    return argv


class LazyPages(CriuDaemon):
    what = "CRIU lazy-pages daemon"

    def __init__(self, images_dir: Path, work_dir: Path, remote_port: int | None = None) -> None:
        super().__init__(work_dir / "lazy-pages.log")
        self.images_dir = images_dir
        self.work_dir = work_dir
        self.remote_port = remote_port
        #: The process that keeps the container from running on zero pages (uffdguard.py).
        self.guard: asyncio.subprocess.Process | None = None

    @property
    def remote(self) -> bool:
        """The pages come from the source (post-copy), not from local images."""
        return self.remote_port is not None

    async def start(self, timeout: float = 30.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        await self.spawn(
            lambda fd: lazy_pages_argv(criu_binary(), self.images_dir, self.work_dir, self.log, fd, self.remote_port),
            timeout,
        )

    async def guarded(self, restore: Awaitable[T], runc_root: Path, name: str) -> T:
        """Run ``restore`` with the guard taking each userfaultfd as the daemon gets it.

        CRIU hands the daemon each process's userfaultfd during the restore,
        well before it lets the processes go, so a daemon (or agent) that dies
        as soon as they run cannot release one. The guard lives in a session
        of its own: it outlives this agent.
        """
        assert self.pid is not None
        self.guard = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tug.engine.destination.uffdguard", str(self.pid), str(runc_root), name,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            result = await restore
        except BaseException:
            await asyncio.shield(self._verdict("failed"))
            raise
        self._tell("restored")
        return result

    def _tell(self, word: str) -> None:
        if self.guard is not None and self.guard.stdin is not None and not self.guard.stdin.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.guard.stdin.write(f"{word}\n".encode())

    async def _verdict(self, word: str) -> None:
        """Tell the guard how the fill ended and wait until it acted (it freezes the copy unless ``settled``)."""
        if self.guard is None:
            return
        self._tell(word)
        if self.guard.stdin is not None:
            self.guard.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_GUARD_S):
                await self.guard.wait()
        if self.guard.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.guard.kill()
            await self.guard.wait()
        self.guard = None

    async def settle(self, timeout: float) -> None:
        """Wait until every page is in place; a daemon that fails raises CriuError.

        On failure the guard has frozen (or killed) the copy before this returns.
        """
        try:
            async with asyncio.timeout(timeout):
                rc = await self.wait()
        except TimeoutError:
            await super().kill()
            await self._verdict("failed")
            raise self.failure(f"had not filled the memory within {timeout:g} s") from None
        if rc != 0:
            self.reported = True
            await self._verdict("failed")
            raise self.failure()
        # Every page is in place: a fault from now on (memory the process
        # dropped and touches again) must be the kernel's, not a dead daemon's.
        await self._verdict("settled")

    async def kill(self) -> None:
        """Kill and reap the daemon; the guard freezes the copy if it was not settled."""
        await super().kill()
        await self._verdict("failed")


#: How long the guard may take to freeze (or kill) a copy.
_GUARD_S = 40.0


_LOG_LINE = re.compile(
    r"^\((\d+\.\d+)\) uffd: (\d+-\d+): (?:#PF at 0x([0-9a-f]+)|uffd_copy: 0x([0-9a-f]+)/(\d+)|zero page at 0x([0-9a-f]+))$"
)


def fault_latencies(log_text: str) -> list[float]:
    """Seconds from each page fault to its page being in place, as the daemon saw them.

    From the daemon's own ``-v4`` log: ``#PF at A`` when a process faults,
    then the ``uffd_copy: DST/LEN`` (or ``zero page at A``) that fills it,
    for the same process and userfaultfd. This is the wait the faulting
    thread had, request and answer included, whatever the pages' source.
    """
    pending: dict[str, list[tuple[int, float]]] = {}
    out: list[float] = []
    for line in log_text.splitlines():
        m = _LOG_LINE.match(line)
        if m is None:
            continue
        t, who = float(m.group(1)), m.group(2)
        if m.group(3) is not None:
            pending.setdefault(who, []).append((int(m.group(3), 16), t))
            continue
        if m.group(4) is not None:
            lo = int(m.group(4), 16)
            hi = lo + int(m.group(5))
        else:
            lo = int(m.group(6), 16)
            hi = lo + 1
        waiting = pending.get(who)
        if not waiting:
            continue
        left = []
        for addr, t0 in waiting:
            if lo <= addr < hi:
                out.append(t - t0)
            else:
                left.append((addr, t0))
        pending[who] = left
    return out


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """p50 and p99 in ms (empty without faults)."""
    if not latencies:
        return {}
    lat = sorted(latencies)

    def pick(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000

    return {"p50": pick(0.50), "p99": pick(0.99)}
