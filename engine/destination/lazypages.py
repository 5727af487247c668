"""Lazy restore from local images: the restored processes run before their memory is in place.

CRIU's restore writes every page into the new processes before they run:
for a 1 GiB container on these VMs that is seconds of downtime spent
populating memory. With ``runc restore --lazy-pages`` CRIU instead registers
the container's anonymous private memory with userfaultfd and lets the
processes run at once; a ``criu lazy-pages`` daemon started beforehand then
fills every page, first those the processes fault on, then all the rest in
the background, and exits when none is left.

Here the pages are already on this host (pre-copied, or streamed during the
dump), so the daemon reads local images and no network is involved: the
failure modes left are the daemon's own. That is why a lazy restore only
counts as done once the daemon has exited successfully, and the migration
commits only after that (:meth:`LazyPages.settle`): until then a failure
still resumes the frozen source.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tug.engine.criu.daemon import CriuDaemon
from tug.engine.criu.tool import criu_binary


def lazy_pages_argv(criu: str, images_dir: Path, work_dir: Path, log: Path, status_fd: int) -> list[str]:
    """The daemon's command line (pure, for tests).

    The restore finds the daemon through ``lazy-pages.socket`` in its work
    dir, so both get the same ``--work-dir``.
    """
    return [
        criu, "lazy-pages",
        "--images-dir", str(images_dir),
        "--work-dir", str(work_dir),
        "--status-fd", str(status_fd),
        "-v4", "--log-file", str(log),
    ]


class LazyPages(CriuDaemon):
    what = "CRIU lazy-pages daemon"

    def __init__(self, images_dir: Path, work_dir: Path) -> None:
        super().__init__(work_dir / "lazy-pages.log")
        self.images_dir = images_dir
        self.work_dir = work_dir

    async def start(self, timeout: float = 30.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        await self.spawn(lambda fd: lazy_pages_argv(criu_binary(), self.images_dir, self.work_dir, self.log, fd), timeout)

    async def settle(self, timeout: float) -> None:
        """Wait until every page is in place; a daemon that fails raises CriuError."""
        try:
            async with asyncio.timeout(timeout):
                rc = await self.wait()
        except TimeoutError:
            await self.kill()
            raise self.failure(f"had not filled the memory within {timeout:g} s") from None
        if rc != 0:
            self.reported = True
            raise self.failure()
