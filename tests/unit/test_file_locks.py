"""Finding the file locks a container's processes hold (real locks, real /proc)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tug.engine.source.container import file_lock_holders, held_file_locks

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
kind = sys.argv[2]
if kind == "posix":
    fcntl.lockf(fd, fcntl.LOCK_EX)
else:
    fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""

OFD = """
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
F_OFD_SETLK = 37
fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
print("locked", flush=True)
time.sleep(60)
"""


def holder(script: str, *args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_posix_flock_and_ofd_locks_are_found_for_their_holder_only(tmp_path: Path) -> None:
    for script, kind in ((HOLD, "posix"), (HOLD, "flock"), (OFD, "ofd")):
        p = holder(script, str(tmp_path / kind), kind)
        try:
            assert held_file_locks([p.pid]), kind
            assert not held_file_locks([os.getpid()]), kind
            holders = file_lock_holders()  # read once, asked for several containers
            assert held_file_locks([p.pid], holders) and not held_file_locks([os.getpid()], holders), kind
            assert (p.pid in holders.pids) if kind != "ofd" else holders.unattributed, kind
        finally:
            p.kill()
            p.wait()
    assert not held_file_locks([])


def test_a_waiter_is_not_a_holder(tmp_path: Path) -> None:
    p = holder(HOLD, str(tmp_path / "l"), "posix")
    waiter = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "l"), "posix"], stdout=subprocess.PIPE)
    try:
        time.sleep(0.5)  # the waiter blocks in lockf
        assert not held_file_locks([waiter.pid])
    finally:
        for q in (p, waiter):
            q.kill()
            q.wait()
