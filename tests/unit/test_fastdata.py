"""The lean channel-data path (transports/fastdata.py): the same packets asyncssh
would send, accepted by a real asyncssh peer, across rekeys and flow control."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_WINDOW_ADJUST
from asyncssh.crypto.cipher import GCMCipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tug.transports import fastdata

from .sshserver import known_hosts, start_server


def test_a_packet_is_rfc4253_encrypted_as_asyncssh_encrypts_it() -> None:
    key, iv = os.urandom(16), os.urandom(12)
    data = os.urandom(32768 - 9)
    padding = os.urandom(19)

    def padlen_for(n: int) -> int:  # AES-GCM: the length field is not encrypted (1), 16-byte blocks
        p = -(1 + n) % 16
        return p + 16 if p < 4 else p

    # RFC 4253 6: uint32 packet_length, byte padding_length, payload, random padding.
    payload = bytes([MSG_CHANNEL_DATA]) + (7).to_bytes(4, "big") + len(data).to_bytes(4, "big") + data
    padlen = padlen_for(len(payload))
    assert fastdata.padding_length(len(payload), 16, 1) == padlen
    plain = memoryview(bytearray(b"x" * (32768 + 64)))  # a buffer used before: stale bytes must not leak in
    hdr_field, sealed, pktlen = fastdata.seal_data(plain, (7).to_bytes(4, "big"), memoryview(data), padding[:padlen],
                                                   AESGCM(key), iv)
    packet = bytes([padlen]) + payload + padding[:padlen]
    hdr = len(packet).to_bytes(4, "big")
    body, tag = GCMCipher("aes128-gcm", key, iv).encrypt_and_sign(hdr, packet)
    assert hdr_field + sealed == body + tag and pktlen == len(packet)


def test_padding_is_random_and_drawn_in_bulk(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.urandom
    monkeypatch.setattr(fastdata.os, "urandom", lambda n: calls.append(n) or real(n))
    pad = fastdata._Padding()
    taken = [pad.take(19) for _ in range(400)]
    assert len(set(taken)) == 400 and len(calls) == 2  # 400 x 19 bytes from two 4 KiB draws


async def _hashing_agent(process: asyncssh.SSHServerProcess[bytes]) -> None:
    h = hashlib.sha256()
    n = 0
    while chunk := await process.stdin.read(1 << 16):
        h.update(chunk)
        n += len(chunk)
    process.stdout.write(f"{n} {h.hexdigest()}\n".encode())
    process.exit(0)


async def _transfer(tmp_path: Path, chunks: list[Any], *, rekey_bytes: int | None = None, window: int | None = None
                    ) -> tuple[str, dict[str, int]]:
    server, host_key, ident = await start_server(tmp_path, process_factory=_hashing_agent,
                                                 **({"window": window} if window else {}))
    port = server.sockets[0].getsockname()[1]
    counts = {"data_via_asyncssh": 0, "kexinit": 0, "writelines": 0, "parts_written": 0, "adjusts_via_asyncssh": 0}
    opts: dict[str, Any] = {"rekey_bytes": rekey_bytes} if rekey_bytes else {}
    handlers = asyncssh.channel.SSHChannel._packet_handlers
    stock_adjust = handlers[MSG_CHANNEL_WINDOW_ADJUST]

    def adjust(chan: Any, *args: Any) -> Any:
        counts["adjusts_via_asyncssh"] += 1
        return stock_adjust(chan, *args)

    handlers[MSG_CHANNEL_WINDOW_ADJUST] = adjust  # the server's channels too: not counted below
    try:
        async with asyncssh.connect("127.0.0.1", port, username="root", client_keys=[str(ident)],
                                    known_hosts=str(known_hosts(tmp_path, port, host_key)),
                                    encryption_algs=["aes128-gcm@openssh.com"], **opts) as conn:
            stock_send, stock_kexinit = conn.send_packet, conn._send_kexinit

            def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
                if pkttype == MSG_CHANNEL_DATA:
                    counts["data_via_asyncssh"] += 1
                stock_send(pkttype, *args, handler=handler)

            def kexinit() -> None:
                counts["kexinit"] += 1
                stock_kexinit()

            conn.send_packet = send_packet  # type: ignore[method-assign]
            conn._send_kexinit = kexinit  # type: ignore[method-assign]
            transport = conn._transport
            stock_writelines = transport.writelines

            def writelines(parts: list[bytes]) -> None:
                counts["writelines"] += 1
                counts["parts_written"] += len(parts)
                stock_writelines(parts)

            transport.writelines = writelines
            proc = await conn.create_process("agent", encoding=None)
            assert fastdata.speed_up(conn, proc.channel)
            for c in chunks:
                proc.stdin.write(c)
                await proc.stdin.drain()
            proc.stdin.write_eof()
            out = await asyncio.wait_for(proc.stdout.read(), 60)
            await proc.wait()
    finally:
        server.close()
        handlers[MSG_CHANNEL_WINDOW_ADJUST] = stock_adjust
    return out.decode().strip(), counts


def _expect(chunks: list[Any]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(bytes(c))
    return f"{sum(len(bytes(c)) for c in chunks)} {h.hexdigest()}"


async def test_every_byte_arrives_through_the_lean_path(tmp_path: Path) -> None:
    """bytes, bytearray and memoryview writes of every size, 32 KiB packets and a
    small window (many window adjusts): the peer's digest matches, and no data
    packet went through asyncssh's own send_packet."""
    src = os.urandom(3 << 20)
    chunks: list[Any] = [src[:1], bytearray(src[1:70000]), memoryview(src)[70000:1 << 20], src[1 << 20:]]
    got, counts = await _transfer(tmp_path, chunks, window=256 * 1024)
    assert got == _expect(chunks)
    assert counts["data_via_asyncssh"] == 0, counts
    # One writev per flush: the packets a window opening lets go leave together.
    assert counts["parts_written"] >= 2 * ((3 << 20) // 32768)  # each packet: its length field, its ciphertext
    assert counts["writelines"] * 3 <= counts["parts_written"] // 2, counts


async def test_window_adjusts_skip_asyncssh_s_receive_path(tmp_path: Path) -> None:
    """A 64 KiB window: the peer reopens it ~100 times for 3 MiB, and the data
    only moves when the adjusts are applied; none reaches asyncssh's handler
    (the server's own channel, which never sends, gets none either)."""
    chunks = [os.urandom(3 << 20)]
    got, counts = await _transfer(tmp_path, chunks, window=64 * 1024)
    assert got == _expect(chunks)
    assert counts["adjusts_via_asyncssh"] == 0, counts


async def test_window_adjusts_take_asyncssh_s_path_when_it_logs_them(tmp_path: Path) -> None:
    asyncssh.set_debug_level(2)
    try:
        chunks = [os.urandom(1 << 20)]
        got, counts = await _transfer(tmp_path, chunks, window=64 * 1024)
    finally:
        asyncssh.set_debug_level(1)
    assert got == _expect(chunks)
    assert counts["adjusts_via_asyncssh"] >= (1 << 20) // (64 * 1024), counts


async def test_a_rekey_goes_through_asyncssh_and_the_data_survives_it(tmp_path: Path) -> None:
    """Rekey every 1 MB: each packet that finds a key exchange due goes through
    asyncssh's send_packet (which starts it and defers data until it is done)."""
    chunks = [os.urandom(1 << 20) for _ in range(8)]
    got, counts = await _transfer(tmp_path, chunks, rekey_bytes=1_000_000)
    assert got == _expect(chunks)
    assert counts["kexinit"] >= 5 and counts["data_via_asyncssh"] >= 5, counts


async def test_packet_debug_logging_keeps_asyncssh_s_own_path(tmp_path: Path) -> None:
    asyncssh.set_debug_level(3)
    try:
        chunks = [os.urandom(200_000)]
        got, counts = await _transfer(tmp_path, chunks)
    finally:
        asyncssh.set_debug_level(1)
    assert got == _expect(chunks)
    assert counts["data_via_asyncssh"] >= 200_000 // 32768, counts


def test_an_unknown_asyncssh_is_left_alone() -> None:
    class Conn:
        pass

    assert fastdata.speed_up(Conn(), Conn()) is False


def test_the_installed_asyncssh_is_the_one_the_lean_path_was_written_for() -> None:
    """Another asyncssh release turns the lean path off (asyncssh's own path, ~0.5 s more CPU
    per GiB): this says so instead of silently. Review fastdata.py against its send path."""
    assert asyncssh.__version__.startswith(fastdata.TESTED_ASYNCSSH), (
        f"asyncssh {asyncssh.__version__}: transports/fastdata.py was written for {fastdata.TESTED_ASYNCSSH}"
    )
