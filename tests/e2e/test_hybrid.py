"""Hybrid (``--strategy hybrid``): pre-copy rounds, then the final step as post-copy.

Real CRIU lazy dump and lazy-pages daemon, real runc, the lab's sshd. The
destination's daemon is fed by the agent's hybrid page server: the page
store where the frozen source confirmed a page unchanged, the source's own
bytes otherwise (two reverse forwards over tug's SSH link).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..faults.harness import criu_pids, runc_checkpoints
from .conftest import Lab, demo_container, migrate
from .test_network import Client, assert_clean_run

pytestmark = pytest.mark.e2e


@pytest.fixture
def busy_demo(lab: Lab) -> Iterator[str]:
    """128 MiB that keeps dirtying pages: the frozen memory differs from what pre-copy sent."""
    yield from demo_container(lab, "hy", "--memory", "128", "--dirty-rate", "2000")


def test_hybrid_there_and_back_keeps_memory_and_connections(lab: Lab, busy_demo: str) -> None:
    demo = busy_demo
    before = lab.check("a", demo)
    client = Client(lab, demo, connections=2)
    try:
        there = migrate("a", demo, lab.url("b"), "--strategy", "hybrid", "--policy", "qemu")
        assert there.returncode == 0, there.stderr
        back = migrate("b", demo, lab.url("a"), "--strategy", "hybrid", "--policy", "qemu")
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
        assert report["rounds"], report  # pre-copy ran first
        assert report["fill_ms"] is not None and report["fill_ms"] > 0
        # Most of the memory was already there: the store served it, the
        # source sent only what changed (and never the whole memory again).
        assert report["store_pages"] > 0 and report["source_pages"] > 0, report
        assert report["store_pages"] > report["source_pages"], report
        assert report["bytes_after_commit"] < (128 << 20) // 2, report
        assert report["remote_faults"] is not None
        if report["remote_faults"]:
            lat = report["fault_latency_ms"]
            assert 0 < lat["p50"] <= lat["p99"], lat
    lab.check_moved_intact("a", demo, before, back.json()["downtime_ms"], fault_wait_ms=back.json()["fill_ms"])
    assert lab.leftovers("b", demo) == []
    assert not runc_checkpoints() and not criu_pids("a") and not criu_pids("b")
