"""Port forwards over the agent's SSH connection (see AgentProcess.forward).

Only this module, reverse_forward.py and ssh.py import asyncssh. The callbacks here never raise:
a broken channel or socket ends the forward and is recorded in
:attr:`PortForward.error`; the caller sees the consequence (CRIU's dump
fails, the page server reports) as tug errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import cast

import asyncssh

from tug.engine.errors import ForwardingRefusedError, ProtocolError, TransportError

from . import fastdata
from .tunnel import Tunnel

#: Where forwarded connections go on the destination (and where they start
#: here): services tug starts there (CRIU's page server) listen on loopback
#: only, so nothing but this SSH connection can reach them.
LOOPBACK = "127.0.0.1"


class PortForward:
    """``127.0.0.1:local_port`` here leads to ``127.0.0.1:remote_port`` on the peer.

    Our own forwarder rather than asyncssh's ``forward_local_port``, for three
    reasons. It counts payload bytes both ways (the report's bytes on the
    wire include the pages that went this way). Its SSH channel is opened
    before any local client connects (see :meth:`AgentProcess.forward`). And
    it serves exactly one local connection, because CRIU's page server serves
    exactly one session: once that connection arrives the listening socket
    is closed (no port left open), and a channel that died early makes the
    late local connection fail at once instead of hanging.

    Data is relayed by protocol callbacks with flow control both ways: when
    the SSH channel's send window is full we stop reading the local socket,
    and when the local socket's buffer is full we stop reading the channel.
    """

    def __init__(self, host: str, remote_port: int, what: str) -> None:
        self.host = host
        self.remote_port = remote_port
        self.what = what
        self.local_port = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        #: Why the forward ended early (channel error, second client), if it did.
        self.error: str | None = None
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._server: asyncio.Server | None = None
        self._local: asyncio.Transport | None = None
        self._pending: list[bytes] = []  # from the peer before the local client came
        self._local_eof = False
        self._remote_eof = False
        self._closed = False
        self._done = asyncio.Event()
        #: Called once with (our end, the client's end) of the local
        #: connection when its first bytes arrive (engine/uncork.py uses it).
        self.on_first_data: Callable[[tuple[str, int], tuple[str, int]], None] | None = None
        #: Vets a local connection (our end, the client's end): None admits
        #: it, a reason refuses it and the forward waits on for another.
        self.admit: Callable[[tuple[str, int], tuple[str, int]], str | None] | None = None
        self.refused: list[str] = []
        #: Sees every payload chunk as it passes: (from the peer?, bytes). Must not raise.
        self.tap: Callable[[bool, bytes], None] | None = None
        #: A reverse forward's listener on the peer (see open_reverse_forward).
        self._listener: asyncssh.SSHListener | None = None
        #: Resumable (see :func:`open_reverse_forward`): the channel carries
        #: this tunnel's frames, and losing the channel keeps the local end.
        self.tunnel: Tunnel | None = None
        #: Set while a resumable forward has no channel (the link is lost).
        self.link_lost = asyncio.Event()
        self._accept: Callable[[str, int], Awaitable[_ChannelEnd]] | None = None
        self._local_paused = False

    @property
    def address(self) -> str:
        """``HOST:PORT`` for clients on this host."""
        return f"{LOOPBACK}:{self.local_port}"

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        await self._done.wait()

    def close(self) -> None:
        """Tear everything down (idempotent): listener, local socket, channel."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._local is not None:
            self._local.close()  # flushes what is buffered, then closes
            self._local = None
        if self._chan is not None:
            with contextlib.suppress(asyncssh.Error, OSError):
                self._chan.close()
            self._chan = None
        self._closed = True
        self._done.set()

    # ---- wiring (called by the two protocol ends) ----------------------------

    def _listening(self, server: asyncio.Server) -> None:
        self._server = server
        self.local_port = int(server.sockets[0].getsockname()[1])
        if self._closed:  # the channel died while we were setting up
            self.close()

    def _channel_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan
        # Reverse forwards too (post-copy's memory): same fill at the same
        # number of remote faults, a little less CPU (bench/reference/
        # 2026-11-28-cpu-third/postcopy-lean-reverse).
        fastdata.speed_up(chan.get_extra_info("connection"), chan)
        if self.tunnel is not None:
            self.link_lost.clear()
            self.error = None  # the loss that set it is over
            self._to_chan(self.tunnel.attach())

    def _to_chan(self, data: bytes) -> None:
        if not data or self._chan is None:
            return
        try:
            self._chan.write(data)
        except (asyncssh.Error, OSError) as exc:
            if self.tunnel is not None:
                self._remote_lost(exc)
            else:
                self._fail(f"SSH channel to {self.what} broke: {exc}")

    def _local_made(self, transport: asyncio.Transport) -> bool:
        """Accept the first local connection only; False closes this one."""
        if self._local is not None or self._closed:
            if self._local is not None:
                self.error = self.error or "a second local connection was refused"
            return False
        if self.admit is not None:
            ours, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
            why = self.admit((ours[0], ours[1]), (peer[0], peer[1])) if ours and peer else "no peer address"
            if why is not None:
                self.refused.append(why)
                return False
        self._local = transport
        if self._server is not None:  # one session: stop listening right away
            self._server.close()
            self._server = None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for data in self._pending:
            transport.write(data)
        self._pending.clear()
        if self._remote_eof and transport.can_write_eof():
            transport.write_eof()
        return True

    def _from_local(self, data: bytes) -> None:
        if self.bytes_sent == 0 and self.on_first_data is not None and self._local is not None:
            ours, peer = self._local.get_extra_info("sockname"), self._local.get_extra_info("peername")
            if ours and peer:
                self.on_first_data((ours[0], ours[1]), (peer[0], peer[1]))
        self.bytes_sent += len(data)
        if self.tap is not None:
            self.tap(False, data)
        if self.tunnel is not None:
            self._to_chan(self.tunnel.send(data))
            if self.tunnel.window_full:
                self._local_paused = True
                self._pause_local(True)
            return
        if self._chan is None:
            return
        try:
            self._chan.write(data)
        except (asyncssh.Error, OSError) as exc:
            self._fail(f"SSH channel to {self.what} broke: {exc}")

    def _from_channel(self, data: bytes) -> None:
        """Bytes from the SSH channel: tunnel frames for a resumable forward."""
        if self.tunnel is None:
            self._from_remote(data)
            return
        try:
            fed = self.tunnel.feed(data)
        except ProtocolError as exc:
            self._fail(f"the resumable channel to {self.what} broke its protocol: {exc}")
            return
        if fed.data:
            self._from_remote(fed.data)
        self._to_chan(fed.reply)
        if self._local_paused and not self.tunnel.window_full:
            self._local_paused = False
            if self._chan is not None:
                self._pause_local(False)
        if fed.eof:
            self._eof_from_remote()
        if self.tunnel.done:
            self.close()

    def _from_remote(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self.tap is not None:
            self.tap(True, data)
        if self._local is not None:
            self._local.write(data)
        else:
            self._pending.append(data)

    def _eof_from_local(self) -> None:
        self._local_eof = True
        if self.tunnel is not None:
            self._to_chan(self.tunnel.send_eof())
            if self._remote_eof:
                self._to_chan(self.tunnel.ack())
            return
        if self._chan is not None:
            with contextlib.suppress(asyncssh.Error, OSError):
                self._chan.write_eof()
        if self._remote_eof:
            self.close()

    def _eof_from_remote(self) -> None:
        self._remote_eof = True
        if self._local is not None and self._local.can_write_eof():
            self._local.write_eof()
        if self._local_eof and self.tunnel is None:
            self.close()

    def _channel_eof(self) -> None:
        if self.tunnel is None:
            self._eof_from_remote()
        # A resumable forward's channel ends by its loss (connection_lost follows).

    def _fail(self, reason: str) -> None:
        self.error = self.error or reason
        self.close()

    def _local_lost(self) -> None:
        self._local = None
        self.close()

    def _remote_lost(self, exc: Exception | None) -> None:
        self._chan = None
        if self.tunnel is not None and not self._closed and not self.tunnel.done:
            # The link, not the stream, is gone: keep the local end (CRIU's or
            # the frozen server's connection) and wait for a new channel.
            self.tunnel.detach()
            self.error = f"SSH channel to {self.what} lost: {exc}" if exc is not None else None
            self.link_lost.set()
            return
        if exc is not None:
            self.error = self.error or f"SSH channel to {self.what} closed: {exc}"
        self.close()

    def _pause_local(self, pause: bool) -> None:
        if not pause and self._local_paused:
            return  # a resumable forward's window is full: the peer's ack resumes it
        if self._local is not None:
            with contextlib.suppress(RuntimeError, OSError):
                (self._local.pause_reading if pause else self._local.resume_reading)()

    def _pause_remote(self, pause: bool) -> None:
        if self._chan is not None:
            with contextlib.suppress(asyncssh.Error, OSError):
                (self._chan.pause_reading if pause else self._chan.resume_reading)()


class _ChannelEnd(asyncssh.SSHTCPSession[bytes]):
    """The SSH channel's side of a :class:`PortForward`."""

    def __init__(self, fwd: PortForward) -> None:
        self._fwd = fwd

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._fwd._channel_made(chan)

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self._fwd._from_channel(data)

    def eof_received(self) -> bool:
        self._fwd._channel_eof()
        return True  # stay half open: the local side may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        self._fwd._remote_lost(exc)

    def pause_writing(self) -> None:
        self._fwd._pause_local(True)

    def resume_writing(self) -> None:
        self._fwd._pause_local(False)


class _LocalEnd(asyncio.Protocol):
    """The local TCP connection's side of a :class:`PortForward`."""

    def __init__(self, fwd: PortForward) -> None:
        self._fwd = fwd
        self._active = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's is not an asyncio.Transport subclass).
        transport = cast(asyncio.Transport, transport)
        self._active = self._fwd._local_made(transport)
        if not self._active:
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._active:
            self._fwd._from_local(data)

    def eof_received(self) -> bool:
        if self._active:
            self._fwd._eof_from_local()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._active:
            self._fwd._local_lost()

    def pause_writing(self) -> None:
        self._fwd._pause_remote(True)

    def resume_writing(self) -> None:
        self._fwd._pause_remote(False)


async def open_forward(conn: asyncssh.SSHClientConnection, host: str, remote_port: int, what: str) -> PortForward:
    """Open the channel to ``127.0.0.1:remote_port`` on ``host``, then listen here.

    asyncssh's errors become one-line tug errors: "administratively
    prohibited" (OpenSSH's answer with ``AllowTcpForwarding no``) is
    :class:`ForwardingRefusedError`, anything else :class:`TransportError`.
    """
    fwd = PortForward(host, remote_port, what)
    try:
        chan, _ = await conn.create_connection(lambda: _ChannelEnd(fwd), LOOPBACK, remote_port)
        # A streamed dump's whole memory goes this way: by the lean data path
        # (fastdata.py; stop-copy at 1 GiB: 2.07-2.28 s of source CPU against
        # 2.57-2.79). Reverse forwards get it in _channel_made.
        fastdata.speed_up(conn, chan)
    except asyncssh.ChannelOpenError as exc:
        if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
            raise ForwardingRefusedError(
                f"{host} refuses TCP forwarding over SSH (sshd AllowTcpForwarding?), which {what} needs: {exc.reason}"
            ) from None
        raise TransportError(f"cannot reach {what} at {LOOPBACK}:{remote_port} on {host}: {exc.reason}") from None
    except (asyncssh.Error, OSError) as exc:
        raise TransportError(f"cannot open a forward to {what} on {host}: {exc}") from None
    try:
        server = await asyncio.get_running_loop().create_server(lambda: _LocalEnd(fwd), LOOPBACK, 0)
    except OSError as exc:
        fwd.close()
        raise TransportError(f"cannot listen on {LOOPBACK} for the forward to {what}: {exc}") from None
    fwd._listening(server)
    return fwd
