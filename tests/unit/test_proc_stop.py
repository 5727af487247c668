"""proc.run's stop on timeout or cancellation: the graceful signal first, SIGKILL only after the grace.

Real child processes (Python) play the tool: one that cleans up on the
signal, one that ignores it, one whose helper appears only after the stop
began (runc starting CRIU late), one that leaves an orphan behind. Every
test checks that nothing of the child's process group is left and that no
child of ours stays a zombie.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tug.engine import proc
from tug.engine.errors import RuntimeToolError

PY = sys.executable


def python(code: str) -> list[str]:
    return [PY, "-c", code]


def cleaner(marker: Path, ready: Path) -> str:
    """A tool that, on SIGALRM, takes a moment to clean up, writes ``marker`` and exits 3."""
    return (
        "import os, signal, sys, time\n"
        "def done(*_):\n"
        "    time.sleep(0.2)\n"
        f"    open({str(marker)!r}, 'w').write(str(os.getpid()))\n"
        "    os._exit(3)\n"
        "signal.signal(signal.SIGALRM, done)\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "while True: time.sleep(1)\n"
    )


async def wait_for(path: Path, seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not path.exists():
            await asyncio.sleep(0.01)


def no_zombie_children() -> list[int]:
    zombies = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if fields[1] == str(os.getpid()) and fields[0] == "Z":
                zombies.append(int(entry.name))
    return zombies


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_cancelled_child_gets_the_graceful_signal_and_time_to_clean_up(tmp_path: Path) -> None:
    marker, ready = tmp_path / "cleaned", tmp_path / "ready"
    stop = proc.GracefulStop(signal=signal.SIGALRM, grace=5)
    task = asyncio.create_task(proc.run(python(cleaner(marker, ready)), timeout=None, stop=stop))
    await wait_for(ready)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert marker.exists(), "the child cleaned up before it was killed"
    assert time.monotonic() - started < 4, "no wait beyond the child's own exit"
    assert not alive(int(marker.read_text()))
    assert not no_zombie_children()


async def test_timed_out_child_that_ignores_the_signal_is_killed_after_the_grace(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "while True: time.sleep(1)\n"
    )
    stop = proc.GracefulStop(signal=signal.SIGALRM, grace=0.5)
    started = time.monotonic()
    with pytest.raises(RuntimeToolError, match="timed out"):
        await proc.run(python(code), timeout=1.0, stop=stop)
    took = time.monotonic() - started
    assert ready.exists() and 1.5 <= took < 4, took
    assert not no_zombie_children()


async def test_only_selected_members_are_signalled_also_those_that_appear_later(tmp_path: Path) -> None:
    """The leader ignores the signal and is not selected (runc); its helper starts late and is (CRIU)."""
    marker, ready = tmp_path / "cleaned", tmp_path / "ready"
    helper = tmp_path / "helper.py"
    helper.write_text(cleaner(marker, ready))
    leader_ready = tmp_path / "leader"
    code = (
        "import signal, subprocess, sys, time\n"
        # Blocked, so that the helper (which inherits the mask) cannot die of
        # the signal before its handler is in place.
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
        f"open({str(leader_ready)!r}, 'w').close()\n"
        "time.sleep(0.5)\n"  # the stop begins before the helper exists
        f"sys.exit(subprocess.call([{PY!r}, {str(helper)!r}]))\n"
    )
    selected: list[int] = []

    def select(pid: int) -> bool:
        try:
            ok = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[1:2] == [str(helper)]
        except OSError:
            return False
        if ok:
            selected.append(pid)
        return ok

    stop = proc.GracefulStop(signal=signal.SIGALRM, grace=5, select=select)
    task = asyncio.create_task(proc.run(python(code), timeout=None, stop=stop))
    await wait_for(leader_ready)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert marker.exists(), "the helper that appeared during the stop got the signal"
    assert selected and int(marker.read_text()) == selected[0]
    assert not alive(selected[0]) and not no_zombie_children()


async def test_an_orphan_of_the_group_does_not_outlive_the_stop(tmp_path: Path) -> None:
    """The leader exits at once on the signal, leaving a child (reparented away) that ignores it."""
    pidfile = tmp_path / "orphan"
    code = (
        "import os, signal, time\n"
        "if os.fork() == 0:\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"    open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "    while True: time.sleep(1)\n"
        "while True: time.sleep(1)\n"
    )
    stop = proc.GracefulStop(signal=signal.SIGTERM, grace=1.0)
    task = asyncio.create_task(proc.run(python(code), timeout=None, stop=stop))
    await wait_for(pidfile)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    orphan = int(pidfile.read_text())
    assert not alive(orphan) or Path(f"/proc/{orphan}/stat").read_text().split(") ")[1].startswith("Z")
    assert not no_zombie_children()


async def test_without_a_stop_the_group_is_killed_at_once(tmp_path: Path) -> None:
    marker, ready = tmp_path / "cleaned", tmp_path / "ready"
    started = time.monotonic()
    with pytest.raises(RuntimeToolError, match="timed out"):
        await proc.run(python(cleaner(marker, ready)), timeout=1.0)
    assert time.monotonic() - started < 2.5
    assert not marker.exists(), "SIGKILL: no chance to clean up"
    assert not no_zombie_children()


async def test_helpers_die_before_their_leader_so_that_it_reaps_them(tmp_path: Path) -> None:
    """runc waits for its CRIU: killed first, the helper is reaped by the leader, not left to init."""
    pidfile = tmp_path / "helper"
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '1000'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "sys.exit(p.wait())\n"
    )
    task = asyncio.create_task(proc.run(python(code), timeout=None))
    await wait_for(pidfile)
    helper = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(helper), "reaped, not a zombie of init"
    assert not no_zombie_children()


def stray_holder(pidfile: Path, rc: int = 5) -> str:
    """A tool that forks a child holding its stdout and stderr, then exits ``rc``
    (CRIU SIGKILLed during its kernel probes leaves such a traced sleeper)."""
    return (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        f"    open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "    while True: time.sleep(1)\n"
        f"while not os.path.exists({str(pidfile)!r}): time.sleep(0.01)\n"
        "sys.stderr.write('the tool failed\\n')\n"
        f"sys.exit({rc})\n"
    )


async def test_a_stray_holding_the_pipes_does_not_hold_up_the_tool_s_end(tmp_path: Path) -> None:
    """The tool's end is its exit: its output so far, then the stray is killed, not waited for."""
    pidfile = tmp_path / "stray"
    started = time.monotonic()
    res = await proc.run(python(stray_holder(pidfile)), timeout=60, check=False)
    assert time.monotonic() - started < 10, "waited on the stray's pipes"
    assert res.returncode == 5 and "the tool failed" in res.err
    stray = int(pidfile.read_text())
    assert not alive(stray) or Path(f"/proc/{stray}/stat").read_text().split(") ")[1].startswith("Z")
    assert not no_zombie_children()


async def test_input_is_fed_while_the_output_is_read(tmp_path: Path) -> None:
    code = "import sys; data = sys.stdin.buffer.read(); sys.stdout.buffer.write(data[::-1] * 4)"
    payload = os.urandom(1 << 20)  # larger than a pipe: feeding and reading must overlap
    res = await proc.run(python(code), input=payload, timeout=30)
    assert res.stdout == payload[::-1] * 4


async def test_a_daemon_killed_before_ready_is_seen_dead_though_its_child_holds_the_status_pipe(tmp_path: Path) -> None:
    """The lazy-pages daemon SIGKILLed mid-probe: its start fails at once, and nothing of it stays."""
    from tug.engine.criu.daemon import CriuDaemon
    from tug.engine.errors import CriuError

    pidfile = tmp_path / "stray"
    code = (
        "import os, signal, sys, time\n"
        "if os.fork() == 0:\n"  # inherits the status fd and stderr, like CRIU's probe child
        f"    open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "    while True: time.sleep(1)\n"
        f"while not os.path.exists({str(pidfile)!r}): time.sleep(0.01)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    daemon = CriuDaemon(tmp_path / "daemon.log")
    started = time.monotonic()
    with pytest.raises(CriuError, match="did not start"):
        await daemon.spawn(lambda fd: [*python(code), str(fd)], timeout=60)
    assert time.monotonic() - started < 10, "waited for the status pipe's end, held by the stray"
    assert daemon.returncode == -signal.SIGKILL and daemon.failed_on_its_own
    await asyncio.wait_for(daemon.kill(), 10)
    stray = int(pidfile.read_text())
    assert not alive(stray) or Path(f"/proc/{stray}/stat").read_text().split(") ")[1].startswith("Z")
