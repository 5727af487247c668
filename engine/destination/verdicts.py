"""What the frozen source says about each page, applied to the page store as it arrives.

After pre-copy the page store holds what the rounds sent; only the frozen
source knows which of those pages changed before the freeze. Its verdicts
(``transports/hybrid_wire.py``: PAGES with the frozen bytes, SAME for the
store's copy, FAIL for no such page) make a page *confirmed*: from then on the
store's copy is the frozen content. Both final steps that leave the memory in
the frozen processes read them:

- hybrid (:mod:`.hybridserver`): the lazy-pages daemon is served a page
  only once it is confirmed;
- pre-copy's eager step (:class:`PushedMemory`): the source pushes the
  verdict of every page its lazy dump left in the processes before the
  restore, and the restore refuses to run unless every such page is
  confirmed (``PageStore.rebuild``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tug.engine.destination.pagestore import PAGE, PageStore
from tug.engine.errors import MigrationError, TransportError
from tug.engine.pageset import PageSet
from tug.transports import hybrid_wire as w
from tug.transports.forward import LOOPBACK

log = logging.getLogger("tug.agent")

#: How long a forward's admission may wait for our own connection to be known.
ADMIT_WAIT_S = 5.0


class Verdicts:
    def __init__(self, store: PageStore) -> None:
        self.store = store
        #: Pages whose stored copy is the frozen content.
        self.confirmed = PageSet()
        #: Pages whose bytes came from the source after the freeze.
        self.fetched = PageSet()
        self.source_bytes = 0
        #: The source said DONE on its sweep channel: every verdict it meant to send came before.
        self.done = False

    @property
    def fetched_pages(self) -> int:
        return self.source_bytes // PAGE

    def apply(self, rec: w.Record) -> None:
        if isinstance(rec, w.Fail):
            raise MigrationError(f"the source has no page {rec.vaddr:#x} (+{rec.nr_pages}) of pid {rec.pid}")
        if not isinstance(rec, (w.Pages, w.Same)):
            return
        end = rec.vaddr + rec.nr_pages * PAGE
        if isinstance(rec, w.Pages):
            self.store.write(rec.pid, rec.vaddr, rec.data)
            self.fetched.add(rec.pid, rec.vaddr, end)
            self.source_bytes += len(rec.data)
        self.confirmed.add(rec.pid, rec.vaddr, end)

    async def read_sweep(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Apply a sweep channel's records until the source closes it; each read is
        acknowledged once applied, so an acknowledged byte is in the store."""
        parser = w.Parser.at_destination()
        while data := await reader.read(1 << 18):
            for rec in parser.feed(data):
                if isinstance(rec, w.Done):
                    self.done = True
                self.apply(rec)
            writer.write(w.encode(w.Ack(len(data))))


class PushedMemory:
    """Pre-copy's eager final step: the source's one channel, pushing every verdict before the restore.

    The source waits until every byte it pushed (DONE last) is acknowledged,
    ends its lazy dump and only then asks for the restore: by then
    :attr:`verdicts` is complete, or the restore is refused.
    """

    def __init__(self, store: PageStore, container: str, port: int) -> None:
        self.container = container
        self.port = port
        self.verdicts = Verdicts(store)
        #: Local port of our connection to the source's forward (its admission asks).
        self.own_port: int | None = None
        self.error: str | None = None
        self._own_known = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        try:
            reader, self._writer = await asyncio.open_connection(LOOPBACK, self.port)
        except OSError as exc:
            raise TransportError(f"cannot reach the source's pushed memory through its forward: {exc}") from None
        self.own_port = int(self._writer.get_extra_info("sockname")[1])
        self._own_known.set()
        self._task = asyncio.create_task(self._read(reader, self._writer), name="tug-pushed-memory")

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.verdicts.read_sweep(reader, writer)
        except (MigrationError, OSError) as exc:
            self.error = str(exc)
            log.error("pushed memory of %s: %s", self.container, exc)

    async def is_own(self, peer_port: int) -> bool:
        """Is ``peer_port`` our connection to the source (a forward's admission)?"""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ADMIT_WAIT_S):
                await self._own_known.wait()
        return peer_port == self.own_port

    def complete(self) -> Verdicts:
        """The verdicts, every one of them in (raises MigrationError otherwise)."""
        if self.error is not None:
            raise MigrationError(f"the source's pushed memory broke: {self.error}")
        if not self.verdicts.done:
            raise MigrationError("the source's pushed memory has not arrived whole: no restore from it")
        return self.verdicts

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
