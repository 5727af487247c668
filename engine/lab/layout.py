"""The lab's fixed names and shapes: paths, subnet, hosts, and shell helpers."""

from __future__ import annotations

import string
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tug.engine.errors import ConfigError, PreconditionError
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
LAB_VERSION = 3


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


