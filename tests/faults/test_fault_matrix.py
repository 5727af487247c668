"""The fault matrix: real migrations in the lab, a real fault in every phase.

For each strategy and phase, the harness waits until ``tug migrate`` enters
the phase and then breaks something for real: it SIGKILLs the destination's
agent, cuts the link (kills the SSH session carrying it), kills CRIU on the
side that runs it in that phase, or sends SIGTERM (twice: a second signal
must not abandon the rollback) to ``tug migrate``. Afterwards, whatever the
outcome, the one-copy rule holds:

- ``migrated``: the destination runs the container, the source has none;
- ``rolled-back`` / ``aborted``: the source runs it, the destination has none;
- ``failed``: the source is frozen (never running while the destination may
  run), and ``tug recover`` leaves exactly one running copy.

In every case the running copy's memory verifies, a new client connects to
it and is answered, and neither host keeps a
leftover of the migration (container, bundle, work dir, netns, veth, mounts,
CRIU or agent process).

A fault may land a little after the phase it aims at (a phase can take a
millisecond); the invariants do not depend on where it landed.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..e2e.conftest import Lab, on, tug
from ..e2e.test_network import Client
from .harness import (
    agent_pids,
    agents_left,
    criu_pids,
    describe,
    runc_checkpoints,
    running_copies,
    signal_all,
    sshd_sessions_of,
    start_migrate,
    stopped_on,
)

pytestmark = pytest.mark.e2e

_names = itertools.count(1)
#: strategy/phase/fault -> outcome, written to build/fault-matrix.json for the README.
OUTCOMES: dict[str, str] = {}

STRATEGIES = ["stop-copy", "precopy", "postcopy", "hybrid"]
#: Strategies with rounds before the freeze, and with a fill served by the frozen source.
ROUNDS = ("precopy", "hybrid")
LAZY_DUMP = ("postcopy", "hybrid")
#: Strategies whose source is held by a CRIU lazy dump through the transfer
#: (pre-copy's eager step pushes the changed pages from it: strategies/pushed.py).
HELD_IN_TRANSFER = (*LAZY_DUMP, "precopy")
PHASES = ["pre-checkpoint", "precopy", "checkpoint", "transfer", "restore", "fill"]
FAULTS = ["agent-kill", "link-drop", "agent-stop", "criu-kill", "sigterm", "migrate-kill"]


def _cases() -> Iterator[tuple[str, str, str]]:
    for strategy, phase, fault in itertools.product(STRATEGIES, PHASES, FAULTS):
        if phase == "precopy" and strategy not in ROUNDS:
            continue
        if phase == "fill" and strategy not in LAZY_DUMP:
            continue  # the local fills of the others last ~0.3 s: their faults land in restore's cases
        if fault == "criu-kill" and (phase == "pre-checkpoint" or (phase == "transfer" and strategy not in HELD_IN_TRANSFER)):
            continue  # no CRIU runs then (but a lazy dump holds the source from checkpoint on)
        yield strategy, phase, fault


@pytest.fixture
def victim(lab: Lab) -> Iterator[str]:
    name = f"f{os.getpid()}-{next(_names)}"
    tug("lab", "demo", "a", name, "--memory", "32", "--dirty-rate", "200", check=True)
    yield name
    for host in lab.urls:
        tug("lab", "rm", host, name)


def _poll(find_pids: Callable[[], list[int]], timeout: float = 10.0) -> list[int]:
    """The processes ``find_pids`` finds, once there are any (they may start just after the phase)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = find_pids()
        if pids:
            return pids
        time.sleep(0.005)
    return []


def _inject(fault: str, phase: str, run_pid: int) -> tuple[str, bool]:
    """Break something real; returns what was done and whether it was."""
    if fault in ("agent-kill", "agent-stop", "link-drop"):
        agents = _poll(lambda: agent_pids("b"))
        if fault == "link-drop":
            n = signal_all(sshd_sessions_of(agents), signal.SIGKILL)
            return f"SIGKILL sshd session x{n}", n > 0
        sig = signal.SIGKILL if fault == "agent-kill" else signal.SIGSTOP
        n = signal_all(agents, sig)
        return f"{signal.Signals(sig).name} agent x{n}", n > 0
    if fault == "criu-kill":
        side = "b" if phase == "restore" else "a"
        n = signal_all(_poll(lambda: criu_pids(side), 5.0), signal.SIGKILL)
        return f"SIGKILL criu on {side} x{n}", n > 0
    if fault == "migrate-kill":
        # tug itself dies (OOM killer, kill -9): no rollback runs at all; the
        # agent sees its session end, and tug recover puts things right.
        os.kill(run_pid, signal.SIGKILL)
        return "SIGKILL tug migrate", True
    if fault == "sigterm":
        os.kill(run_pid, signal.SIGTERM)
        time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(run_pid, signal.SIGTERM)  # a second one, during the rollback
        return "SIGTERM x2 tug migrate", True
    raise AssertionError(fault)


@pytest.mark.parametrize(("strategy", "phase", "fault"), list(_cases()))
def test_fault(lab: Lab, victim: str, strategy: str, phase: str, fault: str) -> None:
    before = lab.check("a", victim)
    assert before["ok"], before
    extra = ["--strategy", strategy, "--timeout", "rollback=5"]
    if fault == "agent-stop":
        # A hung peer is found by the phase deadlines only (its SSH session
        # still answers keepalives): short ones for every phase after this.
        for ph in PHASES[PHASES.index(phase):] + ["commit"]:
            extra += ["--timeout", f"{ph}=8"]
    if strategy in ROUNDS:
        extra += ["--policy", "max-iter=3"]
    if strategy == "precopy":
        extra += ["--eager"]  # without it pre-copy ends as hybrid, the matrix's own column
    run = start_migrate("a", victim, lab.url("b"), *extra)
    reached = run.wait_phase(phase)
    did, injected = _inject(fault, phase, run.proc.pid) if reached else ("phase never reached", False)
    res = run.finish()
    if fault == "agent-stop":
        stopped = sorted(set(agent_pids("b")) | set(stopped_on("b")))
        signal_all(stopped, signal.SIGCONT)  # it finds its session gone, keeps what ran, removes the rest
        assert _settled(lambda: not agent_pids("b"), 60), "a resumed agent must end once its session is gone"
    where = f"{fault} in {phase} ({strategy}): {did}\n{res.stderr}"
    outcome = res.json()["outcome"] if res.stdout.strip() else ("interrupted" if res.returncode == 130 else "none")
    OUTCOMES[f"{strategy}/{phase}/{fault}"] = outcome
    if injected and phase not in ("restore", "fill") and fault != "criu-kill":
        # Broken before the destination could run it: never a completed migration.
        # (A CRIU killed may have finished its work already: then the migration may complete.)
        assert outcome != "migrated", where

    copies = running_copies(lab, victim)
    assert list(copies.values()).count("running") <= 1, f"two running copies: {copies}\n{where}"
    if fault == "migrate-kill" and outcome == "none":
        # Nothing told the source what to do: whatever state it was left in,
        # recover must find the one safe way out (and agents must be gone first).
        assert _settled(lambda: not agent_pids("b"), 60), "the agent must end once its session is gone"
        assert copies.get("a") != "running" or copies.get("b") != "running", where
        rec = on("a", "tug", "recover", victim, "--to", lab.url("b"), "--json")
        assert rec.returncode == 0, f"recover failed: {rec.stderr}\n{where}"
        copies = running_copies(lab, victim)
    elif outcome == "failed" or (outcome == "interrupted" and "tug recover" in res.stderr):
        assert copies.get("a") in ("paused", None), f"source resumed after the destination may have run: {copies}\n{where}"
        rec = on("a", "tug", "recover", victim, "--to", lab.url("b"), "--json")
        assert rec.returncode == 0, f"recover failed: {rec.stderr}\n{where}"
        copies = running_copies(lab, victim)
    running = [h for h, st in copies.items() if st == "running"]
    assert len(running) == 1, f"not exactly one running copy: {copies} (outcome {outcome})\n{where}"
    (host,) = running
    if outcome == "migrated":
        assert host == "b", where
    elif outcome in ("rolled-back", "aborted"):
        assert host == "a", where
    after = lab.check(host, victim)
    assert after["ok"] and after["verify"]["bad_pages"] == 0, f"{after}\n{where}"
    # Reachable where it runs: no network lock or frame hold left engaged on either side.
    client = Client(lab, victim)
    time.sleep(0.2)
    result = client.stop()
    assert result["replies"] > 0 and result["errors"] == 0 and result["reconnects"] == 0, f"{result}\n{where}"
    other = "b" if host == "a" else "a"
    assert _settled(lambda: lab.leftovers(other, victim) == []), f"leftovers on {other}: {lab.leftovers(other, victim)}\n{where}"
    assert _settled(lambda: not agent_pids("b")), f"agents left: {agents_left(lab, 'b')}\n{where}"
    assert _settled(lambda: not criu_pids("a") and not criu_pids("b")), f"CRIU left:\n{describe(criu_pids('a') + criu_pids('b'))}\n{where}"
    assert _settled(lambda: not runc_checkpoints()), f"runc checkpoint left: {runc_checkpoints()}\n{where}"


def _settled(pred: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return bool(pred())


def test_harness_sees_every_phase(lab: Lab, victim: str) -> None:
    """The matrix is only as good as its trigger: each phase it aims at is announced."""
    run = start_migrate("a", victim, lab.url("b"), "--strategy", "precopy", "--policy", "max-iter=2")
    res = run.finish()
    assert res.returncode == 0, res.stderr
    assert set(PHASES) <= set(run.phases), run.phases


@pytest.fixture(scope="module", autouse=True)
def matrix_report() -> Iterator[None]:
    yield
    if OUTCOMES:
        # Merged with what another lane of the same run wrote (scripts/test.sh
        # runs the matrix in parts), under a lock: one file for the README.
        out = Path(__file__).resolve().parents[2] / "build" / "fault-matrix.json"
        out.parent.mkdir(exist_ok=True)
        with open(out.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                known = json.loads(out.read_text()) if out.exists() else {}
            except ValueError:
                known = {}
            out.write_text(json.dumps({**known, **OUTCOMES}, indent=1, sort_keys=True))
