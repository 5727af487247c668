"""Pre-copy's eager step in the lab: the changed pages pushed from the frozen processes (strategies/pushed.py).

What it must show for real: CRIU's frozen dump leaves the memory in the
processes (its images hold no lazy page), tug pushes only what changed since
the last round, the destination restores from its page store (lazily from
the local store, or eagerly through its chain with ``--no-lazy-restore``),
and the container arrives whole with its client connection kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from .conftest import Lab, demo_container, lazy_wait, migrate
from .test_network import Client, assert_clean_run

PUSHED = re.compile(r"memory of '([^']+)' pushed from its frozen processes: (\d+) pages sent \([\d.]+ MiB\), (\d+) confirmed")


@pytest.fixture
def pushed_demo(lab: Lab) -> Iterator[str]:
    """64 MiB of checked memory, 2000 pages/s dirtied in a 5% hot set."""
    yield from demo_container(lab, "tup", "--memory", "64", "--dirty-rate", "2000", "--hot-set", "0.05")


@pytest.mark.parametrize(("tracker", "restore"), [("uffd", ()), ("content", ("--no-lazy-restore",))],
                         ids=["uffd-lazy-local", "content-chain"])
def test_eager_step_pushes_only_what_changed(lab: Lab, pushed_demo: str, tracker: str, restore: tuple[str, ...]) -> None:
    name = pushed_demo
    client = Client(lab, name)
    worst = 0.0
    try:
        for src, dst in (("a", "b"), ("b", "a")):
            before = lab.check(src, name)
            res = migrate(src, name, lab.url(dst), "--strategy", "precopy", "--eager", "--tracker", tracker,
                          "--policy", "max-iter=3", *restore)
            assert res.returncode == 0, res.stderr
            report = res.json()
            assert report["outcome"] == "migrated" and report["strategy"] == "precopy", report["notes"]
            pushed = [PUSHED.match(n) for n in report["notes"]]
            (m,) = [p for p in pushed if p is not None]
            sent, same = int(m.group(2)), int(m.group(3))
            # Every page the lazy dump left got a verdict; most were already there.
            assert sent + same >= (60 << 20) // 4096 and sent < same // 4, (sent, same)
            # The frozen window carried the changed pages and the (small) images, never the memory again.
            assert report["frozen_bytes"] < (64 << 20) // 4, report["frozen_bytes"]
            steps = report["frozen_steps_ms"]
            assert "push_ms" in steps and "dump_end_ms" in steps, steps
            assert report["commit_point"] == ("confirmed" if restore else "running"), report["commit_point"]
            if not restore:
                assert any(n.startswith("the page store served") for n in report["notes"]), report["notes"]
            # Once its processes ran, the source was no longer needed: only calls crossed after the commit.
            assert report["bytes_after_commit"] < 64 << 10, report["bytes_after_commit"]
            worst = max(worst, report["downtime_ms"])
            lab.check_moved_intact(dst, name, before, worst, fault_wait_ms=lazy_wait(report))
            assert lab.leftovers(src, name) == []
    finally:
        result = client.stop()
    assert_clean_run(result)
