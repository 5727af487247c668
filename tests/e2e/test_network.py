"""Network migration: a container keeps its IP, its MAC and its open TCP connections.

A client in the lab's ``client`` host holds connections to the demo
container's TCP server (``tug lab client``) while the container moves. The
client checks every reply itself: exactly one per request, in order, on the
same connection; bulk streams in both directions are verified byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..faults.harness import endpoint_name_taken, kill_lazy_pages_once_running, refuse_restore_on
from .conftest import TUG, Lab, demo_container, migrate, on, wait_for


class Client:
    """``tug lab client NAME`` in the background; :meth:`stop` ends it with SIGINT."""

    def __init__(self, lab: Lab, name: str, *extra: str, connections: int = 1, port: int = 7000) -> None:
        self.address = lab.address(name)
        self.client_ns = lab.layout.client_ns
        self.connections = connections
        self.port = port
        self.proc = subprocess.Popen(
            [TUG, "lab", "client", name, "--duration", "600", "--json", "--connections", str(connections),
             "--port", str(port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )
        want = connections + (1 if "--bulk" in extra else 0) + (1 if "--upload" in extra else 0)
        if not wait_for(lambda: self.established() >= want, timeout=20):
            out = self.stop()
            raise AssertionError(f"client did not connect to {self.address}: {out}")

    def sockets(self) -> set[str]:
        """Local ends (addr:port) of the client's established connections to the container."""
        res = subprocess.run(
            ["ip", "netns", "exec", self.client_ns, "ss", "-Htn", "state", "established"], capture_output=True, text=True
        )
        return {ln.split()[2] for ln in res.stdout.splitlines() if f"{self.address}:{self.port}" in ln}

    def established(self) -> int:
        return len(self.sockets())

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=120)
        assert out.strip(), f"client printed nothing (exit {self.proc.returncode}): {err}"
        result: dict[str, Any] = json.loads(out)
        return result


def endpoint(lab: Lab, host: str, name: str) -> tuple[str, str]:
    """(address/prefix, MAC) of eth0 in the container's network namespace on ``host``."""
    res = subprocess.run(
        ["ip", "-n", lab.netns(host, name).name, "-j", "addr", "show", "eth0"], capture_output=True, text=True, check=True
    )
    link = json.loads(res.stdout)[0]
    inet = [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"]
    return inet[0], link["address"]


def assert_clean_run(result: dict[str, Any]) -> None:
    """No reset, no reconnect, every request answered once and in order."""
    assert result["replies"] > 0, result
    assert result["errors"] == 0, result["per_connection"]
    assert result["reconnects"] == 0, result["per_connection"]
    assert result["out_of_order"] == 0, result["per_connection"]
    assert result["ok"] is True, result


def test_connection_survives_there_and_back(lab: Lab, demo: str, record_property: Any) -> None:
    """One connection, A -> B -> A: no reset, nothing lost, and the requests sent during each freeze
    are answered by the destination (the network lock holds them, then delivers them)."""
    before = endpoint(lab, "a", demo)
    client = Client(lab, demo)
    try:
        there = migrate("a", demo, lab.url("b"))
        assert there.returncode == 0, there.stderr
        replies_on_b = client.established()
        assert endpoint(lab, "b", demo) == before, "the endpoint must keep its address and MAC"
        assert not lab.netns(lab_host := "a", demo).exists(), f"old endpoint left on {lab_host}"
        back = migrate("b", demo, lab.url("a"))
        assert back.returncode == 0, back.stderr
    finally:
        result = client.stop()
    assert replies_on_b == 1, "the client's one connection is still established after the move"
    assert_clean_run(result)
    for report in (there.json(), back.json()):
        # The client's requests during the freeze were held, then delivered to the destination.
        held = report["held_frames"]
        assert held["held"] > 0 and held["delivered"] == held["held"] and held["dropped"] == 0, held
    assert endpoint(lab, "a", demo) == before
    record_property("client_max_gap_ms", result["max_gap_ms"])
    record_property("engine_downtime_ms", [there.json()["downtime_ms"], back.json()["downtime_ms"]])
    assert lab.check("a", demo)["ok"]
    assert lab.leftovers("b", demo) == []


@pytest.fixture
def loopback_demo(lab: Lab) -> Iterator[str]:
    """A demo container that also keeps a TCP connection to itself over its loopback."""
    yield from demo_container(lab, "tl", "--memory", "32", "--dirty-rate", "200", "--loopback")


@pytest.mark.parametrize("strategy", ["stop-copy", "postcopy", "hybrid"])
def test_loopback_and_client_connections_survive_without_criu_network_lock(
    lab: Lab, loopback_demo: str, strategy: str
) -> None:
    """tug's own lock holds the network of a frozen container, so CRIU's in-namespace
    iptables lock is skipped (criu/netlockskip.py): a connection from outside and the
    container's connection to itself over its loopback (both ends restored by one CRIU)
    survive a move there and back, with no error and no reconnect on either."""
    name = loopback_demo
    client = Client(lab, name)
    try:
        for src, dst in (("a", "b"), ("b", "a")):
            res = migrate(src, name, lab.url(dst), "--strategy", strategy)
            assert res.returncode == 0, res.stderr
            check = lab.check(dst, name)
            assert check["ok"], check
            peer = check["verify"]["pod"]
            assert peer["peer_port"] and peer["peer_errors"] == 0 and peer["peer_reconnects"] == 0, peer
    finally:
        result = client.stop()
    assert_clean_run(result)


def test_many_connections_and_data_in_flight(lab: Lab, demo: str) -> None:
    """Four request loops plus a paced download and upload, both verified, across two moves."""
    size = 24 << 20
    client = Client(lab, demo, "--bulk", str(size), "--upload", str(size), "--rate", str(2 << 20), connections=4)
    try:
        t_start = time.time()
        assert migrate("a", demo, lab.url("b")).returncode == 0
        assert migrate("b", demo, lab.url("a")).returncode == 0
        t_end = time.time()
    finally:
        result = client.stop()
    assert_clean_run(result)
    assert result["connections"] == 4 and all(c["replies"] > 0 for c in result["per_connection"])
    for key in ("bulk", "upload"):
        xfer = result[key]
        assert xfer["ok"], (key, xfer)
        # The streams really were in flight across both freezes.
        assert xfer["started_at"] < t_start and xfer["finished_at"] > t_end, (key, xfer, t_start, t_end)
    assert result["bulk"]["received"] == size and result["upload"]["sent"] == size


@pytest.mark.parametrize(
    ("fault", "phase"),
    [
        ("restore-refused", "restore"),  # CRIU's restore fails on the destination
        ("endpoint-name-taken", "pre-restore"),  # the destination cannot create the endpoint
    ],
)
def test_rollback_keeps_connections(lab: Lab, demo: str, fault: str, phase: str, tmp_path: Path) -> None:
    before = endpoint(lab, "a", demo)
    client = Client(lab, demo, connections=2)
    try:
        with contextlib.ExitStack() as stack:
            if fault == "restore-refused":
                refuse_restore_on(lab, "a", demo, "b", tmp_path)
            else:
                stack.enter_context(endpoint_name_taken(lab, "b", demo))
            res = migrate("a", demo, lab.url("b"))
        assert res.returncode == 1
        report = res.json()
        assert report["outcome"] == "rolled-back", report
        assert report["error"]["phase"] == phase, report["error"]
        if phase != "pre-restore":  # the lock was on: what it held went to the resumed source
            held = report["held_frames"]
            assert held["held"] > 0 and held["delivered"] == held["held"], held
        # The client keeps talking to the resumed source.
        count = client.established()
    finally:
        result = client.stop()
    assert count == 2
    assert_clean_run(result)
    assert endpoint(lab, "a", demo) == before
    assert lab.check("a", demo)["ok"]
    assert lab.leftovers("b", demo) == []


def test_copy_that_ran_then_broke_leaves_the_source_frozen_until_recover(lab: Lab, big_demo: str) -> None:
    """Restored, then b's memory fill dies (its lazy-pages daemon SIGKILLed):
    its copy ran (clients may have been answered by it), so the source stays
    frozen (the one-copy rule), the broken copy is removed, and the error
    names ``tug recover``, which resumes the source, whose clients'
    connections survive (their segments sent meanwhile are retransmitted)."""
    demo = big_demo
    before = endpoint(lab, "a", demo)
    client = Client(lab, demo, connections=2)
    try:
        with kill_lazy_pages_once_running(lab, "b", demo) as killer:
            res = migrate("a", demo, lab.url("b"))
        assert killer.killed, "the lazy-pages daemon was never seen with the container restored"
        assert res.returncode == 1
        report = res.json()
        assert report["outcome"] == "failed", report
        assert report["error"]["kind"] == "criu" and report["error"]["phase"] == "fill", report["error"]
        assert "lazy-pages" in report["error"]["message"]
        assert f"tug recover {demo} --to {lab.url('b')}" in res.stderr
        st = lab.state("a", demo)
        assert st is not None and st["status"] == "paused", "the source must not resume after the destination ran"
        assert lab.state("b", demo) is None, "the broken copy is removed"
        rec = on("a", "tug", "recover", demo, "--to", lab.url("b"), "--json")
        assert rec.returncode == 0, rec.stderr
        assert rec.json()["action"] == "undone", rec.stdout
        st = lab.state("a", demo)
        assert st is not None and st["status"] == "running"
        count = client.established()
    finally:
        result = client.stop()
    assert count == 2
    assert result["reconnects"] == 0, result
    assert endpoint(lab, "a", demo) == before
    assert lab.check("a", demo)["ok"]
    assert lab.leftovers("b", demo) == []


def test_tcp_close_drops_connections_but_keeps_listening(lab: Lab, demo: str) -> None:
    """--tcp-close: established connections end on the move, the server still accepts."""
    client = Client(lab, demo)
    first = client.sockets()
    try:
        res = migrate("a", demo, lab.url("b"), "--tcp-close")
        assert res.returncode == 0, res.stderr
        # The client notices the closed connection and connects anew, to b.
        assert wait_for(lambda: bool(client.sockets()) and client.sockets() != first, timeout=30)
    finally:
        result = client.stop()
    assert result["reconnects"] >= 1, result["per_connection"]
    assert result["out_of_order"] == 0
    fresh = subprocess.run([TUG, "lab", "client", demo, "--duration", "1", "--json"], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert_clean_run(json.loads(fresh.stdout))
    assert lab.check("b", demo)["ok"]
