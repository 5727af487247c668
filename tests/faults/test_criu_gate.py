"""Faults while runc waits at a CRIU gate (criu/gate.py), before the freeze.

Every strategy starts the frozen dump's ``runc checkpoint`` before the freeze
(and the destination its ``runc restore``), CRIU held at a gate until the
container is frozen. Whoever dies while it waits there,
no CRIU may run: the gate's script reads the end of its fifo and exits, runc
fails, the container never stopped, and nothing is left on the source.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..e2e.conftest import Lab, demo_container, on
from ..e2e.test_network import Client
from .harness import (
    _on_host,
    agent_pids,
    criu_pids,
    find,
    runc_checkpoints,
    running_copies,
    signal_all,
    sshd_sessions_of,
    start_migrate,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def demo(lab: Lab) -> Iterator[str]:
    yield from demo_container(lab, "tg")


def waiting_at_gate(host: str) -> list[int]:
    """The gate scripts of ``host`` that hold a dump (a script not yet replaced by CRIU)."""
    def holding(pid: int, cmd: list[str]) -> bool:
        if len(cmd) < 3 or not any(c.endswith("/gate/criu") for c in cmd) or not _on_host(pid, host):
            return False
        try:
            return os.readlink(f"/proc/{pid}/exe").split("/")[-1].startswith("python")
        except OSError:
            return False
    return find(holding)


def settled(pred: Callable[[], bool], timeout: float = 30.0, pause: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(pause)
    return bool(pred())


@pytest.mark.parametrize("strategy", ["stop-copy", "precopy", "postcopy", "hybrid"])
@pytest.mark.parametrize("fault", ["migrate-kill", "link-drop"])
def test_no_criu_runs_when_the_migration_dies_at_the_gate(lab: Lab, demo: str, strategy: str, fault: str) -> None:
    run = start_migrate("a", demo, lab.url("b"), "--strategy", strategy, *(["--eager"] if strategy == "precopy" else []))
    try:
        # Stopped as soon as its runc exists, tug cannot open the gate: the
        # dump's CRIU request then waits there for as long as the test wants.
        assert settled(lambda: bool(runc_checkpoints()), 120, pause=0.002), f"no runc checkpoint:\n{chr(10).join(run.lines)}"
        os.kill(run.proc.pid, signal.SIGSTOP)
        assert settled(lambda: bool(waiting_at_gate("a")), 30), "the dump never reached its gate"
        if fault == "migrate-kill":
            os.kill(run.proc.pid, signal.SIGKILL)
        else:
            assert signal_all(sshd_sessions_of(agent_pids("b")), signal.SIGKILL) > 0
            os.kill(run.proc.pid, signal.SIGCONT)
    finally:
        res = run.finish()
    where = f"{fault} at the gate ({strategy}):\n{res.stderr}"
    # The script saw its gate close, runc failed: no CRIU ran, nothing is left.
    assert settled(lambda: not waiting_at_gate("a") and not runc_checkpoints() and not criu_pids("a")), where
    assert running_copies(lab, demo).get("a") == "running", f"{running_copies(lab, demo)}\n{where}"
    if fault == "link-drop":
        assert res.json()["outcome"] in ("rolled-back", "aborted"), where
    else:
        assert settled(lambda: not agent_pids("b"), 60), "the agent must end once its session is gone"
        rec = on("a", "tug", "recover", demo, "--to", lab.url("b"), "--json")
        assert rec.returncode == 0, f"recover failed: {rec.stderr}\n{where}"
    assert running_copies(lab, demo).get("a") == "running" and lab.leftovers("b", demo) == [], where
    check = lab.check("a", demo)
    assert check["ok"] and check["verify"]["bad_pages"] == 0, check
    client = Client(lab, demo)
    time.sleep(0.2)
    result = client.stop()
    assert result["replies"] > 0 and result["errors"] == 0, result
    assert not any(Path(f"/proc/{p}").exists() for p in waiting_at_gate("a"))


def runc_restores(host: str) -> list[int]:
    return find(lambda pid, cmd: bool(cmd) and Path(cmd[0]).name == "runc" and "restore" in cmd and _on_host(pid, host))


@pytest.mark.parametrize("strategy", ["stop-copy", "precopy", "postcopy", "hybrid"])
def test_agent_killed_while_its_prestarted_restore_waits_at_the_gate(lab: Lab, demo: str, strategy: str) -> None:
    """The destination's runc restore, started before the freeze, waits at its gate
    when the agent is SIGKILLed: its script sees the gate's end, runc fails and
    removes the container it had begun, and the source rolls back (never frozen
    for long, never two copies)."""
    run = start_migrate("a", demo, lab.url("b"), "--strategy", strategy, *(["--eager"] if strategy == "precopy" else []))
    try:
        assert settled(lambda: bool(runc_restores("b")), 120, pause=0.002), f"no runc restore:\n{chr(10).join(run.lines)}"
        os.kill(run.proc.pid, signal.SIGSTOP)
        assert settled(lambda: bool(waiting_at_gate("b")), 30), "the restore never reached its gate"
        assert signal_all(agent_pids("b"), signal.SIGKILL) > 0
        os.kill(run.proc.pid, signal.SIGCONT)
    finally:
        res = run.finish()
    where = f"agent killed at the restore's gate ({strategy}):\n{res.stderr}"
    assert res.json()["outcome"] in ("rolled-back", "aborted"), where
    assert settled(lambda: not waiting_at_gate("b") and not runc_restores("b") and not criu_pids("b")), where
    assert running_copies(lab, demo) == {"a": "running"}, f"{running_copies(lab, demo)}\n{where}"
    assert settled(lambda: lab.leftovers("b", demo) == []), f"leftovers on b: {lab.leftovers('b', demo)}\n{where}"
    check = lab.check("a", demo)
    assert check["ok"] and check["verify"]["bad_pages"] == 0, check
