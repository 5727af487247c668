"""Post-copy (``--strategy postcopy``): the destination runs first, its memory follows from the frozen source.

Real CRIU lazy dump and lazy-pages daemon, real runc, the lab's sshd: the
pages cross tug's reverse forward. The commit point is the destination
running, so after it the source never resumes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..faults.harness import agent_pids, criu_pids, cut_link_once_running, refuse_restore_on, runc_checkpoints
from .conftest import Lab, demo_container, migrate, on, wait_for
from .test_network import Client, assert_clean_run

pytestmark = pytest.mark.e2e


@pytest.fixture
def busy_demo(lab: Lab) -> Iterator[str]:
    """128 MiB that keeps dirtying pages: faults during the fill are real."""
    yield from demo_container(lab, "pc", "--memory", "128", "--dirty-rate", "2000")


def test_postcopy_there_and_back_keeps_memory_and_connections(lab: Lab, busy_demo: str) -> None:
    demo = busy_demo
    before = lab.check("a", demo)
    client = Client(lab, demo, connections=2)
    try:
        there = migrate("a", demo, lab.url("b"), "--strategy", "postcopy")
        assert there.returncode == 0, there.stderr
        back = migrate("b", demo, lab.url("a"), "--strategy", "postcopy")
        assert back.returncode == 0, back.stderr
        count = client.established()
    finally:
        result = client.stop()
    assert count == 2
    assert_clean_run(result)
    assert result["reconnects"] == 0, result
    for res in (there, back):
        report = res.json()
        assert report["outcome"] == "migrated" and report["commit_point"] == "running", report
        assert report["fill_ms"] is not None and report["fill_ms"] > 0
        # The memory crossed after the destination ran, not in the frozen window.
        assert report["bytes_after_commit"] > (64 << 20), report["bytes_after_commit"]
        assert report["frozen_bytes"] < report["bytes_after_commit"] // 4, report
        assert report["remote_faults"] is not None
        if report["remote_faults"]:
            lat = report["fault_latency_ms"]
            assert 0 < lat["p50"] <= lat["p99"], lat
        assert "memory" in there.stderr  # the fill's progress is shown
    # Post-copy's processes run before their memory is there: the heartbeat
    # thread's first writes after the restore wait on remote faults (seen: a
    # gap 50 ms over downtime + slack), which can only happen during the fill.
    lab.check_moved_intact("a", demo, before, back.json()["downtime_ms"], fault_wait_ms=back.json()["fill_ms"])
    assert lab.leftovers("b", demo) == []
    assert not runc_checkpoints() and not criu_pids("a") and not criu_pids("b")


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


def test_link_cut_mid_fill_leaves_both_frozen_until_recover(lab: Lab, slow_fill: str) -> None:
    """The destination ran, then lost its source: never running with holes.

    Its copy is frozen with part of its memory; the source stays frozen (it
    ran over there); one clear error names ``tug recover``, which undoes the
    migration (the only complete memory is the source's).
    """
    demo = slow_fill
    with cut_link_once_running(lab, "b", demo) as cutter:
        res = migrate("a", demo, lab.url("b"), "--strategy", "postcopy")
    assert cutter.killed, "the link was never cut"
    assert res.returncode == 1
    report = res.json()
    assert report["outcome"] == "failed", report
    # "running" if the restore's answer got through before the cut; None if not
    # (then the source cannot know whether the copy ran, which ends the same way).
    assert report["commit_point"] in ("running", None), report
    assert f"tug recover {demo} --to {lab.url('b')}" in res.stderr
    assert wait_for(lambda: not agent_pids("b"), 30), "b's agent must end once its session is gone"
    st_a, st_b = lab.state("a", demo), lab.state("b", demo)
    assert st_a is not None and st_a["status"] == "paused", st_a
    # Frozen; or killed, where the freezer cannot take a thread that waits on
    # a missing page inside a system call: never running with holes.
    assert st_b is None or st_b["status"] in ("paused", "stopped"), f"the destination runs with missing memory: {st_b}"
    assert not runc_checkpoints() and not criu_pids("a") and not criu_pids("b")

    rec = on("a", "tug", "recover", demo, "--to", lab.url("b"), "--json")
    assert rec.returncode == 0, rec.stderr
    assert rec.json()["action"] == "undone", rec.stdout
    st = lab.state("a", demo)
    assert st is not None and st["status"] == "running"
    assert lab.check("a", demo)["ok"]
    assert lab.leftovers("b", demo) == []
