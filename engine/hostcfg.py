"""Where this host keeps things: runc state, bundles, work space.

A real host uses the defaults; the lab plays several hosts on one machine by
giving each its own values through ``TUG_*`` environment variables (set by the
lab's sshd and by ``tug lab run``). Keeping this in one place means the agent
and the CLI can never disagree about where a container lives.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from tug.engine.runtime.network import HostNetwork


@dataclass(frozen=True, slots=True, kw_only=True)
class HostConfig:
    name: str
    runc_root: Path
    data_dir: Path
    #: Image and work files go here; tmpfs keeps dump and restore at memory speed.
    work_dir: Path
    #: If set, restored containers are put under this cgroup parent.
    cgroup_parent: str | None
    ssh_identity: Path | None
    ssh_known_hosts: Path | None
    #: Bridge that container endpoints join, and the netns it lives in
    #: (None: this process's own). Without a bridge, containers with a
    #: managed endpoint cannot be received here.
    bridge: str | None = None
    bridge_netns: str | None = None

    @property
    def network(self) -> HostNetwork | None:
        if not self.bridge:
            return None
        return HostNetwork(host=self.name, bridge=self.bridge, bridge_netns=self.bridge_netns)

    @property
    def bundles_dir(self) -> Path:
        return self.data_dir / "containers"

    def bundle_dir(self, container: str) -> Path:
        return self.bundles_dir / container

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> HostConfig:
        e = dict(os.environ if env is None else env)
        name = e.get("TUG_HOST") or socket.gethostname()

        def path(key: str) -> Path | None:
            v = e.get(key)
            return Path(v) if v else None

        return cls(
            name=name,
            runc_root=path("TUG_RUNC_ROOT") or Path("/run/runc"),
            data_dir=path("TUG_DATA_DIR") or Path("/var/lib/tug"),
            work_dir=path("TUG_WORK_DIR") or Path("/dev/shm") / f"tug-{name}",
            cgroup_parent=e.get("TUG_CGROUP_PARENT") or None,
            ssh_identity=path("TUG_SSH_IDENTITY"),
            ssh_known_hosts=path("TUG_SSH_KNOWN_HOSTS"),
            bridge=e.get("TUG_BRIDGE") or None,
            bridge_netns=e.get("TUG_BRIDGE_NETNS") or None,
        )

    def env(self) -> dict[str, str]:
        """The variables that reproduce this config in a child process."""
        out = {
            "TUG_HOST": self.name,
            "TUG_RUNC_ROOT": str(self.runc_root),
            "TUG_DATA_DIR": str(self.data_dir),
            "TUG_WORK_DIR": str(self.work_dir),
        }
        if self.cgroup_parent:
            out["TUG_CGROUP_PARENT"] = self.cgroup_parent
        if self.ssh_identity:
            out["TUG_SSH_IDENTITY"] = str(self.ssh_identity)
        if self.ssh_known_hosts:
            out["TUG_SSH_KNOWN_HOSTS"] = str(self.ssh_known_hosts)
        if self.bridge:
            out["TUG_BRIDGE"] = self.bridge
        if self.bridge_netns:
            out["TUG_BRIDGE_NETNS"] = self.bridge_netns
        return out
