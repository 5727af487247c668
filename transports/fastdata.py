"""Channel data sent with one copy instead of twelve: a lean path for the bulk.

Why: nearly every byte a migration moves (memory pages above all) leaves the
source as SSH channel data, and asyncssh (2.x) builds each 32 KiB packet of it
by joining and slicing Python bytes: the write is copied into a bytearray,
sliced per packet, length-prefixed, prefixed with the channel id, with the
packet type, wrapped in padding, encrypted, split from its tag, joined with
the length, joined with the tag: about a dozen copies of every byte, and as
many Python calls per packet, each packet its own socket write. Measured
in the lab (asyncssh client to OpenSSH's ``cat > /dev/null``, 1.26 GB at
1 gbit, aes128-gcm): 1.6-1.8 s of CPU as asyncssh ships; 1.15-1.4 s with
one copy per packet; 1.0-1.1 s with the packets of one flush (as many as the
peer's window takes) in one ``writev``.

What: for a channel tug sends its bulk on (the agent's stdin), :func:`speed_up`
replaces the channel's ``write`` and ``_flush_send_buf``: an immutable
``bytes`` write is queued as a view (no copy), each packet's slice stays a
view, and :func:`encode_data` lays out the whole SSH packet (RFC 4253 binary
packet: length, padding length, ``SSH_MSG_CHANNEL_DATA``, recipient, string)
in one buffer and encrypts it in place of asyncssh's own sequence, producing
the same bytes asyncssh would (tested byte for byte). The packets one flush
sends go to the socket in one ``writelines`` (before any packet asyncssh
sends itself, so the order on the wire is kept). Padding comes from
``os.urandom`` drawn a few KiB at a time instead of one syscall per packet.

When not: anything but an AES-GCM cipher (tug's first choice, see
``transports.ssh.CIPHERS``), compression, a key exchange due or under way,
asyncssh's packet-level debug logging (level 3): every such packet goes
through asyncssh's own ``send_packet``, which handles rekeying, deferral and
logging as always. Any asyncssh release but the one this was written
against and tested with (:data:`TESTED_ASYNCSSH`) is left entirely alone,
and a unit test says so.
"""

from __future__ import annotations

import os
import time
from typing import Any

import asyncssh
from asyncssh.encryption import GCMEncryption
from asyncssh.logging import SSHLogger
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MSG_CHANNEL_DATA = 94
MSG_CHANNEL_EOF = 96
#: Random padding drawn at a time (a packet takes 4 to 19 bytes of it).
PAD_POOL = 4096

_CONN_ATTRS = ("_send_encryption", "_send_enchdrlen", "_send_blocksize", "_send_seq", "_rekey_bytes_sent",
               "_rekey_bytes", "_rekey_seconds", "_rekey_time", "_kex_complete", "_auth_complete", "_compressor",
               "_transport")
_CHAN_ATTRS = ("_send_buf", "_send_buf_len", "_send_window", "_send_pktsize", "_send_state", "_send_chan", "_encoding",
               "_pause_resume_writing", "_close_send", "send_packet")


class _Padding:
    """Random padding bytes, from os.urandom a pool at a time."""

    __slots__ = ("_pool", "_pos")

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._pool):
            self._pool, self._pos = os.urandom(PAD_POOL), 0
        self._pos += n
        return self._pool[self._pos - n : self._pos]


class _Keyed:
    """An AESGCM object per key (asyncssh builds one per packet)."""

    __slots__ = ("key", "aead")

    def __init__(self) -> None:
        self.key: bytes | None = None
        self.aead: AESGCM | None = None

    def get(self, key: bytes) -> AESGCM:
        if key != self.key or self.aead is None:
            self.key, self.aead = key, AESGCM(key)
        return self.aead


def encode_data(
    recipient: int, data: Any, padlen_for: Any, padding: bytes, aead: AESGCM, iv: bytes
) -> tuple[tuple[bytes, bytes], int]:
    """One SSH_MSG_CHANNEL_DATA packet, encrypted with AES-GCM: ((length field,
    ciphertext with its tag), packet length). The two parts go to the socket as
    they are (writelines), not joined into a third copy.

    ``padlen_for(payload_len)`` is the connection's padding rule; ``padding``
    holds at least that many random bytes. The length field is the
    additional authenticated data, as RFC 5647 has it.
    """
    n = len(data)
    padlen = padlen_for(9 + n)
    pktlen = 10 + n + padlen
    buf = bytearray(pktlen)
    buf[0] = padlen
    buf[1] = MSG_CHANNEL_DATA
    buf[2:6] = recipient.to_bytes(4, "big")
    buf[6:10] = n.to_bytes(4, "big")
    buf[10 : 10 + n] = data
    buf[10 + n :] = padding[:padlen]
    hdr = pktlen.to_bytes(4, "big")
    return (hdr, aead.encrypt(iv, buf, hdr)), pktlen


#: The asyncssh releases whose send path this was written against and tested with
#: (tests/unit/test_fastdata.py fails on any other, so that it is reviewed, not guessed).
TESTED_ASYNCSSH = ("2.24.",)


def internals_known(conn: Any, chan: Any) -> bool:
    return (
        asyncssh.__version__.startswith(TESTED_ASYNCSSH)
        and all(hasattr(conn, a) for a in _CONN_ATTRS)
        and all(hasattr(chan, a) for a in _CHAN_ATTRS)
    )


def speed_up(conn: Any, chan: Any) -> bool:
    """Send ``chan``'s data through the lean path; False (nothing changed) for an unknown asyncssh."""
    if not internals_known(conn, chan):
        return False
    padding = _Padding()
    keyed = _Keyed()
    stock_write = chan.write

    def padlen_for(payload_len: int) -> int:
        block: int = conn._send_blocksize
        padlen: int = -(conn._send_enchdrlen + payload_len) % block
        return padlen + block if padlen < 4 else padlen

    def fast_ok() -> bool:
        """What asyncssh's own send_packet would do differently is not due."""
        return (
            type(conn._send_encryption) is GCMEncryption
            and not conn._compressor
            and conn._kex_complete
            and conn._auth_complete
            and conn._rekey_bytes_sent < conn._rekey_bytes
            and not (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)
            and SSHLogger._debug_level < 3
        )

    pending: list[bytes] = []

    def push() -> None:
        """The packets encoded so far, in one write (a writev: one syscall for many)."""
        if pending:
            if conn._transport:
                conn._transport.writelines(pending)
            pending.clear()

    def send_data(data: Any) -> None:
        if chan._send_chan is None:
            return  # closed meanwhile: asyncssh's send_packet drops it too
        if not fast_ok():
            push()  # in order: what was encoded before goes first
            chan.send_packet(MSG_CHANNEL_DATA, len(data).to_bytes(4, "big") + bytes(data))
            return
        cipher = conn._send_encryption._cipher
        wire, pktlen = encode_data(chan._send_chan, data, padlen_for, padding.take(19), keyed.get(cipher._key),
                                   cipher._iv)
        cipher._update_iv()
        pending.extend(wire)
        conn._send_seq = (conn._send_seq + 1) & 0xFFFFFFFF
        conn._rekey_bytes_sent += pktlen

    def write(data: Any, datatype: Any = None) -> None:
        if datatype is not None or chan._encoding or chan._send_state != "open" or not data:
            stock_write(data, datatype)  # its own checks and errors
            return
        # bytes cannot change under us: queued as they are; anything else is copied once.
        view = memoryview(data if isinstance(data, bytes) else bytes(data)).cast("B")
        chan._send_buf.append((view, None))
        chan._send_buf_len += len(view)
        flush()

    def flush() -> None:
        try:
            while chan._send_buf and chan._send_window:
                size = min(chan._send_window, chan._send_pktsize)
                buf, datatype = chan._send_buf[0]
                if len(buf) > size:
                    data = buf[:size]
                    if isinstance(buf, memoryview):
                        chan._send_buf[0] = (buf[size:], datatype)
                    else:
                        del buf[:size]
                else:
                    data = buf
                    del chan._send_buf[0]
                chan._send_buf_len -= len(data)
                chan._send_window -= len(data)
                if datatype is None:
                    send_data(data)
                else:
                    push()
                    chan.send_packet(95, datatype.to_bytes(4, "big"), len(data).to_bytes(4, "big") + bytes(data))
        finally:
            push()  # every packet that took a sequence number goes out, whatever happened
        chan._pause_resume_writing()
        if not chan._send_buf:
            if chan._send_state == "eof_pending":
                chan.send_packet(MSG_CHANNEL_EOF)
                chan._send_state = "eof"
            elif chan._send_state == "close_pending":
                chan._close_send()

    chan.write = write
    chan._flush_send_buf = flush
    return True
