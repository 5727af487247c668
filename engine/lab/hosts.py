"""The built-in lab: several "hosts" on one machine, each a network namespace.

Each host has its own address on a private bridge, its own sshd (key-only,
generated keys, known_hosts written for the client), its own runc state root,
data directory, tmpfs work directory and cgroup parent. Processes of a host
run in its network namespace only (``nsenter --net``), sharing the machine's
mount namespace: CRIU cannot dump a process tree that lives in a mount
namespace holding /run/netns bind mounts, which ``ip netns exec`` would create.

Addresses exist only inside these namespaces; nothing routes off the machine.
Each lab is one instance (see :mod:`.layout`): its state is recorded in its
own state file, and ``down`` (or ``up`` after a crash) removes everything whose
name starts with the instance's prefix, and nothing of any other instance.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tug.engine.errors import ConfigError, PreconditionError
from tug.engine.fsutil import remove_tree
from tug.engine.lab import podmandemo, sshd
from tug.engine.lab.addresses import address_table
from tug.engine.lab.instance import claim_subnet
from tug.engine.lab.layout import CGROUP_ROOT, LAB_VERSION, SSH_PORT, Lab, LabHost, Layout, default_subnet, host_names, in_ns, sh


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise PreconditionError("the lab needs root (network namespaces, runc, CRIU)")
    missing = [t for t in ("ip", "nsenter", "ssh-keygen", "runc", "tc") if not shutil.which(t)]
    if not os.path.exists("/usr/sbin/sshd"):
        missing.append("sshd (openssh-server)")
    if missing:
        raise PreconditionError(f"missing tools for the lab: {', '.join(missing)} (run scripts/setup.sh)")


# ---- state ------------------------------------------------------------------


def load(layout: Layout) -> Lab | None:
    try:
        data = json.loads(layout.state_file.read_text())
    except (OSError, ValueError):
        return None
    return Lab(
        hosts=[LabHost(**h, layout=layout) for h in data["hosts"]],
        rate=data.get("rate"),
        delay=data.get("delay"),
        created=data["created"],
        version=int(data.get("version", 1)),
        layout=layout,
        subnet=data.get("subnet") or default_subnet(),  # a state file from before instances: the default's
    )


def require(layout: Layout) -> Lab:
    lab = load(layout)
    if lab is None:
        raise ConfigError(f"{layout.title} is not up (run 'tug lab up{layout.flag}')")
    return lab


def _save(lab: Lab) -> None:
    lab.layout.run_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "hosts": [h.to_dict() for h in lab.hosts], "rate": lab.rate, "delay": lab.delay,
        "created": lab.created, "version": lab.version, "instance": lab.layout.instance, "subnet": lab.subnet,
    }
    tmp = lab.layout.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(lab.layout.state_file)


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


def up(layout: Layout, hosts: int = 2, rate: str | None = None, delay: str | None = None, log: Any = None) -> Lab:
    """Create the lab instance, or keep a healthy one (re-applying link shaping)."""
    _require_tools()
    if hosts < 2:
        raise ConfigError("the lab needs at least 2 hosts")
    say = log or (lambda msg: None)
    existing = load(layout)
    if existing is not None and existing.version != LAB_VERSION:
        say("the lab was made by an older tug; rebuilding it")
        down(layout)
        existing = None
    if existing is not None and healthy(existing):
        if len(existing.hosts) != hosts:
            raise ConfigError(
                f"{layout.title} is up with {len(existing.hosts)} hosts; run 'tug lab down{layout.flag}' first to change that"
            )
        if (existing.rate, existing.delay) != (rate, delay):
            for h in existing.hosts:
                _shape(h, rate, delay)
            existing = Lab(hosts=existing.hosts, rate=rate, delay=delay, created=existing.created,
                           layout=layout, subnet=existing.subnet)
            _save(existing)
            say(f"link shaping set to rate={rate or 'unlimited'} delay={delay or '0'}")
        else:
            say("the lab is already up")
        return existing
    # The dash matters: the default's prefix is a prefix of every other instance's.
    if existing is not None or any(ns.startswith(layout.prefix + "-") for ns in _netns_list()):
        say("cleaning up leftovers of a previous lab")
        down(layout)

    subnet = claim_subnet(layout)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    layout.data_dir.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    _client_keys(layout)
    sh("ip", "netns", "add", layout.bridge_ns)
    in_ns(layout.bridge_ns, "ip", "link", "add", "br0", "type", "bridge")
    in_ns(layout.bridge_ns, "ip", "link", "set", "br0", "up")
    in_ns(layout.bridge_ns, "ip", "link", "set", "lo", "up")
    lab_hosts: list[LabHost] = []
    known: list[str] = []
    try:
        for i, name in enumerate(host_names(hosts)):
            h = _make_host(layout, subnet, i, name)
            _shape(h, rate, delay)
            pub = sshd.start_sshd(h)
            lab_hosts.append(h := replace(h, sshd_pid=sshd.read_pid(h)))
            known.append(f"{h.address} {pub}")
            say(f"host {name}: {h.url}")
        lab = Lab(hosts=lab_hosts, rate=rate, delay=delay, created=time.time(), layout=layout, subnet=subnet)
        _make_client(layout, lab.client_address)
        say(f"client: {lab.client_address} (netns {layout.client_ns})")
        layout.known_hosts.write_text("\n".join(known) + "\n")
        _save(lab)
        sshd.wait_ssh(lab)
    except BaseException:
        _save(Lab(hosts=lab_hosts, rate=rate, delay=delay, created=time.time(), layout=layout, subnet=subnet))
        down(layout)
        raise
    return lab


def _client_keys(layout: Layout) -> None:
    if not layout.identity.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tug-lab-client", "-f", str(layout.identity))
    layout.authorized_keys.write_text(layout.identity.with_suffix(".pub").read_text())
    layout.authorized_keys.chmod(0o600)


def _plug(layout: Layout, ns: str, outer: str, address: str) -> None:
    """A veth from the bridge to ``ns``'s eth0 carrying ``address``.

    Both ends are made inside their namespaces, never in the machine's own:
    there, another instance making the same name at the same moment would
    collide, and an older tug's ``down`` removes every ``tl-*`` link.
    """
    sh("ip", "-n", layout.bridge_ns, "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
    in_ns(layout.bridge_ns, "ip", "link", "set", outer, "master", "br0", "up")
    in_ns(ns, "ip", "link", "set", "lo", "up")
    in_ns(ns, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
    in_ns(ns, "ip", "link", "set", "eth0", "up")


def _make_host(layout: Layout, subnet: str, i: int, name: str) -> LabHost:
    h = LabHost(
        name=name,
        index=i,
        netns=layout.netns(name),
        address=f"{subnet}.{11 + i}",
        port=SSH_PORT,
        runc_root=str(layout.runc_root(name)),
        data_dir=str(layout.host_data_dir(name)),
        work_dir=str(layout.work_dir(name)),
        cgroup_parent=layout.cgroup_parent(name),
        layout=layout,
    )
    for d in (h.runc_root, h.data_dir, h.work_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
    from tug.engine.runtime.podmanprobe import write_config

    write_config(layout.podman_dir(name), layout.podman_run_dir(name))
    sh("ip", "netns", "add", h.netns)
    _plug(layout, h.netns, f"tlb-{name}", h.address)
    return h


def _make_client(layout: Layout, address: str) -> None:
    """A namespace on the segment for traffic generators (no sshd, no runc)."""
    sh("ip", "netns", "add", layout.client_ns)
    _plug(layout, layout.client_ns, "tlb-client", address)


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
        lab.layout.bridge_ns in nss and lab.layout.client_ns in nss and lab.version == LAB_VERSION
        and all(h.netns in nss and _pid_alive(h.sshd_pid) for h in lab.hosts)
    )


def status(layout: Layout) -> dict[str, Any]:
    lab = load(layout)
    if lab is None:
        return {"up": False, "instance": layout.instance, "hosts": []}
    nss = set(_netns_list())
    addresses = address_table(layout)
    hosts = []
    for h in lab.hosts:
        containers: list[dict[str, Any]] = []
        res = sh("runc", "--root", h.runc_root, "list", "--format", "json", check=False)
        if res.returncode == 0:
            containers = [
                {"id": c["id"], "status": c["status"], "pid": c["pid"], "address": addresses.get(c["id"])}
                for c in json.loads(res.stdout or "null") or []
            ]
        containers += [{**c, "address": addresses.get(c["id"])} for c in podmandemo.containers(h)]
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
                "work_dir": h.work_dir,
                "cgroup_parent": h.cgroup_parent,
                "tug_host": layout.agent_host(h.name),
                "containers": containers,
            }
        )
    return {
        "up": healthy(lab), "instance": layout.instance, "subnet": f"{lab.subnet}.0/24", "rate": lab.rate,
        "delay": lab.delay, "identity": str(layout.identity), "known_hosts": str(layout.known_hosts),
        "run_dir": str(layout.run_dir), "data_dir": str(layout.data_dir), "bridge_netns": layout.bridge_ns, "hosts": hosts,
        "client": {"name": "client", "address": lab.client_address, "netns": layout.client_ns,
                   "netns_present": layout.client_ns in nss},
    }


def down(layout: Layout, log: Any = None) -> None:
    """Remove everything this lab instance created, including leftovers of a crashed one.

    Only names of this instance: the hosts its state file lists and the
    namespaces that carry its prefix and a dash, whatever else is up.
    """
    say = log or (lambda msg: None)
    lab = load(layout)
    names = {h.name for h in lab.hosts} if lab else set()
    own = layout.prefix + "-"
    names |= {ns[len(own):] for ns in _netns_list() if ns.startswith(own) and ns not in (layout.bridge_ns, layout.client_ns)}
    for name in sorted(names):
        _remove_podman(layout, name, say)
        root = layout.runc_root(name)
        if root.exists():
            res = sh("runc", "--root", str(root), "list", "-q", check=False)
            for cid in res.stdout.split():
                sh("runc", "--root", str(root), "delete", "--force", cid, check=False)
                say(f"host {name}: removed container {cid}")
        try:
            os.kill(int(layout.sshd_pidfile(name).read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        sh("ip", "netns", "del", layout.netns(name), check=False)
        endpoints = f"tug-{layout.agent_host(name)}-"  # container endpoints of this host
        for ns in _netns_list():
            if ns.startswith(endpoints):
                sh("ip", "netns", "del", ns, check=False)
        remove_tree(layout.work_dir(name))
        _remove_cgroups(layout.cgroup_parent(name).lstrip("/"))
    sh("ip", "netns", "del", layout.client_ns, check=False)
    sh("ip", "netns", "del", layout.bridge_ns, check=False)
    if layout.is_default:
        _remove_legacy_links()
    shutil.rmtree(layout.hosts_dir, ignore_errors=True)
    shutil.rmtree(layout.run_dir, ignore_errors=True)
    if not layout.is_default:  # nothing stays behind; the default keeps its keys and demo image
        shutil.rmtree(layout.data_dir, ignore_errors=True)


def _remove_podman(layout: Layout, name: str, say: Any) -> None:
    """The host's podman: its containers (conmon, runc state), images, mounts and directories."""
    import asyncio

    from tug.engine.runtime import podmanprobe

    base, run = layout.podman_dir(name), layout.podman_run_dir(name)
    conf = base / "containers.conf"
    if not conf.exists():
        return
    env = {"CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(base / "storage.conf")}
    asyncio.run(podmanprobe.reset(env, base, run))
    say(f"host {name}: removed its podman state")


def _remove_legacy_links() -> None:
    """Links an older tug made in the machine's namespace (``tl-*``) and a crash left there."""
    for link in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = link.split(":")
        if len(parts) > 1:
            ifname = parts[1].strip().split("@")[0]
            if ifname.startswith(("tl-", "tlb-")):
                sh("ip", "link", "del", ifname, check=False)


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


def exec_in_host(layout: Layout, name: str, argv: list[str]) -> None:
    """Replace this process with argv running inside lab host ``name`` (or "client")."""
    lab = require(layout)
    if not argv:
        raise ConfigError("nothing to run: tug lab run HOST -- CMD...")
    env = dict(os.environ)
    env["TUG_LAB"] = layout.instance  # a 'tug lab' command in there means this instance
    if name == "client":
        ns = layout.client_ns
    else:
        h = lab.host(name)
        ns = h.netns
        env.update(h.env())
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')}"
    os.execvpe("nsenter", ["nsenter", f"--net=/run/netns/{ns}", "--", *argv], env)
