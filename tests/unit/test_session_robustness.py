"""Session robustness: two real Sessions over a connected unix socket pair.

Faults come from the harness only: a peer whose reading is paused (so flow
control blocks the writer), handlers and sinks that raise, answers that do
not fit in a frame. Whatever happens, a caller gets an answer or an error
within its bounds, and one bad call or stream never ends the session.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tug.engine.errors import ConfigError, MigrationError, ProtocolError, RemoteError, TransportError
from tug.transports import protocol as p
from tug.transports.session import BATCH, Session

BOUND = 5.0  # no test waits longer than this for anything; the bug is a hang


class SocketStream:
    """A ByteStream over one end of a socket pair; ``pause()`` makes it a peer that stops reading."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._r = reader
        self._w = writer
        self._reading = asyncio.Event()
        self._reading.set()

    def pause(self) -> None:
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    async def read(self) -> bytes:
        await self._reading.wait()
        return await self._r.read(1 << 16)

    async def write(self, data: bytes) -> None:
        self._w.write(data)
        await self._w.drain()

    async def close(self) -> None:
        self._w.close()


async def socket_pair() -> tuple[SocketStream, SocketStream]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):  # small kernel buffers: a paused reader blocks the writer quickly
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
    ends = [await asyncio.open_unix_connection(sock=s) for s in (a, b)]
    return SocketStream(*ends[0]), SocketStream(*ends[1])


@dataclass
class Sink:
    """Records what arrives; raises ``exc`` from ``fail_on`` (write, close or abort)."""

    fail_on: str | None = None
    exc: BaseException | None = None
    data: bytearray = field(default_factory=bytearray)
    meta: dict[str, Any] | None = None
    aborted: str | None = None

    def _maybe_fail(self, where: str) -> None:
        if self.fail_on == where:
            assert self.exc is not None
            raise self.exc

    async def write(self, data: bytes) -> None:
        self._maybe_fail("write")
        self.data += data

    async def close(self, meta: dict[str, Any]) -> None:
        self._maybe_fail("close")
        self.meta = meta

    async def abort(self, reason: str) -> None:
        self.aborted = reason
        self._maybe_fail("abort")


class Handler:
    """``echo`` returns its arguments; ``do`` runs the harness's ``action``; streams go to ``sinks``."""

    def __init__(self) -> None:
        self.action: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self.refuse: BaseException | None = None
        self.sinks: list[Sink] = []
        self.next_sink = Sink()

    async def handle_call(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        if method == "echo":
            return dict(args)
        assert method == "do" and self.action is not None
        return await self.action()

    async def open_stream(self, kind: str, meta: dict[str, Any]) -> Sink:
        if self.refuse is not None:
            raise self.refuse
        sink, self.next_sink = self.next_sink, Sink()
        self.sinks.append(sink)
        return sink


@dataclass
class Pair:
    source: Session
    agent: Session
    handler: Handler
    agent_stream: SocketStream
    notices: list[p.Notice]

    async def works(self) -> None:
        """The session still serves calls."""
        assert await self.source.call("echo", timeout=BOUND, n=1) == {"n": 1}


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    source_end, agent_end = await socket_pair()
    handler = Handler()
    notices: list[p.Notice] = []
    source = Session(source_end, p.Role.SOURCE, on_notice=notices.append)
    agent = Session(agent_end, p.Role.AGENT, handler=handler)
    async with asyncio.timeout(BOUND):
        await asyncio.gather(
            source.start(software="test", host="src", info={}),
            agent.start(software="test", host="dst", info={}),
        )
    yield Pair(source, agent, handler, agent_end, notices)
    agent_end.resume()
    async with asyncio.timeout(BOUND):
        await source.close(timeout=1)
        await agent.close(timeout=1)


# ---- 1. a call's timeout covers its send -------------------------------------


@pytest.mark.parametrize("blocked_by", ["own-frame", "stream-write"])
async def test_call_timeout_covers_the_send_to_a_peer_that_stopped_reading(pair: Pair, blocked_by: str) -> None:
    pair.agent_stream.pause()
    writer: asyncio.Task[None] | None = None
    args: dict[str, Any] = {}
    if blocked_by == "own-frame":
        args = {"blob": bytes(4 << 20)}  # far more than the socket and transport buffers hold
    else:
        out = await pair.source.open_stream("files")
        writer = asyncio.create_task(out.write(bytes(8 << 20)))  # holds the write lock, blocked
        await asyncio.sleep(0.1)
        assert not writer.done()
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="could not send 'echo' within 0.3 s: the peer is not reading"):
        await asyncio.wait_for(pair.source.call("echo", timeout=0.3, **args), BOUND)
    assert time.monotonic() - t0 < 1.5
    pair.agent_stream.resume()
    if writer is not None:
        await asyncio.wait_for(writer, BOUND)
    await pair.works()


async def test_close_does_not_hang_on_a_peer_that_stopped_reading(pair: Pair) -> None:
    pair.agent_stream.pause()
    with pytest.raises(TransportError):
        await asyncio.wait_for(pair.source.call("echo", timeout=0.2, blob=bytes(4 << 20)), BOUND)  # the pipe is full now
    t0 = time.monotonic()
    await asyncio.wait_for(pair.source.close(timeout=0.2), BOUND)
    assert time.monotonic() - t0 < 1.5


# ---- 2. a failing sink aborts its stream only; a failing handler is a Fail ---


SINK_ERRORS = [
    pytest.param(OSError(errno.ENOSPC, "No space left on device"), "No space left on device", id="ENOSPC"),
    pytest.param(OverflowError("record length overflows"), "record length overflows", id="OverflowError"),
    pytest.param(ValueError("bad record header"), "bad record header", id="ValueError"),
    pytest.param(ProtocolError("pages stream ended in the middle of a run"), "in the middle of a run", id="ProtocolError"),
    pytest.param(asyncio.CancelledError(), "CancelledError", id="stray-CancelledError"),
]


@pytest.mark.parametrize(("exc", "message"), SINK_ERRORS)
async def test_sink_failing_on_write_fails_the_senders_stream_only(pair: Pair, exc: BaseException, message: str) -> None:
    pair.handler.next_sink = Sink(fail_on="write", exc=exc)
    out = await pair.source.open_stream("files", {"container": "c"})
    with pytest.raises(MigrationError, match=message) as caught:
        async with asyncio.timeout(BOUND):
            while True:  # the sender learns at a write, however far ahead of the receiver it was
                await out.write(bytes(BATCH))
    assert "agent could not take the 'files' stream" in str(caught.value)
    with pytest.raises(MigrationError, match=message):
        await out.close()
    (sink,) = pair.handler.sinks
    assert sink.aborted is not None and message in sink.aborted
    assert not pair.notices  # the failure report is the session's, not a log line
    await pair.works()
    # The next stream goes through whole.
    out = await pair.source.open_stream("files")
    await out.write(b"after")
    await out.close({"files": 1})
    await pair.works()
    assert pair.handler.sinks[1].data == b"after" and pair.handler.sinks[1].meta == {"files": 1}


@pytest.mark.parametrize("where", ["close", "open"])
async def test_stream_failure_after_the_senders_close_is_raised_by_the_next_call(pair: Pair, where: str) -> None:
    exc = OSError(errno.EIO, "Input/output error")
    if where == "open":
        pair.handler.refuse = ConfigError("no migration in progress for container 'c'")
        message = "no migration in progress"
    else:
        pair.handler.next_sink = Sink(fail_on="close", exc=exc)
        message = "Input/output error"
    out = await pair.source.open_stream("images")
    await out.write(b"small enough to be sent with the close")
    await out.close({})  # does not wait for the receiver
    with pytest.raises(MigrationError, match=message) as caught:
        await pair.source.call("echo", timeout=BOUND)
    assert "'images' stream" in str(caught.value)
    if where == "open":
        assert isinstance(caught.value, ConfigError)
    else:
        assert isinstance(caught.value, RemoteError) and caught.value.remote_kind == "internal"
        assert pair.handler.sinks[0].aborted is not None  # best effort cleanup on the receiver
    await pair.works()  # raised once, and the session goes on


async def test_sink_failing_on_abort_keeps_the_session(pair: Pair) -> None:
    pair.handler.next_sink = Sink(fail_on="abort", exc=RuntimeError("cleanup failed"))
    out = await pair.source.open_stream("files")
    await out.write(b"x")
    await out.abort("sender gave up")
    await pair.works()
    assert pair.handler.sinks[0].aborted == "sender gave up"


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "OSError: .* No space left on device"),
        (KeyError("container"), "KeyError: 'container'"),
        (asyncio.CancelledError("page server wait cancelled"), "CancelledError: page server wait cancelled"),
    ],
    ids=["OSError", "KeyError", "stray-CancelledError"],
)
async def test_handler_exception_of_any_type_is_an_internal_fail(pair: Pair, exc: BaseException, message: str) -> None:
    async def fail() -> dict[str, Any]:
        raise exc

    pair.handler.action = fail
    with pytest.raises(RemoteError, match=message) as caught:
        await pair.source.call("do", timeout=BOUND)
    assert caught.value.remote_kind == "internal"
    await pair.works()


async def test_failing_notice_callback_fails_the_session_instead_of_hanging_it(pair: Pair) -> None:
    def boom(ev: p.Notice) -> None:
        raise RuntimeError("notice sink broke")

    pair.source.on_notice = boom
    await pair.agent.notice("hello")
    with pytest.raises(TransportError, match="session reader failed: RuntimeError: notice sink broke"):
        await pair.source.call("echo", timeout=BOUND)


# ---- 3. an answer that cannot go on the wire becomes a Fail -------------------


async def test_oversize_reply_becomes_a_fail(pair: Pair) -> None:
    async def big() -> dict[str, Any]:
        return {"blob": bytes(p.MAX_FRAME_DEFAULT)}

    pair.handler.action = big
    with pytest.raises(RemoteError, match=r"reply too large: (\d+) bytes") as caught:
        await pair.source.call("do", timeout=BOUND)
    size = int(str(caught.value).split(": ")[1].split()[0])
    assert size > p.MAX_FRAME_DEFAULT
    assert caught.value.remote_kind == "protocol"
    await pair.works()


async def test_oversize_fail_is_clipped_not_dropped(pair: Pair) -> None:
    async def fail() -> dict[str, Any]:
        raise ValueError("x" * (p.MAX_FRAME_DEFAULT + 1))

    pair.handler.action = fail
    with pytest.raises(RemoteError, match=r"^ValueError: xxx+\.\.\.$") as caught:
        await pair.source.call("do", timeout=BOUND)
    assert caught.value.remote_kind == "internal"
    await pair.works()


async def test_unencodable_reply_becomes_a_fail(pair: Pair) -> None:
    async def odd() -> dict[str, Any]:
        return {"ids": {1, 2}, "name": "bad \udcff"}

    pair.handler.action = odd
    with pytest.raises(RemoteError, match="reply cannot be sent: .*set") as caught:
        await pair.source.call("do", timeout=BOUND)
    assert caught.value.remote_kind == "protocol"
    await pair.works()
