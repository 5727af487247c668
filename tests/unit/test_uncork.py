"""Uncorking CRIU's page-server socket: finding it, and clearing TCP_CORK through pidfd_getfd."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tug.engine.criu.uncork import _set_cork_off, peer_is_criu, socket_inode, uncork_peer

TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A1B2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 20 4 30 10 -1
   1: 0100007F:1F90 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 20 4 30 10 -1
"""


def test_socket_inode_matches_both_endpoints() -> None:
    if socket.htonl(1) == 1:  # big-endian hosts print the address the other way round
        return
    assert socket_inode(TABLE, local=("127.0.0.1", 0xA1B2), remote=("127.0.0.1", 0x1F90)) == 4242
    assert socket_inode(TABLE, local=("127.0.0.1", 0x1F90), remote=("127.0.0.1", 0xA1B2)) == 4343
    assert socket_inode(TABLE, local=("127.0.0.1", 0xA1B2), remote=("127.0.0.1", 1)) is None


def connected_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return listener, client, server


def test_the_real_table_and_the_real_cork() -> None:
    listener, client, server = connected_pair()
    try:
        inode = socket_inode(Path("/proc/net/tcp").read_text(), local=client.getsockname(), remote=server.getsockname())
        assert inode == os.fstat(client.fileno()).st_ino
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        _set_cork_off(os.getpid(), client.fileno())  # through a pidfd_getfd duplicate, like CRIU's
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
        client.sendall(b"still usable")
        assert server.recv(100) == b"still usable"
    finally:
        for s in (listener, client, server):
            s.close()


def test_only_a_process_named_criu_is_touched() -> None:
    listener, client, server = connected_pair()
    try:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        why = uncork_peer(server.getsockname(), server.getpeername())
        assert why is not None and why.endswith("not only criu"), why
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 1
        assert uncork_peer(("127.0.0.1", 1), ("127.0.0.1", 2)) == "the peer's socket is not in /proc/net/tcp"
    finally:
        for s in (listener, client, server):
            s.close()


def test_a_peer_that_is_not_criu_is_refused() -> None:
    listener, client, server = connected_pair()
    try:
        why = peer_is_criu(server.getsockname(), server.getpeername())
        assert why is not None and why.startswith("the peer's socket is held by ") and why.endswith("not only criu"), why
    finally:
        for s in (listener, client, server):
            s.close()
