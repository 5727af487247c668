"""Pre-copy's pushed eager step, broken mid-push for real (strategies/pushed.py).

The fault matrix's ``transfer`` cases land after the push at its 32 MiB
(tens of ms). Here the push lasts seconds: one round of a 256 MiB container
that dirties all of its memory, over a shaped link, so most pages changed
since they were sent. The harness then SIGKILLs, mid-push, the CRIU whose
lazy dump holds the source's processes (with the freezer thawed: they may
run at once), or cuts the link. Either way the destination never ran, so
the source must end up running, alone, with its memory intact, and neither
host may keep anything of the migration.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..e2e.conftest import Lab, demo_container, wait_for
from .harness import (
    agent_pids,
    criu_pids,
    running_copies,
    shaped,
    signal_all,
    sshd_sessions_of,
    start_migrate,
)

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
    copies = running_copies(lab, demo)
    assert copies.get("a") == "running" and copies.get("b") is None, f"{copies}\n{where}"
    after = lab.check("a", demo)
    assert after["ok"] and after["verify"]["bad_pages"] == 0, after
    assert after["heartbeat"]["last_counter"] > before["heartbeat"]["last_counter"], after
    assert wait_for(lambda: lab.leftovers("b", demo) == [], 15), lab.leftovers("b", demo)
    assert wait_for(lambda: not criu_pids("a") and not criu_pids("b"), 15), "CRIU left behind"
    assert wait_for(lambda: not agent_pids("b"), 30), "agent left behind"
