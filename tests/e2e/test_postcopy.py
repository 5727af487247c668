"""Post-copy (``--strategy postcopy``): the destination runs first, its memory follows from the frozen source.

Real CRIU lazy dump and lazy-pages daemon, real runc, the lab's sshd: the
pages cross tug's reverse forward. The commit point is the destination
running, so after it the source never resumes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..faults.harness import (
    agent_pids,
    assert_frozen_until_recover,
    criu_pids,
    cut_link_once_running,
    refuse_restore_on,
    runc_checkpoints,
)
from .conftest import Lab, demo_container, migrate, wait_for
from .test_network import Client, assert_clean_run

pytestmark = pytest.mark.e2e


@pytest.fixture
def busy_demo(lab: Lab) -> Iterator[str]:
    """128 MiB that keeps dirtying pages: faults during the fill are real."""
    yield from demo_container(lab, "pc", "--memory", "128", "--dirty-rate", "2000")


def lazy_there_and_back(lab: Lab, demo: str, *args: str) -> list[dict[str, Any]]:
    """``demo`` a -> b -> a with ``args`` (a strategy whose destination runs
    first), two client connections held throughout. Checks what every lazy
    move must show (no reset or reconnect, the commit point at running, a
    fill, fault latencies, memory and counter intact, nothing left behind)
    and returns both reports (with ``stderr``) for the strategy's own checks."""
    before = lab.check("a", demo)
    client = Client(lab, demo, connections=2)
    try:
        there = migrate("a", demo, lab.url("b"), *args)
        assert there.returncode == 0, there.stderr
        back = migrate("b", demo, lab.url("a"), *args)
        assert back.returncode == 0, back.stderr
        count = client.established()
    finally:
        result = client.stop()
    assert count == 2
    assert_clean_run(result)
    assert result["reconnects"] == 0, result
    reports = []
    for res in (there, back):
        report = res.json()
        assert report["outcome"] == "migrated" and report["commit_point"] == "running", report
        assert report["fill_ms"] is not None and report["fill_ms"] > 0
        assert report["remote_faults"] is not None
        if report["remote_faults"]:
            lat = report["fault_latency_ms"]
            assert 0 < lat["p50"] <= lat["p99"], lat
        reports.append({**report, "stderr": res.stderr})
    # The processes run before their memory is there: the heartbeat thread's
    # first writes after the restore wait on remote faults (seen: a gap 50 ms
    # over downtime + slack), which can only happen during the fill.
    lab.check_moved_intact("a", demo, before, reports[1]["downtime_ms"], fault_wait_ms=reports[1]["fill_ms"])
    assert lab.leftovers("b", demo) == []
    assert not runc_checkpoints() and not criu_pids("a") and not criu_pids("b")
    return reports


def test_postcopy_there_and_back_keeps_memory_and_connections(lab: Lab, busy_demo: str) -> None:
    for report in lazy_there_and_back(lab, busy_demo, "--strategy", "postcopy"):
        # The memory crossed after the destination ran, not in the frozen window.
        assert report["bytes_after_commit"] > (64 << 20), report["bytes_after_commit"]
        assert report["frozen_bytes"] < report["bytes_after_commit"] // 4, report
        assert "memory" in report["stderr"]  # the fill's progress is shown


@pytest.mark.parametrize("strategy", ["postcopy", "hybrid"])
def test_failure_before_the_processes_run_rolls_back(lab: Lab, busy_demo: str, tmp_path: Path, strategy: str) -> None:
    """CRIU's restore fails on b: the lazy dump is stopped and the source runs
    on (post-copy's, and hybrid's after its rounds)."""
    demo = busy_demo
    refuse_restore_on(lab, "a", demo, "b", tmp_path)
    res = migrate("a", demo, lab.url("b"), "--strategy", strategy)
    assert res.returncode == 1
    report = res.json()
    assert report["outcome"] == "rolled-back", report
    assert report["error"]["phase"] == "restore" and report["error"]["kind"] == "criu", report["error"]
    assert report["commit_point"] is None
    st = lab.state("a", demo)
    assert st is not None and st["status"] == "running"
    assert lab.check("a", demo)["ok"]
    assert lab.leftovers("b", demo) == []
    assert not runc_checkpoints() and not criu_pids("a") and not criu_pids("b")


@pytest.fixture
def slow_fill(lab: Lab) -> Iterator[str]:
    """512 MiB: the fill takes seconds, so the link can be cut while pages are still missing."""
    yield from demo_container(lab, "ps", "--memory", "512")


def test_link_cut_as_the_copy_runs_recovers_or_leaves_both_frozen(lab: Lab, slow_fill: str) -> None:
    """The link is cut the moment the destination's copy runs: never running with holes.

    If the restore's answer got through, the cut lands in the fill, which is
    recovered (tug reconnects, the fill resumes: tests/faults/test_link_recovery.py
    covers it in depth). If it did not, the source cannot know whether the
    copy ran: both stay frozen (the agent freezes its copy once the recovery
    deadline has passed) and one clear error names ``tug recover``, which
    undoes the migration (the only complete memory is the source's).
    """
    demo = slow_fill
    with cut_link_once_running(lab, "b", demo) as cutter:
        res = migrate("a", demo, lab.url("b"), "--strategy", "postcopy", "--link-recovery", "5")
    assert cutter.killed, "the link was never cut"
    report = res.json()
    if report["outcome"] == "migrated":
        assert report["link_recoveries"] >= 1, report
        assert lab.check("b", demo)["ok"]
        assert lab.leftovers("a", demo) == []
        assert wait_for(lambda: not agent_pids("b"), 30), "b's agents must end after the commit"
        return
    assert res.returncode == 1
    assert report["outcome"] == "failed", report
    # "running" if the restore's answer got through before the cut; None if not
    # (then the source cannot know whether the copy ran, which ends the same way).
    assert report["commit_point"] in ("running", None), report
    assert f"tug recover {demo} --to {lab.url('b')}" in res.stderr
    assert_frozen_until_recover(lab, demo, 45)
