"""Pre-copy with the uffd tracker (userfaultfd write-protect + PAGEMAP_SCAN) in the lab."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Lab, demo_container, migrate, tug
from .test_network import Client, assert_clean_run


@pytest.fixture
def dirty_demo(lab: Lab) -> Iterator[str]:
    """64 MiB of checked memory, 2000 pages/s dirtied in a 5% hot set."""
    yield from demo_container(lab, "tuf", "--memory", "64", "--dirty-rate", "2000", "--hot-set", "0.05")


def host_pids(lab: Lab, host: str, name: str) -> list[int]:
    res = subprocess.run(["runc", "--root", lab.runc_root(host), "ps", "--format", "json", name], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return [int(p) for p in json.loads(res.stdout or "[]")]


def write_protected_vmas(pid: int) -> list[str]:
    """VMAs of ``pid`` registered with any userfaultfd for write-protect (smaps VmFlags "uw")."""
    smaps = Path(f"/proc/{pid}/smaps").read_text()
    return [m for m in re.findall(r"^VmFlags:(.*)$", smaps, re.M) if " uw" in f" {m} "]


def uffd_rounds(notes: list[str]) -> list[tuple[int, int]]:
    """(pages from the uffd scans, pages compared by content) of each round's note."""
    out = []
    for n in notes:
        m = re.match(r"round \d+ \(uffd\) of [^:]+: (\d+) pages written \(uffd scan\); (\d+) compared by content", n)
        if m:
            out.append((int(m.group(1)), int(m.group(2))))
    return out


def test_uffd_precopy_there_and_back(lab: Lab, dirty_demo: str) -> None:
    """a -> b -> a with --tracker uffd and a client connected throughout: memory
    verifies, the rounds came from the scans (not the fallback), and the
    restored container is left without any write-protect and keeps writing."""
    name = dirty_demo
    client = Client(lab, name)
    worst_downtime = 0.0  # the heartbeat's longest gap covers every move so far
    try:
        for src, dst in (("a", "b"), ("b", "a")):
            before = lab.check(src, name)
            res = migrate(src, name, lab.url(dst), "--strategy", "precopy", "--eager", "--tracker", "uffd")
            assert res.returncode == 0, res.stderr
            report = res.json()
            assert report["outcome"] == "migrated" and report["tracker"] == "uffd"
            rounds = uffd_rounds(report["notes"])
            assert len(rounds) == len(report["rounds"]) >= 2, report["notes"]
            assert rounds[0][0] >= (60 << 20) // 4096, "round 0 sent the memory from the scan"
            # Only file-backed private mappings (the binary's .data) are compared by content.
            assert all(content < uffd // 100 for uffd, content in rounds[:1]), rounds
            assert report["frozen_bytes"] < 0.10 * report["bytes_total"]
            assert any(n.startswith(f"final uffd scan of {name} in ") for n in report["notes"])
            assert not [n for n in report["notes"] if "compared by content instead" in n]
            worst_downtime = max(worst_downtime, report["downtime_ms"])
            lab.check_moved_intact(dst, name, before, worst_downtime)
            pids = host_pids(lab, dst, name)
            assert pids and all(write_protected_vmas(p) == [] for p in pids)
            # It keeps running and writing its pages: a later check verifies
            # a newer counter and every page again.
            first = lab.check(dst, name)
            time.sleep(1.0)
            later = lab.check(dst, name)
            assert later["ok"] and later["verify"]["bad_pages"] == 0
            assert later["heartbeat"]["last_counter"] > first["heartbeat"]["last_counter"]
            assert lab.leftovers(src, name) == []
    finally:
        result = client.stop()
    assert_clean_run(result)


def test_uffd_precopy_with_memory_mapped_during_the_rounds(lab: Lab) -> None:
    """The workload maps a new 2 MiB region every 200 ms and unmaps the last
    (new VMAs, reused addresses): each round registers what is new, and the
    moved container's memory, the churned region included, verifies."""
    name = "tuf-churn"
    lab.remove(name)
    tug("lab", "demo", "a", name, "--memory", "32", "--dirty-rate", "500", "--hot-set", "0.1", "--churn", "2", check=True)
    try:
        before = lab.check("a", name)
        res = migrate("a", name, lab.url("b"), "--strategy", "precopy", "--eager", "--tracker", "uffd", "--policy", "max-iter=4")
        assert res.returncode == 0, res.stderr
        report = res.json()
        rounds = uffd_rounds(report["notes"])
        assert len(rounds) == 4, report["notes"]
        # The new regions were registered and scanned, not compared by content
        # (which covers only the few file-backed pages of the binary).
        assert all(content < 512 for _, content in rounds), rounds
        after = lab.check_moved_intact("b", name, before, report["downtime_ms"])
        assert after["verify"]["bad_pages"] == 0
        assert all(write_protected_vmas(p) == [] for p in host_pids(lab, "b", name))
    finally:
        lab.remove(name)
