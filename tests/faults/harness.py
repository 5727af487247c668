"""Fault injection from outside: a running ``tug migrate`` is watched through
its progress lines, and when it enters a phase the harness kills or stops a
real process (the agent, its SSH session, CRIU) or signals ``tug migrate``.

Production code knows nothing of this: every fault is something that happens
to real processes on real hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tug.engine.lab import hosts as labhosts
from tug.engine.lab.instance import current

from ..e2e.conftest import TUG, Lab, Result, on, wait_for

PHASE_LINE = re.compile(r"\]\s+(\S+) \.\.\.$")


@dataclass
class Run:
    """A ``tug migrate`` on host ``src``, with its stderr read line by line."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    _cv: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                m = PHASE_LINE.search(line.rstrip("\n"))
                if m:
                    self.phases.append(m.group(1))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_phase(self, phase: str, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while phase not in self.phases:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and self._reader is not None and not self._reader.is_alive()):
                    return False
                self._cv.wait(min(left, 0.5))
            return True

    def finish(self, timeout: float = 300) -> Result:
        # stdout only: stderr belongs to the reader thread (communicate() would race it for lines).
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=10)
        return Result(self.proc.returncode, out, "\n".join(self.lines))


def start_migrate(src: str, name: str, dest_url: str, *extra: str) -> Run:
    proc = subprocess.Popen(
        [TUG, "lab", "run", src, "--", "tug", "migrate", name, "--to", dest_url, "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, bufsize=1,
    )
    run = Run(proc)
    run._reader = threading.Thread(target=run._read, daemon=True)
    run._reader.start()
    return run


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


def _on_host(pid: int, host: str) -> bool:
    """Whether ``pid`` works for lab host ``host`` of this test run's instance
    (TUG_LAB): another instance's processes on this machine are never touched."""
    return _env(pid).get("TUG_HOST") == current().agent_host(host)


def _in_this_lab(pid: int) -> bool:
    """Whether ``pid`` works for any host of this test run's lab instance."""
    host = _env(pid).get("TUG_HOST")
    if host is None:
        return False
    lay = current()
    return "." not in host if lay.is_default else host.startswith(f"{lay.instance}.")


def _pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def find(pred: Callable[[int, list[str]], bool]) -> list[int]:
    return [pid for pid in _pids() if (cmd := _cmdline(pid)) and pred(pid, cmd)]


def agent_pids(host: str) -> list[int]:
    """The tug agents serving migrations to lab host ``host``."""
    return find(lambda pid, cmd: any("tug.engine.agent" in c for c in cmd) and _on_host(pid, host))


def agents_left(lab: Lab, host: str) -> str:
    """What keeps ``host``'s agents alive, for a failed wait on their end: each
    one's command, state, parent and kernel wait, and the host's agent log."""
    out = []
    for pid in agent_pids(host):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            out.append(f"{pid} {' '.join(_cmdline(pid))!r} state {fields[0]} ppid {fields[1]} wchan {wchan}")
        except (OSError, IndexError):
            continue
    log = lab.layout.host_data_dir(host) / "logs" / "agent.log"
    with contextlib.suppress(OSError):
        out.append("agent.log:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-60:]))
    return "\n".join(out)


def stopped_on(host: str) -> list[int]:
    """Processes working for lab host ``host`` that a SIGSTOP holds (state T).

    An agent stopped while its SSH session still starts it may have children
    (the login shell's) that matched as agents when stopped and no longer do.
    """
    def stopped(pid: int, cmd: list[str]) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return False
        return state == "T" and _on_host(pid, host)
    return find(stopped)


def criu_pids(host: str) -> list[int]:
    """CRIU processes started for lab host ``host`` (by runc or tug, on either side)."""
    def is_criu(pid: int, cmd: list[str]) -> bool:
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return False
        return exe.endswith("/criu") and _on_host(pid, host)
    return find(is_criu)


def describe(pids: list[int]) -> str:
    """Who these processes are (for an assertion's message): pid, parent, group, state, command."""
    lines = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            lines.append(f"{pid}: gone")
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        lines.append(f"{pid}: state {fields[0]} ppid {fields[1]} pgid {fields[2]}: {' '.join(_cmdline(pid))[:300]}")
    return "\n".join(lines)


def signal_all(pids: list[int], sig: int) -> int:
    n = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            n += 1
        except ProcessLookupError:
            pass
    return n


def running_copies(lab: Lab, name: str) -> dict[str, str]:
    """Host -> runc status, for every host that has the container."""
    out = {}
    for host in lab.urls:
        st = lab.state(host, name)
        if st is not None:
            out[host] = st["status"]
    return out


# ---- faults the destination host causes by itself ---------------------------------------------

#: An OCI prestart hook that fails on one lab host. runc runs prestart hooks
#: inside CRIU's restore (its ``setup-namespaces`` action script), before any
#: process of the container exists: CRIU's restore then fails for real, with
#: its own error lines and log, and nothing of the container ever ran.
REFUSING_HOOK = """#!/bin/sh
state=$(cat)
case "$state" in *"/hosts/{host}/"*) echo "prestart hook: this host refuses the container" >&2; exit 1;; esac
exit 0
"""


def refuse_restore_on(lab: Lab, src: str, name: str, host: str, hook_dir: Path) -> None:
    """Make every restore of ``name`` on ``host`` fail inside CRIU (and nothing else).

    The hook goes into the container's own config on ``src``: the migration
    carries it along as it carries any hook, and the start on ``src`` already
    happened. Remove the container afterwards (the hook stays in its config).
    """
    script = hook_dir / f"refuse-on-{host}.sh"
    script.write_text(REFUSING_HOOK.format(host=host))
    script.chmod(0o755)
    cfg_path = lab.bundle(src, name) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("hooks", {}).setdefault("prestart", []).append({"path": str(script)})
    cfg_path.write_text(json.dumps(cfg, indent=2))


@contextlib.contextmanager
def endpoint_name_taken(lab: Lab, host: str, name: str) -> Iterator[str]:
    """The veth name ``name``'s endpoint needs on ``host`` is already in use there.

    Another interface holds it on the bridge's side, as a leftover of some
    other tool would: creating the container's endpoint fails for real.
    """
    net = labhosts.require(lab.layout).host(host).network()
    outer = net.outer(name)
    peer = f"tx{name[:10]}"
    subprocess.run(["ip", "-n", net.bridge_netns or "", "link", "add", outer, "type", "veth", "peer", "name", peer], check=True)
    try:
        yield outer
    finally:
        subprocess.run(["ip", "-n", net.bridge_netns or "", "link", "del", outer], check=False, capture_output=True)


def _pages_written(pid: int) -> int:
    """Bytes of pages a CRIU page server has written into its images dir so far.

    (It splices from the socket: ``/proc/PID/io`` does not count them.)
    """
    cmd = _cmdline(pid)
    try:
        images = Path(cmd[cmd.index("--images-dir") + 1])
        return sum(p.stat().st_size for p in images.glob("pages-*.img"))
    except (ValueError, IndexError, OSError):
        return 0


def criu_daemons(host: str, mode: str) -> list[int]:
    """CRIU processes of lab host ``host`` started as ``criu MODE`` (page-server, lazy-pages)."""
    return [pid for pid in criu_pids(host) if mode in _cmdline(pid)[1:3]]


@dataclass
class Watcher:
    """Kills a process when a condition holds, from a thread, while a migration runs."""

    find: Callable[[], list[int]]
    ready: Callable[[int], bool]
    sig: int = signal.SIGKILL
    killed: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set() and not self.killed:
            for pid in self.find():
                if self.ready(pid) and signal_all([pid], self.sig):
                    self.killed.append(pid)
                    return
            time.sleep(0.002)

    def __enter__(self) -> Watcher:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)


def kill_page_server_after(host: str, nbytes: int) -> Watcher:
    """SIGKILL ``host``'s CRIU page server once it has read ``nbytes`` (the dump is under way)."""
    return Watcher(lambda: criu_daemons(host, "page-server"), lambda pid: _pages_written(pid) >= nbytes)


def kill_lazy_pages_once_running(lab: Lab, host: str, name: str) -> Watcher:
    """SIGKILL ``host``'s lazy-pages daemon once ``runc restore`` is done and runc knows the container.

    By then CRIU has let its processes go (runc writes the container's state
    a little earlier, while CRIU may still kill them on a failure): the fill
    fails after they ran.
    """

    return Watcher(lambda: criu_daemons(host, "lazy-pages"), lambda pid: restored_on(lab, host, name))


def restored_on(lab: Lab, host: str, name: str) -> bool:
    """``runc restore`` of ``name`` on ``host`` is over and runc knows the container: its processes ran."""
    restoring = find(lambda p, cmd: Path(cmd[0]).name == "runc" and "restore" in cmd and _on_host(p, host))
    return not restoring and lab.state(host, name) is not None


def sshd_sessions_of(pids: list[int]) -> list[int]:
    """The sshd processes whose children ``pids`` are (killing them cuts the link)."""
    out = []
    for pid in pids:
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if "sshd" in Path(f"/proc/{ppid}/comm").read_text():
                out.append(ppid)
        except (OSError, IndexError, ValueError):
            continue
    return out


def cut_link_once_running(lab: Lab, host: str, name: str) -> Watcher:
    """Kill the SSH session carrying ``host``'s agent once the restored container ran there."""
    return Watcher(lambda: sshd_sessions_of(agent_pids(host)), lambda pid: restored_on(lab, host, name))


def runc_checkpoints() -> list[int]:
    """Any ``runc checkpoint`` of this lab instance still running (a lazy dump
    outlives its phase; none may outlive a migration)."""
    return find(lambda pid, cmd: bool(cmd) and Path(cmd[0]).name == "runc" and "checkpoint" in cmd and _in_this_lab(pid))


def sshd_listener(lab: Lab, host: str) -> int:
    """The pid of lab host ``host``'s listening sshd (its sessions are its children)."""
    return int(Path(lab.layout.sshd_pidfile(host)).read_text().split()[0])




def cut_link_in_fill(run: Run, host: str, *, after_s: float = 0.5) -> int:
    """Once ``run`` is in its fill phase (and ``after_s`` later: pages in flight), SIGKILL
    the sshd sessions carrying ``host``'s agent; returns how many were killed."""
    if not run.wait_phase("fill"):
        return 0
    time.sleep(after_s)
    return signal_all(sshd_sessions_of(agent_pids(host)), signal.SIGKILL)


def cut_link_again_after_recovery(run: Run, host: str, timeout: float = 60.0) -> int:
    """Once ``run`` says its link recovered, cut the new one too, if its fill still runs."""
    deadline = time.monotonic() + timeout
    while not any("link recovered" in ln for ln in list(run.lines)):
        if time.monotonic() > deadline or run.proc.poll() is not None:
            return 0
        time.sleep(0.01)
    time.sleep(0.2)
    if any(re.search(r"\bfill done\b", ln) for ln in list(run.lines)):
        return 0
    return signal_all(sshd_sessions_of(agent_pids(host)), signal.SIGKILL)


@contextlib.contextmanager
def ssh_refused(lab: Lab, host: str) -> Iterator[None]:
    """While inside: ``host``'s sshd takes no new connection (stopped: the kernel
    queues them unanswered), so a source that lost its link cannot come back."""
    pid = int(Path(lab.layout.sshd_pidfile(host)).read_text().split()[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)

@contextlib.contextmanager
def shaped(lab: Lab, host: str, rate: str) -> Iterator[None]:
    """While inside: what ``host`` sends leaves at ``rate`` (a slow link makes a fill last long enough to cut)."""
    ns = lab.layout.netns(host)
    tc = ["ip", "netns", "exec", ns, "tc", "qdisc"]
    subprocess.run([*tc, "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "256kb", "latency", "200ms"],
                   check=True)
    try:
        yield
    finally:
        subprocess.run([*tc, "del", "dev", "eth0", "root"], check=False)


def assert_frozen_until_recover(lab: Lab, names: str | list[str], agent_wait: float) -> dict[str, dict[str, Any]]:
    """A fill whose source is gone for good: both copies of each container (a
    group's members: all of them) frozen, the destination's never running with
    holes, nothing left running, and ``tug recover`` of each undoes it (the only
    complete memory is the source's). Returns each one's ``lab check`` on a."""
    names = [names] if isinstance(names, str) else names
    assert wait_for(lambda: not agent_pids("b"), agent_wait), \
        f"b's agent must end once its source is gone for good\n{agents_left(lab, 'b')}"
    for name in names:
        st_a, st_b = lab.state("a", name), lab.state("b", name)
        assert st_a is not None and st_a["status"] == "paused", (name, st_a)
        # Frozen; or killed, where the freezer cannot take a thread that waits on
        # a missing page inside a system call: never running with holes.
        assert st_b is None or st_b["status"] in ("paused", "stopped"), f"{name} runs on b with missing memory: {st_b}"
    assert not runc_checkpoints() and not criu_pids("a") and not criu_pids("b")
    for name in names:
        rec = on("a", "tug", "recover", name, "--to", lab.url("b"), "--json")
        assert rec.returncode == 0, f"recover {name}: {rec.stderr}"
        assert rec.json()["action"] == "undone", rec.stdout
    checks = {}
    for name in names:
        st = lab.state("a", name)
        assert st is not None and st["status"] == "running", (name, st)
        checks[name] = lab.check("a", name)
        assert checks[name]["ok"], checks[name]
        assert lab.leftovers("b", name) == [], (name, lab.leftovers("b", name))
    return checks
