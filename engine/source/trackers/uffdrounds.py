"""The uffd tracker's rounds: pre-copy without soft-dirty and without a shadow copy.

Each round, per container process: re-read its maps, register every private
readable anonymous VMA with tug's userfaultfd (already registered ones are left as they
are), then ``PAGEMAP_SCAN`` each registered VMA for pages written since the
last scan, write-protecting them again in the same walk, and read and send
those pages (:mod:`.uffdtrack` says why that is exact). A round costs a few
ms per GiB of scan plus the pages it sends; no copy of the memory is kept.

A process is attached the first round it is seen (the userfaultfd is made
inside it by :mod:`.inject`). What the scans do not cover falls back to the
content compare of :class:`~.content.ContentRounds`, per region or per
process, and every round's note says how many pages came from which source:
file-backed private mappings (a binary's .data: a few pages), a process
where injection failed (noted once), VMAs the kernel refused to register, a process that duplicated tug's userfaultfd (kcmp), processes that
exited (forgotten) or appeared (attached).

The frozen dump goes through the same filtering page server as the content
tracker's, but the filter asks :meth:`.uffdtrack.UffdTracker.diff`: a final
scan right after the freeze (no protect, nothing read) is all it needs.

The frozen processes stay registered while CRIU dumps them
(:meth:`.uffdtrack.UffdTracker.freeze` says why that is safe); :meth:`close`
drops the fds, which unregisters a source resumed after a rollback.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator

from tug.engine.procfs import Region, ns_pid
from tug.engine.source.context import DumpFn, SourceContext
from tug.engine.source.psfilter import PageFilter
from tug.engine.source.trackers.content import Chunk, ContentRounds, PageQueue, RoundCounters
from tug.engine.source.trackers.shadow import CHUNK_PAGES, PAGE, ProcessMemory
from tug.engine.source.trackers.uffd import Pagemap, UffdError, inject_userfaultfd
from tug.engine.source.trackers.uffdtrack import Process, Sources, UffdTracker, register_all, start_time
from tug.policies import ConvergencePolicy, RoundStats


class UffdRounds(ContentRounds):
    """Pre-copy rounds with userfaultfd write-protect and PAGEMAP_SCAN (module doc)."""

    name = "uffd"

    def __init__(self, ctx: SourceContext, policy: ConvergencePolicy) -> None:
        super().__init__(ctx, policy)
        self.uffd = UffdTracker(self.tracker)
        #: Host pid -> the process under the tracker.
        self.procs: dict[int, Process] = {}
        #: Host pid (and its start time) -> why it is compared by content instead.
        self.refused: dict[tuple[int, str], str] = {}
        self.sources = Sources()
        self.history_sources: list[Sources] = []
        self._buffers = ReadBuffers(CHUNK_PAGES * PAGE)

    def page_filter(self) -> PageFilter:
        return self.uffd

    async def round(self, index: int) -> RoundStats:
        self.sources = Sources()
        stats = await super().round(index)
        self.history_sources.append(self.sources)
        self.ctx.note(f"round {index} (uffd) of {self.ctx.name}: {self.sources.line()}")
        return stats

    async def _attach(self, pid: int) -> Process | None:
        """The process under the tracker, attaching it on first sight; None: content."""
        try:
            started = await asyncio.to_thread(start_time, pid)
        except (OSError, IndexError):
            return None
        proc = self.procs.get(pid)
        if proc is not None and proc.start_time == started:
            return proc
        if proc is not None:  # the pid was reused: a new process
            self._drop(pid)
        if (pid, started) in self.refused:
            return None
        try:
            uffd = await inject_userfaultfd(pid)
        except (UffdError, OSError, ValueError) as exc:  # ValueError: a garbled report
            self._refuse(pid, started, str(exc))
            return None
        try:
            uffd.api()
            pm = Pagemap(pid)
            nspid = await asyncio.to_thread(ns_pid, pid)
        except (UffdError, OSError) as exc:
            uffd.close()
            self._refuse(pid, started, str(exc))
            return None
        self.uffd.forget_pid(nspid)  # a new process may reuse a pid inside the container
        self.procs[pid] = proc = Process(pid, nspid, started, uffd, pm)
        return proc

    def _refuse(self, pid: int, started: str, why: str) -> None:
        self.refused[(pid, started)] = why
        self.ctx.note(f"uffd tracker: process {pid} compared by content instead: {why}", "warning")

    def _drop(self, pid: int) -> None:
        proc = self.procs.pop(pid, None)
        if proc is not None:
            self.uffd.forget_pid(proc.ns_pid)
            proc.close()

    async def _scan(self, c: RoundCounters, queue: PageQueue) -> None:
        pids = await self.ctx.runc.pids(self.ctx.name)
        for gone in set(self.procs) - set(pids):
            self._drop(gone)  # exited: its fd goes, nothing of it will be dumped
        for host_pid in pids:
            try:
                mem = await asyncio.to_thread(ProcessMemory, host_pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            try:
                proc = await self._attach(host_pid)
                try:
                    regions = await asyncio.to_thread(mem.regions)
                except (FileNotFoundError, ProcessLookupError):
                    continue  # exited meanwhile (the next round drops it)
                holder = await asyncio.to_thread(proc.uffd.leaked, pids) if proc is not None else None
                if proc is not None and holder is not None:
                    why = f"process {holder} of the container holds tug's userfaultfd of process {host_pid}"
                    self.ctx.note(f"uffd tracker: {why}; compared by content", "warning")
                    self.refused[(host_pid, proc.start_time)] = why
                    self._drop(host_pid)
                    proc = None
                if proc is None:
                    self.sources.fallback["process not attached"] += 1
                    await self._content(mem, regions, c, queue)
                    continue
                await self._tracked(proc, mem, regions, c, queue)
            finally:
                mem.close()

    async def _content(self, mem: ProcessMemory, regions: list[Region], c: RoundCounters, queue: PageQueue) -> None:
        scanned, dirty = c.scanned, c.dirty
        await self._compare(mem, regions, c, queue)
        self.sources.content_scanned += c.scanned - scanned
        self.sources.content_changed += c.dirty - dirty

    async def _tracked(self, proc: Process, mem: ProcessMemory, regions: list[Region], c: RoundCounters, queue: PageQueue) -> None:
        def scan() -> tuple[list[tuple[int, int]], list[Region], int]:
            ok, refused = register_all(proc, regions)
            for r, why in refused:
                self.uffd.untracked(proc.ns_pid, r)
                self.sources.fallback[why] += 1
            runs: list[tuple[int, int]] = []
            pages = 0
            for r in ok:
                pages += (r.end - r.start) // PAGE
                runs.extend(self.uffd.note_written(proc, proc.pagemap.written(r.start, r.end)))
            return runs, [r for r, _ in refused], pages

        try:
            runs, refused, pages = await asyncio.to_thread(scan)
        except UffdError as exc:
            # The scan failed: this process is compared by content from now on.
            self.refused[(proc.pid, proc.start_time)] = str(exc)
            self.ctx.note(f"uffd tracker: process {proc.pid} compared by content instead: {exc}", "warning")
            self._drop(proc.pid)
            await self._content(mem, regions, c, queue)
            return
        c.scanned += pages
        for batch in read_batches(runs):
            buf = self._buffers.take()
            got = await asyncio.to_thread(read_runs, mem, batch, buf)
            if not got:
                self._buffers.give(buf)
                continue
            for vaddr, data in got:
                self.uffd.sent(proc.ns_pid, vaddr, data)
                n = len(data) // PAGE
                c.dirty += n
                self.sources.uffd_written += n
            if self._index > 0:  # the hot set, as the content compare records it
                self._rewritten(proc.ns_pid, got)
            await queue.put(Chunk(pid=proc.ns_pid, runs=got, release=functools.partial(self._buffers.give, buf)))
        if refused:
            await self._content(mem, refused, c, queue)

    async def final_dump(self, dump: DumpFn, page_server: str | None) -> None:
        """The final scan (:meth:`freeze_scan`), then the filtered dump."""
        await self.freeze_scan()
        await super().final_dump(dump, page_server)

    async def freeze_scan(self, *, in_window: bool = True) -> None:
        """The final scan (frozen: ms, nothing read): what is held is now exactly
        what the destination has of the frozen memory (hybrid asks :meth:`page_filter`
        the same). ``in_window``: a step of the frozen window, before CRIU
        dumps (timed for the report); hybrid's scan runs once its lazy dump
        holds the processes.

        Only the processes the rounds attached are scanned (no ``runc ps`` in
        the downtime): any other process of the dump has nothing held, so the
        filter compares all of its pages by content (changed, unless the
        content compare recorded them)."""
        t0 = time.monotonic()
        sources = Sources()

        def freeze() -> None:
            for host_pid, proc in list(self.procs.items()):
                try:
                    alive = start_time(host_pid) == proc.start_time
                except (OSError, IndexError):
                    alive = False
                if not alive:
                    self._drop(host_pid)  # exited (or its pid reused): nothing of it is held
                    continue
                try:
                    mem = ProcessMemory(host_pid)
                    try:
                        self.uffd.freeze(proc, mem.regions(), sources)
                    finally:
                        mem.close()
                except (UffdError, OSError) as exc:
                    sources.fallback[f"final scan failed: {exc}"] += 1
                    self._drop(host_pid)

        await asyncio.to_thread(freeze)
        if in_window:
            self.ctx.timings["uffd_final_scan_ms"] = (time.monotonic() - t0) * 1000
        self.ctx.note(f"final uffd scan of {self.ctx.name} in {(time.monotonic() - t0) * 1000:.1f} ms: {sources.line()}")

    def close(self) -> None:
        super().close()
        for pid in list(self.procs):
            self._drop(pid)


def read_batches(runs: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """``runs`` (byte ranges) as (vaddr, npages) pieces, at most CHUNK_PAGES pages a batch.

    A batch is read in one worker-thread hop: a scattered hot set is
    thousands of one-page runs a round, and a hop each was most of a short
    round's time (and of the source's CPU).
    """
    batch: list[tuple[int, int]] = []
    total = 0
    for lo, hi in runs:
        for vaddr in range(lo, hi, CHUNK_PAGES * PAGE):
            npages = min(CHUNK_PAGES, (hi - vaddr) // PAGE)
            if batch and total + npages > CHUNK_PAGES:
                yield batch
                batch, total = [], 0
            batch.append((vaddr, npages))
            total += npages
    if batch:
        yield batch


class ReadBuffers:
    """Buffers the rounds read memory into, used again once the sender wrote them.

    Why: a fresh buffer per 4 MiB read is fresh memory each time (glibc hands
    blocks that large back to the kernel when they are freed), and the kernel
    zeroes every page of it on first touch only for the read to overwrite it:
    in a 1 GiB pre-copy that was ~5% of the source's samples (perf:
    clear_page under the pread of /proc/PID/mem). The round's queue bounds
    the buffers in flight, so the pool never holds more than QUEUE_DEPTH + 2;
    used only from the event loop's thread (the reads fill a buffer taken before).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.size)

    def give(self, buf: bytearray) -> None:
        self._free.append(buf)


def read_runs(mem: ProcessMemory, batch: list[tuple[int, int]], buf: bytearray) -> list[tuple[int, bytes | memoryview]]:
    """The current bytes of each piece (whole pages), read into ``buf`` one after
    the other (a batch is at most CHUNK_PAGES pages); a piece unmapped meanwhile
    is left out (CRIU will not dump it either).

    One ``process_vm_readv`` for the whole batch; from the first piece it did
    not read whole on, each through ``/proc/PID/mem`` (:mod:`.vmread` says why).
    """
    pieces = [(vaddr, npages * PAGE) for vaddr, npages in batch]
    whole = mem.read_vectored(pieces, buf)
    out: list[tuple[int, bytes | memoryview]] = []
    view = memoryview(buf)
    at = 0
    for vaddr, size in pieces:
        if whole >= size:
            whole -= size
            n = size
        else:
            whole = 0
            n = mem.read_into(vaddr, view[at : at + size]) // PAGE * PAGE
        if n:
            out.append((vaddr, view[at : at + n]))
            at += n
    return out
