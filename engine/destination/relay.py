"""The agent's end of a resumable forward: the fill's streams outlive the link.

Why: a reverse forward ends at the destination's sshd, so a dropped SSH
connection used to close the lazy-pages daemon's (or the hybrid server's)
TCP connection, and the fill failed although neither end had. Here the agent
holds that connection instead and carries it to the source's forward over
a :class:`~tug.transports.tunnel.Tunnel`: when the link drops, the local
connection stays open (the daemon's faulting threads simply wait), and once
the source has reconnected (agent.py's reattach) and listens again, the
source calls ``relay_reconnect`` and the stream resumes where it broke,
without a byte lost or repeated.

The tunnel's logic is sans-IO (transports/tunnel.py); this is its I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from tug.engine.errors import MigrationError, TransportError
from tug.transports.tunnel import Tunnel

log = logging.getLogger("tug.agent")

LOOPBACK = "127.0.0.1"
READ = 1 << 18

Admit = Callable[[tuple[str, int], tuple[str, int]], Awaitable[str | None]]


class Relay:
    """One stream: a local connection here <-> the source's forward at ``127.0.0.1:remote_port``."""

    def __init__(self, what: str, remote_port: int) -> None:
        self.what = what
        self.remote_port = remote_port
        self.tunnel = Tunnel()
        #: Local ports of our connections to the forward (the source's admission asks).
        self.own_ports: set[int] = set()
        #: Set while the link is lost (no channel), cleared on reconnect.
        self.lost = asyncio.Event()
        self.reconnects = 0
        self.error: str | None = None
        self._local_w: asyncio.StreamWriter | None = None
        self._remote_w: asyncio.StreamWriter | None = None
        self._acked = asyncio.Event()
        self._acked.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closed = False

    # ---- the local end ---------------------------------------------------------

    def local_socket(self) -> socket.socket:
        """For an in-process client (the hybrid server): the other end of a socket pair."""
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self._spawn(self._start_local(ours), "local")
        return theirs

    async def _start_local(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        self._local_w = writer
        await self._pump_local(reader)

    async def listen(self, admit: Admit) -> int:
        """For CRIU's daemon: a loopback port; the first admitted client is the stream's local end,
        and only then is the source's forward reached (its lazy dump serves from the freeze on)."""

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ours, peer = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
            why = "a second client" if self._local_w is not None else await admit((ours[0], ours[1]), (peer[0], peer[1]))
            if why is not None:
                log.warning("%s: refused a local client: %s", self.what, why)
                writer.close()
                return
            self._local_w = writer
            if self._server is not None:
                self._server.close()
                self._server = None
            try:
                await self.connect(self.remote_port)
            except MigrationError as exc:
                self._fail(str(exc))
                return
            await self._pump_local(reader)

        self._server = await asyncio.start_server(client, LOOPBACK, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _pump_local(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while not self._closed:
                await self._acked.wait()
                data = await reader.read(READ)
                frames = self.tunnel.send(data) if data else self.tunnel.send_eof()
                if self.tunnel.window_full:
                    self._acked.clear()
                await self._to_remote(frames)
                if not data:
                    return

    # ---- the source's end --------------------------------------------------------

    async def connect(self, port: int) -> None:
        """Reach the source's forward at ``127.0.0.1:port`` (first time or after a lost link)."""
        if self._closed:
            raise TransportError(f"{self.what}: the relay is closed")
        if self._remote_w is not None:
            # The source came back before we saw the old link go: it is gone all the same.
            old, self._remote_w = self._remote_w, None
            self.tunnel.detach()
            old.close()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind((LOOPBACK, 0))
            # Known before the connection exists: the source's admission asks for it.
            self.own_ports.add(int(sock.getsockname()[1]))
            await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, port))
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot reach the source's forward for {self.what} at port {port}: {exc}") from None
        self.remote_port = port
        self._remote_w = writer
        if self.tunnel.resumes:
            self.reconnects += 1
        self.lost.clear()
        writer.write(self.tunnel.attach())
        self._spawn(self._pump_remote(reader, writer), "remote")

    async def _pump_remote(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                data = await reader.read(READ)
            except (OSError, ConnectionError):
                break
            if not data:
                break
            try:
                fed = self.tunnel.feed(data)
            except MigrationError as exc:  # the tunnel's protocol broken: nothing to resume
                self._fail(str(exc))
                return
            try:
                if self._local_w is not None and fed.data:
                    self._local_w.write(fed.data)
                    await self._local_w.drain()
                if fed.eof and self._local_w is not None and self._local_w.can_write_eof():
                    self._local_w.write_eof()
            except (OSError, ConnectionError) as exc:  # the local client went: the stream is over
                self._fail(f"the local end closed: {exc}")
                return
            if fed.reply:
                writer.write(fed.reply)
            if not self.tunnel.window_full:
                self._acked.set()
            if self.tunnel.done:
                self.close()
                return
        if writer is self._remote_w:
            self._remote_w = None
            self.tunnel.detach()
            if not self._closed:
                log.warning("%s: link lost; the local connection waits for the source to come back", self.what)
                self.lost.set()
        writer.close()

    async def _to_remote(self, frames: bytes) -> None:
        w = self._remote_w
        if not frames or w is None:
            return
        w.write(frames)
        with contextlib.suppress(OSError, ConnectionError):
            await w.drain()

    # ---- life ----------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None], what: str) -> None:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run(), name=f"tug-relay-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, why: str) -> None:
        log.error("%s: %s", self.what, why)
        self.error = self.error or why
        self.close()

    def close(self) -> None:
        """End both connections (the local client sees its stream end: the fill fails if unfinished)."""
        self._closed = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in (self._local_w, self._remote_w):
            if w is not None:
                w.close()
        self._local_w = self._remote_w = None
        self._acked.set()
        for t in list(self._tasks):
            if t is not asyncio.current_task():
                t.cancel()
