"""Podman: tug doctor's rows and podman's checkpoint/restore probe, for real.

Needs Debian's podman (scripts/setup.sh installs it) with runc as its OCI runtime.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import TUG, Lab, demo_container, lazy_wait, migrate, on, tug, wait_for
from tests.faults.harness import Watcher, agent_pids, criu_daemons, endpoint_name_taken, find, signal_all, start_migrate


@pytest.fixture(scope="module", autouse=True)
def _podman_installed() -> None:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run scripts/setup.sh (apt-get install podman)")


def test_doctor_reports_podman_and_docker() -> None:
    res = tug("doctor", "--json", timeout=240)
    rows = {r["name"]: r for r in res.json()["checks"]}
    assert rows["podman"]["status"] == "ok", rows["podman"]
    assert rows["podman OCI runtime"]["detail"].startswith("runc"), rows["podman OCI runtime"]
    assert "driver overlay" in rows["podman storage"]["detail"]
    # The probe checkpointed and restored a container in a podman of its own.
    assert rows["podman checkpoint/restore"]["status"] == "ok", rows["podman checkpoint/restore"]
    assert "refuses docker containers" in rows["docker"]["detail"]


@pytest.fixture
def podman_demo(lab: Lab) -> Iterator[str]:
    yield from demo_container(lab, "pm", "--runtime", "podman", "--memory", "32", "--dirty-rate", "200")


def podman_names(host: str, *flags: str) -> list[str]:
    res = on(host, "podman", "ps", *flags, "--format", "{{.Names}}", check=True)
    return res.stdout.split()


def test_lab_hosts_have_their_own_podman(lab: Lab, podman_demo: str) -> None:
    """The demo runs under host a's podman; host b's podman (own storage, run root) knows nothing of it."""
    assert podman_demo in podman_names("a")
    assert podman_demo not in podman_names("b", "--all")
    roots = {h: on(h, "podman", "info", "--format", "{{.Store.GraphRoot}} {{.Store.RunRoot}}", check=True).stdout for h in "ab"}
    assert roots["a"] != roots["b"] and str(lab.layout.podman_dir("a")) in roots["a"]
    # Every host holds the demo image, by the same id: a migration pulls nothing.
    ids = {h: on(h, "podman", "image", "inspect", "--format", "{{.Id}}", "localhost/tug-demo:latest", check=True).stdout
           for h in "ab"}
    assert ids["a"] == ids["b"]
    check = tug("lab", "check", "a", podman_demo, check=True).json()
    assert check["ok"] and check["runtime"] == "podman", check
    tug("lab", "rm", "a", podman_demo, check=True)
    assert podman_demo not in podman_names("a", "--all")


def podman_id(host: str, name: str) -> str | None:
    res = on(host, "podman", "inspect", "--format", "{{.Id}} {{.State.Status}}", name)
    return res.stdout.strip() if res.returncode == 0 else None


def runc_status(host: str, name: str) -> str | None:
    """What runc (podman's, at its default root) says of the container: podman's own
    status of a container frozen behind its back can lag."""
    found = podman_id(host, name)
    if found is None:
        return None
    res = subprocess.run(["runc", "state", found.split()[0]], capture_output=True, text=True)
    return str(json.loads(res.stdout)["status"]) if res.returncode == 0 else None


def runs_under_podman_of(lab: Lab, host: str) -> bool:
    """runc (podman's) runs a container of ``host``'s podman: its restore let the processes go.
    (runc, not podman inspect: fast enough to catch a lazy fill early.)"""
    storage = str(lab.layout.podman_dir(host))
    # runc writes the state a little before CRIU lets the processes go (it may still kill
    # them): the restore's own runc (conmon's child) must be gone too.
    if find(lambda pid, cmd: bool(cmd) and Path(cmd[0]).name == "runc" and "restore" in cmd
            and any(a.startswith(storage) for a in cmd)):
        return False
    res = subprocess.run(["runc", "list", "--format", "json"], capture_output=True, text=True)
    return any(c["status"] == "running" and c["bundle"].startswith(storage) for c in json.loads(res.stdout or "null") or [])


def address_of(name: str, host: str) -> str:
    bundle = on(host, "podman", "inspect", "--format", "{{.StaticDir}}", name, check=True).stdout.strip()
    return str(json.loads(Path(bundle, "tug-network.json").read_text())["address"]).split("/")[0]


class Client:
    """``tug lab client NAME`` in the background, holding one connection; :meth:`stop` ends it."""

    def __init__(self, lab: Lab, name: str, host: str) -> None:
        self.address, self.ns = address_of(name, host), lab.layout.client_ns
        self.proc = subprocess.Popen([TUG, "lab", "client", name, "--duration", "600", "--json"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        if not wait_for(lambda: self.established() >= 1, timeout=20):
            raise AssertionError(f"client did not connect to {self.address}: {self.stop()}")

    def established(self) -> int:
        res = subprocess.run(["ip", "netns", "exec", self.ns, "ss", "-Htn", "state", "established"],
                             capture_output=True, text=True)
        return sum(f"{self.address}:7000" in ln for ln in res.stdout.splitlines())

    def close(self) -> None:
        """After a failed test: a client left running would reconnect to the next container
        given this address and skew other tests' connection counts."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=120)
        assert out.strip(), err
        result: dict[str, Any] = json.loads(out)
        return result


def move(lab: Lab, name: str, src: str, dst: str, *extra: str, earlier_ms: float = 0.0) -> dict[str, Any]:
    """Move ``name`` src -> dst; the destination's podman owns it, the source's forgot it.
    ``earlier_ms``: the longest downtime of earlier moves (its heartbeat log spans them too)."""
    before = lab.check(src, name)
    res = migrate(src, name, lab.url(dst), *extra)
    assert res.returncode == 0, res.stderr
    report = res.json()
    assert report["outcome"] == "migrated", report
    # Restored lazily (podman's restore, made lazy through the spec's CRIU config file).
    assert report["commit_point"] == "running", report
    lab.check_moved_intact(dst, name, before, max(report["downtime_ms"], earlier_ms), lazy_wait(report))
    assert name in podman_names(dst)
    assert name not in podman_names(src, "--all")
    return report


@pytest.mark.parametrize("strategy", [
    ("--strategy", "stop-copy"),
    ("--strategy", "precopy", "--eager", "--tracker", "content"),
    ("--strategy", "precopy", "--eager", "--tracker", "uffd"),
    ("--strategy", "postcopy"),
    ("--strategy", "hybrid"),
], ids=["stop-copy", "precopy-content", "precopy-uffd", "postcopy", "hybrid"])
def test_there_and_back_podman_owns_it(lab: Lab, podman_demo: str, strategy: tuple[str, ...]) -> None:
    """a -> b -> a: memory verified, counter continuous, the client keeps its one connection,
    and each time the destination's podman runs it and the source's lists nothing."""
    client = Client(lab, podman_demo, "a")
    try:
        there = move(lab, podman_demo, "a", "b", *strategy)
        move(lab, podman_demo, "b", "a", *strategy, "--runtime", "podman", earlier_ms=there["downtime_ms"])
        result = client.stop()
    finally:
        client.close()
    assert result["errors"] == 0 and result["reconnects"] == 0 and result["out_of_order"] == 0, result
    assert result["replies"] > 0

    # Podman's own tools work on what tug restored.
    assert on("a", "podman", "logs", podman_demo).returncode == 0
    assert "tug-workload" in on("a", "podman", "exec", podman_demo, "ps", check=True).stdout
    on("a", "podman", "stop", "--time", "1", podman_demo, check=True)
    on("a", "podman", "rm", podman_demo, check=True)
    assert podman_demo not in podman_names("a", "--all")


def test_missing_image_is_refused_before_anything_changes(lab: Lab, podman_demo: str) -> None:
    before = podman_id("a", podman_demo)
    on("b", "podman", "rmi", "localhost/tug-demo:latest", check=True)
    try:
        res = migrate("a", podman_demo, lab.url("b"))
        assert res.returncode == 1
        assert "has no image" in res.stderr and "pulls nothing" in res.stderr, res.stderr
        assert res.json()["outcome"] == "aborted"
    finally:
        on("b", "podman", "load", "-i", str(lab.layout.image_dir / "podman-image.tar"), check=True)
    assert podman_id("a", podman_demo) == before and before is not None and before.endswith("running")
    assert podman_demo not in podman_names("b", "--all")
    assert lab.check("a", podman_demo)["ok"]


def test_name_taken_in_the_destinations_podman(lab: Lab, podman_demo: str) -> None:
    before = podman_id("a", podman_demo)
    on("b", "podman", "create", "--name", podman_demo, "localhost/tug-demo:latest", "/bin/sleep", "1", check=True)
    try:
        res = migrate("a", podman_demo, lab.url("b"))
        assert res.returncode == 1 and "already has a container named" in res.stderr, res.stderr
    finally:
        on("b", "podman", "rm", "--force", podman_demo, check=True)
    assert podman_id("a", podman_demo) == before
    assert lab.check("a", podman_demo)["ok"]


def test_rollback_when_the_endpoint_fails_leaves_podman_as_before(lab: Lab, podman_demo: str) -> None:
    """The destination's podman had made the container when its endpoint failed for real:
    the source's podman state is as before, the destination's holds nothing."""
    before = podman_id("a", podman_demo)
    with endpoint_name_taken(lab, "b", podman_demo):
        res = migrate("a", podman_demo, lab.url("b"))
    assert res.returncode == 1, res.stdout
    assert podman_id("a", podman_demo) == before
    assert podman_demo not in podman_names("b", "--all")
    assert not lab.netns("b", podman_demo).exists()
    assert lab.check("a", podman_demo)["ok"]
    move(lab, podman_demo, "a", "b")  # and nothing was left in the way


def test_rollback_when_the_agent_is_killed(lab: Lab) -> None:
    """A killed agent (SIGKILL, mid pre-copy): the source runs on as before, and the fresh
    agent's sweep removes the podman container the dead one had made on b."""
    gen = demo_container(lab, "pk", "--runtime", "podman", "--memory", "256", "--dirty-rate", "20000")
    name = next(gen)
    try:
        before = podman_id("a", name)
        run = start_migrate("a", name, lab.url("b"), "--strategy", "precopy", "--tracker", "content")
        assert run.wait_phase("precopy"), run.lines
        assert signal_all(agent_pids("b"), signal.SIGKILL) > 0
        res = run.finish()
        assert res.returncode == 1, res.stdout
        assert res.json()["outcome"] == "rolled-back", res.json()
        assert podman_id("a", name) == before
        assert lab.check("a", name)["ok"]
        assert wait_for(lambda: name not in podman_names("b", "--all"), timeout=30)
    finally:
        for _ in gen:
            pass


def test_fill_failure_after_it_ran_leaves_the_source_frozen_until_recover(lab: Lab) -> None:
    """The lazy-pages daemon SIGKILLed once podman on b runs the copy: the copy ran, so the
    source stays frozen (one copy); the broken copy goes; tug recover resumes the source, whose
    podman state is then as before."""
    gen = demo_container(lab, "pf", "--runtime", "podman", "--memory", "256")
    name = next(gen)
    client: Client | None = None
    try:
        before = podman_id("a", name)
        client = Client(lab, name, "a")
        running_on_b = Watcher(lambda: criu_daemons("b", "lazy-pages"), lambda pid: runs_under_podman_of(lab, "b"))
        with running_on_b:
            res = migrate("a", name, lab.url("b"), "--strategy", "postcopy")
        assert running_on_b.killed, "the lazy-pages daemon was never seen with podman running the copy"
        assert res.returncode == 1 and res.json()["outcome"] == "failed", res.stdout
        assert f"tug recover {name} --to {lab.url('b')}" in res.stderr
        assert runc_status("a", name) == "paused", ("the source must not resume after the destination ran", podman_id("a", name))
        assert name not in podman_names("b", "--all"), "the broken copy is removed"
        rec = on("a", "tug", "recover", name, "--to", lab.url("b"), "--json")
        assert rec.returncode == 0, rec.stderr
        assert rec.json()["action"] == "undone", rec.stdout
        assert podman_id("a", name) == before
        assert lab.check("a", name)["ok"]
        # The client is not checked further: the copy on b ran, and may have
        # answered it before its fill broke; undoing the move then rewinds
        # what the client was told (the trade-off recover's undo makes).
        assert client.stop()["replies"] > 0
    finally:
        if client is not None:
            client.close()
        for _ in gen:
            pass


def test_restore_failing_in_podman_rolls_back(lab: Lab) -> None:
    """The lazy-pages daemon SIGKILLed while podman's runc restore runs on b: CRIU fails the
    restore before the processes run, so the source resumes, its podman state as before, b's
    podman holds nothing, and the client's connection survives."""
    gen = demo_container(lab, "pr", "--runtime", "podman", "--memory", "64")
    name = next(gen)
    storage = str(lab.layout.podman_dir("b"))
    client: Client | None = None
    try:
        before = podman_id("a", name)
        client = Client(lab, name, "a")
        restoring = Watcher(lambda: criu_daemons("b", "lazy-pages"), lambda pid: bool(find(
            lambda p, cmd: bool(cmd) and Path(cmd[0]).name == "runc" and "restore" in cmd
            and any(a.startswith(storage) for a in cmd))))
        with restoring:
            res = migrate("a", name, lab.url("b"))
        assert restoring.killed, "the lazy-pages daemon was never seen while podman restored"
        assert res.returncode == 1 and res.json()["outcome"] == "rolled-back", res.stdout
        assert podman_id("a", name) == before and runc_status("a", name) == "running"
        assert wait_for(lambda: name not in podman_names("b", "--all"), timeout=30)
        assert lab.check("a", name)["ok"]
        result = client.stop()
        assert result["errors"] == 0 and result["reconnects"] == 0, result
    finally:
        if client is not None:
            client.close()
        for _ in gen:
            pass
