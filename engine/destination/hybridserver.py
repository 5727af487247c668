"""The agent's page server for a hybrid fill: the page store where the source vouches for it.

The store holds what pre-copy sent; the frozen source (its frozen-memory
service, ``engine/source/frozenserver.py``) alone knows which of those pages
changed before the freeze. So a page is served from the store only once the
source has *confirmed* it: SAME (the stored copy is the frozen content) or
PAGES (the frozen bytes, written into the store first). Two connections to
the source, each through its own reverse forward over tug's SSH link
(``transports/hybrid_wire.py``):

* the sweep channel brings verdicts unasked, top down, and gets ACKs back;
* the fault channel carries GETs for what the lazy-pages daemon asks before
  the sweep got there: one page for a fault, at most :data:`BACKGROUND_FETCH`
  pages for a background request (the daemon answers strictly in order, so a
  fault queued behind a background request waits for its answer: it must
  stay small).

The daemon's request is then answered from the store, up to the first page
not confirmed (CRIU accepts fewer pages than it asked for). A page the
source says it lacks (FAIL) or the store lacks after a confirmation ends
serving with an error: the daemon fails, the guard freezes the copy, never
a wrong page.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import time
from typing import Any

from tug.engine.destination.lazypages import latency_summary
from tug.engine.destination.pagestore import PAGE, PageStore
from tug.engine.destination.storeserver import StorePageServer
from tug.engine.destination.verdicts import ADMIT_WAIT_S, Verdicts
from tug.engine.errors import MigrationError, TransportError
from tug.transports import hybrid_wire as w
from tug.transports.criu_lazy import Get, Goodbye, LazyRequests, goodbye_answer
from tug.transports.forward import LOOPBACK

#: Pages one background request may fetch from the source (256 KiB: ~2 ms at 1 gbit).
BACKGROUND_FETCH = 64


class HybridPageServer(StorePageServer):
    def __init__(self, store: PageStore, container: str, fault_port: int, sweep_port: int) -> None:
        super().__init__(store, container)
        self.source_ports = (fault_port, sweep_port)
        #: Local ends of the agent's relays to those ports (relay.py), if set before start.
        self.relayed: tuple[socket.socket, socket.socket] | None = None
        #: Local ports of our two connections to the source's forwards (admission).
        self.own_ports: set[int] = set()
        self._own_known = asyncio.Event()
        #: What the source said about each page (confirmed, fetched).
        self.verdicts = Verdicts(store)
        self.confirmed = self.verdicts.confirmed
        self.fetched = self.verdicts.fetched
        #: The source ended its lazy dump (END answered): the fill is complete on both sides.
        self.source_ended = False
        self._ending = False
        self.store_pages = 0
        self.source_pages = 0
        self.remote_faults = 0
        self.fetches = 0
        self._fault_latency: list[float] = []
        self._answers = w.Answers()
        self._waiting: collections.deque[asyncio.Future[w.Answer | w.Ended]] = collections.deque()
        self._fault_writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._source_error: str | None = None

    async def start(self) -> int:
        """Connect both channels to the source, then listen for the daemon."""
        try:
            if self.relayed is not None:  # the agent's relays hold the channels across a lost link
                fault = await asyncio.open_connection(sock=self.relayed[0])
                sweep = await asyncio.open_connection(sock=self.relayed[1])
            else:
                fault = await asyncio.open_connection(LOOPBACK, self.source_ports[0])
                sweep = await asyncio.open_connection(LOOPBACK, self.source_ports[1])
        except OSError as exc:
            raise TransportError(f"cannot reach the source's frozen memory through its forwards: {exc}") from None
        for _, writer in (fault, sweep):
            self._writers.append(writer)
            if self.relayed is None:  # a relay's socket pair has no port (relay.py vets its own)
                self.own_ports.add(int(writer.get_extra_info("sockname")[1]))
        self._own_known.set()
        self._fault_writer = fault[1]
        self._tasks = [
            asyncio.create_task(self._read_faults(fault[0]), name="tug-hybrid-faults"),
            asyncio.create_task(self._read_sweep(sweep[0], sweep[1]), name="tug-hybrid-sweep"),
        ]
        return await super().start()

    async def is_own(self, peer_port: int) -> bool:
        """Is ``peer_port`` one of our connections to the source (a forward's admission)?"""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ADMIT_WAIT_S):
                await self._own_known.wait()
        return peer_port in self.own_ports

    # ---- what the source says --------------------------------------------------

    @property
    def sweep_done(self) -> bool:
        return self.verdicts.done

    @property
    def source_bytes(self) -> int:
        return self.verdicts.source_bytes

    async def _read_sweep(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.verdicts.read_sweep(reader, writer)
        except (MigrationError, OSError) as exc:
            if not self._ending:
                self._source_failed(f"sweep channel: {exc}")
            return
        if not self.sweep_done and not self._ending:
            self._source_failed("the source closed the sweep channel before it was done")

    async def _read_faults(self, reader: asyncio.StreamReader) -> None:
        parser = w.Parser.at_destination()
        try:
            while data := await reader.read(1 << 18):
                for rec in parser.feed(data):
                    answer = self._answers.take(rec)
                    self.verdicts.apply(rec)
                    if answer is not None:
                        fut = self._waiting.popleft()
                        if not fut.done():
                            fut.set_result(answer)
        except (MigrationError, OSError) as exc:
            self._source_failed(f"fault channel: {exc}")
            return
        self._source_failed("the source closed the fault channel")

    def _source_failed(self, why: str) -> None:
        """The source is gone before the daemon said goodbye: the fill fails, whatever the store holds.

        Its lazy dump may still hold the source's processes, and only the
        source can end it: a destination that went on running would be a
        second copy next to one that ``tug recover`` must still settle. So the
        daemon's connection is cut (it fails, and the guard freezes this copy).
        """
        if self._source_error is None:
            self._source_error = why
            self.error = self.error or f"the frozen source was lost mid-fill: {why}"
            if self._session is not None and not self._session.done():
                self._session.cancel()
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(MigrationError(f"the frozen source stopped answering: {why}"))

    async def _ask(self, req: w.Get | w.End) -> w.Answer | w.Ended:
        if self._source_error is not None:
            raise MigrationError(f"the frozen source stopped answering: {self._source_error}")
        assert self._fault_writer is not None
        fut: asyncio.Future[w.Answer | w.Ended] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self._fault_writer.write(self._answers.ask(req))
        return await fut

    async def _fetch(self, get: w.Get) -> None:
        self.fetches += 1
        await self._ask(get)

    async def _before_goodbye(self) -> None:
        """Every page is here: the source ends its dump first (module doc of hybrid_wire)."""
        self._ending = True  # the daemon has every page: the source may stop its sweep now
        ended = await self._ask(w.End())
        if not isinstance(ended, w.Ended) or not ended.ok:
            raise MigrationError("the source's lazy dump did not end cleanly after the fill")
        self.source_ended = True

    # ---- what the daemon asks ------------------------------------------------------

    def _prefix(self, pid: int, first: int, n: int, confirmed: bool) -> int:
        """How many pages from ``first`` are (or, with ``confirmed`` False, are not) confirmed."""
        return self.confirmed.leading(pid, first * PAGE, (first + n) * PAGE, held=confirmed)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests are answered strictly in order, but fetched from the source concurrently.

        A thread's fault must not wait for the source round trips of the
        faults queued before it: every request starts as it arrives, and the
        answers are written in request order as they complete.
        """
        parser = LazyRequests()
        answers: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue()
        queued = 0  # answers in the queue, not yet written

        async def write_in_order() -> None:
            nonlocal queued
            try:
                while (task := await answers.get()) is not None:
                    writer.write(await task)
                    queued -= 1
                    if answers.empty():
                        await writer.drain()
            except BaseException:
                writer.transport.abort()  # the daemon must not wait for an answer that never comes
                raise

        out = asyncio.create_task(write_in_order(), name="tug-hybrid-answers")
        pending: set[asyncio.Task[bytes]] = set()
        try:
            while data := await reader.read(1 << 16):
                for ev in parser.feed(data):
                    if isinstance(ev, Goodbye):
                        await answers.put(None)
                        await out
                        await writer.drain()
                        await self._before_goodbye()
                        writer.write(goodbye_answer())
                        await writer.drain()
                        return
                    if queued == 0 and (now := self._answer_confirmed(ev)) is not None:
                        # Nothing ahead of it and the store vouched for: the
                        # answer goes out at once (a fault's usual case, and
                        # a task per request was most of its cost).
                        writer.write(now)
                        continue
                    task = asyncio.create_task(self._reply(ev), name="tug-hybrid-reply")
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    queued += 1
                    await answers.put(task)
                if out.done():
                    await out  # raises what failed
            await answers.put(None)
            await out
        finally:
            out.cancel()
            for task in pending:
                task.cancel()
            await asyncio.gather(out, *pending, return_exceptions=True)

    def _ready(self, get: Get) -> int:
        """How many of the pages ``get`` asks for, from its first, the store may answer now."""
        return self._prefix(get.pid, get.vaddr // PAGE, min(get.nr_pages, w.MAX_PAGES), True)

    def _answer_confirmed(self, get: Get) -> bytes | None:
        """The answer from the store alone, or None when it needs the source first."""
        if self._source_error is not None:
            return None  # _reply raises it, in order
        ready = self._ready(get)
        return self._from_store(get, ready) if ready else None

    async def _reply(self, get: Get) -> bytes:
        if self._source_error is not None:
            raise MigrationError(f"the frozen source was lost mid-fill: {self._source_error}")
        ready = self._ready(get)
        if ready == 0:
            fault = get.nr_pages == 1
            ahead = 1 if fault else min(get.nr_pages, w.MAX_PAGES, BACKGROUND_FETCH)
            want = self._prefix(get.pid, get.vaddr // PAGE, ahead, False)
            t0 = time.monotonic()
            await self._fetch(w.Get(get.pid, get.vaddr, want))
            if fault:
                self.remote_faults += 1
                self._fault_latency.append(time.monotonic() - t0)
            ready = self._ready(get)
            if ready == 0:
                raise MigrationError(f"the source confirmed no page at {get.vaddr:#x} of pid {get.pid}")
        return self._from_store(get, ready)

    def _from_store(self, get: Get, ready: int) -> bytes:
        """The first ``ready`` pages of ``get`` (all confirmed), counted by where their bytes came from."""
        before = self.pages
        answer = self._answer(Get(ready, get.vaddr, get.pid, get.dst_id))
        count = self.pages - before
        came = self.fetched.count(get.pid, get.vaddr, get.vaddr + count * PAGE)
        self.source_pages += came
        self.store_pages += count - came
        return answer

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out.update({
            "store_pages": self.store_pages, "source_pages": self.source_pages, "remote_faults": self.remote_faults,
            "source_fetches": self.fetches, "source_bytes": self.source_bytes, "sweep_done": self.sweep_done,
            "source_ended": self.source_ended,
        })  # fmt: skip
        if self._fault_latency:
            out["source_fault_latency_ms"] = latency_summary(self._fault_latency)
        return out

    async def close(self) -> None:
        await super().close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for writer in self._writers:
            writer.close()
        self._tasks, self._writers = [], []
