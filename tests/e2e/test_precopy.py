"""Iterative pre-copy with the content tracker, in the lab on a 1 gbit link."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..faults.harness import refuse_restore_on
from .conftest import Lab, demo_container, migrate, tug


@pytest.fixture
def gbit(lab: Lab) -> Iterator[Lab]:
    """Shape every lab link to 1 gbit for the test, then lift the shaping."""
    tug("lab", "up", "--rate", "1gbit", check=True)
    try:
        yield lab
    finally:
        tug("lab", "up", check=True)


@pytest.fixture
def big_hot_set(lab: Lab) -> Iterator[str]:
    """256 MiB of checked memory, 2000 pages/s dirtied within a 2% hot set."""
    yield from demo_container(lab, "tpre", "--memory", "256", "--dirty-rate", "2000", "--hot-set", "0.02")


def test_precopy_moves_little_while_frozen(gbit: Lab, big_hot_set: str) -> None:
    lab, name = gbit, big_hot_set
    # The stop-copy baseline for this very workload and link: a -> b.
    base = migrate("a", name, lab.url("b"), "--strategy", "stop-copy")
    assert base.returncode == 0, base.stderr
    stop_copy = base.json()
    assert lab.check("b", name)["ok"]

    # Pre-copy back: b -> a.
    before = lab.check("b", name)
    res = migrate("b", name, lab.url("a"), "--strategy", "precopy", "--eager", "--policy", "phaul", "--tracker", "content")
    assert res.returncode == 0, res.stderr
    report = res.json()
    assert report["outcome"] == "migrated"
    assert report["strategy"] == "precopy" and report["tracker"] == "content"

    rounds = report["rounds"]
    assert len(rounds) >= 2, rounds
    assert all({"dirty_pages", "bytes", "duration_ms"} <= set(r) for r in rounds)
    # Round 0 copies everything; later rounds only the hot set: they shrink.
    assert rounds[0]["dirty_pages"] >= (200 << 20) // 4096
    assert rounds[1]["dirty_pages"] < rounds[0]["dirty_pages"] // 10
    assert rounds[-1]["dirty_pages"] < rounds[0]["dirty_pages"] // 10

    # The point of pre-copy, on bytes rather than time.
    assert report["frozen_bytes"] < 0.10 * stop_copy["frozen_bytes"], (report["frozen_bytes"], stop_copy["frozen_bytes"])

    lab.check_moved_intact("a", name, before, max(stop_copy["downtime_ms"], report["downtime_ms"]))
    assert lab.leftovers("b", name) == []


def test_dirtying_faster_than_the_link_stops_at_the_iteration_limit(gbit: Lab) -> None:
    lab, name = gbit, "tpre-hot"
    lab.remove(name)
    # 64 MiB, all of it hot, 60000 pages/s = 245 MB/s: twice what 1 gbit carries.
    tug("lab", "demo", "a", name, "--memory", "64", "--dirty-rate", "60000", "--hot-set", "1.0", check=True)
    try:
        res = migrate("a", name, lab.url("b"), "--strategy", "precopy", "--policy", "max-iter=3", "--tracker", "content")
        assert res.returncode == 0, res.stderr
        report = res.json()
        assert len(report["rounds"]) == 3
        assert report["rounds"][-1]["decision"].startswith("final")
        assert lab.check("b", name)["ok"]
    finally:
        lab.remove(name)


def test_rollback_after_precopy_rounds(lab: Lab, demo: str, tmp_path: Path) -> None:
    refuse_restore_on(lab, "a", demo, "b", tmp_path)
    res = migrate("a", demo, lab.url("b"), "--strategy", "precopy", "--policy", "max-iter=2")
    assert res.returncode == 1
    report = res.json()
    assert report["outcome"] == "rolled-back"
    assert len(report["rounds"]) == 2
    assert report["error"]["phase"] == "restore"
    st = lab.state("a", demo)
    assert st is not None and st["status"] == "running"
    assert lab.check("a", demo)["ok"]
    assert lab.leftovers("b", demo) == []


def test_bad_policy_is_a_one_line_error(lab: Lab, demo: str) -> None:
    res = migrate("a", demo, lab.url("b"), "--strategy", "precopy", "--policy", "max-iter=banana", "--quiet")
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tug: error: bad --policy"), res.stderr
    assert lab.check("a", demo)["ok"]


def test_soft_dirty_tracker(lab: Lab, demo: str) -> None:
    """CRIU pre-dump needs kernel soft-dirty tracking; this kernel may lack it."""
    has = subprocess.run(["criu", "check", "--feature", "mem_dirty_track"], capture_output=True).returncode == 0
    if not has:
        res = migrate("a", demo, lab.url("b"), "--strategy", "precopy", "--tracker", "soft-dirty", "--quiet")
        assert res.returncode == 1 and "kernel lacks soft-dirty" in res.stderr
        assert lab.check("a", demo)["ok"]
        pytest.skip("kernel lacks soft-dirty (see tug doctor)")
    res = migrate("a", demo, lab.url("b"), "--strategy", "precopy", "--tracker", "soft-dirty")
    assert res.returncode == 0, res.stderr
    assert res.json()["tracker"] == "soft-dirty"
    assert lab.check("b", demo)["ok"]
