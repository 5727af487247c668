"""Hybrid (``--strategy hybrid``): pre-copy rounds, then the final step as post-copy.

Real CRIU lazy dump and lazy-pages daemon, real runc, the lab's sshd. The
destination's daemon is fed by the agent's hybrid page server: the page
store where the frozen source confirmed a page unchanged, the source's own
bytes otherwise (two reverse forwards over tug's SSH link).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import Lab, demo_container
from .test_postcopy import lazy_there_and_back

pytestmark = pytest.mark.e2e


@pytest.fixture
def busy_demo(lab: Lab) -> Iterator[str]:
    """128 MiB that keeps dirtying pages: the frozen memory differs from what pre-copy sent."""
    yield from demo_container(lab, "hy", "--memory", "128", "--dirty-rate", "2000")


def test_hybrid_there_and_back_keeps_memory_and_connections(lab: Lab, busy_demo: str) -> None:
    for report in lazy_there_and_back(lab, busy_demo, "--strategy", "hybrid", "--policy", "qemu"):
        assert report["rounds"], report  # pre-copy ran first
        # Most of the memory was already there: the store served it, the
        # source sent only what changed (and never the whole memory again).
        assert report["store_pages"] > 0 and report["source_pages"] > 0, report
        assert report["store_pages"] > report["source_pages"], report
        assert report["bytes_after_commit"] < (128 << 20) // 2, report

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
