"""Fixtures for end-to-end tests in the lab: real CRIU, runc, sshd, namespaces.

Everything goes through the ``tug`` CLI, the same surface a user and the
acceptance checks use. A missing prerequisite fails with what to install.

The lab is the instance TUG_LAB names (the default lab without it): every
``tug lab`` command the tests run inherits the variable, and the paths they
read come from the same :class:`~tug.engine.lab.layout.Layout`, so a test run
given its own instance touches nothing of another.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tug.engine.lab.instance import current
from tug.engine.lab.layout import Layout
from tug.engine.lab.workload import analyze_heartbeat

TUG = str(Path(sys.executable).with_name("tug"))
_names = itertools.count(1)

#: The workload writes a heartbeat line every 10 ms. The longest gap a client
#: of the container sees may exceed the engine's downtime by one interval plus
#: scheduling noise: the engine's clock starts just before the freeze and stops
#: when the destination's answer arrives, the heartbeat's when the next line is
#: written.
HEARTBEAT_SLACK_MS = 50


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def tug(*args: str, timeout: float = 300, check: bool = False) -> Result:
    res = subprocess.run([TUG, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    out = Result(res.returncode, res.stdout, res.stderr)
    if check and res.returncode != 0:
        raise AssertionError(f"tug {' '.join(args)} exited {res.returncode}:\n{res.stderr}\n{res.stdout}")
    return out


def on(host: str, *argv: str, timeout: float = 300, check: bool = False) -> Result:
    return tug("lab", "run", host, "--", *argv, timeout=timeout, check=check)


def require_prerequisites() -> None:
    missing = [t for t in ("runc", "criu", "ip", "nsenter", "tc") if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin")]
    if not os.path.exists("/usr/sbin/sshd"):
        missing.append("openssh-server")
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (CRIU, runc, network namespaces)")
    if missing:
        pytest.fail(f"end-to-end tests need {', '.join(missing)}: run 'make test' (scripts/setup.sh installs them)")


@dataclass
class Lab:
    urls: dict[str, str]
    layout: Layout

    def url(self, host: str) -> str:
        return self.urls[host]

    @property
    def subnet(self) -> str:
        """The lab's /24 as ``10.231.X`` (from a host's address)."""
        return self.urls["a"].split("@", 1)[1].rsplit(":", 1)[0].rsplit(".", 1)[0]

    def runc_root(self, host: str) -> str:
        return str(self.layout.runc_root(host))

    def bundle(self, host: str, name: str) -> Path:
        return self.layout.host_data_dir(host) / "containers" / name

    def state(self, host: str, name: str) -> dict[str, Any] | None:
        res = subprocess.run(["runc", "--root", self.runc_root(host), "state", name], capture_output=True, text=True)
        return json.loads(res.stdout) if res.returncode == 0 else None

    def containers(self, host: str) -> list[str]:
        res = subprocess.run(["runc", "--root", self.runc_root(host), "list", "-q"], capture_output=True, text=True)
        return res.stdout.split()

    def check(self, host: str, name: str) -> dict[str, Any]:
        res = tug("lab", "check", host, name)
        data: dict[str, Any] = json.loads(res.stdout)
        assert (res.returncode == 0) == bool(data["ok"])
        return data

    def check_moved_intact(
        self, host: str, name: str, before: dict[str, Any], downtime_ms: float, fault_wait_ms: float = 0.0
    ) -> dict[str, Any]:
        """``name`` runs on ``host`` with its memory intact, its counter continued
        from ``before`` (a check on the source), and no heartbeat gap beyond the
        engine's ``downtime_ms`` plus HEARTBEAT_SLACK_MS, plus ``fault_wait_ms``
        where the processes ran before their memory was there (post-copy: the
        heartbeat thread then waits on its pages' remote faults, within the fill)."""
        after = self.check(host, name)
        assert after["ok"], after
        assert after["verify"]["ok"] and after["verify"]["bad_pages"] == 0
        hb = after["heartbeat"]
        assert hb["resets"] == 0 and hb["backwards"] == 0 and hb["skipped"] == 0
        since = before["heartbeat"]["last_counter"]
        assert hb["last_counter"] > since
        # The migration's gap: from the last line the check before it saw (a
        # stall of the loaded machine before that is not the migration's).
        gap = analyze_heartbeat(Path(after["state"]) / "heartbeat.log", since_counter=since).max_gap_ms
        bound = downtime_ms + HEARTBEAT_SLACK_MS + fault_wait_ms
        assert gap <= bound, (
            f"{name}: heartbeat gap {gap:.0f} ms since line {since} > downtime {downtime_ms:.0f} + slack "
            f"{HEARTBEAT_SLACK_MS} + fault wait {fault_wait_ms:.0f} ms"
        )
        return after

    def exec(self, host: str, name: str, *argv: str) -> str:
        res = subprocess.run(["runc", "--root", self.runc_root(host), "exec", name, *argv], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def remove(self, name: str) -> None:
        """``tug lab rm`` on every host: container, bundle, network endpoint, address."""
        for host in self.urls:
            tug("lab", "rm", host, name, check=True)

    def netns(self, host: str, name: str) -> Path:
        """The network namespace of ``name``'s endpoint on ``host``."""
        return self.layout.host_network(host).netns_path(name)

    def address(self, name: str) -> str:
        """The container's lab address (the same on every host)."""
        for h in tug("lab", "status", "--json", check=True).json()["hosts"]:
            for c in h["containers"]:
                if c["id"] == name and c.get("address"):
                    return str(c["address"])
        raise AssertionError(f"{name} has no lab address")

    def leftovers(self, host: str, name: str) -> list[str]:
        """Anything a failed migration of ``name`` could have left on ``host``."""
        found = []
        if self.state(host, name) is not None:
            found.append(f"runc container {name}")
        if self.bundle(host, name).exists():
            found.append(f"bundle {self.bundle(host, name)}")
        work = self.layout.work_dir(host)
        for p in (work / name, work / f"{name}.out"):
            if p.exists():
                found.append(str(p))
        if self.netns(host, name).exists():
            found.append(f"network namespace {self.netns(host, name)}")
        ipc = self.bundle(host, name).parent.parent / "ipcns" / name
        if ipc.exists():
            found.append(f"IPC namespace {ipc}")
        outer = self.layout.host_network(host).outer(name)
        if subprocess.run(["ip", "-n", self.layout.bridge_ns, "link", "show", outer], capture_output=True).returncode == 0:
            found.append(f"veth {outer} on the lab bridge")
        mounts = Path("/proc/self/mountinfo").read_text()
        for prefix in (f"{work}/{name}/", f"{work}/{name}.out/"):
            if prefix in mounts:
                found.append(f"mounts under {prefix}")
        return found


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    require_prerequisites()
    was_up = tug("lab", "status", "--json").json().get("up", False)
    res = tug("lab", "up", timeout=120)
    if res.returncode != 0:
        pytest.fail(f"'tug lab up' failed: {res.stderr.strip()}")
    status = tug("lab", "status", "--json", check=True).json()
    yield Lab(urls={h["name"]: h["url"] for h in status["hosts"]}, layout=current())
    if not was_up:
        tug("lab", "down", timeout=120)


def demo_container(lab: Lab, prefix: str = "t", *options: str) -> Iterator[str]:
    """A fresh demo container on host a (default: 32 MiB, 200 pages/s); removed from every host afterwards."""
    name = f"{prefix}{os.getpid()}-{next(_names)}"
    tug("lab", "demo", "a", name, *(options or ("--memory", "32", "--dirty-rate", "200")), check=True)
    yield name
    lab.remove(name)


def pod_containers(lab: Lab, prefix: str, members: int = 2, *extra: str) -> Iterator[list[str]]:
    """A fresh pod on host a (``tug lab pod``): its holder, then its members; removed afterwards."""
    name = f"{prefix}{os.getpid()}-{next(_names)}"
    names = [name, *(f"{name}-m{i}" for i in range(1, members + 1))]
    try:
        tug("lab", "pod", "a", name, "--members", str(members), *extra, check=True)
        yield names
    finally:
        for n in reversed(names):
            lab.remove(n)


@pytest.fixture
def demo(lab: Lab) -> Iterator[str]:
    yield from demo_container(lab)


@pytest.fixture
def big_demo(lab: Lab) -> Iterator[str]:
    """256 MiB: enough memory that a lazy fill is still running when its daemon is killed."""
    yield from demo_container(lab, "tb", "--memory", "256")


def migrate(src: str, name: str, dest_url: str, *extra: str) -> Result:
    return on(src, "tug", "migrate", name, "--to", dest_url, "--json", *extra)


def lazy_wait(report: dict[str, Any]) -> float:
    """Restored lazily, a container runs before its memory is there: its
    heartbeat thread may wait on its pages within the fill, which the client sees on top of the downtime."""
    return float(report["fill_ms"] or 0.0) if report["commit_point"] == "running" else 0.0


def wait_for(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def remove_cgroups(cgroup: str) -> None:
    """A test's own cgroup parent, in every hierarchy, deepest first (empty dirs only)."""
    for parent in Path("/sys/fs/cgroup").glob(f"*/{cgroup.lstrip('/')}"):
        for d in sorted(parent.rglob("*"), key=lambda p: -len(p.parts)) + [parent]:
            if d.is_dir():
                try:
                    d.rmdir()
                except OSError:
                    pass
