"""A resumable reverse forward and the agent's relay, over a real SSH server (asyncssh's, in
this process): the link dies mid-stream, a new connection takes over, and both ends of the
stream see every byte exactly once, in order (transports/forward.py, engine/destination/relay.py)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import asyncssh

from tug.engine.destination.relay import Relay
from tug.transports.ssh import SshTarget, connect_agent

from .sshserver import known_hosts, start_server

#: The service's answer to each byte (bytes keep their places whatever the chunking).
_FLIP = bytes(b ^ 0x5A for b in range(256))


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return True  # remote (reverse) forwarding, as sshd's AllowTcpForwarding yes


async def test_stream_survives_a_dropped_link(tmp_path: Path) -> None:
    server, host_key, ident = await start_server(tmp_path, server_factory=_Server)
    port = server.sockets[0].getsockname()[1]
    known = known_hosts(tmp_path, port, host_key)
    target = SshTarget(user="root", host="127.0.0.1", port=port)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The source's service (CRIU's lazy dump, the frozen server): answers each
        # chunk, slowly enough that the link can be cut with bytes in flight.
        while data := await reader.read(1 << 16):
            writer.write(data.translate(_FLIP))
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.close()

    service = await asyncio.start_server(echo, "127.0.0.1", 0)
    service_port = service.sockets[0].getsockname()[1]

    async def connect_local() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", service_port))
        sock.setblocking(False)
        return sock

    async def admit_remote(peer_port: int) -> str | None:
        return None

    async def admit_local(ours: tuple[str, int], peer: tuple[str, int]) -> str | None:
        return None

    first = await connect_agent(target, identity=ident, known_hosts=known, agent_command="agent")
    fwd = await first.reverse_forward(what="the test service", admit_remote=admit_remote, connect_local=connect_local,
                                      resumable=True)
    relay = Relay("the test stream", fwd.remote_port)
    local_port = await relay.listen(admit_local)
    reader, writer = await asyncio.open_connection("127.0.0.1", local_port)

    chunks = [os.urandom(1000 + i) for i in range(400)]
    expected = b"".join(chunks).translate(_FLIP)

    async def send() -> None:
        for c in chunks:
            writer.write(c)
            await writer.drain()
            await asyncio.sleep(0.0005)

    sender = asyncio.create_task(send())
    got = bytearray()
    second = None
    try:
        while len(got) < len(expected):
            async with asyncio.timeout(20):
                data = await reader.read(1 << 16)
            assert data, "the local stream ended"
            got += data
            if second is None and len(got) > len(expected) // 3:
                first._conn.abort()  # the link drops with bytes in flight both ways
                await asyncio.wait_for(relay.lost.wait(), 10)
                assert fwd.link_lost.is_set() and not fwd.closed
                second = await connect_agent(target, identity=ident, known_hosts=known, agent_command="agent")
                await second.adopt(first)
                await relay.connect(fwd.remote_port)
        await sender
        assert bytes(got) == expected
        assert relay.reconnects == 1 and fwd.tunnel is not None and fwd.tunnel.resumes == 2
    finally:
        writer.close()
        relay.close()
        fwd.close()
        for agent in (first, second):
            if agent is not None:
                await agent.close(timeout=1)
        service.close()
        server.close()
