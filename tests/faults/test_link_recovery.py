"""A link that drops during the lazy fill is recovered (issue 10, the commit point kept).

Real faults from the harness: the SSH session carrying the destination's
agent is SIGKILLed (its sshd child) while pages are still being fetched, over
a shaped link so the fill lasts long enough to be cut. The fill's streams
survive on both hosts (transports/tunnel.py, engine/destination/relay.py),
tug reconnects and reattaches, and the migration completes: memory verified,
the counter continuous, the client's TCP connection kept, the report counts
the recoveries (the new link is cut once more while the fill still runs). If the link does not come back within ``--link-recovery``,
both sides stay frozen as before recovery existed and ``tug recover`` undoes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ..e2e.conftest import Lab, Result, demo_container, pod_containers, wait_for
from ..e2e.test_network import Client, assert_clean_run
from .harness import (
    agent_pids,
    agents_left,
    assert_frozen_until_recover,
    criu_pids,
    cut_link_again_after_recovery,
    cut_link_in_fill,
    runc_checkpoints,
    shaped,
    ssh_refused,
    start_migrate,
)

pytestmark = pytest.mark.e2e

#: a's pages leave at this rate during these tests: 256 MiB take ~8 s to fill.
RATE = "256mbit"


@pytest.fixture
def big_demo(lab: Lab) -> Iterator[str]:
    yield from demo_container(lab, "lr", "--memory", "256", "--dirty-rate", "4000")


def _extra(strategy: str) -> list[str]:
    # Hybrid with one round: much of the memory changed since, the fill fetches it from the source.
    return ["--strategy", strategy] + (["--policy", "max-iter=1"] if strategy == "hybrid" else [])


@pytest.mark.parametrize("strategy", ["postcopy", "hybrid"])
def test_link_cut_mid_fill_recovers(lab: Lab, big_demo: str, strategy: str) -> None:
    demo = big_demo
    before = lab.check("a", demo)
    client = Client(lab, demo, connections=1)
    try:
        with shaped(lab, "a", RATE):
            run = start_migrate("a", demo, lab.url("b"), *_extra(strategy))
            cut = cut_link_in_fill(run, "b")
            # And the new link too: a fill recovers as often as its link drops.
            again = cut_link_again_after_recovery(run, "b") if cut else 0
            res = run.finish()
        count = client.established()
    finally:
        result = client.stop()
    assert cut, f"the link was never cut\n{res.stderr}"
    assert res.returncode == 0, res.stderr
    report = res.json()
    assert report["outcome"] == "migrated" and report["commit_point"] == "running", report
    assert report["link_recoveries"] == 1 + (1 if again else 0), report
    assert "link lost" in res.stderr and "link recovered" in res.stderr, res.stderr
    assert count == 1
    assert_clean_run(result)
    assert result["reconnects"] == 0, result
    lab.check_moved_intact("b", demo, before, report["downtime_ms"], fault_wait_ms=report["fill_ms"])
    assert lab.leftovers("a", demo) == []
    assert wait_for(lambda: not agent_pids("b"), 30), f"agents left: {agents_left(lab, 'b')}"
    assert not runc_checkpoints() and not criu_pids("a") and not criu_pids("b")


@pytest.mark.parametrize("strategy", ["postcopy", "hybrid"])
def test_link_cut_for_good_leaves_both_frozen_until_recover(lab: Lab, big_demo: str, strategy: str) -> None:
    """The link never comes back within the deadline: never running with holes.

    The destination's copy is frozen with part of its memory (its agent gave
    up waiting); the source stays frozen (the copy ran); one clear error names
    ``tug recover``, which undoes the migration (the only whole memory is the source's).
    """
    demo = big_demo
    res, report = _cut_for_good(lab, demo, *_extra(strategy))
    assert report["commit_point"] in ("running", None), report
    assert report["link_recoveries"] == 0, report
    assert f"tug recover {demo} --to {lab.url('b')}" in res.stderr
    assert_frozen_until_recover(lab, demo, 60)


def _cut_for_good(lab: Lab, name: str, *extra: str) -> tuple[Result, dict[str, Any]]:
    """Migrate ``name`` a -> b and cut the link mid-fill with b's sshd refusing
    every reconnect for longer than the 4 s recovery deadline: it fails, saying so."""
    with shaped(lab, "a", RATE):
        run = start_migrate("a", name, lab.url("b"), *extra, "--link-recovery", "4", "--connect-timeout", "2")
        assert run.wait_phase("fill"), "the fill never started"
        with ssh_refused(lab, "b"):
            cut = cut_link_in_fill(run, "b")
            res = run.finish()
    assert cut, f"the link was never cut\n{res.stderr}"
    assert res.returncode == 1, res.stderr
    report = res.json()
    assert report["outcome"] == "failed", report
    assert "did not come back" in res.stderr, res.stderr
    return res, report


@pytest.fixture
def big_pod(lab: Lab) -> Iterator[list[str]]:
    yield from pod_containers(lab, "lp", 2, "--memory", "96", "--dirty-rate", "4000")


def test_link_cut_mid_fill_of_a_pod_recovers(lab: Lab, big_pod: list[str]) -> None:
    """A pod's pre-copy ends as hybrid, each member's fill served by its own
    frozen source over relays of its own: the link cut while they fill is
    recovered once for all of them, and every member arrives whole."""
    holder = big_pod[0]
    before = {n: lab.check("a", n) for n in big_pod}
    with shaped(lab, "a", RATE):
        run = start_migrate("a", holder, lab.url("b"), "--pod", "--strategy", "precopy", "--policy", "max-iter=1")
        cut = cut_link_in_fill(run, "b")
        res = run.finish()
    assert cut, f"the link was never cut\n{res.stderr}"
    assert res.returncode == 0, res.stderr
    report = res.json()
    assert report["outcome"] == "migrated" and report["strategy"] == "hybrid", report
    assert report["link_recoveries"] == 1, report
    assert "link lost" in res.stderr and "link recovered" in res.stderr, res.stderr
    for n in big_pod:
        assert any(note.startswith(f"memory of {n!r} filled in place") for note in report["notes"]), report["notes"]
        lab.check_moved_intact("b", n, before[n], report["downtime_ms"], fault_wait_ms=report["fill_ms"])
        assert lab.leftovers("a", n) == []
    assert wait_for(lambda: not agent_pids("b"), 30), f"agents left: {agents_left(lab, 'b')}"
    assert not runc_checkpoints() and not criu_pids("a") and not criu_pids("b")


def test_link_cut_for_good_during_a_pods_fill_leaves_it_frozen_until_recover(lab: Lab, big_pod: list[str]) -> None:
    """A pod's pre-copy ended as hybrid, and its link never comes back while
    the members fill: every member's copy on b is frozen with part of its
    memory, every source stays frozen on a, and ``tug recover`` of each member
    undoes the migration: the whole pod runs again on a, alone, its memory
    and shared segment intact, and b keeps nothing."""
    holder = big_pod[0]
    before = {n: lab.check("a", n) for n in big_pod}
    res, report = _cut_for_good(lab, holder, "--pod", "--strategy", "precopy", "--policy", "max-iter=1")
    assert report["strategy"] == "hybrid", report
    for n in big_pod:
        assert f"tug recover {n} --to {lab.url('b')}" in res.stderr, (n, res.stderr)
    for n, after in assert_frozen_until_recover(lab, big_pod, 60).items():
        assert after["verify"]["bad_pages"] == 0, (n, after)
        assert after["counter"] > before[n]["counter"], (n, after)
        assert after["verify"]["pod"]["shm_peers"] == 2, (n, after["verify"]["pod"])
