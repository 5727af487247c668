"""PortForward against a real SSH server (asyncssh's, in this process, on loopback).

The forward must relay both ways with exact byte counts, carry half-closes
(CRIU's page server waits for the client's EOF after its final reply), serve
exactly one local connection and stop listening once it has it, and turn a
refused or unreachable forward into a one-line TransportError before anyone
connects locally.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from tug.engine.errors import ForwardingRefusedError, TransportError
from tug.transports.ssh import AgentProcess, SshTarget, connect_agent

from .sshserver import known_hosts, start_server


class _Server(asyncssh.SSHServer):
    def __init__(self, allow_forwarding: bool) -> None:
        self.allow = allow_forwarding

    def begin_auth(self, username: str) -> bool:
        return True  # public key auth against authorized_client_keys

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        # True: asyncssh connects to dest itself. Otherwise answer as OpenSSH's sshd
        # does with AllowTcpForwarding no (tests/e2e/test_streamdump.py checks the real one).
        if not self.allow:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "open failed")
        return True


@dataclass
class Ssh:
    agent: AgentProcess
    echo_port: int
    received: list[bytes]


async def _start(tmp_path: Path, *, allow: bool) -> tuple[asyncssh.SSHAcceptor, SshTarget, Path, Path]:
    server, host_key, ident = await start_server(tmp_path, server_factory=lambda: _Server(allow))
    port = server.sockets[0].getsockname()[1]
    known = known_hosts(tmp_path, port, host_key)
    return server, SshTarget(user="root", host="127.0.0.1", port=port), ident, known


@pytest.fixture
async def ssh(tmp_path: Path) -> AsyncIterator[Ssh]:
    server, target, ident, known = await _start(tmp_path, allow=True)
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Like CRIU's page server: read until EOF, answer, wait for the peer's close.
        data = await reader.read()
        received.append(data)
        writer.write(b"got %d" % len(data))
        writer.write_eof()
        await writer.drain()
        writer.close()

    echo = await asyncio.start_server(handle, "127.0.0.1", 0)
    agent = await connect_agent(target, identity=ident, known_hosts=known, agent_command="agent")
    try:
        yield Ssh(agent=agent, echo_port=echo.sockets[0].getsockname()[1], received=received)
    finally:
        await agent.close()
        echo.close()
        server.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_relays_both_ways_counts_bytes_and_half_closes(ssh: Ssh) -> None:
    fwd = await ssh.agent.forward(ssh.echo_port, what="the echo server")
    payload = os.urandom(3 << 20) + b"end"
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.local_port)
    writer.write(payload)
    writer.write_eof()  # half-close: the far end must see EOF and still be able to answer
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer == b"got %d" % len(payload)
    assert ssh.received == [payload]
    await asyncio.wait_for(fwd.wait_closed(), 5)
    assert fwd.bytes_sent == len(payload)
    assert fwd.bytes_received == len(answer)
    assert ssh.agent.forwarded_bytes == len(payload) + len(answer)
    assert fwd.error is None


async def test_serves_one_connection_then_stops_listening(ssh: Ssh) -> None:
    fwd = await ssh.agent.forward(ssh.echo_port)
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.local_port)
    await asyncio.sleep(0.05)
    # The page server serves one session: once it has its client, no port stays open.
    refused = await asyncio.to_thread(_listening, fwd.local_port)
    assert refused is False
    writer.write(b"x")
    writer.write_eof()
    assert await reader.read() == b"got 1"
    writer.close()
    fwd.close()
    fwd.close()  # idempotent


async def test_close_before_any_client_frees_the_port(ssh: Ssh) -> None:
    fwd = await ssh.agent.forward(ssh.echo_port)
    assert await asyncio.to_thread(_listening, fwd.local_port)
    fwd.close()
    await asyncio.wait_for(fwd.wait_closed(), 5)
    assert not await asyncio.to_thread(_listening, fwd.local_port)


async def test_nothing_listening_on_the_far_side_fails_before_any_client(ssh: Ssh) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # bound, never listening: connect is refused
        with pytest.raises(TransportError, match=r"cannot reach the page server at 127\.0\.0\.1:\d+ on 127\.0\.0\.1"):
            await ssh.agent.forward(free, what="the page server")


async def test_refused_forwarding_is_one_clear_line(tmp_path: Path) -> None:
    server, target, ident, known = await _start(tmp_path, allow=False)
    agent = await connect_agent(target, identity=ident, known_hosts=known, agent_command="agent")
    try:
        with pytest.raises(ForwardingRefusedError) as info:
            await agent.forward(9, what="the CRIU page server on 127.0.0.1")
        msg = str(info.value)
        assert "\n" not in msg
        assert "refuses TCP forwarding" in msg and "AllowTcpForwarding" in msg and "the CRIU page server" in msg
    finally:
        await agent.close()
        server.close()


async def test_far_end_dying_ends_the_local_connection(ssh: Ssh, tmp_path: Path) -> None:
    """A page server killed mid-dump: CRIU's socket must end, not hang."""

    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1 << 20)
        writer.transport.abort()

    dying = await asyncio.start_server(die, "127.0.0.1", 0)
    try:
        fwd = await ssh.agent.forward(dying.sockets[0].getsockname()[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", fwd.local_port)

        async def pour() -> None:
            chunk = bytes(1 << 20)
            with pytest.raises((ConnectionError, OSError)):
                for _ in range(512):  # far more than any buffer between us and the dead end
                    writer.write(chunk)
                    await writer.drain()

        await asyncio.wait_for(pour(), 10)
        await asyncio.wait_for(fwd.wait_closed(), 5)
        writer.close()
    finally:
        dying.close()


async def test_forwarding_probe(ssh: Ssh, tmp_path: Path) -> None:
    assert await ssh.agent.forwarding_allowed() is True
    (tmp_path / "refusing").mkdir()
    server, target, ident, known = await _start(tmp_path / "refusing", allow=False)
    agent = await connect_agent(target, identity=ident, known_hosts=known, agent_command="agent")
    try:
        assert await agent.forwarding_allowed() is False
        assert agent.forwarded_bytes == 0
    finally:
        await agent.close()
        server.close()


async def test_forwarded_data_takes_the_lean_path(ssh: Ssh, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward can carry a whole memory (a streamed dump, a post-copy fill):
    its channel data goes by transports/fastdata.py, not asyncssh's send_packet."""
    from asyncssh.constants import MSG_CHANNEL_DATA

    sent = {"data": 0}
    conn = ssh.agent._conn
    ships = conn.send_packet  # what every channel of the connection sends through (tug's filter first)

    def counting(pkttype: int, *args: bytes, handler: object = None) -> None:
        sent["data"] += pkttype == MSG_CHANNEL_DATA
        ships(pkttype, *args, handler=handler)

    monkeypatch.setattr(conn, "send_packet", counting)
    fwd = await ssh.agent.forward(ssh.echo_port, what="the echo server")
    payload = os.urandom(2 << 20)
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.local_port)
    writer.write(payload)
    writer.write_eof()
    await writer.drain()
    assert await reader.read() == b"got %d" % len(payload)
    writer.close()
    assert ssh.received == [payload] and sent["data"] == 0, sent
