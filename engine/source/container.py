"""The container to move, as the source host has it, and the session to the
destination's agent: what pre-checkpoint learns before anything changes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tug.engine.criu import tool as criu
from tug.engine.criu.pageserver import RemotePageServer
from tug.engine.errors import ConfigError, ForwardingRefusedError, MigrationError, PreconditionError, TransportError
from tug.engine.hostcfg import HostConfig
from tug.engine.options import MigrationOptions
from tug.engine.runtime import ipcns
from tug.engine.runtime import network as netif
from tug.engine.runtime.endpoint import SourceEndpoint
from tug.engine.runtime.network import EndpointSpec
from tug.engine.runtime.runc import Runc
from tug.engine.source.pod import shared_namespaces
from tug.engine.volumes import Volume, VolumeChoice, classify
from tug.transports import protocol as p
from tug.transports.session import Session
from tug.transports.ssh import AgentProcess, SshTarget, connect_agent

SOFTWARE = "tug/0.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceContainer:
    name: str
    bundle: Path
    #: The rootfs as runc sees it (config.json's root.path, made absolute).
    rootfs: Path
    config_raw: bytes
    #: The network endpoint tug manages for it (None: no network of tug's).
    endpoint: EndpointSpec | None
    #: Its host mounts and how each moves.
    volumes: list[Volume]


async def inspect_container(
    runc: Runc, name: str, host: HostConfig, choices: Mapping[str, VolumeChoice], *, netns_of: str | None = None,
    ipc_of: str | None = None,
) -> SourceContainer:
    """A running container tug can move, or a clear error saying why not
    (a host mount without a mode in ``choices`` is one: tug.engine.volumes).
    ``netns_of``: the member of the group whose network namespace it joins;
    ``ipc_of``: the group's IPC namespace it shares (source/pod.py)."""
    st = await runc.require(name)
    if st.status != "running":
        raise ConfigError(f"container {name!r} is {st.status}; only a running container can be migrated")
    config_raw = runc.visible_spec((st.bundle / "config.json").read_bytes())
    spec = json.loads(config_raw)
    root = Path(spec.get("root", {}).get("path", "rootfs"))
    endpoint = netif.load_spec(st.bundle)
    joined = netif.netns_path_in_spec(spec)
    shared = shared_namespaces(name, spec)
    if shared:
        raise PreconditionError(
            f"container {name!r} shares namespaces with another container ({', '.join(shared)}): CRIU treats only "
            "network namespaces as external, so these would be dumped with each member and restored as copies; "
            "nothing was changed"
        )
    ipc_path = ipcns.path_in_spec(spec)
    if ipc_path and ipcns.host_inode() in (ipcns.inode_of(st.pid), ipcns.inode_at(ipc_path)):
        raise PreconditionError(
            f"container {name!r} joins this host's own IPC namespace ({ipc_path}): its SysV objects are the "
            "host's and cannot move with it; nothing was changed"
        )
    if ipc_path and ipc_of is None:
        raise PreconditionError(
            f"container {name!r} joins IPC namespace {ipc_path}, which no other container of this migration is in: "
            "its SysV objects cannot move with it; nothing was changed"
        )
    if endpoint is None and joined and netns_of is None:
        raise PreconditionError(
            f"container {name!r} joins network namespace {joined}, which tug does not manage "
            f"(no {netif.SPEC_FILE} in its bundle): its network cannot be recreated on the destination"
        )
    if endpoint is not None and host.network is None:
        raise PreconditionError(f"container {name!r} has a network endpoint but TUG_BRIDGE is not set here")
    return SourceContainer(
        name=name, bundle=st.bundle, rootfs=root if root.is_absolute() else st.bundle / root,
        config_raw=config_raw, endpoint=endpoint, volumes=classify(name, spec, choices),
    )


async def open_session(
    target: SshTarget,
    opts: MigrationOptions,
    host: HostConfig,
    *,
    info: dict[str, Any],
    on_notice: Callable[[p.Notice], None],
    agent_command: str | None = None,
    connect_timeout: float | None = None,
    preamble: bytes = b"",
) -> tuple[AgentProcess, Session, p.Hello]:
    """SSH to the destination, start its agent, and greet it.

    ``agent_command``, ``connect_timeout`` override the options' (a reattach,
    engine/source/relink.py, runs the agent's ``--attach`` and writes its
    token as ``preamble`` before the greeting).
    """
    timeout = opts.connect_timeout if connect_timeout is None else connect_timeout
    agent = await connect_agent(
        target,
        identity=opts.identity or host.ssh_identity,
        known_hosts=opts.known_hosts or host.ssh_known_hosts,
        agent_command=agent_command or opts.agent_command,
        connect_timeout=timeout,
    )
    session = Session(agent.stream, p.Role.SOURCE, on_notice=on_notice)
    try:
        if preamble:
            await agent.stream.write(preamble)
        peer = await session.start(software=SOFTWARE, host=host.name, info=info, timeout=timeout + 15)
    except MigrationError as exc:
        tail = [ln for ln in agent.stderr_tail() if ln.strip()]
        hint = f" (agent said: {tail[-1].strip()})" if tail else ""
        with contextlib.suppress(MigrationError):
            await session.close()
        await agent.close()
        raise TransportError(f"the tug agent on {target} did not start: {exc}{hint}") from None
    return agent, session, peer


async def retire_source(
    runc: Runc, name: str, host: HostConfig, bundle: Path | None, net: SourceEndpoint | None, note: Callable[[str, str], None]
) -> bool:
    """After the commit: the frozen source, its endpoint and bundle go.
    Failures are noted, never raised (the destination owns the container
    now). Returns whether the source container is gone."""
    gone = True
    try:
        await runc.delete(name, force=True)
    except MigrationError as exc:
        gone = False
        note(f"could not delete the frozen source container: {exc}", "warning")
    if net is not None:
        await net.remove()
    if bundle is not None and gone:
        await ipcns.drop_if_unused(bundle, host.data_dir, runc)  # a pod's, once its last member left
    if bundle is not None and bundle.parent == host.bundles_dir:
        shutil.rmtree(bundle, ignore_errors=True)
    return gone


async def local_cpuinfo() -> bytes:
    """This host's CPU as CRIU describes it (cpuinfo.img), for the destination to check."""
    with tempfile.TemporaryDirectory(prefix="tug-cpuinfo-") as d:
        return (await criu.cpuinfo_dump(Path(d))).read_bytes()


async def preflight_destination(
    session: Session, name: str, criu_version: str, network: dict[str, Any] | None, cpuinfo: bytes,
    *, podman: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Can the destination take the container (versions, name, CPU)? Changes
    nothing there. An empty ``cpuinfo`` skips the CPU check (a group's CPU
    is checked once, with its first member)."""
    extra: dict[str, Any] = {"podman": podman} if podman is not None else {}
    return await session.call("preflight", container=name, criu_version=criu_version, cpuinfo=cpuinfo, network=network,
                              **extra)


async def start_final_page_server(
    session: Session, agent: AgentProcess, name: str, parent: str | None, *, optional: bool
) -> RemotePageServer:
    """The destination's page server for the frozen dump, and the forward to it.

    Started before the freeze (stop-copy: in pre-restore; pre-copy: once the
    rounds are done and the parent is known), so CRIU's start-up and the
    forward's channel open are not paid in the downtime, and a destination
    that refuses TCP forwarding fails before anything froze. ``optional``:
    the strategy could dump to files instead, which the error then says.
    """
    try:
        return await RemotePageServer.start(session, agent, name, images="images", parent=parent)
    except ForwardingRefusedError as exc:
        if optional:
            raise ForwardingRefusedError(f"{exc} (or migrate with --no-stream-dump)") from None
        raise


@dataclass(frozen=True, slots=True)
class LockHolders:
    """Who holds file locks on this host, as ``/proc/locks`` says."""

    pids: frozenset[int]
    #: Some lock names no pid (OFD locks, -1): the holders' fdinfo decides.
    unattributed: bool

    def __bool__(self) -> bool:
        return bool(self.pids) or self.unattributed


def file_lock_holders() -> LockHolders:
    """One read of ``/proc/locks``: the holders of every lock (waiters are not)."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return LockHolders(frozenset(), False)
    pids: set[int] = set()
    for line in lines:
        fields = line.split()
        if len(fields) > 1 and fields[1] == "->":
            continue  # a waiter, not a holder
        if len(fields) >= 5 and fields[4].lstrip("-").isdigit():
            pids.add(int(fields[4]))
    return LockHolders(frozenset(pids - {-1}), -1 in pids)


def held_file_locks(pids: list[int], holders: LockHolders | None = None) -> bool:
    """Whether any of ``pids`` holds a file lock (POSIX, flock or OFD).

    ``/proc/locks`` (``holders``: read once for several containers) names
    the holder's pid, except for OFD locks: then the processes' fdinfo,
    which lists the locks on each open file, decides.
    """
    if holders is None:
        holders = file_lock_holders()
    if holders.pids.intersection(pids):
        return True
    if not holders.unattributed:
        return False
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                if "\nlock:" in Path(f"/proc/{pid}/fdinfo/{fd}").read_text():
                    return True
            except OSError:
                continue
    return False
