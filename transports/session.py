"""An RPC-and-streams session: the I/O layer over :mod:`tug.transports.protocol`.

The protocol module decides what bytes mean; this module moves them. Both the
source and the agent run a :class:`Session` over any :class:`ByteStream` (an
SSH channel, stdin/stdout, an in-memory pipe in tests).

Backpressure is structural: the reader hands each stream chunk to its sink
and awaits it before reading more, so a slow disk on the agent slows the
sender through the transport's flow control instead of growing a buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

from tug.engine.errors import (
    ConfigError,
    CriuError,
    MigrationError,
    PreconditionError,
    ProtocolError,
    RemoteError,
    TransportError,
)

from . import protocol as p

#: Stream data leaves in frames of this size; the transport sees writes of at
#: least BATCH bytes (small writes cost SSH a packet and a MAC each).
CHUNK = 1 << 20
BATCH = 256 << 10


class ByteStream(Protocol):
    async def read(self) -> bytes:
        """Some bytes, or b"" at end of stream."""

    async def write(self, data: bytes) -> None:
        """Write and wait for the transport to accept it (flow control)."""

    async def close(self) -> None: ...


class StreamSink(Protocol):
    """Where an incoming stream's data goes (on the receiving side)."""

    async def write(self, data: bytes) -> None: ...

    async def close(self, meta: dict[str, Any]) -> None: ...

    async def abort(self, reason: str) -> None: ...


class Handler(Protocol):
    async def handle_call(self, method: str, args: dict[str, Any]) -> dict[str, Any]: ...

    async def open_stream(self, kind: str, meta: dict[str, Any]) -> StreamSink: ...


_KINDS: dict[str, type[MigrationError]] = {
    "config": ConfigError,
    "precondition": PreconditionError,
}


def error_from_fail(ev: p.Fail) -> MigrationError:
    """Rebuild the agent's exception on this side, keeping its details."""
    if ev.kind == "criu":
        lines = ev.details.get("error_lines") or []
        log = ev.details.get("log_path")
        from pathlib import Path

        # "summary" is the message without the error line and log path that
        # CriuError.__str__ appends (they travel as details and are re-added).
        summary = ev.details.get("summary")
        if not isinstance(summary, str):
            summary = ev.message.split(": ")[0] if lines else ev.message
        return CriuError(
            summary,
            error_lines=[str(x) for x in lines],
            log_path=Path(log) if isinstance(log, str) else None,
            returncode=ev.details.get("returncode") if isinstance(ev.details.get("returncode"), int) else None,
        )
    cls = _KINDS.get(ev.kind)
    if cls is not None:
        return cls(ev.message)
    return RemoteError(ev.message, remote_kind=ev.kind, details=ev.details)


def fail_from_error(call_id: int, exc: BaseException) -> p.Fail:
    details: dict[str, Any] = {}
    if isinstance(exc, CriuError):
        details = {
            "summary": str(exc.args[0]) if exc.args else "",
            "error_lines": list(exc.error_lines),
            "log_path": str(exc.log_path) if exc.log_path else None,
            "returncode": exc.returncode,
        }
    if isinstance(exc, MigrationError):
        return p.Fail(call_id=call_id, kind=exc.kind, message=str(exc), details=details)
    return p.Fail(call_id=call_id, kind="internal", message=f"{type(exc).__name__}: {exc}", details={})


class OutStream:
    """A stream we send; batches small writes into large frames."""

    def __init__(self, session: Session, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._buf = bytearray()
        self.bytes = 0

    async def write(self, data: bytes | memoryview) -> None:
        self.bytes += len(data)
        if not self._buf and len(data) >= BATCH:
            # Large writes skip the batching buffer: one copy fewer per chunk.
            view = memoryview(data)
            await self._session._write(
                b"".join(self._session.conn.send_data(self.stream_id, view[i : i + CHUNK]) for i in range(0, len(view), CHUNK))
            )
            return
        self._buf += data
        if len(self._buf) >= BATCH:
            await self._flush()

    async def _flush(self) -> None:
        buf, self._buf = self._buf, bytearray()
        view = memoryview(buf)
        frames = [self._session.conn.send_data(self.stream_id, view[i : i + CHUNK]) for i in range(0, len(buf), CHUNK)]
        if frames:
            await self._session._write(b"".join(frames))

    async def close(self, meta: dict[str, Any] | None = None) -> None:
        await self._flush()
        await self._session._send(p.StreamClose(stream_id=self.stream_id, meta=dict(meta or {})))

    async def abort(self, reason: str) -> None:
        self._buf.clear()
        await self._session._send(p.StreamAbort(stream_id=self.stream_id, reason=reason))


class Session:
    def __init__(
        self,
        stream: ByteStream,
        role: p.Role,
        *,
        handler: Handler | None = None,
        on_notice: Callable[[p.Notice], None] | None = None,
    ) -> None:
        self.stream = stream
        self.conn = p.Connection(role)
        self.handler = handler
        self.on_notice = on_notice
        self._ids = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._sinks: dict[int, StreamSink] = {}
        self._write_lock = asyncio.Lock()
        self._hello: asyncio.Future[p.Hello] = asyncio.get_running_loop().create_future()
        self._closed = asyncio.Event()
        self._failure: MigrationError | None = None
        self._reader: asyncio.Task[None] | None = None
        self._call_tasks: set[asyncio.Task[None]] = set()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.started = time.monotonic()

    # ---- lifecycle -------------------------------------------------------

    async def start(self, *, software: str, host: str, info: dict[str, Any], timeout: float = 30.0) -> p.Hello:
        """Exchange Hello frames; returns the peer's."""
        self._reader = asyncio.create_task(self._read_loop(), name="tug-session-reader")
        await self._send(p.Hello(version=p.PROTOCOL_VERSION, software=software, host=host, info=info))
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self._hello)
        except TimeoutError:
            raise TransportError(f"peer did not answer the tug handshake within {timeout:g} s") from None

    @property
    def peer(self) -> p.Hello | None:
        return self._hello.result() if self._hello.done() and not self._hello.exception() else None

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self, reason: str = "done") -> None:
        """Say Bye (if still possible), stop reading, close the byte stream."""
        if not self._closed.is_set() and self._failure is None:
            with contextlib.suppress(MigrationError):
                await self._send(p.Bye(reason=reason))
        with contextlib.suppress(MigrationError, OSError):
            await self.stream.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, MigrationError):
                await self._reader
        for t in list(self._call_tasks):
            t.cancel()
        self._fail_pending(TransportError("session closed"))
        self._closed.set()

    # ---- sending ---------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        async with self._write_lock:
            await self.stream.write(data)
            self.bytes_sent += len(data)

    async def _send(self, event: p.Event) -> None:
        await self._write(self.conn.send(event))

    async def call(self, method: str, *, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        try:
            await self._send(p.Call(call_id=call_id, method=method, args=args))
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise TransportError(f"agent did not answer {method!r} within {timeout:g} s") from None
        finally:
            self._pending.pop(call_id, None)

    async def open_stream(self, kind: str, meta: dict[str, Any] | None = None) -> OutStream:
        sid = next(self._stream_ids)
        await self._send(p.StreamOpen(stream_id=sid, kind=kind, meta=dict(meta or {})))
        return OutStream(self, sid)

    async def notice(self, message: str, *, level: str = "info", **data: Any) -> None:
        await self._send(p.Notice(level=level, message=message, data=data))

    # ---- receiving -------------------------------------------------------

    def _fail_pending(self, exc: MigrationError) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        if not self._hello.done():
            self._hello.set_exception(exc)
            self._hello.exception()  # mark retrieved: start() may never await it

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.stream.read()
                if not data:
                    self.conn.feed_eof()
                    raise TransportError("connection to peer closed")
                self.bytes_received += len(data)
                for ev in self.conn.feed(data):
                    await self._dispatch(ev)
                    if isinstance(ev, p.Bye):
                        self._closed.set()
                        self._fail_pending(TransportError(f"peer said goodbye: {ev.reason}"))
                        return
        except MigrationError as exc:
            self._failure = exc if isinstance(exc, (TransportError, ProtocolError)) else TransportError(str(exc))
            self._fail_pending(self._failure)
            for sink in self._sinks.values():
                with contextlib.suppress(Exception):
                    await sink.abort(str(exc))
            self._sinks.clear()
            self._closed.set()

    async def _dispatch(self, ev: p.Event) -> None:
        if isinstance(ev, p.Hello):
            if not self._hello.done():
                self._hello.set_result(ev)
        elif isinstance(ev, (p.Reply, p.Fail)):
            fut = self._pending.get(ev.call_id)
            if fut is not None and not fut.done():
                if isinstance(ev, p.Reply):
                    fut.set_result(ev.result)
                else:
                    fut.set_exception(error_from_fail(ev))
        elif isinstance(ev, p.Call):
            task = asyncio.create_task(self._serve_call(ev), name=f"tug-call-{ev.method}")
            self._call_tasks.add(task)
            task.add_done_callback(self._call_tasks.discard)
        elif isinstance(ev, p.StreamOpen):
            if self.handler is None:
                raise ProtocolError("peer opened a stream but this side accepts none")
            self._sinks[ev.stream_id] = await self.handler.open_stream(ev.kind, ev.meta)
        elif isinstance(ev, p.StreamData):
            await self._sinks[ev.stream_id].write(ev.data)
        elif isinstance(ev, p.StreamClose):
            await self._sinks.pop(ev.stream_id).close(ev.meta)
        elif isinstance(ev, p.StreamAbort):
            await self._sinks.pop(ev.stream_id).abort(ev.reason)
        elif isinstance(ev, p.Notice):
            if self.on_notice is not None:
                self.on_notice(ev)

    async def _serve_call(self, ev: p.Call) -> None:
        reply: p.Event
        try:
            if self.handler is None:
                raise ProtocolError(f"this side serves no calls (got {ev.method!r})")
            result = await self.handler.handle_call(ev.method, ev.args)
            reply = p.Reply(call_id=ev.call_id, result=result)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # every failure becomes a Fail for the caller
            reply = fail_from_error(ev.call_id, exc)
        with contextlib.suppress(MigrationError):
            await self._send(reply)

