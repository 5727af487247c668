"""CRIU's page server: a dump's memory goes straight to the destination.

``runc checkpoint --page-server ADDR:PORT`` makes CRIU send every pagemap and
pages image through a TCP connection instead of writing them locally; the
other images stay in the local image dir. On the destination a ``criu
page-server`` writes what it receives into its images dir. tug uses this for
two things: a stop-copy dump whose transfer overlaps the dump itself, and the
soft-dirty pre-copy rounds (``runc checkpoint --pre-dump``, see predump.py).

Two halves live here:

* :class:`PageServer` runs on the destination (in the agent): one ``criu
  page-server`` process per dump, because CRIU serves exactly one session and
  then exits. It listens on 127.0.0.1 only; the source reaches it through an
  SSH port forward (:meth:`tug.transports.ssh.AgentProcess.forward`).
* :class:`RemotePageServer` is the source's handle on it: the agent calls
  that start and reap it, and the forward that carries the pages. It also
  feeds progress events while CRIU dumps.

How the ephemeral port is learnt: CRIU rejects ``--port 0``, but without
``--port`` it binds port 0 and listens before it writes the ready byte to
``--status-fd``. The port is then read from the kernel (``/proc/PID/net/tcp``
rows whose socket inode is one of the process's fds) rather than parsed from
CRIU's log: that needs no particular log level or message wording, and it is
race-free because the socket listens before the ready byte is written.
Pre-binding a socket ourselves and passing ``--ps-socket`` would need an
``accept()`` before CRIU could even start, i.e. CRIU's start-up either inside
the frozen window or behind an extra round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from tug.engine.criu.daemon import CriuDaemon
from tug.engine.criu.dumpdigest import StreamDigest
from tug.engine.criu.tool import criu_binary, log_error_lines
from tug.engine.criu.uncork import peer_is_criu, uncork_peer
from tug.engine.errors import CriuError, IntegrityError
from tug.engine.progress import Meter
from tug.transports.session import Session
from tug.transports.ssh import LOOPBACK, AgentProcess, PortForward

#: What CRIU's page server logs when its client went away before the end:
#: a consequence of the dump failing, never its cause.
NOT_FLUSHED = "were not flushed"

#: TCP state LISTEN in /proc/net/tcp (include/net/tcp_states.h).
_TCP_LISTEN = "0A"
#: How often a streamed dump's progress is sampled (Meter emits at most 10/s).
_PROGRESS_S = 0.1

def page_server_argv(criu: str, images_dir: Path, log: Path, status_fd: int, parent: str | None = None) -> list[str]:
    """The command line of one page server run (pure, for tests).

    No ``--port``: CRIU then binds an ephemeral port (``--port 0`` is
    refused). ``--prev-images-dir`` makes CRIU create ``images_dir/parent ->
    parent``, which is how the server learns that earlier rounds exist and
    how it checks the holes a pre-dump sends.
    """
    argv = [
        criu, "page-server",
        "--images-dir", str(images_dir),
        "--address", LOOPBACK,
        "--status-fd", str(status_fd),
        "-v4", "--log-file", str(log),
    ]
    if parent is not None:
        argv += ["--prev-images-dir", parent]
    return argv


def listening_ports(tcp_table: str, inodes: Iterable[int]) -> list[int]:
    """Ports in LISTEN state among the sockets ``inodes`` of a /proc/net/tcp{,6} text.

    Row format: ``sl local_address rem_address st tx:rx tr:when retrnsmt uid
    timeout inode ...`` with ``local_address`` as ``HEXADDR:HEXPORT``.
    """
    wanted = set(inodes)
    ports = []
    for line in tcp_table.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10 or cols[3] != _TCP_LISTEN:
            continue
        try:
            inode = int(cols[9])
            port = int(cols[1].rsplit(":", 1)[1], 16)
        except (ValueError, IndexError):
            continue
        if inode in wanted:
            ports.append(port)
    return ports


def listening_port_of(pid: int) -> int | None:
    """The TCP port process ``pid`` listens on, from the kernel's tables."""
    inodes = []
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:[") and link.endswith("]"):
                    inodes.append(int(link[8:-1]))
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            ports = listening_ports(Path(f"/proc/{pid}/net/{table}").read_text(), inodes)
            if ports:
                return ports[0]
    return None


def pages_bytes(images_dir: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for p in images_dir.glob("pages-*.img"):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
    return total


class PageServer(CriuDaemon):
    """One ``criu page-server`` on this host, receiving one dump into ``images_dir``."""

    what = "CRIU page server"

    def __init__(self, ident: int, images_dir: Path, log: Path, parent: str | None = None) -> None:
        super().__init__(log)
        self.ident = ident
        self.images_dir = images_dir
        self.parent = parent
        self.port = 0

    async def start(self, timeout: float = 30.0) -> int:
        """Spawn CRIU and return the port it listens on once it is ready."""
        await self.spawn(
            lambda status_fd: page_server_argv(criu_binary(), self.images_dir, self.log, status_fd, self.parent),
            timeout=timeout,
        )
        assert self.pid is not None
        port = listening_port_of(self.pid)
        if port is None:
            await asyncio.shield(self.kill())
            raise CriuError("CRIU page server listens on no TCP port", log_path=self.log, error_lines=log_error_lines(self.log))
        self.port = port
        return port



class RemotePageServer:
    """The source's handle on one page server on the destination.

    ``address`` is what ``runc checkpoint --page-server`` gets: the local end
    of an SSH forward whose channel is already connected to the server, so a
    refused forward or a server that is not listening fails before the dump.
    """

    def __init__(self, session: Session, container: str, ident: int, forward: PortForward) -> None:
        self.session = session
        self.container = container
        self.ident = ident
        self.forward = forward
        self.digest = StreamDigest()

    @classmethod
    async def start(
        cls,
        session: Session,
        agent: AgentProcess,
        container: str,
        *,
        images: str,
        parent: str | None = None,
    ) -> RemotePageServer:
        """Have the agent start a page server into ``images`` (relative to its
        work dir) and connect a forward to it."""
        res = await session.call("page_server_start", container=container, images=images, parent=parent)
        fwd = await agent.forward(int(res["port"]), what=f"the CRIU page server on {agent.target.host}")
        # CRIU corks its socket and never pushes its last request: uncork it
        # from here, or every streamed dump ends with a 200 ms wait (uncork.py).
        fwd.on_first_data = lambda ours, peer: _uncork_later(ours, peer)
        fwd.admit = peer_is_criu  # only root's CRIU (by uid and binary, not name) may feed pages
        ps = cls(session, container, int(res["id"]), fwd)
        # The pages are digested as they pass, and checked there once written (dumpdigest.py).
        fwd.tap = lambda from_peer, data: None if from_peer else ps.digest.feed(data)
        return ps

    @property
    def address(self) -> str:
        return self.forward.address

    @property
    def wire_bytes(self) -> int:
        """Payload bytes this dump moved through the forward, both ways."""
        return self.forward.bytes_sent + self.forward.bytes_received

    async def finish(self) -> dict[str, Any]:
        """Wait until the server has written everything and exited cleanly.

        Raises the server's CriuError (with its kept log) if it failed.
        """
        digests = None if self.digest.error is not None else self.digest.digests
        try:
            res = await self.session.call("page_server_wait", container=self.container, id=self.ident, digests=digests)
        finally:
            self.forward.close()
        if self.digest.error is not None:
            raise IntegrityError(
                f"the pages streamed to the CRIU page server could not be followed ({self.digest.error}): "
                "they cannot be verified"
            )
        return res

    @contextlib.asynccontextmanager
    async def progress(self, meter: Meter) -> AsyncIterator[None]:
        """Feed ``meter`` with the pages sent while the body (the dump) runs."""

        async def poll() -> None:
            seen = 0
            while True:
                await asyncio.sleep(_PROGRESS_S)
                now = self.forward.bytes_sent
                meter.add(now - seen)
                seen = now

        task = asyncio.create_task(poll(), name=f"tug-page-server-{self.ident}-progress")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def close(self) -> None:
        self.forward.close()


def _uncork_later(ours: tuple[str, int], peer: tuple[str, int]) -> None:
    """Best effort, in a thread (a /proc scan); a failure only costs the 200 ms."""
    task = asyncio.ensure_future(asyncio.to_thread(uncork_peer, ours, peer))
    _UNCORKING.add(task)
    task.add_done_callback(_UNCORKING.discard)


#: Keeps the uncork tasks referenced until they finish.
_UNCORKING: set[asyncio.Future[str | None]] = set()
