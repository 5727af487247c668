"""The podman adapter: every podman invocation tug makes, in one place.

tug does not use podman's own checkpoint/restore to move memory (it has no
streaming, no pre-copy without soft-dirty and no lazy restore). It does the
CRIU work itself on the OCI runtime state podman keeps (podman runs runc with
the container's *id*, a bundle in the container's ``userdata`` directory and
runc's state root, ``/run/runc`` unless podman was given ``--runtime-flag
root=...``, which conmon's command line shows), and hands the result back to
podman on the destination through podman's non-exported restore: a container
created there with the same image and command, initialised and stopped (so
podman wrote its OCI spec and never ran the workload), finds CRIU's images in
its ``userdata/checkpoint`` and ``podman container restore`` runs them under
its own conmon. From then on that podman owns the container.

Which podman a host means is podman's own business: ``CONTAINERS_CONF`` and
``CONTAINERS_STORAGE_CONF`` in the environment (the lab gives each host its
own; a real host has none and uses podman's defaults) reach every podman tug
runs, as they reach a user's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tug.engine import proc
from tug.engine.errors import ConfigError, PreconditionError, RuntimeToolError

#: runc's state root when podman passes none (runc's own default, for root).
DEFAULT_RUNC_ROOT = Path("/run/runc")


@dataclass(frozen=True, slots=True, kw_only=True)
class PodmanContainer:
    """What tug needs of a podman container, from ``podman inspect``."""

    id: str
    name: str
    status: str  # configured | created | running | paused | exited | stopped
    pid: int
    conmon_pid: int
    image_id: str
    image_name: str
    #: The OCI bundle podman hands runc (its ``userdata`` directory).
    bundle: Path
    #: The overlay's merged directory while mounted (empty path when not).
    rootfs: Path
    #: The argv podman runs in the container (entrypoint + command).
    argv: tuple[str, ...]
    #: runc's --root for this container (from conmon's command line).
    runc_root: Path
    cgroup_parent: str
    #: The network namespace path it joined (``--network ns:PATH``), or "".
    netns_path: str
    ulimits: tuple[str, ...] = ()

    @property
    def checkpoint_dir(self) -> Path:
        """Where podman's non-exported restore reads CRIU's images."""
        return self.bundle / "checkpoint"


def parse_inspect(data: dict[str, Any], runc_root: Path) -> PodmanContainer:
    """One ``podman inspect`` entry -> :class:`PodmanContainer` (pure)."""
    state = data.get("State") or {}
    config = data.get("Config") or {}
    host = data.get("HostConfig") or {}
    graph = (data.get("GraphDriver") or {}).get("Data") or {}
    entry = config.get("Entrypoint") or []
    if isinstance(entry, str):
        entry = entry.split() if entry else []
    cmd = config.get("Cmd") or []
    mode = str(host.get("NetworkMode") or "")
    ulimits = tuple(
        f"{u['Name'].removeprefix('RLIMIT_').lower()}={int(u['Soft'])}:{int(u['Hard'])}"
        for u in host.get("Ulimits") or [] if isinstance(u, dict) and u.get("Name")
    )
    return PodmanContainer(
        id=str(data["Id"]), name=str(data.get("Name", "")), status=str(state.get("Status", "")),
        pid=int(state.get("Pid") or 0), conmon_pid=int(state.get("ConmonPid") or 0),
        image_id=str(data.get("Image", "")), image_name=str(data.get("ImageName", "")),
        bundle=Path(str(data.get("StaticDir", ""))), rootfs=Path(str(graph.get("MergedDir", ""))),
        argv=tuple(str(a) for a in [*entry, *cmd]), runc_root=runc_root,
        cgroup_parent=str(host.get("CgroupParent") or ""),
        netns_path=mode.removeprefix("ns:") if mode.startswith("ns:") else "",
        ulimits=ulimits,
    )


def runc_root_from_cmdline(argv: list[str]) -> Path:
    """runc's --root in a conmon command line (``--runtime-arg --root=X`` or a
    ``--runtime-arg --root --runtime-arg X`` pair), else runc's default (pure)."""
    args = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--runtime-arg"]
    for i, a in enumerate(args):
        if a.startswith("--root="):
            return Path(a.split("=", 1)[1])
        if a == "--root" and i + 1 < len(args):
            return Path(args[i + 1])
    return DEFAULT_RUNC_ROOT


def _conmon_runc_root(conmon_pid: int) -> Path:
    if conmon_pid <= 0:
        return DEFAULT_RUNC_ROOT
    try:
        raw = Path(f"/proc/{conmon_pid}/cmdline").read_bytes()
    except OSError:
        return DEFAULT_RUNC_ROOT
    return runc_root_from_cmdline([a.decode(errors="replace") for a in raw.split(b"\0") if a])


class Podman:
    """The host's podman (its configuration comes from the environment)."""

    def __init__(self, *, binary: str = "podman", env: dict[str, str] | None = None) -> None:
        self.binary = binary
        self.env = env

    async def _run(self, *args: str, timeout: float = 60, check: bool = True) -> proc.Completed:
        return await proc.run([self.binary, *args], timeout=timeout, check=check, env=self.env, via_files=True)

    async def version(self) -> str:
        res = await self._run("version", "--format", "{{.Client.Version}}", timeout=20)
        return res.out.strip()

    async def info(self) -> dict[str, Any]:
        res = await self._run("info", "--format", "json", timeout=30)
        data: dict[str, Any] = json.loads(res.out)
        return data

    async def inspect(self, name: str) -> PodmanContainer | None:
        res = await self._run("container", "inspect", name, timeout=20, check=False)
        if res.returncode != 0:
            if "no such container" in res.err.lower():
                return None
            raise RuntimeToolError(f"podman inspect {name} failed: {res.err.strip()}", argv=res.argv,
                                   returncode=res.returncode, stderr=res.err)
        items = json.loads(res.out or "[]")
        if not items:
            return None
        conmon = int((items[0].get("State") or {}).get("ConmonPid") or 0)
        return parse_inspect(items[0], _conmon_runc_root(conmon))

    async def require(self, name: str) -> PodmanContainer:
        found = await self.inspect(name)
        if found is None:
            raise ConfigError(f"container {name!r} not found in this host's podman")
        return found

    async def has_image(self, image_id: str) -> bool:
        res = await self._run("image", "exists", image_id, timeout=20, check=False)
        return res.returncode == 0

    async def create_mounted(self, c: PodmanContainer, *, name: str, netns_path: str, cgroup_parent: str) -> Path:
        """Create ``name`` like ``c`` (same image id, command, ulimits) and mount
        its overlay: the writable layer is synced into the returned directory.
        ``netns_path`` must exist (podman checks; it need not be the final one)."""
        argv = ["create", "--name", name, "--network", f"ns:{netns_path}" if netns_path else "none"]
        if cgroup_parent:
            argv += ["--cgroup-parent", cgroup_parent]
        for u in c.ulimits:
            argv += ["--ulimit", u]
        argv += ["--entrypoint", json.dumps(list(c.argv[:1]))] if c.argv else []
        argv += [c.image_id, *c.argv[1:]]
        await self._run(*argv, timeout=60)
        try:
            mounted = await self._run("mount", name, timeout=30)
            return Path(mounted.out.strip())
        except BaseException:
            await self.remove(name)
            raise

    async def init_stopped(self, name: str) -> PodmanContainer:
        """Initialise and stop ``name``: "exited", never having run.

        ``podman init`` makes podman write the OCI spec its restore reads
        (``userdata/config.json``, joining the network namespace at its path
        now) and runc create the container; stopping it kills runc's init
        before the workload was ever exec'd. "exited" is the state podman's
        non-exported restore accepts.
        """
        await self._run("init", name, timeout=60)
        await self._run("stop", "--time", "0", name, timeout=60)
        made = await self.require(name)
        if made.status not in ("exited", "stopped", "configured"):
            raise PreconditionError(f"podman container {name} is {made.status} after init and stop, not exited")
        return made

    async def restore(self, name: str, *, tcp_established: bool, file_locks: bool = False, timeout: float = 300) -> None:
        """podman's non-exported restore: CRIU's images must be in userdata/checkpoint."""
        argv = ["container", "restore"]
        if tcp_established:
            argv.append("--tcp-established")
        if file_locks:
            argv.append("--file-locks")
        await self._run(*argv, name, timeout=timeout)

    async def remove(self, name: str) -> None:
        """Remove ``name`` (stopped or not) and its storage; fine if it is gone."""
        await self._run("rm", "--force", "--time", "0", name, timeout=60, check=False)

    async def unmount(self, name: str) -> None:
        await self._run("umount", "--force", name, timeout=30, check=False)

    async def forget_after_runc_delete(self, name: str) -> None:
        """After tug deleted the runc container behind podman's back: podman
        notices the exit on its next look, and ``rm`` removes its record."""
        await self._run("container", "cleanup", name, timeout=30, check=False)
        await self.remove(name)


async def not_runc_hint(name: str) -> str:
    """Why a name runc does not know may still be a container here: podman's (whose
    migration is not built yet: refused, nothing touched) or docker's (refused)."""
    if installed() is not None:
        try:
            found = await Podman().inspect(name)
        except RuntimeToolError:
            found = None
        if found is not None:
            return (f"; it is a podman container ({found.id[:12]}, {found.status}): migrate it with --runtime podman "
                    "(or auto); nothing was touched")
    return " (a docker container? tug does not migrate those: tug doctor says why)"


def installed() -> str | None:
    from shutil import which

    return which("podman")


def env_of_host() -> dict[str, str]:
    """The podman configuration variables this process sees (for messages)."""
    return {k: v for k, v in os.environ.items() if k in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")}
