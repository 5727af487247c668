"""Who may feed pages into a migration: root's CRIU binary, not whatever is called ``criu``.

The filtering page server and the forward to the destination's page server
admit a local connection with ``peer_is_criu``. A real process connects to
them: one that named itself ``criu`` (``prctl(PR_SET_NAME)``) and dropped to
uid 65534 before connecting, one named ``criu`` by a symlink it was run
through, one named ``criu`` but running as root from another binary; all are
refused. The real CRIU (``criu dump --page-server`` of a sleeping process)
is admitted, and the filtering server, after refusing the impostor, takes it.

Needs root and criu.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tug.engine.criu.tool import criu_binary
from tug.engine.criu.uncork import peer_is_criu, uncork_peer
from tug.engine.source.psfilter import FilterServer
from tug.engine.source.trackers.shadow import ContentTracker

NOBODY = 65534

#: A client that calls itself criu (unless run as criu already), drops to ``uid`` (unless 0), connects, says
#: "ready" and holds the connection until its stdin closes.
IMPOSTOR = """
import ctypes, encodings.idna, os, socket, sys  # imported while still root: the stdlib may be unreadable to nobody
port, uid, rename = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "rename"
if uid:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
if rename:
    ctypes.CDLL(None).prctl(15, b"criu", 0, 0, 0)  # PR_SET_NAME
s = socket.create_connection(("127.0.0.1", port))
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (setuid, /proc of other users' processes)")


def impostor(port: int, uid: int, python: str = sys.executable) -> subprocess.Popen[str]:
    rename = "keep" if Path(python).name == "criu" else "rename"
    p = subprocess.Popen(
        [python, "-I", "-S", "-c", IMPOSTOR, str(port), str(uid), rename],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    assert Path(f"/proc/{p.pid}/comm").read_text().strip() == "criu", "it really calls itself criu"
    return p


def end(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.close()
    p.wait(timeout=10)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s


def accepted_from(listener: socket.socket, p: subprocess.Popen[str]) -> socket.socket:
    conn, _ = listener.accept()
    return conn


def test_a_process_named_criu_running_as_nobody_is_refused(listener: socket.socket) -> None:
    p = impostor(listener.getsockname()[1], NOBODY)
    try:
        with accepted_from(listener, p) as conn:
            why = peer_is_criu(conn.getsockname(), conn.getpeername())
            assert why is not None and f"uid {NOBODY}" in why and "not root" in why, why
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert uncork_peer(conn.getsockname(), conn.getpeername()) == why, "nor is its socket touched"
    finally:
        end(p)


def why_refused(listener: socket.socket, p: subprocess.Popen[str]) -> str | None:
    """What peer_is_criu says of the impostor ``p``'s connection (and ``p`` ends)."""
    try:
        with accepted_from(listener, p) as conn:
            return peer_is_criu(conn.getsockname(), conn.getpeername())
    finally:
        end(p)


def test_a_root_process_named_criu_from_another_binary_is_refused(listener: socket.socket) -> None:
    why = why_refused(listener, impostor(listener.getsockname()[1], 0))
    assert why is not None and "not the CRIU binary" in why, why


def test_a_binary_run_under_the_name_criu_is_refused(listener: socket.socket, tmp_path: Path) -> None:
    """exec through a symlink named criu: comm is "criu", the executable is not CRIU's."""
    link = tmp_path / "criu"
    link.symlink_to(os.path.realpath(sys.executable))
    tmp_path.chmod(0o755)
    why = why_refused(listener, impostor(listener.getsockname()[1], NOBODY, python=str(link)))
    assert why is not None and "not root" in why, why


def criu_dump_into(port: int, tmp_path: Path) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """A sleeping process, and a real ``criu dump --page-server`` of it connecting to ``port``."""
    target = subprocess.Popen(["sleep", "1000"], start_new_session=True, stdin=subprocess.DEVNULL)
    images = tmp_path / "images"
    images.mkdir()
    criu = subprocess.Popen(
        [
            criu_binary(), "dump", "-t", str(target.pid), "-D", str(images), "--leave-running",
            "--page-server", "--address", "127.0.0.1", "--port", str(port), "-v4", "-o", "dump.log",
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return target, criu


def finish(target: subprocess.Popen[bytes], criu: subprocess.Popen[bytes]) -> None:
    """CRIU, cut off, fails its dump and lets the target go; both are reaped."""
    try:
        criu.wait(timeout=30)
        status = Path(f"/proc/{target.pid}/status").read_text()
        assert "TracerPid:\t0" in status and "CRIUMFD" not in Path(f"/proc/{target.pid}/maps").read_text()
    finally:
        if criu.poll() is None:
            criu.kill()
            criu.wait()
        target.kill()
        target.wait()


def test_the_real_criu_is_admitted(listener: socket.socket, tmp_path: Path) -> None:
    if shutil.which(criu_binary()) is None:
        pytest.fail("this test needs criu: run 'make test'")
    target, criu = criu_dump_into(listener.getsockname()[1], tmp_path)
    try:
        listener.settimeout(30)
        conn, _ = listener.accept()
        with conn:
            assert peer_is_criu(conn.getsockname(), conn.getpeername()) is None
    finally:
        finish(target, criu)


async def test_the_filter_refuses_the_impostor_and_takes_criu(tmp_path: Path) -> None:
    fs = FilterServer.listen(ContentTracker(), tmp_path / "filter")  # the default: only CRIU
    received: list[int] = []

    async def sink(pid: int, vaddr: int, data: bytes) -> None:
        received.append(len(data))

    serve = asyncio.create_task(fs.serve(sink))
    p = await asyncio.to_thread(impostor, fs.port, NOBODY)
    try:
        async with asyncio.timeout(10):
            while not fs.refused:
                await asyncio.sleep(0.01)
        assert not fs.connected and "not root" in fs.refused[0], fs.refused
    finally:
        await asyncio.to_thread(end, p)
    target, criu = criu_dump_into(fs.port, tmp_path)
    try:
        async with asyncio.timeout(30):
            while not fs.connected:
                assert criu.poll() is None, "CRIU gave up before it was admitted"
                await asyncio.sleep(0.01)
        assert len(fs.refused) == 1
    finally:
        # Closes CRIU's connection if it is still dumping (its dump then fails cleanly); a small
        # target may already have been dumped whole, and serve() returned on CRIU's close.
        serve.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serve
        fs.close()
        await asyncio.to_thread(finish, target, criu)
