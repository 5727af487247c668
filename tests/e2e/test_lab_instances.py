"""Two lab instances on one machine at once, each migrating, neither touching the other.

Both instances are brought up at the same moment (their subnet claims race
for real), each gets a demo container with the *same* name on its host ``a``,
and both move it a -> b with stop-copy in two ``tug migrate`` processes that
run at the same time. Each copy must arrive intact in its own instance: in
its own runc root, its own endpoint namespace, its own cgroup, its own
subnet. Then one instance goes down; the other's namespaces are the very same
ones (same inodes), its sshds the same processes, and it migrates again.
Nothing of either stays behind.

The instances are not the default lab nor the one TUG_LAB names, so a test
run or a person using those is not disturbed; this test does not use the
``lab`` fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tug.engine.lab.layout import Layout, default_subnet

from .conftest import TUG, Result, require_prerequisites, tug

pytestmark = pytest.mark.e2e

NAMES = ("ta", "tb") if os.environ.get("TUG_LAB") not in ("ta", "tb") else ("tc", "td")
CONTAINER = "demo"


def lab(inst: str, *args: str, timeout: float = 120, check: bool = True) -> Result:
    return tug("lab", "--lab", inst, *args, timeout=timeout, check=check)


def status(inst: str) -> dict[str, Any]:
    data: dict[str, Any] = lab(inst, "status", "--json", check=False).json()
    return data


def netns_inodes(prefixes: tuple[str, ...]) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in Path("/run/netns").iterdir() if p.name.startswith(prefixes)}


def owned(lay: Layout) -> tuple[str, ...]:
    """Prefixes of every namespace an instance makes: its own, and its hosts' container endpoints."""
    return (lay.prefix + "-", f"tug-{lay.instance}.")


def fingerprint(inst: str) -> dict[str, Any]:
    """What must not change while another instance works: its namespaces (by inode) and sshds (by pid)."""
    lay = Layout(inst)
    saved = json.loads(lay.state_file.read_text())
    return {"netns": netns_inodes(owned(lay)), "sshd": [h["sshd_pid"] for h in saved["hosts"]], "up": status(inst)["up"]}


def leftovers(lay: Layout) -> list[str]:
    found = sorted(netns_inodes(owned(lay)))
    found += [str(p) for p in (lay.run_dir, lay.data_dir, lay.work_dir("a"), lay.work_dir("b")) if p.exists()]
    found += [str(p) for h in ("a", "b") for p in Path("/sys/fs/cgroup").glob(f"*/{lay.cgroup_parent(h).lstrip('/')}")]
    return found


def run_at_once(commands: dict[str, list[str]]) -> dict[str, tuple[float, float, subprocess.CompletedProcess[str]]]:
    """Start every command at the same moment; (start, end, result) of each, times monotonic."""
    barrier = threading.Barrier(len(commands))
    out: dict[str, tuple[float, float, subprocess.CompletedProcess[str]]] = {}

    def one(key: str, argv: list[str]) -> None:
        barrier.wait()
        t0 = time.monotonic()
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        out[key] = (t0, time.monotonic(), res)

    threads = [threading.Thread(target=one, args=item) for item in commands.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def container_pid(inst: str, host: str) -> int:
    for h in status(inst)["hosts"]:
        if h["name"] == host:
            for c in h["containers"]:
                if c["id"] == CONTAINER and c["status"] == "running":
                    return int(c["pid"])
    raise AssertionError(f"{CONTAINER} does not run on {host} of lab {inst}")


def assert_lives_in(inst: str, host: str, before: dict[str, Any]) -> None:
    """The container runs on ``host`` of ``inst`` only, intact, inside that instance's netns and cgroup."""
    lay = Layout(inst)
    after = lab(inst, "check", host, CONTAINER, check=False).json()
    assert after["ok"], after
    hb = after["heartbeat"]
    assert hb["resets"] == 0 and hb["backwards"] == 0 and hb["skipped"] == 0
    assert hb["last_counter"] > before["heartbeat"]["last_counter"]
    pid = container_pid(inst, host)
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == lay.host_network(host).netns_path(CONTAINER).stat().st_ino
    assert f":{lay.cgroup_parent(host)}/{CONTAINER}\n" in Path(f"/proc/{pid}/cgroup").read_text()
    other = "a" if host == "b" else "b"
    assert not lay.host_network(other).netns_path(CONTAINER).exists()
    st = status(inst)
    address = next(c["address"] for h in st["hosts"] for c in h["containers"] if c["id"] == CONTAINER)
    assert address.startswith(st["subnet"].rsplit(".", 1)[0] + ".")


@pytest.fixture
def two_labs() -> Iterator[tuple[str, str]]:
    require_prerequisites()
    ups = run_at_once({name: [TUG, "lab", "--lab", name, "up"] for name in NAMES})
    try:
        for name, (_, _, res) in ups.items():
            assert res.returncode == 0, f"tug lab --lab {name} up: {res.stderr}"
        yield NAMES
    finally:
        for name in NAMES:
            lab(name, "down", check=False)


def test_two_instances_migrate_at_once_and_down_removes_only_its_own(two_labs: tuple[str, str]) -> None:
    a_lab, b_lab = two_labs
    st = {name: status(name) for name in two_labs}
    assert all(s["up"] for s in st.values()), st
    subnets = {s["subnet"] for s in st.values()}
    assert len(subnets) == 2 and f"{default_subnet()}.0/24" not in subnets, subnets
    for name in two_labs:
        for h in st[name]["hosts"]:
            assert h["netns"].startswith(Layout(name).prefix + "-") and h["runc_root"].startswith(f"{Layout(name).run_dir}/")

    for name in two_labs:
        lab(name, "demo", "a", CONTAINER, "--memory", "64", "--dirty-rate", "200", timeout=180)
    before = {name: lab(name, "check", "a", CONTAINER).json() for name in two_labs}
    untouched = fingerprint(b_lab)

    # Two migrations of two containers named alike, between hosts named alike, at the same time.
    runs = run_at_once({
        name: [TUG, "lab", "--lab", name, "run", "a", "--", "tug", "migrate", CONTAINER, "--to",
               lab(name, "url", "b").stdout.strip(), "--json", "--quiet"]
        for name in two_labs
    })
    reports = {}
    for name, (_, _, res) in runs.items():
        assert res.returncode == 0, f"lab {name}: {res.stderr}"
        reports[name] = json.loads(res.stdout)
        assert reports[name]["outcome"] == "migrated", reports[name]
    # They overlapped: each had begun before the other could have ended.
    latest_begin = max(end - reports[n]["total_s"] for n, (_, end, _) in runs.items())
    earliest_end = min(start + reports[n]["total_s"] for n, (start, _, _) in runs.items())
    assert latest_begin < earliest_end, (runs, reports)

    for name in two_labs:
        assert_lives_in(name, "b", before[name])
    now = fingerprint(b_lab)
    moved = {f"tug-{b_lab}.a-{CONTAINER}", f"tug-{b_lab}.b-{CONTAINER}"}  # B's own endpoint, a -> b
    assert {k: v for k, v in now["netns"].items() if k not in moved} == {
        k: v for k, v in untouched["netns"].items() if k not in moved}
    assert now["sshd"] == untouched["sshd"] and now["up"]

    # Down A: all of A goes, nothing of B does, and B still migrates.
    untouched = fingerprint(b_lab)
    lab(a_lab, "down")
    assert leftovers(Layout(a_lab)) == []
    assert fingerprint(b_lab) == untouched
    back = lab(b_lab, "check", "b", CONTAINER).json()
    res = lab(b_lab, "run", "b", "--", "tug", "migrate", CONTAINER, "--to", lab(b_lab, "url", "a").stdout.strip(),
              "--json", "--quiet", check=False)
    assert res.returncode == 0 and res.json()["outcome"] == "migrated", res.stderr
    assert_lives_in(b_lab, "a", back)

    lab(b_lab, "down")
    assert leftovers(Layout(b_lab)) == []
