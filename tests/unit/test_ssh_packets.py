"""Bulk data over tug's SSH connection: no empty SSH_MSG_IGNORE ahead of every packet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_IGNORE

from tug.transports.ssh import SshTarget, connect_agent

from .sshserver import known_hosts, start_server


@pytest.mark.parametrize("skip", [True, False], ids=["tug", "asyncssh-default"])
async def test_bulk_data_carries_no_ignore_packets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, skip: bool) -> None:
    sent: dict[int, int] = {}
    ships = asyncssh.SSHClientConnection.send_packet

    def counting(self: asyncssh.SSHClientConnection, pkttype: int, *args: bytes, handler: Any = None) -> None:
        """What goes on the wire (asyncssh's own send, reached after tug's filter)."""
        sent[pkttype] = sent.get(pkttype, 0) + 1
        ships(self, pkttype, *args, handler=handler)

    monkeypatch.setattr(asyncssh.SSHClientConnection, "send_packet", counting)
    if not skip:  # the control: asyncssh as it ships sends one ignore packet per packet
        monkeypatch.setattr("tug.transports.ssh.skip_ignore_packets", lambda conn: None)
        monkeypatch.setattr("tug.transports.fastdata.speed_up", lambda conn, chan: False)
    server, host_key, ident = await start_server(tmp_path)
    port = server.sockets[0].getsockname()[1]
    agent = await connect_agent(SshTarget(user="root", host="127.0.0.1", port=port), identity=ident,
                                known_hosts=known_hosts(tmp_path, port, host_key), agent_command="agent")
    try:
        await agent.stream.write(b"x" * (4 << 20))
    finally:
        await agent.close(timeout=5)
        server.close()
    data, ignored = sent.get(MSG_CHANNEL_DATA, 0), sent.get(MSG_IGNORE, 0)
    # The handshake before the connection is ours (authentication) still has a few.
    if skip:  # tug's data goes by its lean path (fastdata.py), never asyncssh's send_packet
        assert ignored < 10 and data == 0, sent
    else:
        assert data >= (4 << 20) // 32768 and ignored >= data, sent


def test_the_installed_asyncssh_is_the_one_the_filter_was_written_for() -> None:
    """A new asyncssh whose send_packet changed turns the filter off: this says so instead of silently."""
    from tug.transports import ssh

    assert ssh._SEND_PACKET_AS_KNOWN, "asyncssh's send_packet changed: review transports/ssh.py skip_ignore_packets"
