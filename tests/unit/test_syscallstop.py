"""The fault harness's syscall stop (tests/faults/syscallstop.py) on real processes.

The group fault tests rely on it to hold an agent at the exact kill that
would let a restored container go: the stop must come before the syscall
runs, a process that never makes it must be let go untouched, and a killed
stopped process must really end.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tug.engine.procfs import thread_state

from ..faults.syscallstop import kill_stopped, release_stopped, sends_signal, stop_at_syscall

# Sends SIGCONT to a stopped target once a second has passed; touches a file after.
SENDER = """
import os, signal, sys, time
target, done = int(sys.argv[1]), sys.argv[2]
time.sleep(0.3)
os.kill(target, 0)            # another signal first: not the one waited for
os.kill(target, signal.SIGCONT)
open(done, "w").close()
time.sleep(30)
"""


def _stopped_target() -> subprocess.Popen[bytes]:
    target = subprocess.Popen(["sleep", "60"])
    target.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while thread_state(target.pid, target.pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    return target


def test_stops_at_the_entry_of_the_matching_kill_and_it_never_runs(tmp_path: Path) -> None:
    target = _stopped_target()
    done = tmp_path / "done"
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(target.pid), str(done)])
    try:
        args = stop_at_syscall(sender.pid, sends_signal(signal.SIGCONT), 10)
        assert args is not None and args[0] == target.pid and args[1] == signal.SIGCONT
        time.sleep(0.3)
        assert thread_state(target.pid, target.pid) == "T", "the SIGCONT ran although the sender was stopped"
        assert not done.exists()
        kill_stopped(sender.pid)
        assert sender.wait(5) == -signal.SIGKILL or sender.returncode is not None
        assert thread_state(target.pid, target.pid) == "T"
    finally:
        sender.kill()
        target.kill()


def test_let_go_the_held_syscall_runs(tmp_path: Path) -> None:
    target = _stopped_target()
    done = tmp_path / "done"
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(target.pid), str(done)])
    try:
        assert stop_at_syscall(sender.pid, sends_signal(signal.SIGCONT), 10) is not None
        release_stopped(sender.pid)
        deadline = time.monotonic() + 5
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done.exists()
        assert thread_state(target.pid, target.pid) != "T"
    finally:
        sender.kill()
        target.kill()


def test_no_match_within_the_timeout_leaves_the_process_running() -> None:
    idle = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.1)
        t0 = time.monotonic()
        assert stop_at_syscall(idle.pid, sends_signal(signal.SIGCONT), 0.5) is None
        assert time.monotonic() - t0 < 3
        time.sleep(0.1)
        assert thread_state(idle.pid, idle.pid) == "S"
        assert idle.poll() is None
    finally:
        idle.kill()
