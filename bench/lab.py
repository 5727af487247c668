"""The lab as the benchmark sees it: the ``tug lab`` CLI plus a few files it documents.

Everything that changes the lab goes through the CLI (``tug lab up/demo/rm/
check/run``), the same surface a user has. Reads that the CLI does not offer
(the workload's heartbeat and status files, the container's memory cgroup)
use the paths the lab documents: bundles under ``<data_dir>/containers/NAME``,
the cgroup from the bundle's own ``config.json``.

The lab is shared with other people: nothing here ever calls ``tug lab down``,
and only containers this process created (``bench-...``) are removed. The
lab is the instance TUG_LAB names (the default lab without it): every ``tug
lab`` command inherits the variable, and the names the benchmark uses beyond
the CLI (namespaces, cgroups) come from ``tug lab status --json``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tug.engine.lab.instance import current

from .matrix import Link, Workload


class LabError(RuntimeError):
    """A lab command failed; the message is the command's last error line."""


def tug_binary() -> str:
    """The ``tug`` next to this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).with_name("tug")
    if here.exists():
        return str(here)
    found = shutil.which("tug")
    if found is None:
        raise LabError("tug not found: run with the venv's python (.venv/bin/python -m bench)")
    return found


TUG = tug_binary()


def tug(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([TUG, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        raise LabError(f"tug {' '.join(args)}: {lines[-1] if lines else f'exit {res.returncode}'}")
    return res


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    name: str
    url: str
    address: str
    runc_root: str
    data_dir: str
    #: The host's network namespace, cgroup parent and TUG_HOST (which names
    #: its containers' endpoint namespaces, ``tug-TUG_HOST-NAME``).
    netns: str
    cgroup_parent: str
    tug_host: str

    def bundle(self, container: str) -> Path:
        return Path(self.data_dir) / "containers" / container


@dataclass(frozen=True, slots=True, kw_only=True)
class LabInfo:
    hosts: dict[str, Host]
    identity: str
    known_hosts: str
    link: Link
    bridge_netns: str


def status() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(tug("lab", "status", "--json", check=False).stdout or "{}")
    return data


def info() -> LabInfo:
    st = status()
    if not st.get("up"):
        raise LabError("the lab is not up")
    hosts = {
        h["name"]: Host(name=h["name"], url=h["url"], address=h["address"], runc_root=h["runc_root"], data_dir=h["data_dir"],
                        netns=h["netns"], cgroup_parent=h["cgroup_parent"], tug_host=h["tug_host"])
        for h in st["hosts"]
    }
    return LabInfo(hosts=hosts, identity=st["identity"], known_hosts=st["known_hosts"],
                   link=Link(rate=st.get("rate"), delay=st.get("delay")), bridge_netns=st["bridge_netns"])


def current_link() -> Link | None:
    """The shaping the lab says is applied now, None if the lab is not up."""
    st = status()
    if not st.get("up"):
        return None
    return Link(rate=st.get("rate"), delay=st.get("delay"))


def state_stamp() -> int | None:
    """mtime (ns) of the lab's state file, rewritten whenever anyone re-shapes the lab.

    ``tug lab status`` only shows the shaping *now*; comparing this stamp
    before and after a run also catches a change that was undone meanwhile
    (another user's ``tug lab up --rate X`` ... ``tug lab up``).
    """
    try:
        return int(current().state_file.stat().st_mtime_ns)
    except OSError:
        return None


def ensure(link: Link) -> None:
    """``tug lab up`` with this shaping: creates the lab if needed, else re-shapes (idempotent)."""
    tug("lab", "up", *link.up_args(), timeout=180)


def others_containers() -> int:
    """Containers in the lab that are not ours: a hint of concurrent load."""
    st = status()
    return sum(1 for h in st.get("hosts", []) for c in h.get("containers", []) if not c["id"].startswith("bench-"))


def start_demo(host: Host, name: str, w: Workload) -> None:
    from . import podman

    tug("lab", "demo", host.name, name, "--memory", str(w.memory_mib), "--dirty-rate", str(w.dirty_rate),
        "--hot-set", repr(w.hot_set), "--runtime", podman.RUNTIME["name"], timeout=180)


def _bundle(host: Host, name: str) -> Path:
    from . import podman

    return podman.bundle(host, name) if podman.active() else host.bundle(name)


def _rootfs(host: Host, name: str) -> Path:
    from . import podman

    return podman.rootfs(host, name) if podman.active() else host.bundle(name) / "rootfs"


def remove(host: Host, name: str) -> None:
    """``tug lab rm``: the container and its bundle; silent if absent."""
    if not name.startswith("bench-"):
        raise LabError(f"refusing to remove {name!r}: the benchmark only removes its own bench-* containers")
    tug("lab", "rm", host.name, name, timeout=120, check=False)


def check(host: Host, name: str) -> dict[str, Any]:
    """``tug lab check``: running, counter continuous, memory verifies."""
    res = tug("lab", "check", host.name, name, timeout=180, check=False)
    try:
        data: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        return {"ok": False, "reason": (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]}
    return data


def running_on(host: Host, name: str) -> bool:
    from . import podman

    if podman.active():
        return podman.running(host, name)
    res = subprocess.run(["runc", "--root", host.runc_root, "state", name], capture_output=True, text=True)
    return res.returncode == 0


# ---- files the demo workload keeps in its rootfs --------------------------------


def heartbeat_log(host: Host, name: str) -> Path:
    return _rootfs(host, name) / "state" / "heartbeat.log"


def last_heartbeat_counter(host: Host, name: str) -> int:
    """Counter of the last complete heartbeat line (0 if none yet)."""
    path = heartbeat_log(host, name)
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 4096))
        tail = f.read()
    lines = tail.split(b"\n")[:-1]  # drop the part after the last newline
    for raw in reversed(lines):
        fields = raw.split()
        if len(fields) in (3, 4) and fields[0].isdigit():
            return int(fields[0])
    return 0


def workload_status(host: Host, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((_rootfs(host, name) / "state" / "status.json").read_text())
    return data


def container_memory(host: Host, name: str) -> dict[str, int | None]:
    """The container's memory cgroup (v1): anon RSS, usage, peak usage, bytes."""
    out: dict[str, int | None] = {"rss_bytes": None, "usage_bytes": None, "max_usage_bytes": None}
    try:
        spec = json.loads((_bundle(host, name) / "config.json").read_text())
        cg = Path("/sys/fs/cgroup/memory") / spec["linux"]["cgroupsPath"].lstrip("/")
        for line in (cg / "memory.stat").read_text().splitlines():
            key, _, val = line.partition(" ")
            if key == "rss":
                out["rss_bytes"] = int(val)
        out["usage_bytes"] = int((cg / "memory.usage_in_bytes").read_text())
        out["max_usage_bytes"] = int((cg / "memory.max_usage_in_bytes").read_text())
    except (OSError, KeyError, ValueError):
        pass  # cgroup v2 or a layout we do not know: leave the figures null
    return out


# ---- a client of the container's service, as a user of it would see it ------

SERVICE_PORT = 7000


def address(name: str) -> str:
    """The container's address on the lab segment (the same on every host)."""
    from . import podman

    if podman.active():
        for host in info().hosts.values():
            if podman.running(host, name):
                return podman.address(host, name)
    for h in status().get("hosts", []):
        for c in h.get("containers", []):
            if c["id"] == name and c.get("address"):
                return str(c["address"])
    raise LabError(f"container {name} has no lab address")


class TcpClient:
    """``tug lab client NAME`` held across a migration, stopped with SIGINT.

    One connection, a request every 5 ms: the longest wait for a reply is the
    downtime a client of the service saw, TCP retransmission backoff included.
    """

    def __init__(self, name: str, limit_s: float) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [TUG, "lab", "client", name, "--duration", f"{limit_s:g}", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )

    def wait_connected(self, timeout: float = 20.0) -> None:
        target = f"{address(self.name)}:{SERVICE_PORT}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            res = subprocess.run(["ip", "netns", "exec", current().client_ns, "ss", "-Htn", "state", "established"],
                                 capture_output=True, text=True)
            if target in res.stdout:
                return
            time.sleep(0.05)
        self.stop()
        raise LabError(f"the lab client did not connect to {target} within {timeout:g} s")

    def stop(self, timeout: float = 120.0) -> dict[str, Any]:
        """End the run (the request in flight still gets its reply) and return the client's JSON."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        try:
            data: dict[str, Any] = json.loads(out)
        except json.JSONDecodeError:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            raise LabError(f"lab client: {lines[-1] if lines else f'exit {self.proc.returncode}'}") from None
        return data
