"""Reverse forwards: a port on the destination leading to a service here (see forward.py).

Only this module, forward.py and ssh.py import asyncssh; asyncssh's errors
become tug's here too.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import asyncssh

from tug.engine.errors import ForwardingRefusedError, TransportError

from .forward import LOOPBACK, PortForward, _ChannelEnd, _LocalEnd
from .tunnel import Tunnel


async def open_reverse_forward(
    conn: asyncssh.SSHClientConnection,
    host: str,
    what: str,
    *,
    admit_remote: Callable[[int], Awaitable[str | None]],
    connect_local: Callable[[], Awaitable[socket.socket]],
    resumable: bool = False,
) -> PortForward:
    """The other direction: ``127.0.0.1:remote_port`` on ``host`` leads to a local service.

    The peer's sshd listens (``tcpip-forward``) on an ephemeral loopback port,
    which becomes :attr:`PortForward.remote_port`. Any process on the peer
    could connect to it, so each connection is vetted before anything is
    relayed: ``admit_remote(client_port)`` (the peer's agent looks up who
    holds that port) returns None to admit or why not; refused connections
    are recorded in :attr:`PortForward.refused` and the listener waits on.
    The first admitted one is connected to ``connect_local()`` (a connected
    socket, which may live in another network namespace), and the listener
    closes: one session, as CRIU's lazy dump serves one daemon.

    ``resumable``: the channel carries a :class:`Tunnel`'s frames (the peer's
    agent holds the other end, see engine/destination/relay.py), and a lost
    channel keeps the local connection: :meth:`listen_again` on a new SSH
    connection lets the peer come back, and the stream resumes where it broke.
    """
    fwd = PortForward(host, 0, what)
    if resumable:
        fwd.tunnel = Tunnel()
    loop = asyncio.get_running_loop()

    async def accept(orig_host: str, orig_port: int) -> _ChannelEnd:
        if fwd._chan is not None or fwd.closed:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "this forward serves one connection")
        why = await admit_remote(orig_port)
        if why is not None:
            fwd.refused.append(why)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, why)
        if fwd._chan is not None or fwd.closed:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "this forward serves one connection")
        if fwd._local is not None and fwd.tunnel is not None:  # the same stream, over a new link
            if fwd._listener is not None:
                fwd._listener.close()
                fwd._listener = None
            return _ChannelEnd(fwd)
        try:
            sock = await connect_local()
            await loop.create_connection(lambda: _LocalEnd(fwd), sock=sock)
        except (OSError, TransportError) as exc:
            fwd._fail(f"cannot reach {what} here: {exc}")
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
        if fwd._listener is not None:  # one session: stop listening on the peer
            fwd._listener.close()
            fwd._listener = None
        return _ChannelEnd(fwd)

    fwd._accept = accept
    await _listen(fwd, conn)
    return fwd


async def listen_again(fwd: PortForward, conn: asyncssh.SSHClientConnection) -> int:
    """A resumable forward whose link was lost: listen on the peer over ``conn``; returns the new port."""
    if fwd.tunnel is None or fwd.closed:
        raise TransportError(f"the forward to {fwd.what} cannot resume")
    await _listen(fwd, conn)
    return fwd.remote_port


async def _listen(fwd: PortForward, conn: asyncssh.SSHClientConnection) -> None:
    host, what, accept = fwd.host, fwd.what, fwd._accept
    assert accept is not None
    try:
        listener = await conn.create_server(accept, LOOPBACK, 0)
    except asyncssh.ChannelListenError as exc:
        raise ForwardingRefusedError(
            f"{host} refuses remote TCP forwarding over SSH (sshd AllowTcpForwarding?), which {what} needs: {exc}"
        ) from None
    except (asyncssh.Error, OSError) as exc:
        raise TransportError(f"cannot listen on {host} for {what}: {exc}") from None
    fwd._listener = listener
    fwd.remote_port = listener.get_port()
