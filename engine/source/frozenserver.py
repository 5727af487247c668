"""The source's side of a hybrid fill and of pre-copy's pushed eager step: the frozen memory decides which pages changed.

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
  unacknowledged so a fault's answer never queues behind much sweep data;
* pre-copy's eager step has neither: before the restore, :meth:`FrozenServer.push`
  sends the same records for every page the lazy dump left in the processes
  on a channel of its own, within :data:`PUSH_WINDOW`, and returns once the
  destination acknowledged all of it (strategies/pushed.py).

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

from tug.engine.pageset import PageSet
from tug.engine.source.frozenmemory import FrozenMemory
from tug.engine.source.psfilter import PageFilter
from tug.engine.source.trackers.shadow import PAGE
from tug.transports import hybrid_wire as w

#: Sweep bytes sent and not yet acknowledged, at most (8 ms at 1 gbit).
SWEEP_WINDOW = 1 << 20
#: Pre-copy's eager step: bytes pushed and not yet acknowledged, at most
#: (nothing else uses the link then: only the round trips are to hide).
PUSH_WINDOW = 4 << 20
#: Chunks (of at most MAX_PAGES) read and encoded per worker-thread hop by
#: the eager step's push, and the page data one hop gathers at most (about):
#: a hot set's changed pages are held three times over until written.
PUSH_BATCH = 64
PUSH_BYTES = 1 << 20
#: Pages around a fault (its aligned block) the sweep visits next.
FAULT_AHEAD = 16


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
        async with _Acked(reader, writer, SWEEP_WINDOW) as out:

            async def push(pid: int, runs: list[tuple[int, int]]) -> None:
                for vaddr, npages in runs:
                    while self._urgent:  # around the latest faults first
                        near = await asyncio.to_thread(self.memory.present, *self._urgent.popleft())
                        for run in near:
                            await push_one(*run)
                    await push_one(pid, vaddr, npages)

            async def push_one(pid: int, vaddr: int, npages: int, chunk: Chunk | None = None) -> None:
                recs = await asyncio.to_thread(chunk or self._sweep_chunk, pid, vaddr, npages)
                if recs:
                    self._count(recs, sweep=True)
                    await out.send(b"".join(w.encode(r) for r in recs))

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
            await out.send(w.encode(w.Done()))
            self.stats.sweep_done_s = time.monotonic() - self._t0
            await out.closed()  # until the destination closes

    async def push(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, runs: list[tuple[int, int, int]]) -> None:
        """Pre-copy's eager step: the verdict of every page of ``runs`` (pid, vaddr, pages),
        then DONE; returns once the destination has acknowledged all of it (applied
        it to its store), so that the restore may follow."""
        self._t0 = time.monotonic()
        chunks = [
            (pid, vaddr + at * PAGE, min(w.MAX_PAGES, npages - at)) for pid, vaddr, npages in runs
            for at in range(0, npages, w.MAX_PAGES)
        ]
        async with _Acked(reader, writer, PUSH_WINDOW) as out:
            done = 0
            while done < len(chunks):
                recs, used = await asyncio.to_thread(self._push_batch, chunks[done : done + PUSH_BATCH])
                done += used
                self._count(recs, sweep=True)
                await out.send(b"".join(w.encode(r) for r in recs))
            await out.send(w.encode(w.Done()))
            await out.drained()
        self.stats.sweep_done_s = time.monotonic() - self._t0

    def _push_batch(self, chunks: list[tuple[int, int, int]]) -> tuple[list[w.Pages | w.Same], int]:
        """The records of the first chunks, up to about PUSH_BYTES of page data; how many chunks (blocking).

        A chunk the frozen processes do not map is left out: the destination
        then lacks its verdict and refuses the restore (pagestore.py).
        """
        out: list[w.Pages | w.Same] = []
        size = 0
        for used, (pid, vaddr, npages) in enumerate(chunks, 1):
            recs = self._sweep_chunk(pid, vaddr, npages)
            out.extend(recs)
            size += sum(len(r.data) for r in recs if isinstance(r, w.Pages))
            if size >= PUSH_BYTES:
                return out, used
        return out, len(chunks)

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


class _Acked:
    """Bytes sent on a channel whose peer acknowledges what it consumed (ACK records),
    with at most ``window`` bytes unacknowledged."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int) -> None:
        self.reader, self.writer, self.window = reader, writer, window
        self.unacked = 0
        self._acked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Acked:
        self._task = asyncio.create_task(self._acks(), name="tug-frozen-acks")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def _acks(self) -> None:
        parser = w.Parser.at_source()
        try:
            while data := await self.reader.read(1 << 12):
                for rec in parser.feed(data):
                    if not isinstance(rec, w.Ack) or rec.bytes > self.unacked:
                        raise w.HybridWireError("the channel carries only ACKs for what was sent")
                    self.unacked -= rec.bytes
                    self._acked.set()
        finally:
            self._acked.set()  # a sender waiting for an ack learns that none will come

    async def _wait_ack(self) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()
            raise w.HybridWireError("the destination closed the channel early")
        self._acked.clear()
        await self._acked.wait()

    async def send(self, data: bytes) -> None:
        while self.unacked > 0 and self.unacked + len(data) > self.window:
            await self._wait_ack()
        self.unacked += len(data)
        self.writer.write(data)
        await self.writer.drain()

    async def drained(self) -> None:
        """Until every byte sent is acknowledged."""
        while self.unacked > 0:
            await self._wait_ack()

    async def closed(self) -> None:
        """Until the peer closes the channel (its acks end)."""
        assert self._task is not None
        await self._task
