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


@pytest.mark.parametrize("back", ["stop-copy", "postcopy"])
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

    mid = {n: lab.check("b", n) for n in pair}
    rc, report, err = migrate_group("b", pair, lab.url("a"), "--strategy", back)
    assert rc == 0, err
    assert report["outcome"] == "migrated" and report["containers"] == list(pair)
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


def test_group_stays_frozen_once_a_member_ran(lab: Lab, pair: tuple[str, str], tmp_path: Path) -> None:
    """The second member's restore fails after the first ran on b: no source
    resumes (the first may have answered clients from b), both are frozen
    here, and the error names tug recover for each; recover then finishes
    the first (it runs on b) and undoes the second (nothing of it there)."""
    first, second = pair
    refuse_restore_on(lab, "a", second, "b", tmp_path)
    rc, report, err = migrate_group("a", pair, lab.url("b"))
    assert rc == 1
    assert report["outcome"] == "failed", err
    for n in pair:
        st = lab.state("a", n)
        assert st is not None and st["status"] == "paused", (n, st)
    assert (lab.state("b", first) or {}).get("status") == "running"
    assert lab.state("b", second) is None
    recover_notes = [note for note in report["notes"] if "tug recover" in note]
    assert any(first in note for note in recover_notes) and any(second in note for note in recover_notes), report["notes"]

    done = json.loads(on("a", "tug", "recover", first, "--to", lab.url("b"), "--json", check=True).stdout)
    assert done["action"] == "finished"
    assert lab.state("a", first) is None and lab.check("b", first)["ok"]
    undone = json.loads(on("a", "tug", "recover", second, "--to", lab.url("b"), "--json", check=True).stdout)
    assert undone["action"] == "undone"
    assert (lab.state("a", second) or {}).get("status") == "running" and lab.check("a", second)["ok"]
    assert lab.leftovers("b", second) == []
