"""The content tracker's frozen dump, filtered while CRIU sends it.

Why: pre-copy with the content tracker ends with a full CRIU dump of the
frozen container, of which usually only a few pages differ from what the
destination already holds. Writing that dump to tmpfs and reading it back
costs the whole container's memory twice over, inside the downtime (~3.3 s
and 2 GiB of tmpfs for a 1 GiB container). Instead the source runs this
server, CRIU's dump is pointed at it (``--page-server 127.0.0.1:PORT``), and
each page is compared with the tracker's shadow the moment it arrives: only
changed runs go on, to the destination's page store, exactly as the pre-copy
rounds send theirs (``pagestream`` framing on a "pages" stream).

What ends up in the local images dir is what CRIU's own ``criu page-server``
would have written there, minus the process pages files: one
``pagemap-<pid>.img`` per process with every entry CRIU sent (the destination
rebuilds its ``pages-<id>.img`` from its page store), and shared memory
(``pagemap-shmem-<id>.img`` plus its pages file) written whole, since the
tracker does not follow shared memory. Pages ids are allocated as CRIU's page
server does (from 0x10001, in order of opening: ``up_page_ids_base`` in
criu/image.c), so they cannot collide with anything else in the dir.

Flow and backpressure: a reader task receives from CRIU (payloads straight
into the protocol parser's buffer), diffs, and puts changed runs on a bounded
queue; a sender task hands them to the sink (the session stream). A slow link
fills the queue, the reader stops reading, TCP stops CRIU: the container's
memory is never buffered here, only up to QUEUE_DEPTH entries of changed runs.

CRIU corks its socket and never pushes its last request (see ``uncork``):
once CRIU has sent something, its socket is uncorked from here, which saves
~200 ms per dump.

Failure: any error here (a malformed stream, a failed sink, a local write)
ends ``serve()`` and closes CRIU's connection, so CRIU's dump fails at its
next write and returns; a CRIU that goes away before ``PS_IOV_CLOSE`` ends
``serve()`` with :attr:`FilterServer.disconnected` set, which tells the
caller that CRIU's own error is the one to report. The caller never kills
CRIU mid-dump (its parasite code would be left inside the container).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tug.engine.criu import images
from tug.engine.criu.uncork import peer_is_criu, uncork_peer
from tug.engine.errors import MigrationError
from tug.engine.source.trackers.shadow import ScanResult
from tug.transports import criu_pageserver as ps
from tug.transports.forward import LOOPBACK

#: Entries with changed runs queued between the reader and the sender. CRIU's
#: entries are at most a pipe buffer (4 MiB), so this bounds what waits for
#: the link to ~32 MiB of changed pages (a 64 MiB entry is possible but odd).
QUEUE_DEPTH = 8
#: recv() size while headers (and small entries) are expected.
SCRATCH_BYTES = 256 << 10
#: A payload remainder at least this big is received in place, without a copy.
DIRECT_MIN = 64 << 10
#: First pages id of a page server (criu/image.c: page_ids += 0x10000).
FIRST_PAGES_ID = 0x10001

class PageFilter(Protocol):
    """What the dump's pages are compared with (the content tracker's shadow,
    or the uffd tracker's record of what the destination holds)."""

    def diff(self, pid: int, vaddr: int, data: bytes | bytearray | memoryview, *, record: bool = True) -> ScanResult:
        """The runs of ``data`` (whole pages at vaddr) the destination does not hold."""
        ...

    def needs_data(self, pid: int, vaddr: int, npages: int) -> list[tuple[int, int]]:
        """The runs [lo, hi) of the range whose bytes :meth:`diff` must see:
        the destination holds every other page as it is (hybrid's frozen
        server then need not read it)."""
        ...


#: Called with (pid, vaddr, bytes of whole pages) for each changed run, in order.
Sink = Callable[[int, int, bytes], Awaitable[None]]


@dataclass(slots=True)
class FilterStats:
    """What one dump sent, and what of it went on."""

    processes: int = 0
    pages: int = 0  # process pages CRIU sent
    changed_pages: int = 0  # of those, differing from the shadow: sent on
    shmem_objects: int = 0
    shmem_pages: int = 0  # written whole into the images dir


@dataclass(slots=True)
class _Pagemap:
    kind: ps.Kind
    id: int
    pages_id: int
    entries: list[images.PagemapEntry] = field(default_factory=list)
    fd: int | None = None  # shmem: its pages file, written as data arrives

    @property
    def name(self) -> str:
        if self.kind is ps.Kind.PROCESS:
            return images.pagemap_file_name(self.id)
        return f"pagemap-shmem-{self.id}.img"


class FilterServer:
    """A one-dump CRIU page server that filters pages against a content tracker."""

    def __init__(self, tracker: PageFilter, images_dir: Path, listener: socket.socket, *, uncork: bool = True) -> None:
        self.tracker = tracker
        self.images_dir = images_dir
        self._listener: socket.socket | None = listener
        self._conn: socket.socket | None = None
        self.port: int = listener.getsockname()[1]
        self._maps: dict[tuple[ps.Kind, int], _Pagemap] = {}
        self._next_pages_id = FIRST_PAGES_ID
        self.stats = FilterStats()
        #: CRIU connected (the dump reached its memory).
        self.connected = False
        #: CRIU closed the connection before PS_IOV_CLOSE: its dump failed, and
        #: its error, not ours, says why.
        self.disconnected = False
        #: PS_IOV_CLOSE was answered and every image written.
        self.complete = False
        #: Clear TCP_CORK on CRIU's socket once it has sent something (module doc).
        self.uncork = uncork
        #: None if not tried (yet), "" once done, else why it could not be done.
        self.uncork_result: str | None = None
        self._uncork_task: asyncio.Future[str | None] | None = None
        self._ends: tuple[tuple[str, int], tuple[str, int]] = (("", 0), ("", 0))  # (ours, CRIU's)
        #: Why connections that were not CRIU's were refused.
        self.refused: list[str] = []
        self.only_criu = True

    @classmethod
    def listen(
        cls, tracker: PageFilter, images_dir: Path, host: str = LOOPBACK, *, uncork: bool = True, only_criu: bool = True
    ) -> FilterServer:
        """Listen on an ephemeral port (before the freeze: no start-up in the downtime).

        ``only_criu``: a connection from anything but root's CRIU (every
        holder of the peer socket runs as uid 0 from tug's CRIU binary, see
        :func:`tug.engine.criu.uncork.peer_is_criu`) is refused, and the
        server waits on for CRIU (tests that play CRIU themselves turn it off)."""
        images_dir.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, 0))
            sock.listen(1)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise MigrationError(f"cannot listen for CRIU's dump on {host}: {exc.strerror}") from None
        server = cls(tracker, images_dir, sock, uncork=uncork)
        server.only_criu = only_criu
        return server

    @property
    def address(self) -> str:
        """What ``--page-server`` gets."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def process_pages_files(self) -> set[str]:
        """The pages images the destination must rebuild from its page store."""
        return {images.pages_file_name(m.pages_id) for m in self._maps.values() if m.kind is ps.Kind.PROCESS}

    def close(self) -> None:
        """Close the sockets and files (idempotent). Only once serve() is not running."""
        for sock in (self._listener, self._conn):
            if sock is not None:
                sock.close()
        self._listener = self._conn = None
        for m in self._maps.values():
            if m.fd is not None:
                os.close(m.fd)
                m.fd = None

    async def serve(self, sink: Sink) -> FilterStats:
        """Accept CRIU's one connection and serve it to the end (see the module doc)."""
        loop = asyncio.get_running_loop()
        try:
            assert self._listener is not None, "serve() runs once"
            while True:
                conn, _ = await loop.sock_accept(self._listener)
                if not self.only_criu:
                    break
                refused = await asyncio.to_thread(peer_is_criu, conn.getsockname(), conn.getpeername())
                if refused is None:
                    break
                conn.close()  # not CRIU: nobody else may feed pages into a migration
                self.refused.append(refused)
            self._listener.close()
            self._listener = None
            self._conn = conn
            self.connected = True
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._ends = (conn.getsockname(), conn.getpeername())
            queue: asyncio.Queue[tuple[int, list[tuple[int, bytes]]] | None] = asyncio.Queue(QUEUE_DEPTH)
            await _both(
                asyncio.create_task(self._read(conn, queue), name="tug-psfilter-read"),
                asyncio.create_task(self._send(queue, sink), name="tug-psfilter-send"),
            )
            if self._uncork_task is not None:
                self.uncork_result = (await self._uncork_task) or ""
        finally:
            if self._uncork_task is not None and not self._uncork_task.done():
                self._uncork_task.cancel()  # the thread finishes on its own; its result no longer matters
            self.close()  # on error: CRIU's next write fails, so its dump ends
        return self.stats

    # ---- reading ------------------------------------------------------------------

    async def _read(self, conn: socket.socket, queue: asyncio.Queue[tuple[int, list[tuple[int, bytes]]] | None]) -> None:
        loop = asyncio.get_running_loop()
        parser = ps.PageServerParser()
        scratch = memoryview(bytearray(SCRATCH_BYTES))
        while not parser.closed:
            events: list[ps.Event]
            target = parser.receive_buffer()
            if target is not None and len(target) >= DIRECT_MIN:
                with target:  # released before the parser runs again
                    n = await self._recv(loop, conn, target)
                events = parser.received(n) if n else []
            else:
                if target is not None:
                    target.release()
                n = await self._recv(loop, conn, scratch)
                events = parser.feed(scratch[:n]) if n else []
            if not n:
                self.disconnected = True
                parser.feed_eof()  # raises: CRIU left before PS_IOV_CLOSE
            if self.uncork and self._uncork_task is None:
                # CRIU corked its socket before sending these bytes.
                self._uncork_task = asyncio.ensure_future(asyncio.to_thread(uncork_peer, *self._ends))
            await self._dispatch(events, conn, queue)
            events.clear()  # drop the Pages views: the parser may reuse its buffer
        await queue.put(None)

    async def _recv(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, buf: memoryview) -> int:
        try:
            return await loop.sock_recv_into(conn, buf)
        except OSError as exc:
            self.disconnected = True
            raise ps.PageServerProtocolError(f"connection from CRIU lost: {exc}") from None

    async def _reply(self, conn: socket.socket, data: bytes) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(conn, data)
        except OSError as exc:
            self.disconnected = True
            raise ps.PageServerProtocolError(f"cannot answer CRIU: {exc}") from None

    async def _dispatch(
        self, events: list[ps.Event], conn: socket.socket, queue: asyncio.Queue[tuple[int, list[tuple[int, bytes]]] | None]
    ) -> None:
        for ev in events:
            if isinstance(ev, ps.Pages):
                pm = self._maps[(ev.kind, ev.id)]  # the parser opened it (explicitly or not)
                pm.entries.append(images.PagemapEntry(ev.vaddr, ev.nr_pages, ev.flags))
                if pm.kind is ps.Kind.PROCESS:
                    # record=False: the shadow stays what the destination got
                    # in the rounds; nothing after this dump reads it.
                    res = self.tracker.diff(ev.id, ev.vaddr, ev.data, record=False)
                    self.stats.pages += ev.nr_pages
                    if res.changed:
                        self.stats.changed_pages += res.changed_pages
                        await queue.put((ev.id, res.changed))
                else:
                    assert pm.fd is not None
                    self._write(pm.fd, ev.data)
                    self.stats.shmem_pages += ev.nr_pages
            elif isinstance(ev, ps.Open):
                self._open(ev.kind, ev.id)
                if ev.reply:
                    await self._reply(conn, ps.reply_open(False))  # no parent: CRIU sends every page
            elif isinstance(ev, ps.ParentQuery):
                await self._reply(conn, ps.reply_parent(False))
            elif isinstance(ev, ps.Hole):
                raise ps.PageServerProtocolError(
                    f"CRIU sent a hole at {ev.vaddr:#x} ({ev.nr_pages} pages, flags {ev.flags:#x}) of {ev.kind.value} "
                    f"{ev.id}, but this server has no parent dump to take it from"
                )
            else:
                await asyncio.to_thread(self._write_pagemaps)
                self.complete = True
                await self._reply(conn, ps.reply_close(0))

    def _open(self, kind: ps.Kind, ident: int) -> None:
        if (kind, ident) in self._maps:
            # CRIU's page server would truncate and start over; a dump never does it.
            raise ps.PageServerProtocolError(f"CRIU opened the pagemap of {kind.value} {ident} twice")
        pm = _Pagemap(kind, ident, self._next_pages_id)
        self._next_pages_id += 1
        self._maps[(kind, ident)] = pm
        if kind is ps.Kind.SHMEM:
            path = self.images_dir / images.pages_file_name(pm.pages_id)
            try:
                pm.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise MigrationError(f"cannot create {path}: {exc.strerror}") from None
            self.stats.shmem_objects += 1
        else:
            self.stats.processes += 1

    def _write(self, fd: int, data: memoryview) -> None:
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as exc:
            raise MigrationError(f"cannot write shared memory pages into {self.images_dir}: {exc.strerror}") from None

    def _write_pagemaps(self) -> None:
        """After CLOSE: every pagemap, with the entries exactly as CRIU sent them."""
        for pm in self._maps.values():
            data = images.write_pagemap(images.Pagemap(pm.pages_id, tuple(pm.entries)))
            try:
                (self.images_dir / pm.name).write_bytes(data)
            except OSError as exc:
                raise MigrationError(f"cannot write {self.images_dir / pm.name}: {exc.strerror}") from None
            if pm.fd is not None:
                os.close(pm.fd)
                pm.fd = None

    # ---- sending ------------------------------------------------------------------

    @staticmethod
    async def _send(queue: asyncio.Queue[tuple[int, list[tuple[int, bytes]]] | None], sink: Sink) -> None:
        while (item := await queue.get()) is not None:
            pid, runs = item
            for vaddr, data in runs:
                await sink(pid, vaddr, data)


async def _both(reader: asyncio.Task[None], sender: asyncio.Task[None]) -> None:
    """Run both to the end; the first failure cancels the other and is raised."""
    tasks = (sender, reader)  # a sink failure is reported before the reader it stopped
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        exc = None if t.cancelled() else t.exception()
        if exc is not None:
            raise exc
