"""Pods: containers sharing a network namespace move together, once, or not at all.

``tug lab pod a P --members 2`` starts P (a demo container holding the pod's
network namespace: its address, its endpoint) and P-m1, P-m2 (demo
containers joining that namespace by path, each on its own port).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..faults.harness import refuse_restore_on
from .conftest import Lab, lazy_wait, on, pod_containers
from .test_network import Client, assert_clean_run


@pytest.fixture
def pod(lab: Lab) -> Iterator[list[str]]:
    yield from pod_containers(lab, "p")


def run(src: str, *argv: str) -> tuple[int, dict[str, Any], str]:
    res = on(src, "tug", "migrate", *argv, "--json")
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else {}, res.stderr


def test_splitting_a_pod_is_refused_before_anything_changes(lab: Lab, pod: list[str]) -> None:
    holder, m1, _ = pod
    rc, report, err = run("a", holder, "--to", lab.url("b"))
    assert rc == 1 and report["outcome"] == "aborted", err
    assert f"'{m1}'" in err and "--pod" in err and "nothing was changed" in err
    rc, report, err = run("a", m1, "--to", lab.url("b"))
    assert rc == 1 and report["outcome"] == "aborted", err
    assert f"network namespace of {holder!r}" in err
    for n in pod:
        assert lab.check("a", n)["ok"]
        assert lab.state("b", n) is None and lab.leftovers("b", n) == []


#: How the pod comes back: ``precopy`` ends as hybrid, ``precopy-eager`` pushes each member's changed pages.
BACK = {
    "stop-copy": ["--strategy", "stop-copy"],
    "postcopy": ["--strategy", "postcopy"],
    "precopy": ["--strategy", "precopy", "--policy", "max-iter=3"],
    "precopy-eager": ["--strategy", "precopy", "--eager", "--policy", "max-iter=3"],
}


@pytest.mark.parametrize("back", list(BACK))
def test_pod_moves_whole_and_back(lab: Lab, pod: list[str], back: str) -> None:
    holder = pod[0]
    before = {n: lab.check("a", n) for n in pod}
    assert all(c["ok"] for c in before.values()), before
    address = lab.address(holder)

    rc, report, err = run("a", holder, "--pod", "--to", lab.url("b"))
    assert rc == 0, err
    assert report["outcome"] == "migrated"
    # The holder first: its namespace exists before the members join it.
    assert report["containers"] == pod
    for n in pod:
        lab.check_moved_intact("b", n, before[n], report["downtime_ms"], fault_wait_ms=lazy_wait(report))
        assert lab.state("a", n) is None and lab.leftovers("a", n) == []
    # One network namespace on b, with the pod's address, and one IPC
    # namespace: every member is in both (and lab check saw each member's
    # loopback connection to the holder and their shared semaphores working).
    assert lab.address(holder) == address
    # The pod's SysV segment: made by the first member restored (CRIU), mapped
    # by tug into the two restored after it; all three write and see it on b.
    attached = [n for n in pod if any(note.startswith(f"{n!r}: 1 SysV segment") for note in report["notes"])]
    assert sorted(attached) == sorted([holder, pod[2]]), report["notes"]
    for n in pod:
        shared = lab.check("b", n)["verify"]["pod"]
        assert shared["shm_attached"] == 3 and shared["shm_peers"] == 2, (n, shared)
    for kind in ("net", "ipc"):
        holder_ns = os.stat(f"/proc/{lab.state('b', holder)['pid']}/ns/{kind}").st_ino  # type: ignore[index]
        for n in pod[1:]:
            assert os.stat(f"/proc/{lab.state('b', n)['pid']}/ns/{kind}").st_ino == holder_ns, (kind, n)  # type: ignore[index]
    for n in pod[1:]:
        assert not lab.netns("b", n).exists()

    mid = {n: lab.check("b", n) for n in pod}
    rc, report, err = run("b", holder, "--pod", "--to", lab.url("a"), *BACK[back])
    assert rc == 0, err
    if back.startswith("precopy"):
        # The pod's rounds ran side by side and converged as one: one round
        # report per round, counting every member's pages.
        assert 1 <= len(report["rounds"]) <= 3
        assert report["rounds"][0]["pages_scanned"] >= 3 * (16 << 20) // 4096
    if back == "precopy":
        # Ends as hybrid, each member with its own lazy dump and frozen-memory
        # server: every member's memory filled in place on a.
        assert report["strategy"] == "hybrid", report["strategy"]
        assert any(n.startswith("precopy ends as hybrid") for n in report["notes"]), report["notes"]
        for n in pod:
            assert any(note.startswith(f"memory of {n!r} filled in place") for note in report["notes"]), (n, report["notes"])
    if back == "precopy-eager":
        # Each member's changed pages pushed from its own frozen processes.
        assert report["strategy"] == "precopy", report["strategy"]
        for n in pod:
            assert any(note.startswith(f"memory of {n!r} pushed from its frozen processes") for note in report["notes"]), \
                (n, report["notes"])
    fault_wait = lazy_wait(report)
    for n in pod:
        lab.check_moved_intact("a", n, mid[n], report["downtime_ms"], fault_wait_ms=fault_wait)
        assert lab.leftovers("b", n) == []


@pytest.mark.parametrize("how", ["stop-copy", "precopy", "precopy-eager"])
def test_a_failed_restore_rolls_the_whole_pod_back(lab: Lab, pod: list[str], tmp_path: Path, how: str) -> None:
    """The holder's restore (the pod's last: it brings the link up) fails
    inside CRIU after both members were restored on b. They were held
    stopped behind a shut network gate, so nothing of the pod ran there: every
    member resumes on a, b keeps nothing, and a client of a member (port
    7001) never notices beyond the pause: no reset, no lost reply. Also when
    each member's source is held by its own lazy dump (hybrid: the held
    members' lazy restores were asking it for pages; the pushed eager step)."""
    holder = pod[0]
    before = {n: lab.check("a", n) for n in pod}
    refuse_restore_on(lab, "a", holder, "b", tmp_path)
    client = Client(lab, holder, port=7001)
    try:
        rc, report, err = run("a", holder, "--pod", "--to", lab.url("b"), *BACK[how])
        assert rc == 1
        assert report["outcome"] == "rolled-back", err
        assert report["error"]["phase"] == "restore" and report["commit_point"] is None
        for n in pod[1:]:  # restored on b before the holder failed
            assert any(f"{n!r} restored on " in note and "held stopped" in note for note in report["notes"]), report["notes"]
        assert client.established() == 1
    finally:
        result = client.stop()
    assert_clean_run(result)
    for n in pod:
        st = lab.state("a", n)
        assert st is not None and st["status"] == "running", (n, st)
        after = lab.check("a", n)
        assert after["ok"] and after["counter"] > before[n]["counter"], (n, after)
        assert lab.state("b", n) is None and lab.leftovers("b", n) == []


#: A runc prestart hook (runc runs it as CRIU restores, before the processes)
#: that takes every permission off the SysV segments of the container's IPC
#: namespace on host b: the container's processes (root, without
#: CAP_IPC_OWNER) may no longer attach them, so tug's attach fails for real.
SEGMENT_LOCKING_HOOK = """#!/usr/bin/env python3
import ctypes, json, os, sys
state = json.load(sys.stdin)
if "/hosts/b/" not in state["bundle"]:
    sys.exit(0)
spec = json.load(open(os.path.join(state["bundle"], "config.json")))
path = next(ns["path"] for ns in spec["linux"]["namespaces"] if ns["type"] == "ipc")
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(path, os.O_RDONLY)
assert libc.setns(fd, 0x08000000) == 0, os.strerror(ctypes.get_errno())  # CLONE_NEWIPC
for line in open("/proc/sysvipc/shm").read().splitlines()[1:]:
    shmid = int(line.split()[1])
    ds = ctypes.create_string_buffer(256)
    assert libc.shmctl(shmid, 2, ds) == 0  # IPC_STAT
    ctypes.c_ushort.from_buffer(ds, 20).value = 0  # ipc_perm.mode
    assert libc.shmctl(shmid, 1, ds) == 0, os.strerror(ctypes.get_errno())  # IPC_SET
    print(f"hook: segment {shmid} locked", file=sys.stderr)
"""


@pytest.mark.parametrize("which", ["held member", "holder"])
def test_a_failed_segment_attach_rolls_the_whole_pod_back(lab: Lab, pod: list[str], tmp_path: Path, which: str) -> None:
    """tug's attach of the pod's SysV segment fails in a member restored after
    the first one (a member held for the group, or the holder, restored last):
    that copy never ran, so the whole pod resumes on a and b keeps nothing."""
    holder = pod[0]
    target = pod[2] if which == "held member" else holder
    before = {n: lab.check("a", n) for n in pod}
    script = tmp_path / "lock-segments.py"
    script.write_text(SEGMENT_LOCKING_HOOK)
    script.chmod(0o755)
    cfg_path = lab.bundle("a", target) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("hooks", {}).setdefault("prestart", []).append({"path": str(script)})
    cfg_path.write_text(json.dumps(cfg, indent=2))

    rc, report, err = run("a", holder, "--pod", "--to", lab.url("b"))
    assert rc == 1, err
    assert report["outcome"] == "rolled-back", err
    assert report["error"]["phase"] == "restore" and report["commit_point"] is None
    assert f"{target}: attaching the pod's SysV segments" in report["error"]["message"], report["error"]
    assert "Permission denied" in report["error"]["message"], report["error"]
    for n in pod:
        st = lab.state("a", n)
        assert st is not None and st["status"] == "running", (n, st)
        after = lab.check("a", n)
        assert after["ok"] and after["counter"] > before[n]["counter"], (n, after)
        assert after["verify"]["pod"]["shm_peers"] == 2, (n, after["verify"]["pod"])
        assert lab.state("b", n) is None and lab.leftovers("b", n) == []


def test_joining_the_hosts_ipc_namespace_is_refused(lab: Lab, demo: str) -> None:
    """A container joining the host's own IPC namespace (or any that no
    container of the migration is in) is refused: its SysV objects cannot
    move with it; nothing changes."""
    cfg_path = lab.bundle("a", demo) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["linux"]["namespaces"] = [ns for ns in cfg["linux"]["namespaces"] if ns["type"] != "ipc"]
    cfg["linux"]["namespaces"].append({"type": "ipc", "path": "/proc/1/ns/ipc"})  # as its admin would have started it
    cfg_path.write_text(json.dumps(cfg, indent=2))
    rc, report, err = run("a", demo, "--to", lab.url("b"))
    assert rc == 1 and report["outcome"] == "aborted", err
    # (In the lab, tug's host is a namespace of its own: init's IPC namespace is another one, which no
    # container of the migration is in; on a real host it is tug's own. Either is refused.)
    assert "IPC namespace (/proc/1/ns/ipc)" in err or "IPC namespace /proc/1/ns/ipc, which no other" in err
    assert lab.check("a", demo)["ok"]
    assert lab.state("b", demo) is None and lab.leftovers("b", demo) == []


def test_clients_of_the_pod_keep_their_connections(lab: Lab, pod: list[str]) -> None:
    """Clients of two members, both at the pod's address (the holder's
    workload on port 7000, the first member's on 7001): after the pod moved
    there and back, neither connection was reset, lost a reply or reconnected."""
    holder = pod[0]
    clients = [Client(lab, holder), Client(lab, holder, port=7001)]
    try:
        rc, report, err = run("a", holder, "--pod", "--to", lab.url("b"))
        assert rc == 0, err
        rc, report, err = run("b", holder, "--pod", "--to", lab.url("a"))
        assert rc == 0, err
        assert all(c.established() == 1 for c in clients)
    finally:
        results = [c.stop() for c in clients]
    for r in results:
        assert_clean_run(r)
