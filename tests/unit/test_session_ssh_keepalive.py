"""A partitioned SSH link fails the session's reads within a bounded time.

asyncssh's own server (in this process, on loopback) stands in for sshd; a
TCP relay between it and the client can cut the link the way a partition
does: bytes stop flowing both ways, but no FIN or RST ever arrives. Only SSH
keepalives can tell that apart from an agent that is merely quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from tug.engine.errors import TransportError
from tug.transports.ssh import SshTarget, connect_agent

from .sshserver import known_hosts, start_server


class Relay:
    """Forwards TCP to ``port``; after ``cut()``, drops every byte (a silent partition)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._cut = False
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def cut(self) -> None:
        self._cut = True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                if not self._cut:
                    writer.write(data)
                    await writer.drain()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()


@pytest.mark.parametrize("keepalive", [True, False], ids=["keepalive", "no-keepalive"])
async def test_partitioned_link_fails_the_read_within_keepalive_bound(tmp_path: Path, keepalive: bool) -> None:
    server, host_key, ident = await start_server(tmp_path)
    relay = Relay(server.sockets[0].getsockname()[1])
    port = await relay.start()
    known = known_hosts(tmp_path, port, host_key)
    interval, count = (0.2, 2) if keepalive else (0.0, 2)  # 0 turns keepalives off
    agent = await connect_agent(
        SshTarget(user="root", host="127.0.0.1", port=port),
        identity=ident,
        known_hosts=known,
        agent_command="agent",
        keepalive_interval=interval,
        keepalive_count_max=count,
    )
    try:
        read = asyncio.create_task(agent.stream.read())
        await asyncio.sleep(3 * interval)  # a quiet but healthy link stays up
        assert not read.done()
        relay.cut()
        t0 = time.monotonic()
        if keepalive:
            with pytest.raises(TransportError, match="connection to ssh://root@127.0.0.1:.* lost: .*keepalive"):
                await asyncio.wait_for(read, 5)
            # interval x (count + 1) = 0.6 s, plus up to one interval of the timer's phase
            assert time.monotonic() - t0 < 2.0
            with pytest.raises(TransportError):
                await agent.stream.write(b"x")
        else:
            # The control: without keepalives nothing notices the partition.
            await asyncio.sleep(1.5)
            assert not read.done()
            read.cancel()
    finally:
        relay.close()
        await asyncio.wait_for(agent.close(timeout=1), 5)
        server.close()
