"""Faults while a pod's members are held on the destination, before its last restore.

A group's members restored before its last one are held there with their
processes stopped (never run) until that last one is in. A fault in that
window must still end with the whole pod on one host: rolled back (every
member runs on a again), or frozen for ``tug recover``, which lets the held
members go only if the last one runs on b and undoes them otherwise. Never a
pod split across the hosts, never two running copies of a member.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Sequence

import pytest

from tug.engine.procfs import thread_state

from ..e2e.conftest import Lab, on, pod_containers
from ..e2e.test_network import Client, assert_clean_run
from .harness import agent_pids, agents_left, criu_pids, running_copies, signal_all, sshd_sessions_of, start_migrate
from .syscallstop import kill_stopped, sends_signal, stop_at_syscall

pytestmark = pytest.mark.e2e

@pytest.fixture
def pod(lab: Lab) -> Iterator[list[str]]:
    # The holder does not attach the pod's SysV segment (as a pause container
    # would not): its restore, the group's last, runs it at once.
    yield from pod_containers(lab, "g", 2, "--shm", "members")


@pytest.fixture
def pod_all(lab: Lab) -> Iterator[list[str]]:
    """Every container attaches the segment: the holder too waits, stopped, for tug's attach."""
    yield from pod_containers(lab, "gs")


def _held_on_b(lab: Lab, name: str, timeout: float = 60.0) -> bool:
    """Wait until ``name`` is restored and held on b (its bundle's marker says so)."""
    marker = lab.bundle("b", name) / ".tug-incoming"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if marker.read_text().startswith("held "):
                return True
        except OSError:
            pass
        time.sleep(0.002)
    return False


def _criu_swrk(host: str) -> list[int]:
    """runc's CRIU (``criu swrk``) on ``host``: a restore under way, not a page server."""
    out = []
    for pid in criu_pids(host):
        try:
            if b"swrk" in open(f"/proc/{pid}/cmdline", "rb").read():
                out.append(pid)
        except OSError:
            pass
    return out


def _settled(pred: object, timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(pred())  # type: ignore[operator]


@pytest.mark.parametrize(
    ("fault", "held"),
    # held: how many members are held on b when the fault comes (2: the
    # holder's restore, the pod's last, is next or under way).
    # "agent-dies-after-last": the agent hangs once the holder runs, at the
    # first SIGCONT that would let a held member go (held there by ptrace),
    # and is killed: the held members were never let go, and recover must
    # let them go with it.
    [("agent-kill", 1), ("agent-kill", 2), ("link-drop", 1), ("migrate-kill", 2), ("agent-dies-after-last", 2)],
)
def test_fault_while_members_are_held(lab: Lab, pod: list[str], fault: str, held: int) -> None:
    holder, m1, _m2 = pod
    before = {n: lab.check("a", n) for n in pod}
    extra = ["--pod", "--timeout", "rollback=5"]
    if fault == "agent-dies-after-last":
        # Eager: a lazily restored holder whose agent dies is frozen by its
        # fill's guard (uffdguard.py), and recover undoes a frozen copy.
        extra.append("--no-lazy-restore")
    run = start_migrate("a", holder, lab.url("b"), *extra)
    # The members are restored before the holder, each held once restored.
    for n in pod[1:1 + held]:
        assert _held_on_b(lab, n), f"{n} was never held on b"
    if fault == "agent-kill":
        did = signal_all(agent_pids("b"), signal.SIGKILL)
    elif fault == "agent-dies-after-last":
        # Stopping it on a marker raced it (CI lost once): the marker is written
        # before the holder's restore starts, and an agent stopped then never
        # restores it.
        agents = agent_pids("b")
        assert len(agents) == 1, f"one agent on b expected: {agents}"
        lets_go = sends_signal(signal.SIGCONT)

        def releases_a_member(nr: int, args: Sequence[int]) -> bool:
            if not lets_go(nr, args):
                return False
            try:  # the members are all restored by now (their release follows the holder's restore)
                members_ns = {os.stat(f"/proc/{(lab.state('b', n) or {})['pid']}/ns/pid").st_ino for n in pod[1:]}
                return os.stat(f"/proc/{args[0]}/ns/pid").st_ino in members_ns
            except (OSError, KeyError):
                return False

        sent = stop_at_syscall(agents[0], releases_a_member, 120)
        assert sent is not None, "the agent never let a held member go"
        try:
            assert (lab.state("b", holder) or {}).get("status") == "running", "the holder does not run on b"
            for n in pod[1:]:
                pid = lab.state("b", n)["pid"]  # type: ignore[index]
                assert thread_state(pid, pid) == "T", f"{n} runs before the agent let it go"
        finally:  # never a stopped agent left for the next test to find
            kill_stopped(agents[0])
        did = 1
    elif fault == "link-drop":
        did = signal_all(sshd_sessions_of(agent_pids("b")), signal.SIGKILL)
    else:
        os.kill(run.proc.pid, signal.SIGKILL)
        did = 1
    assert did > 0, fault
    res = run.finish()
    outcome = res.json()["outcome"] if res.stdout.strip() else "none"
    where = f"{fault} with {held} member(s) held: outcome {outcome}\n{res.stderr}"
    assert _settled(lambda: not agent_pids("b"), 60), f"agents left: {agents_left(lab, 'b')}\n{where}"

    for n in pod:
        copies = running_copies(lab, n)
        assert list(copies.values()).count("running") <= 1, f"two running copies of {n}: {copies}\n{where}"
    if outcome != "rolled-back":
        # Frozen for recover: the held member first, which must follow the holder.
        for n in (m1, *[x for x in pod if x != m1]):
            rec = on("a", "tug", "recover", n, "--to", lab.url("b"), "--json")
            assert rec.returncode == 0, f"recover {n} failed: {rec.stderr}\n{where}"
    hosts = set()
    for n in pod:
        copies = running_copies(lab, n)
        running = [h for h, st in copies.items() if st == "running"]
        assert len(running) == 1, f"{n}: not exactly one running copy: {copies}\n{where}"
        hosts.add(running[0])
    assert len(hosts) == 1, f"the pod was split across {sorted(hosts)}\n{where}"
    (host,) = hosts
    if fault == "agent-dies-after-last":
        assert host == "b", f"the holder ran on b: the pod must finish there\n{where}"
    if outcome == "rolled-back":
        assert host == "a", where
    other = "b" if host == "a" else "a"
    holder_ns = os.stat(f"/proc/{lab.state(host, holder)['pid']}/ns/net").st_ino  # type: ignore[index]
    for n in pod:
        after = lab.check(host, n)
        assert after["ok"] and after["verify"]["bad_pages"] == 0, f"{n}: {after}\n{where}"
        if host == "a":
            assert after["counter"] > before[n]["counter"], (n, after)
        assert os.stat(f"/proc/{lab.state(host, n)['pid']}/ns/net").st_ino == holder_ns, f"{n} left the pod\n{where}"
        assert _settled(lambda n=n: lab.leftovers(other, n) == []), f"leftovers of {n} on {other}: {lab.leftovers(other, n)}"
    assert _settled(lambda: not criu_pids("a") and not criu_pids("b")), where
    # Reachable where it runs: no frame hold of a dead agent is left engaged.
    client = Client(lab, holder, port=7001)
    time.sleep(0.3)
    assert_clean_run(client.stop())


@pytest.mark.parametrize("when", ["before-attach", "after-attach"])
def test_agent_dies_while_the_last_member_waits_for_its_attach(lab: Lab, pod_all: list[str], when: str) -> None:
    """The holder (the group's last) is restored by CRIU with its processes
    stopped for tug's SysV attach, and its agent dies.

    before-attach: it dies while CRIU restores the holder; nothing of the pod
    ever ran on b, and tug recover undoes the whole pod: every member runs
    on a again (its segment still shared), b keeps nothing.
    after-attach: it hangs right after the attach, before letting the
    holder go (its marker says restoring again), and dies: the holder is
    complete but stopped. tug recover finishes the pod on b and lets every
    member go, the holder too: all three run there, sharing the segment."""
    holder = pod_all[0]
    before = {n: lab.check("a", n) for n in pod_all}
    run = start_migrate("a", holder, lab.url("b"), "--pod", "--no-lazy-restore", "--timeout", "rollback=5")
    marker = lab.bundle("b", holder) / ".tug-incoming"

    def says(text: str) -> bool:
        try:
            return marker.read_text().strip() == text
        except OSError:
            return False

    # Both states last a few hundred ms at most: watched closely.
    assert _settled(lambda: says(f"held {holder}"), 60, interval=0.0005), "no held restore of the holder"
    if when == "before-attach":
        assert _settled(lambda: bool(_criu_swrk("b")), 30, interval=0.0005), "no CRIU restore of the holder"
        agents = agent_pids("b")
        signal_all(agents, signal.SIGSTOP)  # CRIU goes on; nobody attaches or lets the holder go
        try:
            assert _settled(lambda: (lab.state("b", holder) or {}).get("status") == "running", 60), "CRIU never restored it"
        finally:  # never a stopped agent left for the next test to find
            killed = signal_all(agents, signal.SIGKILL)
        assert killed > 0, "no agent to kill"
    else:
        # The agent lists the holder's processes (runc ps, milliseconds) between
        # writing "restoring" and its SIGCONT: held at that kill's entry (traced
        # from before the holder's restore), it never sends it, and dies there.
        agents = agent_pids("b")
        assert len(agents) == 1, f"one agent on b expected: {agents}"
        sent = stop_at_syscall(agents[0], sends_signal(signal.SIGCONT), 120)
        assert sent is not None, "the agent never let the holder go"
        try:
            pid = (lab.state("b", holder) or {}).get("pid")
            assert isinstance(pid, int), "the holder is not restored"
            assert os.stat(f"/proc/{sent[0]}/ns/pid").st_ino == os.stat(f"/proc/{pid}/ns/pid").st_ino, "not the holder's"
            assert says("restoring"), "stopped before the holder's attach finished"
            assert thread_state(pid, pid) == "T", "the holder runs although its SIGCONT was never sent"
        finally:
            kill_stopped(agents[0])
    res = run.finish()
    where = f"outcome {res.json()['outcome'] if res.stdout.strip() else 'none'}\n{res.stderr}"
    assert _settled(lambda: not agent_pids("b"), 60), where
    for n in pod_all:
        rec = on("a", "tug", "recover", n, "--to", lab.url("b"), "--json")
        assert rec.returncode == 0, f"recover {n} failed: {rec.stderr}\n{where}"
    host, other = ("a", "b") if when == "before-attach" else ("b", "a")
    for n in pod_all:
        copies = running_copies(lab, n)
        assert copies.get(host) == "running" and copies.get(other) != "running", (n, copies, where)
        after = lab.check(host, n)
        assert after["ok"] and after["counter"] > before[n]["counter"], (n, after)
        assert after["verify"]["pod"]["shm_peers"] == 2, (n, after["verify"]["pod"])
        assert _settled(lambda n=n: lab.leftovers(other, n) == []), f"leftovers of {n} on {other}: {lab.leftovers(other, n)}"
    assert _settled(lambda: not criu_pids("a") and not criu_pids("b")), where
