"""asyncssh: reach the destination, start the tug agent, carry the session.

This module (with forward.py, its port forwards) is the only one that imports
asyncssh; every asyncssh exception is translated here into
:mod:`tug.engine.errors` with a message a user can act on, so nothing
asyncssh-specific escapes ``tug.transports``.

Besides the agent's stdin/stdout, the one SSH connection carries port
forwards (:meth:`AgentProcess.forward`): CRIU on the source streams a dump's
pages to a CRIU page server that listens on the destination's loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import shlex
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncssh
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import String

from tug.engine.errors import AuthenticationError, ConfigError, ForwardingRefusedError, HostKeyError, TransportError

from . import fastdata
from .forward import LOOPBACK, PortForward, open_forward
from .reverse_forward import listen_again, open_reverse_forward

__all__ = ["LOOPBACK", "AgentProcess", "PortForward", "SshTarget", "connect_agent", "parse_url"]

#: AES-GCM runs on AES-NI: ~3x chacha20's throughput through asyncssh
#: (see shared/platform.md). Others stay as fallbacks for peers without it.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr")
READ_SIZE = 1 << 20
#: What asyncssh puts ahead of every packet once encryption is on (see skip_ignore_packets).
_EMPTY_IGNORE = (MSG_IGNORE, (String(b""),))
#: skip_ignore_packets wraps asyncssh's send_packet: only the signature it was written for.
_SEND_PACKET_AS_KNOWN = list(inspect.signature(asyncssh.SSHClientConnection.send_packet).parameters) == [
    "self", "pkttype", "args", "handler"]
#: SSH keepalives: a link that answers nothing for about INTERVAL x (COUNT_MAX + 1)
#: seconds is declared lost. Without them a partitioned link (no RST, no FIN)
#: leaves every read waiting forever; TCP's own keepalive takes hours.
KEEPALIVE_INTERVAL = 5.0
KEEPALIVE_COUNT_MAX = 3


def default_agent_command() -> str:
    """How the destination's agent starts unless the options say otherwise (this Python, this tug)."""
    return f"{shlex.quote(sys.executable)} -m tug.engine.agent"


@dataclass(frozen=True, slots=True)
class SshTarget:
    user: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}:{self.port}"


def parse_url(url: str) -> SshTarget:
    """``ssh://user@host[:port]`` (also accepts ``user@host`` and ``host``)."""
    if "://" not in url:
        url = "ssh://" + url
    parts = urlsplit(url)
    if parts.scheme != "ssh":
        raise ConfigError(f"destination must be an ssh:// URL, got {url!r}")
    if not parts.hostname:
        raise ConfigError(f"destination URL has no host: {url!r}")
    try:
        port = parts.port or 22
    except ValueError:
        raise ConfigError(f"bad port in destination URL {url!r}") from None
    return SshTarget(user=parts.username or "root", host=parts.hostname, port=port)


class _ProcessStream:
    """The agent's stdin/stdout as a :class:`~tug.transports.session.ByteStream`."""

    def __init__(self, process: asyncssh.SSHClientProcess[bytes], target: SshTarget) -> None:
        self._p = process
        self._target = target

    async def read(self) -> bytes:
        try:
            data: bytes = await self._p.stdout.read(READ_SIZE)
            return data
        except Exception as exc:  # asyncssh hands readers whatever closed the connection
            raise self._lost(exc) from None

    async def write(self, data: bytes) -> None:
        try:
            self._p.stdin.write(data)
            await self._p.stdin.drain()
        except Exception as exc:
            raise self._lost(exc) from None

    def _lost(self, exc: Exception) -> TransportError:
        """One TransportError for every way the channel can fail.

        A lost connection reaches a channel's reader as the exception that
        closed it: asyncssh's (a keepalive timeout is ConnectionLost), an
        OSError, or, after an internal error in asyncssh, anything at all.
        """
        what = str(exc) if isinstance(exc, (asyncssh.Error, OSError)) else f"{type(exc).__name__}: {exc}"
        return TransportError(f"connection to {self._target} lost: {what}")

    async def close(self) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            self._p.stdin.write_eof()


class AgentProcess:
    """A tug agent running on the destination over one SSH connection."""

    def __init__(self, conn: asyncssh.SSHClientConnection, process: asyncssh.SSHClientProcess[bytes], target: SshTarget) -> None:
        self._conn = conn
        self._process = process
        self.target = target
        self.stream = _ProcessStream(process, target)
        self._stderr: deque[str] = deque(maxlen=50)
        self._forwards: list[PortForward] = []
        self._stderr_task = asyncio.create_task(self._drain_stderr(), name="tug-agent-stderr")

    async def _drain_stderr(self) -> None:
        # Whatever ends it is the session's to report; close() awaits this task,
        # so an exception kept here would escape from there.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async for line in self._process.stderr:
                text = line.decode(errors="replace") if isinstance(line, bytes) else str(line)
                self._stderr.append(text.rstrip())

    def stderr_tail(self) -> list[str]:
        return list(self._stderr)

    @property
    def forwarded_bytes(self) -> int:
        """Payload bytes carried by every port forward so far, both ways."""
        return sum(f.bytes_sent + f.bytes_received for f in self._forwards)

    async def forward(self, remote_port: int, *, what: str = "the forwarded port") -> PortForward:
        """A local port leading to ``127.0.0.1:remote_port`` on the destination.

        The SSH channel (and so sshd's TCP connection to the remote port) is
        opened *now*, before anyone connects locally: a refused forward or a
        remote port nobody listens on fails here with a one-line
        :class:`TransportError`, and the channel-open round trip is not paid
        later (when the source may be frozen). ``what`` names the remote
        service in those errors.
        """
        fwd = await open_forward(self._conn, self.target.host, remote_port, what)
        self._forwards.append(fwd)
        return fwd

    async def reverse_forward(
        self,
        *,
        what: str,
        admit_remote: Callable[[int], Awaitable[str | None]],
        connect_local: Callable[[], Awaitable[socket.socket]],
        resumable: bool = False,
    ) -> PortForward:
        """A port on the destination (``fwd.remote_port``, loopback) leading
        to a service here; see :func:`open_reverse_forward` for the vetting."""
        fwd = await open_reverse_forward(
            self._conn, self.target.host, what, admit_remote=admit_remote, connect_local=connect_local,
            resumable=resumable,
        )
        self._forwards.append(fwd)
        return fwd

    def resumable_forwards(self) -> list[PortForward]:
        return [f for f in self._forwards if f.tunnel is not None and not f.closed]

    async def adopt(self, old: AgentProcess) -> list[PortForward]:
        """After a lost link: ``old``'s resumable forwards listen again on this connection.

        Their local ends never closed; each gets a new ``remote_port`` on the
        peer, where its agent reconnects and the tunnel resumes. ``old`` lets
        go of them (closing it no longer touches them).
        """
        moved = old.resumable_forwards()
        for fwd in moved:  # all at once, before any await: closing ``old`` never touches them
            old._forwards.remove(fwd)
            self._forwards.append(fwd)
        for fwd in moved:
            await listen_again(fwd, self._conn)
        return moved

    async def forwarding_allowed(self) -> bool:
        """Whether the peer's sshd allows TCP forwarding (for ``tug doctor``).

        Asks for a channel to 127.0.0.1:1 on the peer: sshd answers
        "administratively prohibited" when forwarding is off, and "connect
        failed" when it is on and (as usual) nothing listens there.
        """
        try:
            fwd = await self.forward(1, what="a probe")
        except ForwardingRefusedError:
            return False
        except TransportError:
            return True
        fwd.close()
        self._forwards.remove(fwd)
        return True

    async def close(self, timeout: float = 10.0) -> None:
        """Let the agent exit on its own (it cleans up), then drop the link."""
        for fwd in self._forwards:
            fwd.close()
        # Best effort, and nothing of asyncssh's may escape from here.
        with contextlib.suppress(Exception):
            self._process.stdin.write_eof()
            async with asyncio.timeout(timeout):
                await self._process.wait_closed()
        self._process.close()
        self._conn.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await self._conn.wait_closed()
        self._stderr_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_task


def skip_ignore_packets(conn: asyncssh.SSHClientConnection) -> None:
    """Stop ``conn`` from sending an empty SSH_MSG_IGNORE ahead of every packet.

    asyncssh (2.x) does that once encryption is on: the old defence against
    CBC's predictable IVs (RFC 4251, 9.3.1). tug offers only AEAD and CTR
    ciphers (:data:`CIPHERS`), where it protects nothing, and for the bulk
    of a migration (memory pages, 32 KiB a packet) it doubled the packets:
    twice the encryptions, the random padding and the socket writes on the
    source. Other ignore packets (``send_ignore`` with data) still go.
    """
    if any(name.endswith("-cbc") for name in CIPHERS):  # pragma: no cover - a guard for whoever edits CIPHERS
        return
    if not _SEND_PACKET_AS_KNOWN:  # pragma: no cover - another asyncssh: leave it as it is
        return
    original = conn.send_packet

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if (pkttype, args) != _EMPTY_IGNORE:
            original(pkttype, *args, handler=handler)

    setattr(conn, "send_packet", send_packet)  # noqa: B010 - an instance's own method, not the class's


async def connect_agent(
    target: SshTarget,
    *,
    identity: Path | None = None,
    known_hosts: Path | None = None,
    agent_command: str | None = None,
    connect_timeout: float = 15.0,
    env: dict[str, str] | None = None,
    keepalive_interval: float = KEEPALIVE_INTERVAL,
    keepalive_count_max: int = KEEPALIVE_COUNT_MAX,
) -> AgentProcess:
    """Open SSH to ``target`` and start ``python -m tug.engine.agent`` there.

    With keepalives on (``keepalive_interval`` > 0), a link that stops
    answering fails the session's reads with a TransportError after about
    ``keepalive_interval * (keepalive_count_max + 1)`` seconds.
    """
    if identity is not None and not identity.exists():
        raise ConfigError(f"identity file {identity} does not exist")
    if known_hosts is not None and not known_hosts.exists():
        raise ConfigError(f"known_hosts file {known_hosts} does not exist")
    options: dict[str, object] = {
        "port": target.port,
        "username": target.user,
        "encryption_algs": list(CIPHERS),
        "connect_timeout": connect_timeout,
        "preferred_auth": "publickey",
        "known_hosts": str(known_hosts) if known_hosts is not None else (),
        "keepalive_interval": keepalive_interval,
        "keepalive_count_max": keepalive_count_max,
    }
    if identity is not None:
        options["client_keys"] = [str(identity)]
        options["agent_path"] = None
    try:
        conn = await asyncssh.connect(target.host, **options)
    except asyncssh.HostKeyNotVerifiable:
        where = known_hosts or "~/.ssh/known_hosts"
        raise HostKeyError(
            f"host key of {target.host}:{target.port} is unknown or changed: no matching entry in {where} "
            f"(verify it, then add it with ssh-keyscan, or pass --known-hosts)"
        ) from None
    except asyncssh.PermissionDenied:
        key = f"key {identity}" if identity else "our keys"
        raise AuthenticationError(f"{target} refused {key} (permission denied)") from None
    except asyncssh.KeyImportError as exc:
        raise ConfigError(f"cannot load identity {identity}: {exc}") from None
    except (TimeoutError, asyncio.TimeoutError):
        raise TransportError(f"cannot reach {target.host}:{target.port}: timed out after {connect_timeout:g} s") from None
    except socket.gaierror as exc:
        raise TransportError(f"cannot resolve {target.host}: {exc.strerror}") from None
    except OSError as exc:
        raise TransportError(f"cannot reach {target.host}:{target.port}: {exc.strerror or exc}") from None
    except asyncssh.Error as exc:
        raise TransportError(f"ssh to {target} failed: {exc.reason}") from None
    except Exception as exc:  # e.g. ValueError for an unreadable known_hosts: never asyncssh's own type
        raise TransportError(f"ssh to {target} failed: {type(exc).__name__}: {exc}") from None

    skip_ignore_packets(conn)
    command = agent_command or default_agent_command()
    try:
        process = await conn.create_process(command, encoding=None, env=env or {})
    except Exception as exc:
        conn.close()
        raise TransportError(f"cannot start the tug agent on {target}: {exc}") from None
    fastdata.speed_up(conn, process.channel)  # the bulk (pages, files) goes to the agent's stdin
    return AgentProcess(conn, process, target)
