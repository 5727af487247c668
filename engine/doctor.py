"""``tug doctor``: can this host take part in a live migration, and if not, why?

Each check yields a row with a status and, for anything not OK, the fix. The
wording is meant for someone who has never heard of soft-dirty bits.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from tug.engine import proc
from tug.engine.criu import tool as criu
from tug.engine.errors import MigrationError
from tug.engine.hostcfg import HostConfig

OK, WARN, FAIL = "ok", "warn", "FAIL"
PIPE_MAX_WANTED = 16 << 20
# _IOWR('f', 16, struct pm_scan_arg): 12 u64 fields = 96 bytes.
PAGEMAP_SCAN = (3 << 30) | (96 << 16) | (ord("f") << 8) | 16
TCP_REPAIR = 19


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


async def run_checks(destination: str | None = None, *, identity: Path | None = None, known_hosts: Path | None = None) -> list[Check]:
    rows: list[Check] = []
    rows.append(Check(name="root", status=OK if os.geteuid() == 0 else FAIL,
                      detail="running as root" if os.geteuid() == 0 else "not root",
                      fix="" if os.geteuid() == 0 else "run tug as root (CRIU and runc need it)"))
    rows += await _criu_checks()
    rows.append(await _runc_check())
    rows.append(_freezer_check())
    rows.append(await _network_lock_check())
    rows.append(_iptables_check())
    rows.append(_pipe_check())
    rows.append(_pagemap_scan_check())
    rows.append(await _uffd_tracker_check())
    rows.append(_tcp_repair_check())
    rows += await _podman_checks()
    if destination:
        rows += await _ssh_checks(destination, identity, known_hosts)
    return rows


async def _criu_checks() -> list[Check]:
    try:
        binary = criu.criu_binary()
        v = await criu.version()
    except MigrationError as exc:
        return [Check(name="criu", status=FAIL, detail=str(exc), fix="run scripts/setup.sh (builds CRIU 4.2.1)")]
    rows = [Check(
        name="criu version", status=OK if v.supported else FAIL, detail=f"{v} ({binary})",
        fix="" if v.supported else "CRIU < 4.2 cannot dump INET sockets on kernels >= 6.16; run scripts/setup.sh",
    )]
    passed, line = await criu.check()
    rows.append(Check(name="criu check", status=OK if passed else FAIL, detail=line or ("passed" if passed else "failed"),
                      fix="" if passed else "run 'criu check' for details; CRIU 3.x fails on this kernel (vDSO)"))
    rows.append(_kdat_cache_check())
    soft_dirty = await criu.has_feature("mem_dirty_track")
    rows.append(Check(
        name="soft-dirty (mem_dirty_track)", status=OK if soft_dirty else WARN,
        detail="kernel tracks dirty pages: CRIU pre-dump works" if soft_dirty else
        "this kernel has no soft-dirty page tracking (CONFIG_MEM_SOFT_DIRTY is off), so CRIU's pre-dump "
        "cannot find the pages a running container changed; stop-copy works, and pre-copy must use "
        "tug's uffd or content tracker instead",
        fix="" if soft_dirty else "nothing to fix: --tracker auto (the default) picks uffd (below), else content",
    ))
    uffd = await criu.has_feature("uffd-noncoop")
    rows.append(Check(
        name="lazy pages (uffd)", status=OK if uffd else WARN,
        detail="userfaultfd available: post-copy and hybrid possible; as a destination, precopy ends as hybrid here"
        if uffd else "no non-cooperative userfaultfd: no post-copy or hybrid; as a destination, precopy restores eagerly",
        fix="" if uffd else "a kernel with CONFIG_USERFAULTFD is needed for post-copy and hybrid",
    ))
    return rows


#: Where CRIU keeps its kernel-feature cache: tug's build (scripts/setup.sh) or a distribution's.
KDAT_CACHES = (Path("/run/criu/criu.kdat"), Path("/run/criu.kdat"))


def _kdat_cache_check() -> Check:
    """Whether CRIU found its kernel-feature cache (``criu check`` just ran, and writes it where it can)."""
    found = next((p for p in KDAT_CACHES if p.is_file()), None)
    if found is not None:
        return Check(name="criu kernel-feature cache", status=OK, detail=f"{found}: CRIU runs skip re-probing the kernel")
    return Check(
        name="criu kernel-feature cache", status=WARN,
        detail="none: every CRIU run probes the kernel again (15-25 ms measured here; a migration's frozen "
        "window holds three runs)",
        fix="CRIU keeps the cache on a tmpfs only: run scripts/setup.sh (tug's CRIU keeps it in a tmpfs at /run/criu)",
    )


async def _runc_check() -> Check:
    if not shutil.which("runc"):
        return Check(name="runc", status=FAIL, detail="not installed", fix="apt-get install runc (or scripts/setup.sh)")
    res = await proc.run(["runc", "--version"], timeout=10, check=False)
    return Check(name="runc", status=OK, detail=res.out.splitlines()[0] if res.out else "present")


def _freezer_check() -> Check:
    v1 = Path("/sys/fs/cgroup/freezer")
    v2 = Path("/sys/fs/cgroup/cgroup.subtree_control")
    if v1.is_dir() or v2.exists():
        return Check(name="cgroup freezer", status=OK, detail="available: the source stays frozen until commit")
    return Check(name="cgroup freezer", status=FAIL, detail="no freezer cgroup",
                 fix="mount the freezer cgroup (v1) or use cgroup v2: the source must stay frozen, not die")


async def _network_lock_check() -> Check:
    from tug.engine.runtime import netlock

    problem = await asyncio.to_thread(netlock.probe)
    if problem is None:
        return Check(name="network lock", status=OK,
                     detail="tc clsact + u32 + mirred work: frames sent during the freeze are held, then delivered")
    return Check(
        name="network lock", status=FAIL, detail=f"cannot redirect frames with tc ({problem})",
        fix="a kernel with CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_U32 and CONFIG_NET_ACT_MIRRED "
        "is needed to migrate containers with a network endpoint",
    )


def _iptables_check() -> Check:
    tools = [t for t in ("iptables", "nft") if shutil.which(t)]
    if tools:
        return Check(name="iptables/nft", status=OK, detail=f"{', '.join(tools)} present (a pod's loopback hold; CRIU's "
                     "own network lock where tug does not hold the container's network)")
    return Check(name="iptables/nft", status=FAIL, detail="neither iptables nor nft found",
                 fix="apt-get install iptables (CRIU needs it to dump established TCP connections)")


def _pipe_check() -> Check:
    try:
        size = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except OSError:
        return Check(name="pipe-max-size", status=WARN, detail="unreadable")
    good = size >= PIPE_MAX_WANTED
    return Check(
        name="pipe-max-size", status=OK if good else WARN, detail=f"{size} bytes",
        fix="" if good else f"echo {PIPE_MAX_WANTED} > /proc/sys/fs/pipe-max-size "
        "(CRIU's lazy-pages page server fails without it when CAP_SYS_RESOURCE is missing)",
    )


async def _uffd_tracker_check() -> Check:
    """Run the uffd tracker for real on a throwaway process (what --tracker auto does)."""
    from tug.engine.source.trackers.uffd import probe_now

    why = await probe_now()
    return Check(
        name="uffd tracker", status=OK if not why else WARN,
        detail="userfaultfd WP_ASYNC + PAGEMAP_SCAN work on a test process: pre-copy without a shadow copy"
        if not why else f"does not work here ({why}); pre-copy falls back to the content tracker",
    )


def _pagemap_scan_check() -> Check:
    """Probe the PAGEMAP_SCAN ioctl (Linux >= 6.7) used by the content tracker."""
    buf = (ctypes.c_uint64 * 12)()
    buf[0] = 96  # size
    try:
        with open("/proc/self/pagemap", "rb") as f:
            fcntl.ioctl(f.fileno(), PAGEMAP_SCAN, buf)
        ok = True
    except OSError as exc:
        ok = exc.errno != errno.ENOTTY
    return Check(
        name="PAGEMAP_SCAN", status=OK if ok else WARN,
        detail=("ioctl available" if ok else "not available (kernel < 6.7)")
        + "; tug's content tracker does not need it (it compares page contents with what it sent)",
    )


def _tcp_repair_check() -> Check:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        return Check(name="tcp repair", status=OK, detail="TCP_REPAIR works: established connections can migrate")
    except OSError as exc:
        return Check(name="tcp repair", status=WARN, detail=f"TCP_REPAIR refused ({exc.strerror})",
                     fix="needs CAP_NET_ADMIN; without it use --tcp-close")
    finally:
        s.close()


async def _podman_checks() -> list[Check]:
    """podman's version, OCI runtime, storage and a real checkpoint/restore; docker's stance."""
    from tug.engine.runtime import podmanprobe

    return [Check(name=n, status=s, detail=d, fix=f) for n, s, d, f in await podmanprobe.rows()]


async def _ssh_checks(destination: str, identity: Path | None, known_hosts: Path | None) -> list[Check]:
    from tug.transports import protocol as p
    from tug.transports.session import Session
    from tug.transports.ssh import connect_agent, parse_url

    host = HostConfig.from_env()
    try:
        target = parse_url(destination)
        agent = await connect_agent(target, identity=identity or host.ssh_identity,
                                    known_hosts=known_hosts or host.ssh_known_hosts, connect_timeout=10)
    except MigrationError as exc:
        return [Check(name=f"ssh {destination}", status=FAIL, detail=str(exc), fix="check the URL, key and known_hosts")]
    session = Session(agent.stream, p.Role.SOURCE)
    try:
        peer = await session.start(software="tug-doctor", host=host.name, info={}, timeout=20)
        rows = [Check(name=f"ssh {destination}", status=OK,
                      detail=f"agent on {peer.host}: CRIU {peer.info.get('criu')}, runc {peer.info.get('runc')}")]
        forwarding = await agent.forwarding_allowed()
        rows.append(Check(
            name="ssh TCP forwarding", status=OK if forwarding else WARN,
            detail="allowed: the frozen dump streams to a CRIU page server there" if forwarding else
            "refused by the destination's sshd: stop-copy must dump to files first (--no-stream-dump) "
            "and the soft-dirty pre-copy tracker cannot run",
            fix="" if forwarding else "set 'AllowTcpForwarding local' (or yes) in the destination's sshd_config",
        ))
        return rows
    except MigrationError as exc:
        tail = agent.stderr_tail()
        return [Check(name=f"ssh {destination}", status=FAIL, detail=f"agent did not start: {exc}",
                      fix=tail[-1] if tail else "is tug installed at the same path on the destination? see --agent-command")]
    finally:
        await session.close()
        await agent.close()


def render(rows: list[Check]) -> str:
    w1 = max(len(r.name) for r in rows)
    lines = [f"{'check'.ljust(w1)}  status  detail", f"{'-' * w1}  ------  ------"]
    for r in rows:
        lines.append(f"{r.name.ljust(w1)}  {r.status.ljust(6)}  {r.detail}")
        if r.fix:
            lines.append(f"{''.ljust(w1)}          fix: {r.fix}")
    return "\n".join(lines)


def verdict(rows: list[Check]) -> bool:
    return all(r.status != FAIL for r in rows)


def run_sync(destination: str | None = None, **kw: Path | None) -> list[Check]:
    return asyncio.run(run_checks(destination, **kw))
