"""The source's side of a hybrid fill: the frozen memory decides which pages changed.

After pre-copy the destination's page store holds, page for page, what the
tracker recorded as sent (the stream was ordered and lossless): the content
tracker's shadow, or the uffd tracker's held pages, which its final scan at
the freeze made exact. The final dump is CRIU's ``--lazy-pages`` dump: the
processes stay stopped with their memory in place, and nothing is read
inside the downtime. Then this service reads the stopped processes' memory
itself (``/proc/PID/mem``; the processes cannot write it any more) and asks
the tracker's filter which pages the destination lacks (``record=False``:
its record no longer changes):

* on the **fault channel** it answers each GET of the destination, in order,
  with the changed pages' bytes and SAME for the rest of the range;
* on the **sweep channel**, once the destination runs (its first GET), it
  starts with the pages pre-copy saw written again after its first round
  (the hot set: most likely changed, and touched first; swept in whole
  MAX_PAGES blocks around them), then every
  process's dumpable pages from the top down (the destination's lazy-pages
  daemon fills from the bottom up, so the two meet instead of racing),
  skipping pages already answered, and
  pushes the same records unasked, with at most :data:`SWEEP_WINDOW` bytes
  unacknowledged so a fault's answer never queues behind much sweep data.

A page is answered once: the two channels share the set of pages done (a
GET racing the sweep may repeat a page the sweep has in flight; both carry
the same frozen bytes). Everything the requests say (pids, addresses) comes
from the container's images and is checked against the frozen processes'
own mappings: a page outside them gets FAIL, never bytes of anything else.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from tug.engine.errors import MigrationError
from tug.engine.pageset import PageSet
from tug.engine.procfs import SPECIAL, Region, parse_maps
from tug.engine.source.psfilter import PageFilter
from tug.engine.source.trackers.shadow import PAGE, ProcessMemory
from tug.transports import hybrid_wire as w

#: Sweep bytes sent and not yet acknowledged, at most (8 ms at 1 gbit).
SWEEP_WINDOW = 1 << 20
#: Pages around a fault (its aligned block) the sweep visits next.
FAULT_AHEAD = 16


class NotFrozen(MigrationError):
    """The source's processes are no longer held stopped: their memory is no longer the truth."""


def _private_regions(mem: ProcessMemory) -> list[Region]:
    """Private mappings whose pages CRIU may leave lazy: readable or not (CRIU dumps a
    PROT_NONE mapping's pages too, and /proc/PID/mem reads them as root)."""
    return [r for r in parse_maps(Path(f"/proc/{mem.pid}/maps").read_text()) if r.private and r.path not in SPECIAL]


class FrozenMemory:
    """Read access to the frozen container's processes, keyed by namespace pid.

    ``still_frozen`` is asked after every read: true then means the
    processes were stopped during the read too (nothing lets them go and
    stops them again), so the bytes read are the frozen ones. If CRIU died
    and let them run, :class:`NotFrozen` is raised instead of serving them.
    """

    def __init__(self, procs: list[ProcessMemory], still_frozen: Callable[[], bool] = lambda: True) -> None:
        self.procs = {m.ns_pid: m for m in procs}
        self.regions: dict[int, list[Region]] = {pid: _private_regions(m) for pid, m in self.procs.items()}
        self.still_frozen = still_frozen

    @classmethod
    def open(cls, host_pids: list[int], still_frozen: Callable[[], bool]) -> FrozenMemory:
        procs = []
        for pid in host_pids:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                procs.append(ProcessMemory(pid))
        return cls(procs, still_frozen)

    def close(self) -> None:
        for m in self.procs.values():
            m.close()
        self.procs.clear()

    def covered(self, pid: int, vaddr: int, npages: int) -> bool:
        """Do candidate mappings of ``pid`` cover the range without a gap?"""
        at, end = vaddr, vaddr + npages * PAGE
        for r in self.regions.get(pid, ()):
            if r.start <= at < r.end:
                at = r.end
                if at >= end:
                    return True
        return False

    def read(self, pid: int, vaddr: int, npages: int, *, check: bool = True) -> bytes | None:
        """The pages' frozen bytes, or None if ``pid`` has no such pages.

        ``check=False`` leaves :meth:`check_frozen` to the caller, once after
        a batch of reads (a check reads /proc: one per page run was a good
        part of the sweep's CPU when the changed pages are scattered).
        """
        if not self.covered(pid, vaddr, npages):
            return None
        data = self.procs[pid].read(vaddr, npages)
        if check:
            self.check_frozen()
        return data if len(data) == npages * PAGE else None

    def check_frozen(self) -> None:
        """Raise :class:`NotFrozen` unless the processes are still held (then what
        was read, or judged unchanged without a read, is the frozen content)."""
        if not self.still_frozen():
            raise NotFrozen("the source's processes are no longer held stopped (its CRIU ended): nothing more is served")

    def present(self, pid: int, vaddr: int, npages: int) -> list[tuple[int, int, int]]:
        """(pid, vaddr, npages) runs of dumpable pages in the range (none if unknown or unmapped)."""
        mem = self.procs.get(pid)
        if mem is None or not self.covered(pid, vaddr, npages):
            return []
        try:
            return [(pid, v, n) for v, n in mem.present(vaddr, npages)]
        except OSError:
            return []

    def sweep_runs(self, pid: int) -> list[tuple[int, int]]:
        """The dumpable page runs of ``pid`` (chunks of at most MAX_PAGES), top down."""
        mem = self.procs[pid]
        runs: list[tuple[int, int]] = []
        for region in self.regions[pid]:
            with contextlib.suppress(OSError):
                runs.extend(mem.runs(region))
        return sorted(runs, reverse=True)


#: Sweeps one range of one process into records (blocking).
Chunk = Callable[[int, int, int], list[w.Pages | w.Same]]


@dataclass(slots=True)
class ServeStats:
    gets: int = 0
    fault_gets: int = 0
    pages_sent: int = 0
    pages_same: int = 0
    pages_failed: int = 0
    bytes_sent: int = 0
    sweep_pages_sent: int = 0
    sweep_pages_same: int = 0
    #: Seconds from the sweep's start (the first GET) to its end.
    sweep_done_s: float | None = None
    #: Seconds from a GET's arrival to its answer handed to the transport.
    serve_s: list[float] = field(default_factory=list)


class FrozenServer:
    def __init__(
        self, memory: FrozenMemory, tracker: PageFilter, on_end: Callable[[], Awaitable[bool]] | None = None
    ) -> None:
        self.memory = memory
        self.tracker = tracker
        #: Ends the lazy dump when the destination says END (True: as CRIU supports).
        self.on_end = on_end
        #: Whether END was answered (the dump ended, well or not).
        self.ended: bool | None = None
        self.stats = ServeStats()
        #: Pages already answered on either channel.
        self._done = PageSet()
        self._t0 = time.monotonic()
        #: Blocks around recent faults: the sweep visits them before its next chunk.
        self._urgent: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=256)
        #: pid -> pages the sweep visits first (the tracker's hot set).
        self.hot: dict[int, set[int]] = {}
        #: Set by the first GET: the destination's processes run (its daemon
        #: asks only after the restore); the sweep's cold part waits for it.
        self.running = asyncio.Event()
        #: Told how many pages each batch of answers settled (the fill's progress).
        self.on_progress: Callable[[int], None] | None = None

    def answer(self, get: w.Get) -> list[w.Pages | w.Same | w.Fail]:
        """The records that answer ``get`` (blocking: reads and compares memory)."""
        changed = self._changed(get.pid, get.vaddr, get.nr_pages)
        if changed is None:
            self.stats.pages_failed += get.nr_pages
            return [w.Fail(get.pid, get.vaddr, get.nr_pages)]
        return list(self._records(get.pid, get.vaddr, get.nr_pages, changed))

    def _changed(self, pid: int, vaddr: int, npages: int) -> list[tuple[int, bytes]] | None:
        """The range's changed runs with their frozen bytes (None: ``pid`` has no
        such pages). Only what the filter cannot vouch for is read: with the
        uffd tracker, the pages written since they were sent."""
        if not self.memory.covered(pid, vaddr, npages):
            return None
        changed: list[tuple[int, bytes]] = []
        for lo, hi in self.tracker.needs_data(pid, vaddr, npages):
            data = self.memory.read(pid, lo, (hi - lo) // PAGE, check=False)
            if data is None:
                return None
            changed.extend(self.tracker.diff(pid, lo, data, record=False).changed)
        self.memory.check_frozen()  # after the reads: what they read was frozen
        return changed

    def _records(self, pid: int, vaddr: int, npages: int, changed: list[tuple[int, bytes]]) -> list[w.Pages | w.Same]:
        recs = w.cover(pid, vaddr, npages, changed)
        self._done.add(pid, vaddr, vaddr + npages * PAGE)
        return recs

    def hot_blocks(self, pid: int) -> list[tuple[int, int]]:
        """The MAX_PAGES-aligned blocks (clipped to the mappings) holding a hot page, ascending.

        Whole blocks, not the hot pages' own runs: a hot set written at
        random is hundreds of short runs, and each run swept alone (a worker
        thread hop, a check that CRIU holds the processes) made the first
        confirmations arrive later than the faults that wanted them.
        """
        hot = self.hot.get(pid, set())
        blocks = sorted({p // w.MAX_PAGES for p in hot})
        out: list[tuple[int, int]] = []
        for r in self.memory.regions.get(pid, ()):
            lo_blk, hi_blk = r.start // PAGE // w.MAX_PAGES, (r.end // PAGE - 1) // w.MAX_PAGES
            for b in blocks[bisect.bisect_left(blocks, lo_blk) : bisect.bisect_right(blocks, hi_blk)]:
                lo = max(r.start, b * w.MAX_PAGES * PAGE)
                hi = min(r.end, (b + 1) * w.MAX_PAGES * PAGE)
                out.append((lo, (hi - lo) // PAGE))
        return sorted(out)

    def _present_chunk(self, pid: int, vaddr: int, npages: int) -> list[w.Pages | w.Same]:
        """The records for the not yet answered dumpable pages of a block (blocking)."""
        out: list[w.Pages | w.Same] = []
        for _, v, n in self.memory.present(pid, vaddr, npages):
            out.extend(self._sweep_chunk(pid, v, n))
        return out

    def _sweep_chunk(self, pid: int, vaddr: int, npages: int) -> list[w.Pages | w.Same]:
        """The records for the not yet answered pages of one chunk (blocking)."""
        out: list[w.Pages | w.Same] = []
        at, end = vaddr, vaddr + npages * PAGE
        while at < end:
            at += self._done.leading(pid, at, end, held=True) * PAGE
            n = self._done.leading(pid, at, end, held=False)
            if n == 0:
                break
            changed = self._changed(pid, at, n)
            if changed is not None:  # a run CRIU did not dump either (the mapping's pagemap said so)
                out.extend(self._records(pid, at, n, changed))
            at += n * PAGE
        return out

    async def serve_faults(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer GETs in order until the destination closes the channel."""
        parser = w.Parser.at_source()
        while data := await reader.read(1 << 16):
            for rec in parser.feed(data):
                if isinstance(rec, w.End):
                    await writer.drain()
                    self.ended = await self.on_end() if self.on_end is not None else True
                    writer.write(w.encode(w.Ended(self.ended)))
                    continue
                if not isinstance(rec, w.Get):
                    raise w.HybridWireError("an ACK on the fault channel")
                t = time.monotonic()
                self.running.set()
                recs = await asyncio.to_thread(self.answer, rec)
                self._count(recs, sweep=False)
                self.stats.gets += 1
                if rec.nr_pages == 1:
                    self.stats.fault_gets += 1
                    # A fault is where the process works now: its neighbours
                    # go next on the sweep (QEMU's postcopy moves its
                    # background stream to the faulted page the same way).
                    block = rec.vaddr // PAGE // FAULT_AHEAD * FAULT_AHEAD
                    self._urgent.append((rec.pid, block * PAGE, FAULT_AHEAD))
                writer.write(b"".join(w.encode(r) for r in recs))
                self.stats.serve_s.append(time.monotonic() - t)
            await writer.drain()

    async def sweep(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Push every page's verdict, top down, within the ack window; then DONE."""
        unacked = 0
        acked = asyncio.Event()
        parser = w.Parser.at_source()

        async def acks() -> None:
            nonlocal unacked
            while data := await reader.read(1 << 12):
                for rec in parser.feed(data):
                    if not isinstance(rec, w.Ack) or rec.bytes > unacked:
                        raise w.HybridWireError("the sweep channel carries only ACKs for what was sent")
                    unacked -= rec.bytes
                    acked.set()

        async def push(pid: int, runs: list[tuple[int, int]]) -> None:
            for vaddr, npages in runs:
                while self._urgent:  # around the latest faults first
                    near = await asyncio.to_thread(self.memory.present, *self._urgent.popleft())
                    for run in near:
                        await push_one(*run)
                await push_one(pid, vaddr, npages)

        async def push_one(pid: int, vaddr: int, npages: int, chunk: Chunk | None = None) -> None:
            nonlocal unacked
            recs = await asyncio.to_thread(chunk or self._sweep_chunk, pid, vaddr, npages)
            if not recs:
                return
            self._count(recs, sweep=True)
            out = b"".join(w.encode(r) for r in recs)
            while unacked > 0 and unacked + len(out) > SWEEP_WINDOW:
                if ack_task.done():
                    ack_task.result()
                    raise w.HybridWireError("the destination closed the sweep channel early")
                acked.clear()
                await acked.wait()
            unacked += len(out)
            writer.write(out)
            await writer.drain()

        ack_task = asyncio.create_task(acks(), name="tug-hybrid-sweep-acks")
        try:
            # Only once the destination runs: measured on the lab's shared
            # CPU, sweeping during the transfer and the restore made the
            # downtime longer than the faults it saved.
            await self.running.wait()
            self._t0 = time.monotonic()
            for pid in sorted(self.memory.procs):
                for vaddr, npages in await asyncio.to_thread(self.hot_blocks, pid):
                    await push_one(pid, vaddr, npages, self._present_chunk)
            for pid in sorted(self.memory.procs):
                await push(pid, await asyncio.to_thread(self.memory.sweep_runs, pid))
            done = w.encode(w.Done())
            unacked += len(done)  # the destination acknowledges every byte it consumed
            writer.write(done)
            await writer.drain()
            self.stats.sweep_done_s = time.monotonic() - self._t0
            await ack_task  # until the destination closes
        finally:
            ack_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ack_task

    def _count(self, recs: list[w.Pages | w.Same] | list[w.Pages | w.Same | w.Fail], *, sweep: bool) -> None:
        if self.on_progress is not None:
            self.on_progress(sum(r.nr_pages for r in recs if not isinstance(r, w.Fail)))
        for r in recs:
            if isinstance(r, w.Pages):
                self.stats.pages_sent += r.nr_pages
                self.stats.bytes_sent += len(r.data)
                self.stats.sweep_pages_sent += r.nr_pages if sweep else 0
            elif isinstance(r, w.Same):
                self.stats.pages_same += r.nr_pages
                self.stats.sweep_pages_same += r.nr_pages if sweep else 0
