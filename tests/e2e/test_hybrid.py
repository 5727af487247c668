"""Hybrid (``--strategy hybrid``): pre-copy rounds, then the final step as post-copy.

Real CRIU lazy dump and lazy-pages daemon, real runc, the lab's sshd. The
destination's daemon is fed by the agent's hybrid page server: the page
store where the frozen source confirmed a page unchanged, the source's own
bytes otherwise (two reverse forwards over tug's SSH link).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import Lab, demo_container, lazy_wait, migrate
from .test_postcopy import lazy_there_and_back

pytestmark = pytest.mark.e2e


@pytest.fixture
def busy_demo(lab: Lab) -> Iterator[str]:
    """128 MiB that keeps dirtying pages: the frozen memory differs from what pre-copy sent."""
    yield from demo_container(lab, "hy", "--memory", "128", "--dirty-rate", "2000")


def test_hybrid_there_and_back_keeps_memory_and_connections(lab: Lab, busy_demo: str) -> None:
    """Reached the way users reach it: ``--strategy precopy`` ends as hybrid
    (one container, userfaultfd on the destination) and the report says so;
    then ``--eager`` keeps pre-copy's classic final step."""
    for report in lazy_there_and_back(lab, busy_demo, "--strategy", "precopy", "--policy", "qemu"):
        assert report["strategy"] == "hybrid", report["strategy"]
        assert any(n.startswith("precopy ends as hybrid") for n in report["notes"]), report["notes"]
        assert report["rounds"], report  # pre-copy ran first
        # Most of the memory was already there: the store served it, the
        # source sent only what changed (and never the whole memory again).
        assert report["store_pages"] > 0 and report["source_pages"] > 0, report
        assert report["store_pages"] > report["source_pages"], report
        assert report["bytes_after_commit"] < (128 << 20) // 2, report
    before = lab.check("a", busy_demo)
    res = migrate("a", busy_demo, lab.url("b"), "--strategy", "precopy", "--eager", "--policy", "max-iter=2")
    assert res.returncode == 0, res.stderr
    eager = res.json()
    assert eager["strategy"] == "precopy" and not [n for n in eager["notes"] if "hybrid" in n], eager["notes"]
    # Every page was on b before its processes ran: after the commit only calls cross (hundreds of bytes).
    assert eager["bytes_after_commit"] < 64 << 10, eager
    lab.check_moved_intact("b", busy_demo, before, eager["downtime_ms"], fault_wait_ms=lazy_wait(eager))


def test_hybrid_with_the_uffd_tracker_needs_no_shadow(lab: Lab, busy_demo: str) -> None:
    """The uffd tracker's held pages, made exact by its final scan, say what the store has:
    the same fill, the memory verifies, and the rounds came from the scans (no shadow)."""
    for report in lazy_there_and_back(lab, busy_demo, "--strategy", "hybrid", "--policy", "qemu", "--tracker", "uffd"):
        assert report["tracker"] == "uffd", report
        assert report["rounds"], report
        notes = "\n".join(report["notes"])
        assert "(uffd scan)" in notes and "final uffd scan" in notes, notes
        assert report["store_pages"] > report["source_pages"] > 0, report
        assert report["bytes_after_commit"] < (128 << 20) // 2, report
