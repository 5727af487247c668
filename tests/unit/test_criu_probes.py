"""A CRIU killed while its probe child lives must not hang runc (engine/criu/probes.py).

Real processes, the real CRIU binary: a stand-in for runc (a child
subreaper that waits for its CRIU's socket to end, as runc does) starts a
"criu" whose own child is a real CRIU process holding that socket (``criu
swrk`` on it, waiting for a request, as asleep as the probe child); the
test then SIGKILLs that "criu", exactly the fault the matrix injects. Without the watch the run
hangs; with it the orphan is killed and runc's stand-in sees the end of file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
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
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
main = os.fork()
if main == 0:  # the CRIU that will die, named criu; its child a real CRIU on runc's socket, as CRIU's probe child
    ours.close()
    ctypes.CDLL(None).prctl(15, b"criu", 0, 0, 0)  # PR_SET_NAME
    os.set_inheritable(theirs.fileno(), True)
    if os.fork() == 0:
        os.execv(sys.argv[1], [sys.argv[1], "swrk", str(theirs.fileno())])  # waits for a request: never comes
    open(os.path.join(sys.argv[2], "main.pid"), "w").write(str(os.getpid()))
    time.sleep(600)
theirs.close()
assert ours.recv(1) == b""  # runc learns that its CRIU died only from this end of file
os.waitpid(main, 0)
print("eof")
"""


def _swrk_child_of(pid: int) -> bool:
    """Does ``pid`` have a child running CRIU's ``swrk`` (the real binary)?"""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if os.path.realpath(f"/proc/{child}/exe") == os.path.realpath(criu_binary()):
                    return True
    return False


def _run_criu_that_dies(tmp: Path, watch: bool, timeout: float) -> proc.Completed:
    async def run() -> proc.Completed:
        task = asyncio.create_task(proc.run([sys.executable, "-c", RUNC, criu_binary(), str(tmp)], timeout=timeout,
                                            watch=kill_orphaned_probes if watch else None))
        deadline = time.monotonic() + 10
        while not (tmp / "main.pid").exists() or not _swrk_child_of(int((tmp / "main.pid").read_text())):
            assert time.monotonic() < deadline, "the stand-in never started its CRIU"
            await asyncio.sleep(0.02)
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
