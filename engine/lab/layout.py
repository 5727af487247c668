"""The lab's names and shapes: paths, namespaces, cgroups, subnet, hosts, shell helpers.

Several labs can run on one machine at once (two test runs, a test run and a
benchmark): each is an *instance* with a name, and every name it gives to
something shared by the whole machine (network namespaces in /run/netns,
directories under /run, /var/lib and /dev/shm, cgroups, the container
endpoints' namespaces) carries that name. :class:`Layout` is the one place
those names are made, as pure functions of the instance name, so that the
rules "no two instances share a name" and "no instance shares a name with
the default lab" can be checked without a lab (tests/unit/test_lab_layout.py).

The default instance keeps exactly the names the lab had before instances
existed (``tuglab-a``, ``/run/tug-lab``, 10.231.77.0/24, ...), so a lab that
is up keeps working. Other instances use a dot where the default uses its
dash (``tuglab.ta-a``, ``/run/tug-lab.ta``): a dot never occurs in a default
name, so neither the default's ``down`` (of this or of an older tug, which
removes ``tuglab-*`` namespaces and ``/run/tug-lab`` whole) nor another
instance's ever matches them.
"""

from __future__ import annotations

import hashlib
import re
import string
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tug.engine.errors import ConfigError, PreconditionError
from tug.engine.runtime.network import HostNetwork

#: The instance a lab command uses when neither ``--lab`` nor TUG_LAB names one.
DEFAULT = "default"
#: Environment variable naming the instance (``--lab`` wins over it).
ENV = "TUG_LAB"
#: Instance names: short (they end up in namespace and cgroup names), and of
#: characters that need no quoting anywhere and contain no separator.
NAME_RE = re.compile(r"[a-z0-9]{1,8}")
PREFIX = "tuglab"
RUN_DIR = Path("/run/tug-lab")
DATA_DIR = Path("/var/lib/tug-lab")
#: Every instance's subnet is 10.231.X.0/24, which exists only inside its own namespaces.
SUBNET_BASE = "10.231"
DEFAULT_OCTET = 77
SSH_PORT = 22
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Container addresses: .100 to .199, handed out by name and kept across moves.
POOL = range(100, 200)
#: Bumped when the lab's shape changes; an older lab is rebuilt by ``up``.
LAB_VERSION = 4  # 4: each host has its own podman (config, storage, run root)


def check_name(name: str) -> str:
    if name != DEFAULT and not NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid lab instance name {name!r}: 1 to 8 characters of a-z and 0-9")
    return name


@dataclass(frozen=True, slots=True)
class Layout:
    """Every name one lab instance gives to things the machine shares."""

    instance: str

    def __post_init__(self) -> None:
        check_name(self.instance)

    @property
    def is_default(self) -> bool:
        return self.instance == DEFAULT

    @property
    def title(self) -> str:
        """How messages name it: "the lab", "lab ta"."""
        return "the lab" if self.is_default else f"lab {self.instance}"

    @property
    def flag(self) -> str:
        """What a command for this instance adds to 'tug lab CMD'."""
        return "" if self.is_default else f" --lab {self.instance}"

    @property
    def prefix(self) -> str:
        """Of network namespaces, /dev/shm work dirs and cgroup parents."""
        return PREFIX if self.is_default else f"{PREFIX}.{self.instance}"

    @property
    def run_dir(self) -> Path:
        return RUN_DIR if self.is_default else RUN_DIR.with_name(f"{RUN_DIR.name}.{self.instance}")

    @property
    def data_dir(self) -> Path:
        return DATA_DIR if self.is_default else DATA_DIR.with_name(f"{DATA_DIR.name}.{self.instance}")

    @property
    def state_file(self) -> Path:
        return self.run_dir / "lab.json"

    @property
    def subnet_claim(self) -> Path:
        return self.run_dir / "subnet"

    @property
    def addresses_file(self) -> Path:
        return self.run_dir / "addresses.json"

    @property
    def addresses_lock(self) -> Path:
        return self.run_dir / "addresses.lock"

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-client"

    @property
    def identity(self) -> Path:
        return self.data_dir / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.data_dir / "known_hosts"

    @property
    def authorized_keys(self) -> Path:
        return self.data_dir / "authorized_keys"

    @property
    def image_dir(self) -> Path:
        return self.data_dir / "image"

    @property
    def hosts_dir(self) -> Path:
        return self.data_dir / "hosts"

    def netns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def runc_root(self, host: str) -> Path:
        return self.run_dir / host / "runc"

    def podman_dir(self, host: str) -> Path:
        """The host's own podman: its configuration and storage (podman's --root)."""
        return self.host_data_dir(host) / "podman"

    def podman_run_dir(self, host: str) -> Path:
        """The host's podman run root, tmp dir and events file (podman's --runroot)."""
        return self.run_dir / host / "podman"

    def sshd_pidfile(self, host: str) -> Path:
        return self.run_dir / host / "sshd.pid"

    def host_data_dir(self, host: str) -> Path:
        return self.hosts_dir / host

    def work_dir(self, host: str) -> Path:
        return Path(f"/dev/shm/{self.prefix}-{host}")

    def cgroup_parent(self, host: str) -> str:
        return f"/{self.prefix}-{host}"

    def agent_host(self, host: str) -> str:
        """The host's TUG_HOST: it names the container endpoints' namespaces (``tug-HOST-NAME``)."""
        return host if self.is_default else f"{self.instance}.{host}"

    def host_network(self, host: str) -> HostNetwork:
        return HostNetwork(host=self.agent_host(host), bridge="br0", bridge_netns=self.bridge_ns)


def default_subnet() -> str:
    return f"{SUBNET_BASE}.{DEFAULT_OCTET}"


def choose_subnet(instance: str, taken: set[str]) -> str:
    """The /24 (as ``10.231.X``) of a non-default instance: from its name, not in ``taken``.

    Derived from the name so an instance usually gets the same subnet every
    time; probing on past subnets other instances hold. The default's is
    never handed out, up or not.
    """
    if check_name(instance) == DEFAULT:
        return default_subnet()
    start = int.from_bytes(hashlib.sha256(instance.encode()).digest()[:4], "big") % 254
    for step in range(254):
        octet = 1 + (start + step) % 254
        subnet = f"{SUBNET_BASE}.{octet}"
        if octet != DEFAULT_OCTET and subnet not in taken:
            return subnet
    raise ConfigError("every lab subnet is taken: run 'tug lab down --lab NAME' for instances no longer needed")


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
    #: Not saved with the host: the lab's state file names its instance once.
    layout: Layout = field(default=Layout(DEFAULT), compare=False)

    @property
    def url(self) -> str:
        return f"ssh://root@{self.address}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        """The saved fields: exactly the ones an older tug reads back."""
        return {
            "name": self.name, "index": self.index, "netns": self.netns, "address": self.address, "port": self.port,
            "runc_root": self.runc_root, "data_dir": self.data_dir, "work_dir": self.work_dir,
            "cgroup_parent": self.cgroup_parent, "sshd_pid": self.sshd_pid,
        }

    def env(self) -> dict[str, str]:
        lay = self.layout
        env = {
            "TUG_HOST": lay.agent_host(self.name),
            "TUG_RUNC_ROOT": self.runc_root,
            "TUG_DATA_DIR": self.data_dir,
            "TUG_WORK_DIR": self.work_dir,
            "TUG_CGROUP_PARENT": self.cgroup_parent,
            "TUG_SSH_IDENTITY": str(lay.identity),
            "TUG_SSH_KNOWN_HOSTS": str(lay.known_hosts),
            "TUG_BRIDGE": "br0",
            "TUG_BRIDGE_NETNS": lay.bridge_ns,
        }
        # The host's own podman (storage, run root, events): what podman reads.
        env["CONTAINERS_CONF"] = str(lay.podman_dir(self.name) / "containers.conf")
        env["CONTAINERS_STORAGE_CONF"] = str(lay.podman_dir(self.name) / "storage.conf")
        if not lay.is_default:
            env["TUG_LAB"] = lay.instance  # a 'tug lab' run on the host means this instance
        return env

    def podman_env(self) -> dict[str, str]:
        return {k: v for k, v in self.env().items() if k.startswith("CONTAINERS_")}

    def network(self) -> HostNetwork:
        return self.layout.host_network(self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lab:
    hosts: list[LabHost]
    rate: str | None
    delay: str | None
    created: float
    version: int = LAB_VERSION
    layout: Layout = Layout(DEFAULT)
    subnet: str = default_subnet()

    @property
    def client_address(self) -> str:
        return f"{self.subnet}.5"

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
