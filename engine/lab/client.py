"""``tug lab client``: traffic that must survive a migration, measured.

Runs in the lab's client namespace. Each connection sends ``GET <id>`` every
few milliseconds and checks that every request gets exactly one reply, in
order; the longest wait between replies is the downtime a client sees. A
connection that breaks is reopened and counted: a live migration should need
none. Optionally one connection downloads a large BULK stream and one uploads
data for a SUM, both throttled so the transfer is in flight across the
freeze, and both verified byte for byte.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

MASK64 = (1 << 64) - 1
READ_TIMEOUT = 30.0


class XorShiftStream:
    """The workload's BULK stream (xorshift64*, little-endian words), incrementally."""

    def __init__(self, seed: int) -> None:
        self.x = seed or 0x9E3779B97F4A7C15
        self.buf = b""

    def take(self, n: int) -> bytes:
        out = bytearray(self.buf)
        x = self.x
        while len(out) < n:
            x ^= x >> 12
            x ^= (x << 25) & MASK64
            x ^= x >> 27
            out += ((x * 0x2545F4914F6CDD1D) & MASK64).to_bytes(8, "little")
        self.x = x
        self.buf = bytes(out[n:])
        return bytes(out[:n])


def fnv1a64(data: bytes, h: int = 0xCBF29CE484222325) -> int:
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return h


@dataclass
class ConnStats:
    replies: int = 0
    errors: int = 0
    reconnects: int = 0
    out_of_order: int = 0
    max_gap_ms: float = 0.0
    error_messages: list[str] = field(default_factory=list)


def _running(end: float, stop: asyncio.Event) -> bool:
    return time.monotonic() < end and not stop.is_set()


async def _get_loop(host: str, port: int, end: float, stop: asyncio.Event, interval: float, st: ConnStats) -> None:
    req = 0
    connected_once = False
    #: Time of the last reply, kept across reconnects: a gap that spans a
    #: broken connection is downtime too.
    last: float | None = None
    while _running(end, stop):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
        except (OSError, TimeoutError) as exc:
            st.errors += 1
            st.error_messages.append(f"connect: {exc!r}")
            await asyncio.sleep(0.05)
            continue
        if connected_once:
            st.reconnects += 1
        connected_once = True
        try:
            while _running(end, stop):
                req += 1
                writer.write(b"GET %d\n" % req)
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
                if not line:
                    raise ConnectionResetError("connection closed by the server")
                now = time.monotonic()
                if last is not None:
                    st.max_gap_ms = max(st.max_gap_ms, (now - last) * 1000)
                last = now
                parts = line.split()
                if not parts or parts[0] != str(req).encode():
                    st.out_of_order += 1
                st.replies += 1
                await asyncio.sleep(interval)
            writer.close()
            return
        except (OSError, TimeoutError, ConnectionError) as exc:
            st.errors += 1
            st.error_messages.append(repr(exc))
            writer.close()


async def _bulk(host: str, port: int, nbytes: int, rate: float, seed: int = 42) -> dict[str, Any]:
    """Download nbytes at about ``rate`` bytes/s and compare with the expected stream."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"BULK %d %d\n" % (nbytes, seed))
    await writer.drain()
    expect = XorShiftStream(seed)
    got = 0
    ok = True
    t0 = time.monotonic()
    started_at = time.time()
    try:
        while got < nbytes:
            chunk = await asyncio.wait_for(reader.read(min(65536, nbytes - got)), READ_TIMEOUT)
            if not chunk:
                return {"bytes": nbytes, "received": got, "ok": False, "error": "closed early"}
            if chunk != expect.take(len(chunk)):
                ok = False
            got += len(chunk)
            ahead = got / rate - (time.monotonic() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
    except (OSError, TimeoutError) as exc:
        return {"bytes": nbytes, "received": got, "ok": False, "error": repr(exc)}
    finally:
        writer.close()
    return {"bytes": nbytes, "received": got, "ok": ok, "started_at": started_at, "finished_at": time.time()}


async def _upload(host: str, port: int, nbytes: int, rate: float, seed: int = 7) -> dict[str, Any]:
    """Upload nbytes at about ``rate`` bytes/s; the server's FNV-1a must match ours."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"SUM %d\n" % nbytes)
    src = XorShiftStream(seed)
    h = 0xCBF29CE484222325
    sent = 0
    t0 = time.monotonic()
    started_at = time.time()
    try:
        while sent < nbytes:
            chunk = src.take(min(16384, nbytes - sent))
            h = fnv1a64(chunk, h)
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
            ahead = sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
        line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        return {"bytes": nbytes, "sent": sent, "ok": False, "error": repr(exc)}
    finally:
        writer.close()
    return {
        "bytes": nbytes, "sent": sent, "ok": line.strip() == f"{h:016x}".encode(), "server_sum": line.strip().decode(),
        "started_at": started_at, "finished_at": time.time(),
    }


async def run(
    host: str,
    *,
    port: int = 7000,
    duration: float = 10.0,
    connections: int = 1,
    interval_ms: float = 5.0,
    bulk_bytes: int = 0,
    upload_bytes: int = 0,
    rate: float = 2 << 20,
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Hold the connections for ``duration`` seconds or until ``stop`` is set.

    Bulk transfers always run to their end (or their error): stopping early
    must not turn an intact stream into a truncated one.
    """
    stop = stop or asyncio.Event()
    end = time.monotonic() + duration
    stats = [ConnStats() for _ in range(connections)]
    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        for st in stats:
            tg.create_task(_get_loop(host, port, end, stop, interval_ms / 1000, st))
        bulk = tg.create_task(_bulk(host, port, bulk_bytes, rate)) if bulk_bytes else None
        upload = tg.create_task(_upload(host, port, upload_bytes, rate)) if upload_bytes else None
    out: dict[str, Any] = {
        "target": f"{host}:{port}",
        "duration_s": time.monotonic() - t0,
        "connections": connections,
        "replies": sum(s.replies for s in stats),
        "errors": sum(s.errors for s in stats),
        "reconnects": sum(s.reconnects for s in stats),
        "out_of_order": sum(s.out_of_order for s in stats),
        "max_gap_ms": max(s.max_gap_ms for s in stats),
        "per_connection": [asdict(s) for s in stats],
    }
    if bulk is not None:
        out["bulk"] = bulk.result()
    if upload is not None:
        out["upload"] = upload.result()
    out["ok"] = (
        out["errors"] == 0 and out["reconnects"] == 0 and out["out_of_order"] == 0 and out["replies"] > 0
        and all(x.get("ok", True) for x in (out.get("bulk", {}), out.get("upload", {})))
    )
    return out
