"""Iterative pre-copy, source side: rounds while the container runs, then a delta.

:class:`Rounds` is what every tracker shares: the round loop, in which the
convergence policy (a pure function of the round history) decides after each
round. Two trackers implement a round: :class:`Precopy` here (the content
tracker, for kernels without soft-dirty) and ``predump.PreDump`` (CRIU's own
pre-dump, where the kernel has soft-dirty).

Content tracker: each round scans the container's memory with the content tracker and streams
changed pages to the agent *while the scan goes on*: a scanner task reads and
diffs chunks in a worker thread and puts changed runs on a bounded queue; a
sender task drains it into the "pages" stream (the bound is the backpressure:
a slow link slows the scan instead of buffering the container's memory).
Rootfs changes sync in the same TaskGroup.

After each round the convergence policy, a pure function of the round
history, decides: another round, the final dump, or abort. The final dump of
the frozen container goes to tug's own CRIU page server on the source
(``psfilter``), which compares each page with the shadow copy of what the
destination holds as CRIU sends it: only the differing pages cross the wire,
while CRIU is still dumping, and the container's memory is never written to
tmpfs or read back. The agent rebuilds the pages images from its store, so
CRIU restores from complete, ordinary images.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tug.engine import pagestream
from tug.engine.errors import AbortedByPolicy, MigrationError, PreconditionError
from tug.engine.events import RoundCompleted
from tug.engine.source.psfilter import FilterServer
from tug.engine.source.trackers.shadow import PAGE, ContentTracker, ProcessMemory
from tug.policies import Action, ConvergencePolicy, Decision, RoundStats

if TYPE_CHECKING:
    from tug.engine.source.migration import Migration

TRACKERS = ("auto", "content", "soft-dirty")
QUEUE_DEPTH = 8  # chunks of up to 4 MiB in flight between scanner and sender
#: Whatever the policy says, stop iterating after this many rounds: a policy
#: (possibly the user's own) that never says final must not pin the source.
SAFETY_MAX_ROUNDS = 30

#: The frozen dump itself, given the ``--page-server`` address (None: to files).
DumpFn = Callable[[str | None], Awaitable[None]]


async def choose_tracker(requested: str) -> str:
    """auto picks soft-dirty where the kernel has it, else content.

    Runs before anything changes on either host, so refusing an explicit
    ``soft-dirty`` here leaves nothing to roll back.
    """
    from tug.engine.criu import tool as criu

    if requested not in TRACKERS:
        raise PreconditionError(f"unknown tracker {requested!r} (choose from {', '.join(TRACKERS)})")
    if requested == "content":
        return "content"
    soft_dirty = await criu.has_feature("mem_dirty_track")
    if requested == "soft-dirty" and not soft_dirty:
        raise PreconditionError("kernel lacks soft-dirty (see tug doctor); use --tracker content")
    return "soft-dirty" if soft_dirty else "content"


@dataclass(slots=True)
class _RoundCounters:
    scanned: int = 0
    dirty: int = 0
    bytes: int = 0
    #: Seconds the sender spent handing data to the transport (incl. waits
    #: for flow control): with the link saturated, bytes/send_s is its rate.
    send_s: float = 0.0


class Rounds(abc.ABC):
    """The pre-copy loop shared by every tracker: round, ask the policy, repeat.

    Subclasses implement :meth:`round`; they say where the final dump goes
    (``final_to_destination``, ``final_parent``, :meth:`prepare_final`,
    :meth:`final_dump`) and which pages images the destination rebuilds
    (:meth:`rebuilt_pages`).
    """

    #: The tracker's name in reports.
    name = ""
    #: True when the frozen dump streams to a CRIU page server on the
    #: destination (migration.py starts it); False when the tracker serves
    #: the dump itself (the content tracker filters it on the source).
    final_to_destination = True

    def __init__(self, migration: Migration, policy: ConvergencePolicy) -> None:
        self.m = migration
        self.policy = policy
        self.history: list[RoundStats] = []
        self.events: list[RoundCompleted] = []
        self._last_round_start: float | None = None
        #: Best link-rate estimate so far (bytes/s). A round that is bound by
        #: the scan, not the link, says nothing about the link; round 0 (the
        #: full copy) saturates it, so keep the best rate any round showed.
        self.bandwidth_bps = 0.0

    @property
    def final_parent(self) -> str | None:
        """``--parent-path`` of the final dump, relative to its image dir."""
        return None

    @abc.abstractmethod
    async def round(self, index: int) -> RoundStats:
        """One round: find what changed since the last, send it, say what it cost."""

    async def prepare_final(self, images_dir: Path) -> None:
        """Before the freeze: whatever the final dump needs ready (nothing here)."""

    async def final_dump(self, dump: DumpFn) -> None:
        """Run the frozen dump; by default to the destination's page server."""
        ps = self.m.final_ps
        await dump(ps.address if ps is not None else None)

    def rebuilt_pages(self) -> set[str]:
        """Pages images the agent rebuilds from its store: the transfer phase
        sends every other file of the images dir."""
        return set()

    def close(self) -> None:
        """Release what prepare_final() took (idempotent)."""

    def _since_last_round(self, t0: float) -> float:
        """Seconds since the previous round started (0 for the first)."""
        since = t0 - self._last_round_start if self._last_round_start is not None else 0.0
        self._last_round_start = t0
        return since

    async def run(self) -> None:
        """Rounds until the policy says final (or abort)."""
        index = 0
        while True:
            stats = await self.round(index)
            self.history.append(stats)
            decision = self.policy.decide(self.history)
            if decision.action is Action.CONTINUE and index + 1 >= SAFETY_MAX_ROUNDS:
                self.m.note(f"policy still says continue after {index + 1} rounds; going final (safety cap)", "warning")
                decision = Decision(action=Action.FINAL, reason=f"safety cap of {SAFETY_MAX_ROUNDS} rounds")
            ev = RoundCompleted(
                index=stats.index,
                duration_ms=stats.duration_s * 1000,
                pages_scanned=stats.pages_scanned,
                dirty_pages=stats.dirty_pages,
                pages_sent=stats.pages_sent,
                bytes=stats.bytes_sent,
                bandwidth_bps=stats.bandwidth_bps,
                dirty_rate_pps=stats.dirty_rate_pps,
                decision=f"{decision.action.name.lower()}: {decision.reason}",
            )
            self.events.append(ev)
            self.m.emit(ev)
            if decision.action is Action.FINAL:
                return
            if decision.action is Action.ABORT:
                raise AbortedByPolicy(f"pre-copy will not converge: {decision.reason}")
            index += 1


class Precopy(Rounds):
    """The content tracker's rounds (see the module doc)."""

    #: Only a ``criu`` process may connect to the final dump's filter (unit
    #: tests that play CRIU themselves turn this off).
    only_criu_peers = True

    name = "content"
    final_to_destination = False

    def __init__(self, migration: Migration, policy: ConvergencePolicy) -> None:
        super().__init__(migration, policy)
        self.tracker = ContentTracker()
        #: The source-side page server that filters the frozen dump.
        self._filter: FilterServer | None = None
        self.final_delta_bytes = 0

    async def round(self, index: int) -> RoundStats:
        t0 = time.monotonic()
        since = self._since_last_round(t0)
        c = _RoundCounters()
        queue: asyncio.Queue[tuple[int, list[tuple[int, bytes]]] | None] = asyncio.Queue(QUEUE_DEPTH)
        sent_before = self.m.s.bytes_sent

        async def scanner() -> None:
            try:
                for host_pid in await self.m.runc.pids(self.m.name):
                    try:
                        mem = await asyncio.to_thread(ProcessMemory, host_pid)
                    except (FileNotFoundError, ProcessLookupError):
                        continue  # exited since ps
                    try:
                        regions = await asyncio.to_thread(mem.regions)
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
                                    await queue.put((mem.ns_pid, res.changed))
                    finally:
                        mem.close()
            finally:
                await queue.put(None)

        async def sender() -> None:
            out = await self.m.s.open_stream("pages", {"container": self.m.name, "round": index})
            while (item := await queue.get()) is not None:
                pid, runs = item
                t_send = time.monotonic()
                for vaddr, data in runs:
                    await out.write(pagestream.encode_header(pid, vaddr, len(data) // PAGE))
                    await out.write(data)
                    c.bytes += len(data)
                    self.m.meter_add(len(data))
                c.send_s += time.monotonic() - t_send
            await out.close({"round": index})

        self.m.start_meter("pages", None)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(scanner())
            tg.create_task(sender())
            tg.create_task(self.m.sync_rootfs_now())
        duration = time.monotonic() - t0
        wire = self.m.s.bytes_sent - sent_before
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

    async def prepare_final(self, images_dir: Path) -> None:
        """Listen for CRIU's dump before the freeze (no start-up in the downtime)."""
        self.close()
        self._filter = FilterServer.listen(self.tracker, images_dir, only_criu=self.only_criu_peers)

    async def final_dump(self, dump: DumpFn) -> None:
        """Dump into the filter: changed pages stream to the agent while CRIU runs.

        They go on the "pages" stream as round "final", framed like the
        rounds'. Errors: a failure of ours cuts CRIU off, so its dump fails
        too and ours is the one raised; when CRIU failed first (and left
        without PS_IOV_CLOSE), CRIU's error, with its log, is raised.
        """
        fs = self._filter
        assert fs is not None, "prepare_final() first"
        m = self.m
        out = await m.s.open_stream("pages", {"container": m.name, "round": "final"})
        m.start_meter("pages", None)
        sent = 0

        async def sink(pid: int, vaddr: int, data: bytes) -> None:
            nonlocal sent
            await out.write(pagestream.encode_header(pid, vaddr, len(data) // PAGE))
            await out.write(data)
            sent += len(data)
            m.meter_add(len(data))

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
        await out.close({"round": "final", "bytes": sent})
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
