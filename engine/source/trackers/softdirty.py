"""Soft-dirty pre-copy: CRIU's own pre-dumps, streamed to the destination.

Where the kernel has soft-dirty page tracking (``criu check --feature
mem_dirty_track``), CRIU finds the pages a running container wrote since the
previous dump by itself. Each round is ``runc checkpoint --pre-dump`` whose
pages go through an SSH forward to a fresh ``criu page-server`` on the
destination; the container runs on (CRIU freezes it only while it collects
the pages' locations).

Directory layout, identical on both hosts (the parent links are relative, so
the chain is valid wherever the work dir is)::

    WORK/rounds/0                  round 0: every page
    WORK/rounds/1  parent -> ../0  round 1: pages written since round 0, holes for the rest
    ...
    WORK/images    parent -> ../rounds/N-1   the frozen final dump (the driver's)

On the source, ``--parent-path`` makes CRIU send unchanged pages as holes;
it needs the parent dir locally (runc checks it, CRIU reads its
inventory.img). On the destination the page server gets ``--prev-images-dir``
with the same relative path, links ``parent`` and checks every hole against
the parent's pagemap. The final dump is the streamed stop-copy dump with the
same parent; ``runc restore`` then reads pages through the whole chain,
which therefore stays on the destination until the migration ends.

Round statistics come from CRIU's ``stats-dump`` of each pre-dump
(pages_scanned, pages_skipped_parent, pages_written) plus the bytes that
crossed the wire, so the same convergence policies decide as for the
content tracker.

A failed round fails the migration (the source never stopped running, so
rollback only cleans the destination). Retrying it against the last good
round would be wrong: CRIU may already have cleared the soft-dirty bits of
pages written before the failed round, which the retry would then miss.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tug.engine.criu import stats as dump_stats
from tug.engine.criu.pageserver import RemotePageServer
from tug.engine.errors import ImageFormatError
from tug.engine.progress import Meter
from tug.engine.source.context import SourceContext
from tug.engine.source.trackers.base import Rounds
from tug.policies import ConvergencePolicy, RoundStats

#: Rounds moving less than this say nothing about the link's rate.
_MIN_RATE_SAMPLE = 4 << 20


def round_dir(index: int) -> str:
    """A round's image dir, relative to the work dir (both hosts)."""
    return f"rounds/{index}"


def round_parent(index: int) -> str | None:
    """``--parent-path`` / ``--prev-images-dir`` of round ``index``."""
    return None if index == 0 else f"../{index - 1}"


def final_parent(rounds: int) -> str | None:
    """The final dump's parent (relative to WORK/images) after ``rounds`` rounds."""
    return None if rounds == 0 else f"../{round_dir(rounds - 1)}"


class PreDump(Rounds):
    """Pre-copy rounds with ``runc checkpoint --pre-dump`` (soft-dirty kernels)."""

    name = "soft-dirty"

    def __init__(self, ctx: SourceContext, policy: ConvergencePolicy) -> None:
        super().__init__(ctx, policy)
        #: Rounds whose pre-dump completed on both sides: the parent chain.
        self.rounds_done = 0

    @property
    def final_parent(self) -> str | None:
        return final_parent(self.rounds_done)

    async def round(self, index: int) -> RoundStats:
        m = self.ctx
        assert m.agent is not None
        t0 = time.monotonic()
        since = self._since_last_round(t0)
        wire_before = m.wire_bytes()
        rel = round_dir(index)
        work_dir = m.work / "criu-rounds" / str(index)
        ps = await RemotePageServer.start(m.session, m.agent, m.name, images=rel, parent=round_parent(index))
        dump_s = 0.0

        async def dump() -> None:
            nonlocal dump_s
            t_dump = time.monotonic()
            async with ps.progress(Meter("precopy", "pages", None, m.emit)):
                await m.runc.predump(
                    m.name,
                    image_dir=m.work / rel,
                    work_dir=work_dir,
                    page_server=ps.address,
                    parent_path=round_parent(index),
                    timeout=m.opts.timeout("precopy"),
                )
            dump_s = time.monotonic() - t_dump
            await ps.finish()

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(dump())
                if m.sync_rootfs is not None:
                    tg.create_task(m.sync_rootfs())
        finally:
            ps.close()
        self.rounds_done = index + 1
        stats = await asyncio.to_thread(_read_stats, work_dir / "stats-dump")
        duration = time.monotonic() - t0
        if dump_s > 0 and ps.wire_bytes >= _MIN_RATE_SAMPLE:
            self.bandwidth_bps = max(self.bandwidth_bps, ps.wire_bytes / dump_s)
        return RoundStats(
            index=index,
            duration_s=duration,
            pages_scanned=stats.pages_scanned + stats.shpages_scanned,
            dirty_pages=stats.dirty_pages,
            pages_sent=stats.dirty_pages,
            pages_skipped=stats.pages_skipped_parent + stats.shpages_skipped_parent,
            bytes_sent=m.wire_bytes() - wire_before,
            bandwidth_bps=self.bandwidth_bps,
            dirty_rate_pps=(stats.dirty_pages / since) if since > 0 else 0.0,
        )


def _read_stats(path: Path) -> dump_stats.DumpStats:
    try:
        return dump_stats.read_dump_stats(path.read_bytes())
    except OSError as exc:
        raise ImageFormatError(f"pre-dump wrote no readable statistics ({path}): {exc.strerror}") from None
