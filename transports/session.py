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
import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

from tug.engine.errors import (
    ConfigError,
    CriuError,
    IntegrityError,
    MigrationError,
    PreconditionError,
    ProtocolError,
    RanThenFailed,
    RemoteError,
    TransportError,
)

from . import protocol as p

#: Stream data leaves in frames of this size; the transport sees writes of at
#: least BATCH bytes (small writes cost SSH a packet and a MAC each).
CHUNK = 1 << 20
BATCH = 256 << 10

#: Notice data key by which a receiver reports that one of the sender's streams
#: failed on its side. Only a stream's sender may end it (StreamClose,
#: StreamAbort), and Notice is the one event either side may send at any time,
#: so the report rides on a Notice: no new wire event, and an older peer just
#: logs it.
STREAM_FAILED = "tug.stream_failed"

#: Longest error text put into a fallback Fail or a stream failure report; a
#: report that does not fit in a frame would be dropped, which is what it is for.
_CLIP = 4096


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
    "ran-then-failed": RanThenFailed,
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
    if ev.kind == IntegrityError.kind:
        # The file or page run and the values that differed, kept for a caller to act on.
        d = ev.details
        return IntegrityError(
            ev.message,
            subject=d["subject"] if isinstance(d.get("subject"), str) else "",
            check=d["check"] if isinstance(d.get("check"), str) else "",
            expected=d["expected"] if type(d.get("expected")) is int else 0,
            got=d["got"] if type(d.get("got")) is int else 0,
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
    elif isinstance(exc, IntegrityError):
        details = exc.details()
    if isinstance(exc, MigrationError):
        return p.Fail(call_id=call_id, kind=exc.kind, message=str(exc), details=details)
    return p.Fail(call_id=call_id, kind="internal", message=f"{type(exc).__name__}: {exc}", details={})


def _clip(text: str) -> str:
    """Short, and encodable whatever it holds (an OSError may quote a surrogate-escaped path)."""
    text = text.encode("utf-8", "backslashreplace").decode()
    return text if len(text) <= _CLIP else text[:_CLIP] + "..."


def _is_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the code we called rather than a cancellation of us.

    A handler or sink may let a CancelledError out of something it awaited
    that someone else cancelled; that is its failure, and must be answered
    like any other, or the peer waits forever.
    """
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and task.cancelling() == 0
    return isinstance(exc, Exception)


class OutStream:
    """A stream we send; batches small writes into large frames.

    If the receiver fails to take the stream, it says so (see
    :data:`STREAM_FAILED`) and keeps the session: the next :meth:`write` or
    :meth:`close` raises its error. :meth:`close` does not wait for the
    receiver, so a failure it reports after the close is raised by the
    session's next :meth:`Session.call` instead: the peer handles frames in
    order, so any call sent after the close is answered after that report,
    and a sender never proceeds past a broken stream unawares.
    """

    def __init__(self, session: Session, stream_id: int, kind: str = "") -> None:
        self._session = session
        self.stream_id = stream_id
        self.kind = kind
        self._buf = bytearray()
        self.bytes = 0
        self.closed = False
        #: The receiver's error, once it reported that it failed this stream.
        self.failure: MigrationError | None = None

    async def write(self, data: bytes | memoryview) -> None:
        if self.failure is not None:
            raise self.failure
        self.bytes += len(data)
        if len(data) < BATCH:
            self._buf += data
            if len(self._buf) >= BATCH:
                await self._flush()
            return
        # A large write (a run of pages, typically after its small header) is
        # framed straight from the caller's buffer, with whatever is batched
        # ahead of it in its first frame: its bytes are copied once, into the
        # frames, which go out one by one (a few MiB joined would be a second
        # copy). Only a tail too small to be worth an SSH write is batched.
        conn, view = self._session.conn, memoryview(data)
        frames: list[bytes] = []
        start = 0
        if self._buf:
            start = min(CHUNK - len(self._buf), len(view))
            frames.append(conn.send_data(self.stream_id, self._buf, view[:start]))
            self._buf = bytearray()
        for i in range(start, len(view), CHUNK):
            piece = view[i : i + CHUNK]
            if len(piece) < BATCH:
                self._buf += piece
                break
            frames.append(conn.send_data(self.stream_id, piece))
        for frame in frames:
            await self._session._write(frame)

    async def _flush(self) -> None:
        buf, self._buf = self._buf, bytearray()
        view = memoryview(buf)
        frames = [self._session.conn.send_data(self.stream_id, view[i : i + CHUNK]) for i in range(0, len(buf), CHUNK)]
        if frames:
            await self._session._write(b"".join(frames))

    async def close(self, meta: dict[str, Any] | None = None) -> None:
        if self.failure is not None:
            raise self.failure
        await self._flush()
        await self._session._send(p.StreamClose(stream_id=self.stream_id, meta=dict(meta or {})))
        self.closed = True

    async def abort(self, reason: str) -> None:
        self._buf.clear()
        # The sender gives up on the stream: a failure the receiver reports for it is moot.
        self._session._out.pop(self.stream_id, None)
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
        #: Streams we opened whose failure the peer may still report (see OutStream).
        self._out: dict[int, OutStream] = {}
        #: Failures the peer reported for streams we had already closed; the next call raises them.
        self._late_failures: list[MigrationError] = []
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
        try:
            # Our Hello is inside the timeout too: a peer that reads nothing blocks it.
            async with asyncio.timeout(timeout):
                await self._send(p.Hello(version=p.PROTOCOL_VERSION, software=software, host=host, info=info))
                return await asyncio.shield(self._hello)
        except TimeoutError:
            raise TransportError(f"peer did not answer the tug handshake within {timeout:g} s") from None

    @property
    def lost(self) -> MigrationError | None:
        """Why the session ended without a goodbye (its link or peer failed), if it did."""
        return self._failure

    @property
    def peer(self) -> p.Hello | None:
        return self._hello.result() if self._hello.done() and not self._hello.exception() else None

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self, reason: str = "done", *, timeout: float = 5.0) -> None:
        """Say Bye (if still possible), stop reading, close the byte stream.

        The Bye is a courtesy: it gets ``timeout`` seconds, so closing never
        hangs on a peer that has stopped reading.
        """
        if not self._closed.is_set() and self._failure is None:
            with contextlib.suppress(MigrationError, TimeoutError):
                async with asyncio.timeout(timeout):
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
            try:
                await self.stream.write(data)
            except OSError as exc:  # a plain pipe's BrokenPipeError: one error hierarchy here too
                raise TransportError(f"connection to peer lost: {exc}") from None
            self.bytes_sent += len(data)

    async def _send(self, event: p.Event) -> None:
        await self._write(self.conn.send(event))

    async def call(
        self, method: str, *, timeout: float | None = None, stream_failures: bool = True, **args: Any
    ) -> dict[str, Any]:
        """Ask the peer; ``timeout`` bounds the whole call, sending included.

        A peer that stops reading blocks the send (flow control), so a timeout
        that only covered the wait for the answer would never fire there.
        With ``stream_failures=False`` a stream failure the peer reported
        meanwhile stays queued instead of replacing this call's answer: a
        rollback's ``abort`` must learn that the peer cleaned up.
        """
        call_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        # Streams closed before this call: once it is answered, the peer has seen their end.
        settled = [sid for sid, out in self._out.items() if out.closed] if stream_failures else []
        sent = False
        try:
            async with asyncio.timeout(timeout):
                await self._send(p.Call(call_id=call_id, method=method, args=args))
                sent = True
                result = await fut
        except TimeoutError:
            if not sent:
                what = "the peer is not reading, or the link is that slow"
                raise TransportError(f"could not send {method!r} within {timeout:g} s: {what}") from None
            raise TransportError(f"agent did not answer {method!r} within {timeout:g} s") from None
        except MigrationError as exc:
            late = self._late_failure(settled) if sent and stream_failures else None
            if late is None:
                raise
            late.add_note(f"then {method!r} failed: {exc}")
            raise late from None
        finally:
            self._pending.pop(call_id, None)
        late = self._late_failure(settled) if stream_failures else None
        if late is not None:
            raise late
        return result

    def _late_failure(self, settled: list[int]) -> MigrationError | None:
        for sid in settled:
            self._out.pop(sid, None)
        return self._late_failures.pop(0) if self._late_failures else None

    async def open_stream(self, kind: str, meta: dict[str, Any] | None = None) -> OutStream:
        sid = next(self._stream_ids)
        await self._send(p.StreamOpen(stream_id=sid, kind=kind, meta=dict(meta or {})))
        out = self._out[sid] = OutStream(self, sid, kind)
        return out

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
        except BaseException as exc:
            # Anything that ends the reader must fail the waiting calls: a reader
            # that died silently would leave them (and the peer) waiting forever.
            if not _is_failure(exc):
                raise
            if isinstance(exc, (TransportError, ProtocolError)):
                self._failure = exc
            elif isinstance(exc, MigrationError):
                self._failure = TransportError(str(exc))
            else:
                self._failure = TransportError(f"session reader failed: {type(exc).__name__}: {exc}")
            self._fail_pending(self._failure)
            for sink in self._sinks.values():
                with contextlib.suppress(Exception):
                    await sink.abort(str(self._failure))
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
            try:
                if self.handler is None:
                    raise ProtocolError("peer opened a stream but this side accepts none")
                self._sinks[ev.stream_id] = await self.handler.open_stream(ev.kind, ev.meta)
            except BaseException as exc:
                if not _is_failure(exc):
                    raise
                await self._fail_stream(ev.stream_id, None, exc)
        elif isinstance(ev, (p.StreamData, p.StreamClose)):
            # No sink: the stream failed here already, and its sender has been told.
            sink = self._sinks.get(ev.stream_id)
            if sink is None:
                return
            try:
                if isinstance(ev, p.StreamData):
                    await sink.write(ev.data)
                else:
                    del self._sinks[ev.stream_id]
                    await sink.close(ev.meta)
            except BaseException as exc:
                if not _is_failure(exc):
                    raise
                await self._fail_stream(ev.stream_id, sink, exc)
        elif isinstance(ev, p.StreamAbort):
            sink = self._sinks.pop(ev.stream_id, None)
            if sink is not None:
                with contextlib.suppress(Exception):  # the sender gave up already; nobody to tell
                    await sink.abort(ev.reason)
        elif isinstance(ev, p.Notice):
            sid = ev.data.get(STREAM_FAILED)
            if type(sid) is int:
                self._peer_failed_stream(sid, ev)
            elif self.on_notice is not None:
                self.on_notice(ev)

    async def _fail_stream(self, stream_id: int, sink: StreamSink | None, exc: BaseException) -> None:
        """An incoming stream failed here: drop it and tell its sender, but keep the session.

        One bad stream (a full disk, a malformed record) is the migration's
        problem, which the sender decides about; ending the reader instead
        would leave every call of the peer unanswered.
        """
        self._sinks.pop(stream_id, None)
        fail = fail_from_error(0, exc)
        message = _clip(fail.message)
        if sink is not None:
            with contextlib.suppress(Exception):
                await sink.abort(message)
        report = p.Notice(
            level="error",
            message=message,
            data={STREAM_FAILED: stream_id, "kind": _clip(fail.kind), "details": fail.details},
        )
        with contextlib.suppress(MigrationError):  # e.g. we said Bye already: nobody to tell
            try:
                await self._send(report)
            except p.LocalProtocolError:  # details that cannot go on the wire
                await self._send(dataclasses.replace(report, data={STREAM_FAILED: stream_id, "kind": report.data["kind"]}))

    def _peer_failed_stream(self, stream_id: int, ev: p.Notice) -> None:
        out = self._out.pop(stream_id, None)
        if out is None:  # aborted by us, or not ours: nothing waits for it
            return
        kind, details = ev.data.get("kind"), ev.data.get("details")
        peer = p.Role.AGENT.value if self.conn.role is p.Role.SOURCE else p.Role.SOURCE.value
        exc = error_from_fail(
            p.Fail(
                call_id=0,
                kind=kind if isinstance(kind, str) else "internal",
                message=f"{peer} could not take the {out.kind!r} stream: {ev.message}",
                details=details if isinstance(details, dict) else {},
            )
        )
        if out.closed:
            self._late_failures.append(exc)
        else:
            out.failure = exc

    async def _serve_call(self, ev: p.Call) -> None:
        reply: p.Reply | p.Fail
        try:
            if self.handler is None:
                raise ProtocolError(f"this side serves no calls (got {ev.method!r})")
            result = await self.handler.handle_call(ev.method, ev.args)
            reply = p.Reply(call_id=ev.call_id, result=result)
        except BaseException as exc:  # every failure becomes a Fail for the caller
            if isinstance(exc, asyncio.CancelledError) and not _is_failure(exc):
                raise
            reply = fail_from_error(ev.call_id, exc)
        with contextlib.suppress(MigrationError):  # the session is gone: nobody waits for the answer
            await self._write(self._answer(reply))

    def _answer(self, answer: p.Reply | p.Fail) -> bytes:
        """Frame a call's answer, or, if the protocol refuses it, a Fail saying why.

        The caller waits for exactly one answer, so an answer over the frame
        limit, or that msgpack cannot carry, must not simply be dropped.
        """
        try:
            return self.conn.send(answer)
        except p.LocalProtocolError as exc:
            refused = exc
        if isinstance(answer, p.Fail):
            fallback = p.Fail(call_id=answer.call_id, kind=_clip(answer.kind), message=_clip(answer.message), details={})
        else:
            try:
                size: int | None = len(p.encode_event(answer)) - 4
            except p.LocalProtocolError:
                size = None
            if size is not None and size > self.conn.max_frame:
                reason = f"reply too large: {size} bytes (limit {self.conn.max_frame})"
            else:
                reason = f"reply cannot be sent: {refused}"
            fallback = fail_from_error(answer.call_id, p.LocalProtocolError(_clip(reason)))
        return self.conn.send(fallback)

