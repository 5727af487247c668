"""The agent outlives its SSH session during a lazy fill: the source reattaches.

Why: after the commit point a dropped link must not end the fill (issue 10).
The agent is a child of the sshd session that started it; when that session
dies its stdin ends, which used to mean "the source is gone". During a fill
whose streams are relayed (relay.py), the agent instead waits a bounded time
for the source to come back over a fresh SSH connection. That connection
runs ``python -m tug.engine.agent --attach PATH`` (:func:`attach`), a plain
byte pump between its stdin/stdout and the waiting agent's unix socket at
PATH; the source's first line on it is the random token the agent gave it
over the first session (the socket is root's only, the token binds it to
this migration's source). The agent then serves a new session over it with
everything it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tug.engine.criu.uncork import peer_is_criu
from tug.engine.destination.incoming import AgentState
from tug.engine.destination.relay import Relay
from tug.engine.errors import ProtocolError
from tug.transports.session import Session

log = logging.getLogger("tug.agent")

#: The agent's private directory (in the temp dir) holding its socket.
PREFIX = "tug-agent-"
#: Seconds a reattaching source has to send its token.
TOKEN_WAIT_S = 10.0
#: The agent waits this much longer than the source's own deadline: a source
#: that reconnects at its last moment still finds it.
MARGIN_S = 5.0


class PipeStream:
    """A reader/writer pair as the session's byte stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        return await self.reader.read(1 << 20)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()


class Reattach:
    """The agent's unix socket where a source that lost its link comes back."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.token = secrets.token_hex(16)
        self._dir = Path(tempfile.mkdtemp(prefix=PREFIX))
        self.path = self._dir / "attach.sock"
        self._arrived: asyncio.Queue[PipeStream] = asyncio.Queue()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        os.chmod(self._dir, 0o700)
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=1 << 22)
        await asyncio.to_thread(_sweep_stale, self._dir.parent)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(TOKEN_WAIT_S):
                line = await reader.readline()
        except (TimeoutError, OSError, ValueError):
            writer.close()
            return
        if not hmac.compare_digest(line.strip(), self.token.encode()):
            log.warning("a reattach with a wrong token was refused")
            writer.close()
            return
        await self._arrived.put(PipeStream(reader, writer))

    async def wait(self) -> PipeStream | None:
        """The source's new stream, or None once its deadline (and a margin) passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.deadline_s + MARGIN_S):
                return await self._arrived.get()
        return None

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self._dir.rmdir()


def _sweep_stale(parent: Path) -> None:
    """Remove the directories of agents that were killed (nobody listens on their socket any more).

    A killed agent cannot remove its own; one a minute old at least, so a
    new agent's directory is never taken before it listens.
    """
    now = time.time()
    for d in parent.glob(f"{PREFIX}*"):
        try:
            if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.geteuid() or now - d.stat().st_mtime < 60:
                continue
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(d / "attach.sock"))
        except (ConnectionRefusedError, FileNotFoundError):
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue


class ReattachCalls(AgentState):
    """The agent's side of a reattach: set up before the fill, awaited when its session is lost."""

    #: Where a source that lost its link comes back during a fill.
    reattach: Reattach | None = None

    async def call_link_recovery(self, deadline_s: float) -> dict[str, Any]:
        """Before a fill over relays: where and how the source may come back if its link drops."""
        if self.reattach is None:
            self.reattach = Reattach(max(1.0, min(float(deadline_s), 3600.0)))
            await self.reattach.start()
        return {"path": str(self.reattach.path), "token": self.reattach.token}

    async def await_reattach(self, session: Session) -> PipeStream | None:
        """The session was lost mid-fill: the source's new stream, or None (gone for good, or no fill)."""
        filling = [i for i in self.incoming.values() if i.relays and i.restored and not i.committed and not i.broken]
        if session.lost is None or self.reattach is None or not filling:
            return None
        log.warning("link to the source lost during the fill of %s: waiting up to %.0f s for it to come back",
                    ", ".join(i.name for i in filling), self.reattach.deadline_s)
        # stderr went with the sshd session: log to the file only.
        for h in list(logging.getLogger().handlers):
            if type(h) is logging.StreamHandler:
                logging.getLogger().removeHandler(h)
        new = await self.reattach.wait()
        log.info("source came back" if new is not None else "source did not come back in time")
        return new

    async def call_relay_open(self, container: str, port: int) -> dict[str, Any]:
        """Post-copy, before the freeze: the daemon will reach the source's forward at ``port``
        through a relay of this agent, which outlives a lost link (relay.py)."""
        inc = self._get(container)
        if not (isinstance(port, int) and 0 < port < 65536) or inc.restored:
            raise ProtocolError(f"relay for {container!r} asked for out of turn")
        relay = Relay(f"the lazy-pages stream of {container}", port)

        async def admit(ours: tuple[str, int], peer: tuple[str, int]) -> str | None:
            return await asyncio.to_thread(peer_is_criu, ours, peer)

        local = await relay.listen(admit)
        inc.relays.append(relay)
        return {"relay": len(inc.relays) - 1, "port": local}

    async def call_relay_reconnect(self, container: str, relay: int, port: int) -> dict[str, Any]:
        """The source came back after a lost link: relay ``relay`` resumes through its forward at ``port``."""
        inc = self._get(container)
        if not (isinstance(relay, int) and 0 <= relay < len(inc.relays)) or not (isinstance(port, int) and 0 < port < 65536):
            raise ProtocolError(f"no relay {relay!r} for {container!r}")
        await inc.relays[relay].connect(port)
        return {"reconnected": True}

async def attach(path: str) -> None:
    """``--attach PATH``: pump stdin/stdout to the waiting agent's socket until either ends."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 22)
    stdin = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), os.fdopen(0, "rb", buffering=0))
    out_t, out_p = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(1, "wb", buffering=0))
    stdout = asyncio.StreamWriter(out_t, out_p, stdin, loop)

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(1 << 20):
                dst.write(data)
                await dst.drain()

    done, pending = await asyncio.wait(
        [asyncio.create_task(pump(stdin, writer)), asyncio.create_task(pump(reader, stdout))],
        return_when=asyncio.FIRST_COMPLETED,
    )
    for t in pending:
        t.cancel()
    writer.close()
    sys.stdout.flush()

