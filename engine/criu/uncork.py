"""Uncork the socket CRIU's dump uses to talk to a page server on this host.

Why: CRIU's page-server client corks its socket once, right after connecting
(criu/page-xfer.c ``connect_to_page_server``: ``tcp_cork(sk, true)``), and
pushes it only where it waits for an answer to OPEN2 or PARENT
(``tcp_nodelay(sk, true)``). ``disconnect_from_page_server`` sends
``PS_IOV_CLOSE`` and waits for the status without a push, so the dump's last
partial segment and the CLOSE header sit in the kernel until TCP's zero-window
probe timer sends them, which is never shorter than TCP_RTO_MIN (200 ms:
``tcp_probe0_base``). Measured here: a 64 MiB dump into a page server on
127.0.0.1 took 355-392 ms against 86-96 ms to tmpfs files, of which ~205 ms
was that wait, inside the frozen window of every migration.

A page server cannot push the client's socket, but this host's root can:
``pidfd_getfd(2)`` duplicates CRIU's socket into this process, and clearing
TCP_CORK on the duplicate (it is the same socket) pushes what is queued and
lets every later send go out at once. It is done once the first request has
arrived (CRIU corks before it sends anything), only on CRIU (below) holding
exactly the socket whose four-tuple is our accepted connection. Best effort:
any failure leaves the socket corked, which costs those 200 ms and nothing
else.

The same look at the peer decides who may feed pages into a migration (the
filtering page server, the forward to the destination's page server): a
local connection is admitted only if every process holding its other end is
CRIU, which means run by root (every uid 0) from the very binary tug runs
(``/proc/PID/exe`` has the device and inode of :func:`criu_binary`). A name
proves nothing: any user can call a process ``criu`` (``prctl(PR_SET_NAME)``,
a symlink named criu, ``exec -a``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

from tug.engine.criu.tool import criu_identity, why_not_root_criu
from tug.engine.errors import PreconditionError
from tug.engine.procfs import stat_fields

#: pidfd_getfd(2): the same number on x86-64 and arm64 (generic syscall table).
SYS_PIDFD_GETFD = 438

_libc = ctypes.CDLL(None, use_errno=True)


def _hex_endpoint(ip: str, port: int) -> str:
    """An IPv4 endpoint as /proc/net/tcp prints it (address as a native u32)."""
    return f"{int.from_bytes(socket.inet_aton(ip), sys.byteorder):08X}:{port:04X}"


def socket_inode(tcp_table: str, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the socket with this local and remote endpoint in a /proc/net/tcp text."""
    want_local, want_remote = _hex_endpoint(*local), _hex_endpoint(*remote)
    for line in tcp_table.splitlines()[1:]:
        cols = line.split()
        if len(cols) > 9 and cols[1] == want_local and cols[2] == want_remote:
            with contextlib.suppress(ValueError):
                return int(cols[9])
    return None


def _holders(inode: int, pids: Iterable[Path]) -> list[tuple[int, int]]:
    """(pid, fd) of every process that holds socket ``inode``."""
    target = f"socket:[{inode}]"
    found = []
    for proc in pids:
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            found += [(int(proc.name), int(fd.name)) for fd in (proc / "fd").iterdir() if _is(fd, target)]
    return found


def _is(fd: Path, target: str) -> bool:
    with contextlib.suppress(OSError):
        return os.readlink(fd) == target
    return False


def _set_cork_off(pid: int, fd: int) -> None:
    pidfd = os.pidfd_open(pid)
    try:
        dup = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    finally:
        os.close(pidfd)
    sock = socket.socket(fileno=dup)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
    finally:
        sock.close()  # closes our duplicate only


def criu_holder(ours: tuple[str, int], peer: tuple[str, int]) -> tuple[int, int] | str:
    """(pid, fd) of CRIU at the other end of ``ours`` <-> ``peer``, else why not.

    Every holder of that socket must be root's CRIU (see the module doc;
    CRIU's own children may share it); one of them is returned.
    """
    try:
        criu = criu_identity()
    except (OSError, PreconditionError) as exc:
        return f"cannot identify the CRIU binary: {getattr(exc, 'strerror', None) or exc}"
    try:
        inode = socket_inode(Path("/proc/net/tcp").read_text(), local=peer, remote=ours)
        if inode is None:
            return "the peer's socket is not in /proc/net/tcp"
        holders = _holders(inode, Path("/proc").iterdir())
    except (OSError, ValueError) as exc:
        return f"cannot look at the peer's socket: {getattr(exc, 'strerror', None) or exc}"
    if not holders:
        return "no process holds the peer's socket"
    refused: dict[int, str] = {}
    for pid in {pid for pid, _ in holders}:
        why = why_not_root_criu(pid, criu)
        if why is not None:
            refused[pid] = why
    # A holder that exited meanwhile (one of CRIU's short-lived children)
    # holds nothing any more: it is no impostor, and no reason to refuse.
    refused = {pid: why for pid, why in refused.items() if _alive(pid)}
    if refused:
        return f"the peer's socket is held by {'; '.join(sorted(refused.values()))}: not only criu"
    admitted = [h for h in holders if h[0] not in refused and why_not_root_criu(h[0], criu) is None]
    if not admitted:
        return "no process holds the peer's socket"
    return admitted[0]


def _alive(pid: int) -> bool:
    """Whether ``pid`` still exists and is not a zombie (a zombie holds no files)."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def peer_is_criu(ours: tuple[str, int], peer: tuple[str, int]) -> str | None:
    """None when the local peer is root's CRIU, else why it is refused.

    A page server on 127.0.0.1 accepts whoever connects first; without this
    any local process could feed its own "pages" into a migration.
    """
    found = criu_holder(ours, peer)
    return found if isinstance(found, str) else None


def uncork_peer(ours: tuple[str, int], peer: tuple[str, int]) -> str | None:
    """Clear TCP_CORK on CRIU's end of the connection ``ours`` <-> ``peer``.

    Returns None when done, else why not (for a note; never raises).
    Blocking (/proc scan, a few ms): run it in a thread.
    """
    found = criu_holder(ours, peer)
    if isinstance(found, str):
        return found
    try:
        _set_cork_off(*found)
    except OSError as exc:
        return f"cannot reach CRIU's socket: {exc.strerror or exc}"
    return None
