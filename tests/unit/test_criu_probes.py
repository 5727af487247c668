"""A CRIU killed while its probe child lives must not hang runc (engine/criu/probes.py).

Real processes, the real CRIU binary: a stand-in for runc (a child
subreaper that waits for its CRIU's socket to end, as runc does) starts a
"criu" whose own child is a real CRIU process (a page server, which blocks
like the probe child does) holding the socket; the test then SIGKILLs that
"criu", exactly the fault the matrix injects. Without the watch the run
hangs; with it the orphan is killed and runc's stand-in sees the end of file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tug.engine import proc
from tug.engine.criu.probes import kill_orphaned_probes
from tug.engine.criu.tool import criu_binary
from tug.engine.errors import RuntimeToolError

RUNC = r"""
import ctypes, os, socket, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER, as runc
ours, theirs = socket.socketpair()
main = os.fork()
if main == 0:  # the CRIU that will die: named criu, its child a real CRIU holding the socket
    ours.close()
    ctypes.CDLL(None).prctl(15, b"criu", 0, 0, 0)  # PR_SET_NAME
    if os.fork() == 0:
        os.execv(sys.argv[1], [sys.argv[1], "page-server", "-D", sys.argv[2], "--address", "127.0.0.1",
                               "--port", sys.argv[3], "-o", "ps.log"])
    open(os.path.join(sys.argv[2], "main.pid"), "w").write(str(os.getpid()))
    time.sleep(600)
theirs.close()
assert ours.recv(1) == b""  # runc learns that its CRIU died only from this end of file
os.waitpid(main, 0)
print("eof")
"""


def _run_criu_that_dies(tmp: Path, watch: bool, timeout: float) -> proc.Completed:
    async def run() -> proc.Completed:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        task = asyncio.create_task(proc.run([sys.executable, "-c", RUNC, criu_binary(), str(tmp), str(port)], timeout=timeout,
                                            watch=kill_orphaned_probes if watch else None))
        deadline = time.monotonic() + 10
        while not (tmp / "main.pid").exists() or not (tmp / "ps.log").exists():
            assert time.monotonic() < deadline, "the stand-in never started its CRIU"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        os.kill(int((tmp / "main.pid").read_text()), signal.SIGKILL)  # the fault
        return await task

    return asyncio.run(run())


def test_the_orphan_is_killed_and_runc_sees_its_criu_gone(tmp_path: Path) -> None:
    t0 = time.monotonic()
    res = _run_criu_that_dies(tmp_path, watch=True, timeout=30)
    assert res.out.strip() == "eof"
    assert time.monotonic() - t0 < 10


def test_without_the_watch_runc_hangs(tmp_path: Path) -> None:
    """The hazard is real: the same run without the watch ends only at its timeout."""
    with pytest.raises(RuntimeToolError, match="timed out"):
        _run_criu_that_dies(tmp_path, watch=False, timeout=3)
