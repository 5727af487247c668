"""Several containers moved as one group: one freeze, one commit point, one rollback.

Each member here is a demo container of its own (its own memory, counter,
network endpoint); the pods issue adds the namespaces members share.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..faults.harness import refuse_restore_on
from .conftest import Lab, demo_container, lazy_wait, on


@pytest.fixture
def pair(lab: Lab) -> Iterator[tuple[str, str]]:
    first = demo_container(lab, "ga", "--memory", "16", "--dirty-rate", "200")
    second = demo_container(lab, "gb", "--memory", "24", "--dirty-rate", "200")
    try:
        yield next(first), next(second)
    finally:
        for gen in (first, second):
            next(gen, None)


def migrate_group(src: str, names: tuple[str, ...], url: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    res = on(src, "tug", "migrate", *names, "--to", url, "--json", *extra)
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else {}, res.stderr


@pytest.mark.parametrize("back", ["stop-copy", "postcopy", "precopy"])
def test_group_moves_and_comes_back(lab: Lab, pair: tuple[str, str], back: str) -> None:
    before = {n: lab.check("a", n) for n in pair}
    assert all(c["ok"] for c in before.values()), before

    rc, report, err = migrate_group("a", pair, lab.url("b"))
    assert rc == 0, err
    assert report["outcome"] == "migrated"
    assert report["containers"] == list(pair)
    # One freeze: the whole group's memory crossed while it was frozen.
    assert report["frozen_bytes"] >= (16 + 24) << 20
    for n in pair:
        lab.check_moved_intact("b", n, before[n], report["downtime_ms"], fault_wait_ms=lazy_wait(report))
        assert lab.state("a", n) is None
        assert lab.leftovers("a", n) == []
    # The first was held stopped until the second was in: the hold's CRIU
    # option is gone from its config (its next dump reads the same file).
    conf = lab.bundle("b", pair[0]) / "criu.conf"
    assert not conf.exists() or "leave-stopped" not in conf.read_text()

    mid = {n: lab.check("b", n) for n in pair}
    rc, report, err = migrate_group("b", pair, lab.url("a"), "--strategy", back)
    assert rc == 0, err
    assert report["outcome"] == "migrated" and report["containers"] == list(pair)
    if back == "precopy":  # ends as hybrid, each member's memory served by its own frozen source
        assert report["strategy"] == "hybrid", report["strategy"]
        for n in pair:
            assert any(note.startswith(f"memory of {n!r} filled in place") for note in report["notes"]), report["notes"]
    fault_wait = lazy_wait(report)
    for n in pair:
        lab.check_moved_intact("a", n, mid[n], report["downtime_ms"], fault_wait_ms=fault_wait)
        assert lab.leftovers("b", n) == []


def test_group_rolls_back_whole_when_first_restore_fails(lab: Lab, pair: tuple[str, str], tmp_path: Path) -> None:
    """The first member's restore fails inside CRIU before anything of the
    group ran: every member's source resumes, b keeps nothing of either."""
    refuse_restore_on(lab, "a", pair[0], "b", tmp_path)
    rc, report, err = migrate_group("a", pair, lab.url("b"))
    assert rc == 1
    assert report["outcome"] == "rolled-back", err
    assert report["error"]["kind"] == "criu" and report["error"]["phase"] == "restore"
    for n in pair:
        st = lab.state("a", n)
        assert st is not None and st["status"] == "running", n
        assert lab.check("a", n)["ok"]
        assert lab.leftovers("b", n) == []


def test_group_rolls_back_whole_when_the_last_restore_fails(lab: Lab, pair: tuple[str, str], tmp_path: Path) -> None:
    """The second member's restore fails inside CRIU after the first was
    restored on b: the first was held stopped (it never ran), so the whole
    group rolls back: both sources resume, b keeps nothing of either."""
    first, second = pair
    before = {n: lab.check("a", n) for n in pair}
    refuse_restore_on(lab, "a", second, "b", tmp_path)
    rc, report, err = migrate_group("a", pair, lab.url("b"))
    assert rc == 1
    assert report["outcome"] == "rolled-back", err
    assert report["error"]["kind"] == "criu" and report["error"]["phase"] == "restore"
    assert report["commit_point"] is None
    for n in pair:
        st = lab.state("a", n)
        assert st is not None and st["status"] == "running", (n, st)
        after = lab.check("a", n)
        assert after["ok"] and after["counter"] > before[n]["counter"], (n, after)
        assert lab.state("b", n) is None
        assert lab.leftovers("b", n) == []

