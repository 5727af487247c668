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
view, and :func:`seal_data` lays out the whole SSH packet (RFC 4253 binary
packet: length, padding length, ``SSH_MSG_CHANNEL_DATA``, recipient, string)
in one buffer and encrypts it in place of asyncssh's own sequence, producing
the same bytes asyncssh would (tested byte for byte). The packets one flush
sends go to the socket in one ``writelines`` (before any packet asyncssh
sends itself, so the order on the wire is kept). Padding comes from
``os.urandom`` drawn a few KiB at a time instead of one syscall per packet.

A flush encodes its packets in one loop (:func:`speed_up`'s ``flush_data``)
with the connection's cipher state in locals and one plaintext buffer used
again for every packet, and the peer's window adjusts, which set the pace of
the flushes (OpenSSH sends one per 96 KiB consumed), skip asyncssh's general
receive path (:func:`_lean_window_adjusts`). Measured in a 1 GiB pre-copy
(the default, 3 runs each; with the pooled reads and the runner's malloc and
GC settings of the same day): 2.79-3.01 s of source CPU, 3.30-3.78 before.

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
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MSG_CHANNEL_DATA = 94
MSG_CHANNEL_EOF = 96
#: Random padding drawn at a time (a packet takes 4 to 19 bytes of it).
PAD_POOL = 4096

MSG_CHANNEL_WINDOW_ADJUST = 93
_GCM_TAG = 16
_CONN_ATTRS = ("_send_encryption", "_send_enchdrlen", "_send_blocksize", "_send_seq", "_rekey_bytes_sent",
               "_rekey_bytes", "_rekey_seconds", "_rekey_time", "_kex_complete", "_auth_complete", "_compressor",
               "_transport", "_recv_encryption", "_recv_pkthdr", "_recv_handler", "_recv_seq", "_inpbuf",
               "_decompressor", "_channels")
_CHAN_ATTRS = ("_send_buf", "_send_buf_len", "_send_window", "_send_pktsize", "_send_state", "_send_chan", "_encoding",
               "_pause_resume_writing", "_close_send", "send_packet", "_recv_state", "_flush_send_buf")


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


def padding_length(payload_len: int, block: int, hdrlen: int) -> int:
    """RFC 4253's random padding for a payload, by asyncssh's rule: at least 4
    bytes, and ``hdrlen`` (the encrypted part of the header) + payload +
    padding a multiple of the cipher's block."""
    padlen = -(hdrlen + payload_len) % block
    return padlen + block if padlen < 4 else padlen


def seal_data(
    plain: memoryview, recipient: bytes, data: Any, padding: bytes, aead: AESGCM, nonce: bytes
) -> tuple[bytes, bytes, int]:
    """One SSH_MSG_CHANNEL_DATA packet laid out in ``plain`` (used again for the
    next: the cipher copies out of it) with ``padding`` as its random padding,
    and encrypted with AES-GCM: (length field, ciphertext with its tag, packet
    length). The two parts go to the socket as they are (writelines), not
    joined into a third copy; the length field is the additional
    authenticated data, as RFC 5647 has it.
    """
    n = len(data)
    pktlen = 10 + n + len(padding)
    plain[0] = len(padding)
    plain[1] = MSG_CHANNEL_DATA
    plain[2:6] = recipient
    plain[6:10] = n.to_bytes(4, "big")
    plain[10 : 10 + n] = data
    plain[10 + n : pktlen] = padding
    hdr = pktlen.to_bytes(4, "big")
    return hdr, aead.encrypt(nonce, plain[:pktlen], hdr), pktlen


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
    if getattr(chan, "_tug_lean", False):
        return True  # once: a second layer would only wrap the first
    if not internals_known(conn, chan):
        return False
    chan._tug_lean = True
    padding = _Padding()
    keyed = _Keyed()
    stock_write = chan.write

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

    def write(data: Any, datatype: Any = None) -> None:
        if datatype is not None or chan._encoding or chan._send_state != "open" or not data:
            stock_write(data, datatype)  # its own checks and errors
            return
        # bytes cannot change under us: queued as they are; anything else is copied once.
        view = memoryview(data if isinstance(data, bytes) else bytes(data)).cast("B")
        chan._send_buf.append((view, None))
        chan._send_buf_len += len(view)
        flush()

    def take(size: int) -> tuple[Any, Any]:
        """The next packet's data (at most ``size`` bytes) off the send buffer, and its type."""
        buf, datatype = chan._send_buf[0]
        if len(buf) <= size:
            del chan._send_buf[0]
            return buf, datatype
        piece = buf[:size]
        if isinstance(buf, memoryview):  # ours: a view, sliced
            chan._send_buf[0] = (buf[size:], datatype)
        else:  # asyncssh's own bytearray (a typed write)
            del buf[:size]
        return piece, datatype

    #: The plaintext of one packet, used again for the next: encrypt copies out of it.
    plain = memoryview(bytearray(chan._send_pktsize + 64))

    def flush_data() -> None:
        """Data packets, one loop with the connection's state in locals, while
        nothing asyncssh must see is due: checked once per flush (one peer
        window's worth, microseconds) and the rekey budget per packet."""
        buf = chan._send_buf
        cipher = conn._send_encryption._cipher
        aead = keyed.get(cipher._key)
        fixed, counter = cipher._iv[:4], int.from_bytes(cipher._iv[4:], "big")
        budget = conn._rekey_bytes - conn._rekey_bytes_sent
        window, pktsize = chan._send_window, chan._send_pktsize
        recipient = chan._send_chan.to_bytes(4, "big")
        block, hdrlen = conn._send_blocksize, conn._send_enchdrlen
        used = sent = packets = 0
        try:
            while buf and window and used < budget:
                if buf[0][1] is not None:
                    break  # typed data: asyncssh's way
                piece, _ = take(window if window < pktsize else pktsize)
                n = len(piece)
                window -= n
                sent += n
                hdr, sealed, pktlen = seal_data(plain, recipient, piece, padding.take(padding_length(9 + n, block, hdrlen)),
                                                aead, fixed + counter.to_bytes(8, "big"))
                pending.append(hdr)
                pending.append(sealed)
                counter = (counter + 1) & 0xFFFFFFFFFFFFFFFF
                used += pktlen
                packets += 1
        finally:  # what was encoded took its sequence numbers and IVs, whatever happened
            cipher._iv = fixed + counter.to_bytes(8, "big")
            conn._send_seq = (conn._send_seq + packets) & 0xFFFFFFFF
            conn._rekey_bytes_sent += used
            chan._send_window = window
            chan._send_buf_len -= sent

    def flush() -> None:
        try:
            while chan._send_buf and chan._send_window:
                if chan._send_chan is not None and fast_ok():
                    flush_data()  # data packets, up to a typed one, the window or the rekey budget
                    if not (chan._send_buf and chan._send_window):
                        break
                # One packet asyncssh's own way: typed data, or anything while fast_ok() is not.
                data, datatype = take(min(chan._send_window, chan._send_pktsize))
                chan._send_buf_len -= len(data)
                chan._send_window -= len(data)
                push()  # in order: what was encoded before goes first
                if datatype is not None:
                    chan.send_packet(95, datatype.to_bytes(4, "big"), len(data).to_bytes(4, "big") + bytes(data))
                elif chan._send_chan is not None:  # closed meanwhile: asyncssh's send_packet drops it too
                    chan.send_packet(MSG_CHANNEL_DATA, len(data).to_bytes(4, "big") + bytes(data))
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
    _lean_window_adjusts(conn)
    return True


def _lean_window_adjusts(conn: Any) -> None:
    """Take the peer's window adjusts without asyncssh's general receive path.

    Why: OpenSSH grants a sender more window every 96 KiB it consumed, so a
    GiB brings ~13,000 SSH_MSG_CHANNEL_WINDOW_ADJUST packets, each of which
    asyncssh decrypts with a new AES-GCM object and dispatches through its
    packet, logging and handler machinery before the 4 bytes that matter
    reach the channel. A whole window adjust in the input is decrypted here
    (the same checks: tag, packet type, channel, its state) and applied as
    the channel's own handler does; anything else, a packet not yet whole,
    any condition asyncssh handles differently (another cipher, compression,
    debug logging) goes to asyncssh's ``_recv_pkthdr`` untouched, which
    decrypts it itself. Installed once per connection.
    """
    if getattr(conn, "_tug_lean_recv", False):
        return
    stock = conn._recv_pkthdr
    keyed = _Keyed()

    def recv_pkthdr() -> bool:
        inp = conn._inpbuf
        enc = conn._recv_encryption
        if (type(enc) is not GCMEncryption or conn._decompressor or SSHLogger._debug_level >= 2 or len(inp) < 4
                or not conn._transport):
            return bool(stock())
        pktlen = int.from_bytes(inp[:4], "big")
        end = 4 + pktlen + _GCM_TAG
        if pktlen > 64 or len(inp) < end:  # a window adjust is 32 bytes; longer is something else
            return bool(stock())
        cipher = enc._cipher
        try:
            packet = keyed.get(cipher._key).decrypt(cipher._iv, inp[4:end], inp[:4])
        except InvalidTag:
            return bool(stock())  # its own error
        if packet[1] != MSG_CHANNEL_WINDOW_ADJUST or len(packet) - packet[0] != 10:
            return bool(stock())
        chan = conn._channels.get(int.from_bytes(packet[2:6], "big"))
        if chan is None or chan._recv_state not in ("open", "eof_pending", "eof"):
            return bool(stock())
        conn._inpbuf = inp[end:]
        cipher._update_iv()
        conn._recv_seq = (conn._recv_seq + 1) & 0xFFFFFFFF
        chan._send_window += int.from_bytes(packet[6:10], "big")
        chan._flush_send_buf()
        return True

    conn._recv_pkthdr = recv_pkthdr
    if conn._recv_handler == stock:
        conn._recv_handler = recv_pkthdr
    conn._tug_lean_recv = True
