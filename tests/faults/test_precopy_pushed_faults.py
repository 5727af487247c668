"""Pre-copy's pushed eager step, broken mid-push for real (strategies/pushed.py).

The fault matrix's ``transfer`` cases land after the push at its 32 MiB
(tens of ms). Here the push lasts seconds: one round of a 256 MiB container
that dirties all of its memory, over a shaped link, so most pages changed
since they were sent. The harness then SIGKILLs, mid-push, the CRIU whose
lazy dump holds the source's processes (with the freezer thawed: they may
run at once), or cuts the link. Either way the destination never ran, so
the source must end up running, alone, with its memory intact, and neither
host may keep anything of the migration. The same holds when every page was
pushed and CRIU dies as tug ends the lazy dump (tug held by ptrace at that
instant: syscallstop.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tug.engine.source.lazydump import LAZY_PORT

from ..e2e.conftest import Lab, demo_container, pod_containers, wait_for
from .harness import (
    _on_host,
    agent_pids,
    criu_pids,
    find,
    running_copies,
    shaped,
    signal_all,
    sshd_sessions_of,
    start_migrate,
)
from .syscallstop import NR_SHUTDOWN, Match, release_stopped, stop_at_syscall

pytestmark = pytest.mark.e2e

#: a's pages leave at this rate: the push of ~100 MiB takes seconds.
RATE = "256mbit"


@pytest.fixture
def busy_demo(lab: Lab) -> Iterator[str]:
    yield from demo_container(lab, "pp", "--memory", "256", "--dirty-rate", "4000")


def _holder(lab: Lab, name: str) -> list[int]:
    """The CRIU whose lazy dump holds ``name``'s processes on a: their tracer."""
    res = subprocess.run(["runc", "--root", lab.runc_root("a"), "state", name], capture_output=True, text=True)
    if res.returncode != 0:
        return []
    status = Path(f"/proc/{json.loads(res.stdout)['pid']}/status").read_text()
    tracer = int(re.search(r"^TracerPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return [tracer] if tracer and os.readlink(f"/proc/{tracer}/exe").endswith("/criu") else []


def _assert_runs_alone_on_a(lab: Lab, demo: str, before: dict[str, Any], where: str) -> None:
    """Rolled back before b ran anything: the source runs again, alone, its
    memory intact and its heartbeat going on; neither host keeps anything."""
    copies = running_copies(lab, demo)
    assert copies.get("a") == "running" and copies.get("b") is None, f"{copies}\n{where}"
    after = lab.check("a", demo)
    assert after["ok"] and after["verify"]["bad_pages"] == 0, after
    assert after["heartbeat"]["last_counter"] > before["heartbeat"]["last_counter"], after
    assert wait_for(lambda: lab.leftovers("b", demo) == [], 15), lab.leftovers("b", demo)
    assert wait_for(lambda: not criu_pids("a") and not criu_pids("b"), 15), "CRIU left behind"
    assert wait_for(lambda: not agent_pids("b"), 30), "agent left behind"


@pytest.mark.parametrize("fault", ["criu-kill", "link-drop"])
def test_fault_mid_push_resumes_the_source_alone(lab: Lab, busy_demo: str, fault: str) -> None:
    demo = busy_demo
    before = lab.check("a", demo)
    assert before["ok"], before
    with shaped(lab, "a", RATE):
        run = start_migrate("a", demo, lab.url("b"), "--strategy", "precopy", "--eager", "--tracker", "uffd",
                            "--policy", "max-iter=1", "--timeout", "rollback=10")
        assert run.wait_phase("transfer"), "the migration never reached its transfer phase"
        time.sleep(0.3)  # the images are small: by now the push runs
        if fault == "criu-kill":
            hit = signal_all(_holder(lab, demo), signal.SIGKILL)
        else:
            hit = signal_all(sshd_sessions_of(agent_pids("b")), signal.SIGKILL)
        res = run.finish()
    where = f"{fault} mid-push\n{res.stderr}"
    assert hit > 0, f"nothing to break: the push was over\n{where}"
    report = res.json()
    assert report["outcome"] == "rolled-back", where
    assert "pushing the frozen memory" in res.stderr, where
    if fault == "criu-kill":  # the push saw it: CRIU no longer held the processes, nothing more was read
        assert "no longer held stopped" in res.stderr, where
    assert not any("pushed from its frozen processes" in n for n in report["notes"]), report["notes"]
    _assert_runs_alone_on_a(lab, demo, before, where)


def _tug_migrate(name: str) -> list[int]:
    """``tug migrate NAME`` itself on host a (not the ``tug lab run`` wrapping it)."""
    return find(lambda pid, cmd: "migrate" in cmd and name in cmd and "run" not in cmd and _on_host(pid, "a"))


def _ends_the_lazy_dump(lab: Lab, name: str, tug_pid: int) -> Match:
    """``shutdown(fd, SHUT_WR)`` on tug's connection to CRIU's lazy server: the
    half-close right after ``PS_IOV_CLOSE`` that ends a lazy dump (lazydump.py
    goodbye). That connection lives in the dump's private network namespace,
    the one of the CRIU holding the processes."""
    def match(nr: int, args: Sequence[int]) -> bool:
        if nr != NR_SHUTDOWN or args[1] != socket.SHUT_WR:
            return False
        try:
            link = os.readlink(f"/proc/{tug_pid}/fd/{args[0]}")
            table = [ln.split() for h in _holder(lab, name) for ln in Path(f"/proc/{h}/net/tcp").read_text().splitlines()[1:]]
        except OSError:
            return False
        inode = link.removeprefix("socket:[").removesuffix("]")
        # local_address rem_address ... inode (the 10th field)
        return any(f[9] == inode and int(f[2].split(":")[1], 16) == LAZY_PORT for f in table)
    return match


def test_criu_dies_as_the_lazy_dump_ends_after_the_push(lab: Lab, busy_demo: str) -> None:
    """Every page pushed and acknowledged, and CRIU dies as tug ends its lazy
    dump: tug is held at the half-close that follows ``PS_IOV_CLOSE`` while
    the harness kills the CRIU holding the source, then let go. The dump's end
    fails before the destination ran anything: the source runs again, alone."""
    demo = busy_demo
    before = lab.check("a", demo)
    assert before["ok"], before
    with shaped(lab, "a", RATE):
        run = start_migrate("a", demo, lab.url("b"), "--strategy", "precopy", "--eager", "--tracker", "uffd",
                            "--policy", "max-iter=1", "--timeout", "rollback=10")
        assert run.wait_phase("transfer"), "the migration never reached its transfer phase"
        tugs = _tug_migrate(demo)
        assert len(tugs) == 1, f"one tug migrate expected: {tugs}"
        args = stop_at_syscall(tugs[0], _ends_the_lazy_dump(lab, demo, tugs[0]), 120)
        assert args is not None, "tug never ended its lazy dump"
        try:
            holder = _holder(lab, demo)
            hit = signal_all(holder, signal.SIGKILL)
            assert wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in holder), 10), "CRIU did not die"
        finally:
            release_stopped(tugs[0])
        res = run.finish()
    where = f"CRIU killed as the lazy dump ended\n{res.stderr}"
    assert hit == 1, where
    report = res.json()
    assert report["outcome"] == "rolled-back", where
    # CRIU killed with its answer to the goodbye corked flushes it as it dies:
    # then the dump's end is what fails (runc's CRIU died), else the goodbye.
    assert re.search(rf"the lazy dump of {demo} (exited with|answered the end|broke the connection|did not answer)",
                     res.stderr), where
    assert not any("pushed from its frozen processes" in n for n in report["notes"]), report["notes"]
    _assert_runs_alone_on_a(lab, demo, before, where)


@pytest.fixture
def busy_pod(lab: Lab) -> Iterator[list[str]]:
    yield from pod_containers(lab, "ppp", 2, "--memory", "96", "--dirty-rate", "4000")


def test_a_members_criu_killed_mid_push_rolls_the_whole_pod_back(lab: Lab, busy_pod: list[str]) -> None:
    """A pod's eager step pushes each member from its own lazy dump; the CRIU
    holding one member (m1) is SIGKILLed mid-push. Nothing of the pod ran on b
    (members are restored only once all were pushed): every member runs again
    on a, alone, its memory intact, and b keeps nothing."""
    holder, m1 = busy_pod[0], busy_pod[1]
    before = {n: lab.check("a", n) for n in busy_pod}
    with shaped(lab, "a", RATE):
        run = start_migrate("a", holder, lab.url("b"), "--pod", "--strategy", "precopy", "--eager", "--tracker", "uffd",
                            "--policy", "max-iter=1", "--timeout", "rollback=10")
        assert run.wait_phase("transfer"), "the migration never reached its transfer phase"
        time.sleep(0.3)
        hit = signal_all(_holder(lab, m1), signal.SIGKILL)
        res = run.finish()
    where = f"{m1}'s CRIU killed mid-push\n{res.stderr}"
    assert hit > 0, f"nothing to break: the push was over\n{where}"
    report = res.json()
    assert report["outcome"] == "rolled-back", where
    assert report["commit_point"] is None, report
    for n in busy_pod:
        copies = running_copies(lab, n)
        assert copies.get("a") == "running" and copies.get("b") is None, f"{n}: {copies}\n{where}"
        after = lab.check("a", n)
        assert after["ok"] and after["verify"]["bad_pages"] == 0, (n, after)
        assert after["counter"] > before[n]["counter"], (n, after)
        assert after["verify"]["pod"]["shm_peers"] == 2, (n, after["verify"]["pod"])
        assert wait_for(lambda n=n: lab.leftovers("b", n) == [], 15), lab.leftovers("b", n)
    assert wait_for(lambda: not criu_pids("a") and not criu_pids("b"), 15), "CRIU left behind"
    assert wait_for(lambda: not agent_pids("b"), 30), "agent left behind"
