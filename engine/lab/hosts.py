"""The built-in lab: several "hosts" on one machine, each a network namespace.

Each host has its own address on a private bridge, its own sshd (key-only,
generated keys, known_hosts written for the client), its own runc state root,
data directory, tmpfs work directory and cgroup parent. Processes of a host
run in its network namespace only (``nsenter --net``), sharing the machine's
mount namespace: CRIU cannot dump a process tree that lives in a mount
namespace holding /run/netns bind mounts, which ``ip netns exec`` would create.

Addresses exist only inside these namespaces; nothing routes off the machine.
All lab state is recorded in :data:`STATE_FILE`, and ``down`` (or ``up`` after
a crash) removes everything whose name starts with the lab's prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tug.engine.errors import ConfigError, PreconditionError
from tug.engine.fsutil import remove_tree
from tug.engine.lab import sshd
from tug.engine.lab.addresses import _address_table
from tug.engine.lab.layout import (
    AUTHORIZED_KEYS,
    BRIDGE_NS,
    CGROUP_ROOT,
    CLIENT_ADDRESS,
    CLIENT_NS,
    DATA_DIR,
    IDENTITY,
    KNOWN_HOSTS,
    LAB_VERSION,
    PREFIX,
    RUN_DIR,
    SSH_PORT,
    STATE_FILE,
    SUBNET,
    Lab,
    LabHost,
    host_names,
    in_ns,
    sh,
)


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise PreconditionError("the lab needs root (network namespaces, runc, CRIU)")
    missing = [t for t in ("ip", "nsenter", "ssh-keygen", "runc", "tc") if not shutil.which(t)]
    if not os.path.exists("/usr/sbin/sshd"):
        missing.append("sshd (openssh-server)")
    if missing:
        raise PreconditionError(f"missing tools for the lab: {', '.join(missing)} (run scripts/setup.sh)")


# ---- state ------------------------------------------------------------------


def load() -> Lab | None:
    try:
        data = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None
    return Lab(
        hosts=[LabHost(**h) for h in data["hosts"]],
        rate=data.get("rate"),
        delay=data.get("delay"),
        created=data["created"],
        version=int(data.get("version", 1)),
    )


def require() -> Lab:
    lab = load()
    if lab is None:
        raise ConfigError("the lab is not up (run 'tug lab up')")
    return lab


def _save(lab: Lab) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    data = {
        "hosts": [asdict(h) for h in lab.hosts], "rate": lab.rate, "delay": lab.delay,
        "created": lab.created, "version": lab.version,
    }
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(STATE_FILE)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_list() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


# ---- up ---------------------------------------------------------------------


def up(hosts: int = 2, rate: str | None = None, delay: str | None = None, log: Any = None) -> Lab:
    """Create the lab, or keep a healthy one (re-applying link shaping)."""
    _require_tools()
    if hosts < 2:
        raise ConfigError("the lab needs at least 2 hosts")
    say = log or (lambda msg: None)
    existing = load()
    if existing is not None and existing.version != LAB_VERSION:
        say("the lab was made by an older tug; rebuilding it")
        down()
        existing = None
    if existing is not None and healthy(existing):
        if len(existing.hosts) != hosts:
            raise ConfigError(
                f"the lab is up with {len(existing.hosts)} hosts; run 'tug lab down' first to change that"
            )
        if (existing.rate, existing.delay) != (rate, delay):
            for h in existing.hosts:
                _shape(h, rate, delay)
            existing = Lab(hosts=existing.hosts, rate=rate, delay=delay, created=existing.created)
            _save(existing)
            say(f"link shaping set to rate={rate or 'unlimited'} delay={delay or '0'}")
        else:
            say("the lab is already up")
        return existing
    if existing is not None or any(ns.startswith(PREFIX) for ns in _netns_list()):
        say("cleaning up leftovers of a previous lab")
        down()

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    _client_keys()
    sh("ip", "netns", "add", BRIDGE_NS)
    in_ns(BRIDGE_NS, "ip", "link", "add", "br0", "type", "bridge")
    in_ns(BRIDGE_NS, "ip", "link", "set", "br0", "up")
    in_ns(BRIDGE_NS, "ip", "link", "set", "lo", "up")
    lab_hosts: list[LabHost] = []
    known: list[str] = []
    try:
        for i, name in enumerate(host_names(hosts)):
            h = _make_host(i, name)
            _shape(h, rate, delay)
            pub = sshd.start_sshd(h)
            lab_hosts.append(h := LabHost(**{**asdict(h), "sshd_pid": sshd.read_pid(h)}))
            known.append(f"{h.address} {pub}")
            say(f"host {name}: {h.url}")
        _make_client()
        say(f"client: {CLIENT_ADDRESS} (netns {CLIENT_NS})")
        KNOWN_HOSTS.write_text("\n".join(known) + "\n")
        lab = Lab(hosts=lab_hosts, rate=rate, delay=delay, created=time.time())
        _save(lab)
        sshd.wait_ssh(lab)
    except BaseException:
        _save(Lab(hosts=lab_hosts, rate=rate, delay=delay, created=time.time()))
        down()
        raise
    return lab


def _client_keys() -> None:
    if not IDENTITY.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tug-lab-client", "-f", str(IDENTITY))
    AUTHORIZED_KEYS.write_text(IDENTITY.with_suffix(".pub").read_text())
    AUTHORIZED_KEYS.chmod(0o600)


def _make_host(i: int, name: str) -> LabHost:
    ns = f"{PREFIX}-{name}"
    h = LabHost(
        name=name,
        index=i,
        netns=ns,
        address=f"{SUBNET}.{11 + i}",
        port=SSH_PORT,
        runc_root=str(RUN_DIR / name / "runc"),
        data_dir=str(DATA_DIR / "hosts" / name),
        work_dir=f"/dev/shm/{PREFIX}-{name}",
        cgroup_parent=f"/{PREFIX}-{name}",
    )
    for d in (h.runc_root, h.data_dir, h.work_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
    sh("ip", "netns", "add", ns)
    outer, inner = f"tlb-{name}", f"tl-{name}"
    sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
    sh("ip", "link", "set", inner, "netns", ns)
    sh("ip", "link", "set", outer, "netns", BRIDGE_NS)
    in_ns(BRIDGE_NS, "ip", "link", "set", outer, "master", "br0", "up")
    in_ns(ns, "ip", "link", "set", "lo", "up")
    in_ns(ns, "ip", "link", "set", inner, "name", "eth0")
    in_ns(ns, "ip", "addr", "add", f"{h.address}/24", "dev", "eth0")
    in_ns(ns, "ip", "link", "set", "eth0", "up")
    return h


def _make_client() -> None:
    """A namespace on the segment for traffic generators (no sshd, no runc)."""
    sh("ip", "netns", "add", CLIENT_NS)
    sh("ip", "link", "add", "tl-client", "type", "veth", "peer", "name", "tlb-client")
    sh("ip", "link", "set", "tl-client", "netns", CLIENT_NS)
    sh("ip", "link", "set", "tlb-client", "netns", BRIDGE_NS)
    in_ns(BRIDGE_NS, "ip", "link", "set", "tlb-client", "master", "br0", "up")
    in_ns(CLIENT_NS, "ip", "link", "set", "lo", "up")
    in_ns(CLIENT_NS, "ip", "link", "set", "tl-client", "name", "eth0")
    in_ns(CLIENT_NS, "ip", "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", "eth0")
    in_ns(CLIENT_NS, "ip", "link", "set", "eth0", "up")


def _shape(h: LabHost, rate: str | None, delay: str | None) -> None:
    in_ns(h.netns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
    if delay and rate:
        in_ns(h.netns, "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "netem", "delay", delay, "limit", "100000")
        in_ns(h.netns, "tc", "qdisc", "add", "dev", "eth0", "parent", "1:", "handle", "2:", "tbf", "rate", rate, "burst", "1mb", "latency", "100ms")
    elif delay:
        in_ns(h.netns, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", delay, "limit", "100000")
    elif rate:
        in_ns(h.netns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "1mb", "latency", "100ms")


# ---- status / down ------------------------------------------------------------


def healthy(lab: Lab) -> bool:
    nss = set(_netns_list())
    return (
        BRIDGE_NS in nss and CLIENT_NS in nss and lab.version == LAB_VERSION
        and all(h.netns in nss and _pid_alive(h.sshd_pid) for h in lab.hosts)
    )


def status() -> dict[str, Any]:
    lab = load()
    if lab is None:
        return {"up": False, "hosts": []}
    nss = set(_netns_list())
    addresses = _address_table()
    hosts = []
    for h in lab.hosts:
        containers: list[dict[str, Any]] = []
        res = sh("runc", "--root", h.runc_root, "list", "--format", "json", check=False)
        if res.returncode == 0:
            containers = [
                {"id": c["id"], "status": c["status"], "pid": c["pid"], "address": addresses.get(c["id"])}
                for c in json.loads(res.stdout or "null") or []
            ]
        hosts.append(
            {
                "name": h.name,
                "address": h.address,
                "url": h.url,
                "netns": h.netns,
                "netns_present": h.netns in nss,
                "sshd": "running" if _pid_alive(h.sshd_pid) else "dead",
                "runc_root": h.runc_root,
                "data_dir": h.data_dir,
                "containers": containers,
            }
        )
    return {
        "up": healthy(lab), "rate": lab.rate, "delay": lab.delay, "identity": str(IDENTITY),
        "known_hosts": str(KNOWN_HOSTS), "hosts": hosts,
        "client": {"name": "client", "address": CLIENT_ADDRESS, "netns": CLIENT_NS, "netns_present": CLIENT_NS in nss},
    }


def down(log: Any = None) -> None:
    """Remove everything the lab created, including leftovers of a crashed one."""
    say = log or (lambda msg: None)
    lab = load()
    hosts = lab.hosts if lab else []
    names = {h.name for h in hosts}
    names |= {ns[len(PREFIX) + 1 :] for ns in _netns_list() if ns.startswith(PREFIX + "-") and ns != BRIDGE_NS}
    for name in sorted(names):
        root = RUN_DIR / name / "runc"
        if root.exists():
            res = sh("runc", "--root", str(root), "list", "-q", check=False)
            for cid in res.stdout.split():
                sh("runc", "--root", str(root), "delete", "--force", cid, check=False)
                say(f"host {name}: removed container {cid}")
        pidfile = RUN_DIR / name / "sshd.pid"
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        sh("ip", "netns", "del", f"{PREFIX}-{name}", check=False)
        for ns in _netns_list():
            if ns.startswith(f"tug-{name}-"):  # container endpoints of this host
                sh("ip", "netns", "del", ns, check=False)
        remove_tree(Path(f"/dev/shm/{PREFIX}-{name}"))
        _remove_cgroups(f"{PREFIX}-{name}")
    sh("ip", "netns", "del", CLIENT_NS, check=False)
    sh("ip", "netns", "del", BRIDGE_NS, check=False)
    for link in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = link.split(":")
        if len(parts) > 1:
            ifname = parts[1].strip().split("@")[0]
            if ifname.startswith(("tl-", "tlb-")):
                sh("ip", "link", "del", ifname, check=False)
    shutil.rmtree(DATA_DIR / "hosts", ignore_errors=True)
    shutil.rmtree(RUN_DIR, ignore_errors=True)


def _remove_cgroups(parent: str) -> None:
    """rmdir the lab host's cgroup parent in every hierarchy (children first)."""
    if not CGROUP_ROOT.exists():
        return
    for hier in CGROUP_ROOT.iterdir():
        base = hier / parent
        if not base.is_dir():
            continue
        for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            base.rmdir()
        except OSError:
            pass


# ---- run inside a host --------------------------------------------------------


def exec_in_host(name: str, argv: list[str]) -> None:
    """Replace this process with argv running inside lab host ``name`` (or "client")."""
    lab = require()
    if not argv:
        raise ConfigError("nothing to run: tug lab run HOST -- CMD...")
    env = dict(os.environ)
    if name == "client":
        ns = CLIENT_NS
    else:
        h = lab.host(name)
        ns = h.netns
        env.update(h.env())
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')}"
    os.execvpe("nsenter", ["nsenter", f"--net=/run/netns/{ns}", "--", *argv], env)
