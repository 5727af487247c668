"""The content tracker's rounds: pre-copy on kernels without soft-dirty.

Each round scans the container's memory with the shadow-copy tracker
(:mod:`.shadow`) and streams changed pages to the agent *while the scan goes
on*: a scanner task reads and diffs chunks in a worker thread and puts changed
runs on a bounded queue; a sender task drains it into the "pages" stream (the
bound is the backpressure: a slow link slows the scan instead of buffering
the container's memory). Rootfs changes sync in the same TaskGroup.

The frozen dump goes to tug's own CRIU page server on the source
(:mod:`tug.engine.source.psfilter`), which compares each page with the shadow
copy of what the destination holds as CRIU sends it: only the differing
pages cross the wire, while CRIU is still dumping, and the container's memory
is never written to tmpfs or read back. The agent rebuilds the pages images
from its store, so CRIU restores from complete, ordinary images.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tug.engine import pagestream
from tug.engine.errors import MigrationError
from tug.engine.phases import Phase
from tug.engine.procfs import Region
from tug.engine.progress import Meter
from tug.engine.source.context import DumpFn, SourceContext
from tug.engine.source.psfilter import FilterServer, PageFilter
from tug.engine.source.trackers.base import Rounds
from tug.engine.source.trackers.shadow import PAGE, ContentTracker, ProcessMemory
from tug.policies import ConvergencePolicy, RoundStats

QUEUE_DEPTH = 8  # chunks of up to 4 MiB in flight between scanner and sender


@dataclass(slots=True)
class Chunk:
    """Changed runs of one process (pid inside the container), queued for the sender."""

    pid: int
    runs: Sequence[tuple[int, bytes | memoryview]]
    #: Called once the runs are written (the stream has copied them): the
    #: buffer they are views of may then be read into again.
    release: Callable[[], None] | None = None


#: Chunks, None at the end of a round.
PageQueue = asyncio.Queue[Chunk | None]


@dataclass(slots=True)
class RoundCounters:
    scanned: int = 0
    dirty: int = 0
    bytes: int = 0
    runs: int = 0
    #: Seconds the sender spent handing data to the transport (incl. waits
    #: for flow control): with the link saturated, bytes/send_s is its rate.
    send_s: float = 0.0


class ContentRounds(Rounds):
    """The content tracker's rounds (see the module doc)."""

    #: Only a ``criu`` process may connect to the final dump's filter (unit
    #: tests that play CRIU themselves turn this off).
    only_criu_peers = True

    name = "content"
    final_to_destination = False

    def __init__(self, ctx: SourceContext, policy: ConvergencePolicy) -> None:
        super().__init__(ctx, policy)
        self.tracker = ContentTracker()
        #: The source-side page server that filters the frozen dump.
        self._filter: FilterServer | None = None
        self.final_delta_bytes = 0
        #: pid -> pages written again after round 0: the hot set, most
        #: likely to differ at the freeze and to be touched first after it
        #: (hybrid's sweep visits them first).
        self.rewritten: dict[int, set[int]] = {}
        self._index = 0

    def _rewritten(self, pid: int, runs: Sequence[tuple[int, bytes | memoryview]]) -> None:
        pages = self.rewritten.setdefault(pid, set())
        for vaddr, data in runs:
            pages.update(range(vaddr // PAGE, (vaddr + len(data)) // PAGE))

    async def round(self, index: int) -> RoundStats:
        self._index = index
        t0 = time.monotonic()
        since = self._since_last_round(t0)
        c = RoundCounters()
        queue: PageQueue = asyncio.Queue(QUEUE_DEPTH)
        sent_before = self.ctx.session.bytes_sent

        async def scanner() -> None:
            await self._scan(c, queue)
            # Not in a finally: when cancelled (a deadline, Ctrl-C) or failed, the
            # sender is cancelled too, and waiting for room in a queue nobody
            # drains would hang the TaskGroup, and with it the rollback.
            await queue.put(None)

        async def sender() -> None:
            out = await self.ctx.session.open_stream("pages", {"container": self.ctx.name, "round": index})
            while (item := await queue.get()) is not None:
                t_send = time.monotonic()
                for vaddr, data in item.runs:
                    await out.write(pagestream.encode_header(item.pid, vaddr, data))
                    await out.write(data)
                    c.bytes += len(data)
                    c.runs += 1
                    meter.add(len(data))
                if item.release is not None:
                    item.release()
                c.send_s += time.monotonic() - t_send
            await out.close({"round": index, "runs": c.runs, "bytes": c.bytes})
            meter.add(0, final=True)

        meter = Meter(Phase.PRECOPY.value, "pages", None, self.ctx.emit)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(scanner())
            tg.create_task(sender())
            if self.ctx.sync_rootfs is not None:
                tg.create_task(self.ctx.sync_rootfs())
        duration = time.monotonic() - t0
        wire = self.ctx.session.bytes_sent - sent_before
        if c.send_s > 0 and c.bytes >= (4 << 20):  # too little data says nothing about the link
            self.bandwidth_bps = max(self.bandwidth_bps, c.bytes / c.send_s)
        return RoundStats(
            index=index,
            duration_s=duration,
            pages_scanned=c.scanned,
            dirty_pages=c.dirty,
            pages_sent=c.dirty,
            pages_skipped=c.scanned - c.dirty,
            bytes_sent=wire,
            bandwidth_bps=self.bandwidth_bps,
            dirty_rate_pps=(c.dirty / since) if since > 0 else 0.0,
        )

    async def _scan(self, c: RoundCounters, queue: PageQueue) -> None:
        """Find the changed pages of every process and queue them (the content compare)."""
        for host_pid in await self.ctx.runc.pids(self.ctx.name):
            try:
                mem = await asyncio.to_thread(ProcessMemory, host_pid)
            except (FileNotFoundError, ProcessLookupError):
                continue  # exited since ps
            try:
                await self._compare(mem, await asyncio.to_thread(mem.regions), c, queue)
            finally:
                mem.close()

    async def _compare(self, mem: ProcessMemory, regions: list[Region], c: RoundCounters, queue: PageQueue) -> None:
        """Compare ``regions`` of one process with the shadow, page by page; queue what changed."""
        for region in regions:
            try:
                runs = await asyncio.to_thread(mem.runs, region)
            except OSError:
                continue  # unmapped meanwhile
            for vaddr, npages in runs:
                res = await asyncio.to_thread(self.tracker.scan, mem, vaddr, npages)
                c.scanned += res.scanned
                if res.changed:
                    c.dirty += res.changed_pages
                    if self._index > 0:
                        self._rewritten(mem.ns_pid, res.changed)
                    await queue.put(Chunk(pid=mem.ns_pid, runs=res.changed))

    def page_filter(self) -> PageFilter:
        """What the frozen dump's pages are compared with: the shadow here."""
        return self.tracker

    async def prepare_final(self, images_dir: Path) -> None:
        """Listen for CRIU's dump before the freeze (no start-up in the downtime)."""
        if self._filter is not None:
            self._filter.close()
        self._filter = FilterServer.listen(self.page_filter(), images_dir, only_criu=self.only_criu_peers)

    def final_dump_target(self, page_server: str | None) -> str | None:
        return self._filter.address if self._filter is not None else page_server

    async def final_dump(self, dump: DumpFn, page_server: str | None) -> None:
        """Dump into the filter: changed pages stream to the agent while CRIU runs.

        They go on the "pages" stream as round "final", framed like the
        rounds'. Errors: a failure of ours cuts CRIU off, so its dump fails
        too and ours is the one raised; when CRIU failed first (and left
        without PS_IOV_CLOSE), CRIU's error, with its log, is raised.
        """
        fs = self._filter
        assert fs is not None, "prepare_final() first"
        m = self.ctx
        out = await m.session.open_stream("pages", {"container": m.name, "round": "final"})
        meter = Meter(Phase.CHECKPOINT.value, "pages", None, m.emit)
        sent = runs = 0

        async def sink(pid: int, vaddr: int, data: bytes) -> None:
            nonlocal sent, runs
            await out.write(pagestream.encode_header(pid, vaddr, data))
            await out.write(data)
            sent += len(data)
            runs += 1
            meter.add(len(data))

        serve = asyncio.create_task(fs.serve(sink), name="tug-final-dump-filter")
        try:
            await dump(fs.address)
            if not fs.connected:
                raise MigrationError("CRIU's dump finished without sending its memory to the filtering page server")
            t_criu = time.monotonic()
            stats = await serve
        except BaseException as exc:
            serve.cancel()
            (own,) = await asyncio.gather(serve, return_exceptions=True)
            # serve() may not even have started. The stream is left as it is:
            # the rollback discards it, and a write to a stuck link must not
            # hold up the rollback.
            fs.close()
            if isinstance(exc, MigrationError) and isinstance(own, MigrationError) and own is not exc and not fs.disconnected:
                own.add_note(f"CRIU's dump failed as a consequence: {exc}")
                raise own from None
            raise
        await out.close({"round": "final", "runs": runs, "bytes": sent})
        meter.add(0, final=True)
        m.timings["delta_ms"] = (time.monotonic() - t_criu) * 1000
        self.final_delta_bytes = sent
        m.note(
            f"final dump filtered on the source: {stats.pages} pages from CRIU, {stats.changed_pages} changed "
            f"({sent / 2**20:.1f} MiB sent); {stats.shmem_pages} shared memory pages sent with the images"
        )
        if fs.uncork_result:
            m.note(f"CRIU's page-server socket stayed corked ({fs.uncork_result}): its last request waited ~200 ms", "warning")

    def rebuilt_pages(self) -> set[str]:
        return self._filter.process_pages_files if self._filter is not None and self._filter.complete else set()

    def close(self) -> None:
        if self._filter is not None:
            self._filter.close()
