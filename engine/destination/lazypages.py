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
with silently corrupted memory. So the agent holds its own duplicate of each
userfaultfd (:meth:`LazyPages.hold`, via ``pidfd_getfd``) for as long as the
daemon works: a dead daemon then leaves the faulting threads waiting, and
the agent freezes or kills the copy before it lets go (:meth:`LazyPages.release`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
from collections.abc import Awaitable
from pathlib import Path

from tug.engine.criu.daemon import CriuDaemon
from tug.engine.criu.tool import criu_binary


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
        #: Our duplicates of the restored processes' userfaultfds.
        self.held: list[int] = []
        self._seen: set[int] = set()  # the daemon's fd numbers we took

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

    async def settle(self, timeout: float) -> None:
        """Wait until every page is in place; a daemon that fails raises CriuError.

        On failure the held userfaultfds stay held: the caller freezes or
        kills the processes, then releases them.
        """
        try:
            async with asyncio.timeout(timeout):
                rc = await self.wait()
        except TimeoutError:
            await super().kill()
            raise self.failure(f"had not filled the memory within {timeout:g} s") from None
        if rc != 0:
            self.reported = True
            raise self.failure()
        # Every page is in place: a fault from now on (memory the process
        # dropped and touches again) must be the kernel's, not a dead daemon's.
        self.release()

    async def kill(self) -> None:
        """Kill and reap the daemon, then let go of the userfaultfds (call once the processes are frozen or gone)."""
        await super().kill()
        self.release()

    def hold(self) -> int:
        """Take a duplicate of every userfaultfd the daemon holds that we do not yet; how many we hold."""
        if self.pid is not None and self.returncode is None:
            self.held += uffd_fds_of(self.pid, skip=self._seen)
        return len(self.held)

    async def holding(self, restore: Awaitable[None]) -> None:
        """Run ``restore``, taking each userfaultfd as the daemon gets it.

        CRIU hands the daemon each process's userfaultfd during the restore,
        well before it lets the processes go: polling meanwhile (and once more
        after) means a daemon that dies as soon as they run cannot release one.
        """

        async def poll() -> None:
            while True:
                self.hold()
                await asyncio.sleep(_HOLD_POLL_S)

        poller = asyncio.create_task(poll(), name="tug-uffd-hold")
        try:
            await restore
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            self.hold()

    def release(self) -> None:
        """Let go of the held userfaultfds (after the copy was filled, frozen or killed)."""
        held, self.held = self.held, []
        for fd in held:
            with contextlib.suppress(OSError):
                os.close(fd)


#: How often the userfaultfds are looked for while a restore runs.
_HOLD_POLL_S = 0.002
_SYS_PIDFD_GETFD = 438  # the same number on x86-64 and arm64 (asm-generic)
_libc = ctypes.CDLL(None, use_errno=True)


def uffd_fds_of(pid: int, skip: set[int] | None = None) -> list[int]:
    """Duplicates, in this process, of every userfaultfd that process ``pid`` holds.

    With ``skip``: not those whose fd numbers are in it, which it then gains.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return []
    out: list[int] = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            if skip is not None and int(name) in skip:
                continue
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[userfaultfd]":
                    continue
            except OSError:
                continue
            fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd >= 0:
                os.set_inheritable(fd, False)
                out.append(fd)
                if skip is not None:
                    skip.add(int(name))
    except OSError:
        pass
    finally:
        os.close(pidfd)
    return out


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
