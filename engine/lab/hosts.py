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

import contextlib
import fcntl
import json
import os
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tug.engine.errors import ConfigError, PreconditionError
from tug.engine.fsutil import remove_tree
from tug.engine.runtime.network import HostNetwork

PREFIX = "tuglab"
RUN_DIR = Path("/run/tug-lab")
DATA_DIR = Path("/var/lib/tug-lab")
STATE_FILE = RUN_DIR / "lab.json"
BRIDGE_NS = f"{PREFIX}-br"
SUBNET = "10.231.77"  # /24, lives only inside the lab's namespaces
SSH_PORT = 22
IDENTITY = DATA_DIR / "client_ed25519"
KNOWN_HOSTS = DATA_DIR / "known_hosts"
AUTHORIZED_KEYS = DATA_DIR / "authorized_keys"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CLIENT_NS = f"{PREFIX}-client"
CLIENT_ADDRESS = f"{SUBNET}.5"
#: Container addresses: .100 to .199, handed out by name and kept across moves.
POOL = range(100, 200)
ADDRESSES = RUN_DIR / "addresses.json"
#: Bumped when the lab's shape changes; an older lab is rebuilt by ``up``.
LAB_VERSION = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class LabHost:
    name: str
    index: int
    netns: str
    address: str
    port: int
    runc_root: str
    data_dir: str
    work_dir: str
    cgroup_parent: str
    sshd_pid: int = 0

    @property
    def url(self) -> str:
        return f"ssh://root@{self.address}:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "TUG_HOST": self.name,
            "TUG_RUNC_ROOT": self.runc_root,
            "TUG_DATA_DIR": self.data_dir,
            "TUG_WORK_DIR": self.work_dir,
            "TUG_CGROUP_PARENT": self.cgroup_parent,
            "TUG_SSH_IDENTITY": str(IDENTITY),
            "TUG_SSH_KNOWN_HOSTS": str(KNOWN_HOSTS),
            "TUG_BRIDGE": "br0",
            "TUG_BRIDGE_NETNS": BRIDGE_NS,
        }

    def network(self) -> HostNetwork:
        return HostNetwork(host=self.name, bridge="br0", bridge_netns=BRIDGE_NS)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lab:
    hosts: list[LabHost]
    rate: str | None
    delay: str | None
    created: float
    version: int = LAB_VERSION

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise ConfigError(f"no lab host {name!r} (hosts: {', '.join(h.name for h in self.hosts)})")


def host_names(n: int) -> list[str]:
    letters = string.ascii_lowercase
    return [letters[i] if i < 26 else f"h{i}" for i in range(n)]


def sh(*argv: str, check: bool = True, quiet: bool = False, input: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, input=input)
    if check and res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise PreconditionError(f"{' '.join(argv)}: {msg[-1] if msg else f'exit {res.returncode}'}")
    return res


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("nsenter", f"--net=/run/netns/{ns}", "--", *argv, check=check)


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
            pub = _start_sshd(h)
            lab_hosts.append(h := LabHost(**{**asdict(h), "sshd_pid": _read_pid(h)}))
            known.append(f"{h.address} {pub}")
            say(f"host {name}: {h.url}")
        _make_client()
        say(f"client: {CLIENT_ADDRESS} (netns {CLIENT_NS})")
        KNOWN_HOSTS.write_text("\n".join(known) + "\n")
        lab = Lab(hosts=lab_hosts, rate=rate, delay=delay, created=time.time())
        _save(lab)
        _wait_ssh(lab)
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


def _address_table() -> dict[str, str]:
    try:
        table: dict[str, str] = json.loads(ADDRESSES.read_text())
    except (OSError, ValueError):
        return {}
    return table


@contextlib.contextmanager
def _addresses_locked() -> Iterator[dict[str, str]]:
    """The address table under an exclusive lock; changes are written back.

    Several lab users (tests, a benchmark, a person) start containers at
    once: without the lock two of them could be handed the same address.
    """
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / "addresses.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = _address_table()
        before = dict(table)
        yield table
        if table != before:
            tmp = ADDRESSES.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=2))
            tmp.replace(ADDRESSES)


def address_of(container: str, *, allocate: bool = False) -> str:
    """The lab address of a container, kept for its whole life in the lab."""
    table = _address_table()
    if container in table:
        return table[container]
    if not allocate:
        raise ConfigError(f"no lab address for container {container!r} (start it with 'tug lab demo')")
    with _addresses_locked() as table:
        if container in table:
            return table[container]
        used = set(table.values())
        for i in POOL:
            addr = f"{SUBNET}.{i}"
            if addr not in used:
                table[container] = addr
                return addr
    raise ConfigError("the lab's container address pool is exhausted (remove containers with 'tug lab rm')")


def release_address(container: str) -> None:
    with _addresses_locked() as table:
        table.pop(container, None)


def _shape(h: LabHost, rate: str | None, delay: str | None) -> None:
    in_ns(h.netns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
    if delay and rate:
        in_ns(h.netns, "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "netem", "delay", delay, "limit", "100000")
        in_ns(h.netns, "tc", "qdisc", "add", "dev", "eth0", "parent", "1:", "handle", "2:", "tbf", "rate", rate, "burst", "1mb", "latency", "100ms")
    elif delay:
        in_ns(h.netns, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", delay, "limit", "100000")
    elif rate:
        in_ns(h.netns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "1mb", "latency", "100ms")


def _sshd_config(h: LabHost) -> Path:
    hdir = Path(h.data_dir)
    key = hdir / "ssh_host_ed25519_key"
    if not key.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"tug-lab-{h.name}", "-f", str(key))
    env = " ".join(f"{k}={v}" for k, v in h.env().items() if not k.startswith("TUG_SSH_"))
    cfg = hdir / "sshd_config"
    cfg.write_text(
        "\n".join(
            [
                f"ListenAddress {h.address}",
                f"Port {h.port}",
                f"HostKey {key}",
                f"PidFile {RUN_DIR / h.name / 'sshd.pid'}",
                f"AuthorizedKeysFile {AUTHORIZED_KEYS}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "PrintMotd no",
                "MaxStartups 100",
                "MaxSessions 100",
                f"SetEnv {env}",
                "",
            ]
        )
    )
    return cfg


def _start_sshd(h: LabHost) -> str:
    cfg = _sshd_config(h)
    log = Path(h.data_dir) / "sshd.log"
    in_ns(h.netns, "/usr/sbin/sshd", "-f", str(cfg), "-E", str(log))
    pub = (Path(h.data_dir) / "ssh_host_ed25519_key.pub").read_text().split()
    return f"{pub[0]} {pub[1]}"


def _read_pid(h: LabHost) -> int:
    pidfile = RUN_DIR / h.name / "sshd.pid"
    for _ in range(50):
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise PreconditionError(f"sshd of lab host {h.name} did not start (see {Path(h.data_dir) / 'sshd.log'})")


def _wait_ssh(lab: Lab, timeout: float = 10.0) -> None:
    """Every sshd accepts a key-authenticated command before up returns."""
    deadline = time.monotonic() + timeout
    for h in lab.hosts:
        while True:
            res = in_ns(
                h.netns, "ssh", "-i", str(IDENTITY), "-o", f"UserKnownHostsFile={KNOWN_HOSTS}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=2", "-p", str(h.port), f"root@{h.address}", "true", check=False,
            )
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise PreconditionError(f"lab host {h.name}: ssh check failed: {res.stderr.strip()}")
            time.sleep(0.1)


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
