"""Container network endpoints: a netns, a veth, an address on a shared L2 segment.

A container's endpoint travels with it: the same IP and the same MAC on the
destination, so peers need no new ARP entry and TCP connections (restored by
CRIU's TCP repair) keep their addresses. The outer end of the veth joins the
host's bridge; on the lab that bridge lives in its own namespace, so the
bridge's netns is configurable (``TUG_BRIDGE``, ``TUG_BRIDGE_NETNS``).

The network lock (what keeps the frozen source's kernel from answering
anything, and what happens to the frames meanwhile) is :mod:`.netlock`. The
destination's link stays down until its restore has finished (a packet
reaching a netns with no socket yet would be answered with a reset), then
comes up and announces the MAC with a gratuitous ARP so the bridge forwards
to the new port at once.

Netlink is spoken through pyroute2; calls block for a few milliseconds, so
async callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tug.engine.errors import ConfigError, NetworkError, PreconditionError

T = TypeVar("T")

SPEC_FILE = "tug-network.json"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MNT_DETACH = 2
# By name: ctypes.util.find_library runs ldconfig -p (a subprocess) per call.
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
SOL_PACKET = 263
PACKET_VNET_HDR = 15
ETH_P_ALL = 0x0003


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSpec:
    """What moves with the container: its address and MAC."""

    address: str  # CIDR, e.g. 10.231.77.101/24
    mac: str

    def to_dict(self) -> dict[str, str]:
        return {"address": self.address, "mac": self.mac}

    @classmethod
    def from_dict(cls, d: Any) -> EndpointSpec:
        if not isinstance(d, dict) or not isinstance(d.get("address"), str) or not isinstance(d.get("mac"), str):
            raise ConfigError(f"malformed network spec: {d!r}")
        try:
            ipaddress.ip_interface(d["address"])
        except ValueError:
            raise ConfigError(f"bad address in network spec: {d['address']!r}") from None
        return cls(address=d["address"], mac=d["mac"].lower())

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.address).ip)

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_interface(self.address).network.prefixlen


def load_spec(bundle: Path) -> EndpointSpec | None:
    path = bundle / SPEC_FILE
    if not path.exists():
        return None
    try:
        return EndpointSpec.from_dict(json.loads(path.read_text()))
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_spec(bundle: Path, spec: EndpointSpec) -> None:
    (bundle / SPEC_FILE).write_text(json.dumps(spec.to_dict()) + "\n")


@dataclass(frozen=True, slots=True, kw_only=True)
class HostNetwork:
    """This host's side of container networking."""

    host: str
    bridge: str
    bridge_netns: str | None  # None: the bridge is in the caller's own netns

    def netns(self, container: str) -> str:
        return f"tug-{self.host}-{container}"

    def netns_path(self, container: str) -> Path:
        return NETNS_DIR / self.netns(container)

    def outer(self, container: str) -> str:
        """Outer veth name: unique per (host, container), within IFNAMSIZ."""
        return "tv" + hashlib.sha1(f"{self.host}/{container}".encode()).hexdigest()[:12]


def netlink_in(netns: str | None, fn: Callable[[Any], T]) -> T:
    """``fn(ipr)`` with a pyroute2 IPRoute whose socket lives in ``netns`` (None: ours).

    pyroute2 can open a namespace itself (``NetNS``, ``IPRoute(netns=...)``)
    but does it by forking a Python child and ending it with SIGTERM; the
    child inherits the event loop's signal wake-up pipe, so the parent's loop
    sees a SIGTERM of its own and a migration would cancel itself. Instead a
    short-lived thread enters the namespace (setns affects only that thread)
    and makes the socket there.
    """

    def work() -> T:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return fn(ipr)

    if netns is None:
        return work()
    return _in_netns(NETNS_DIR / netns, work)


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def add_netns(name: str) -> None:
    """``ip netns add``: a fork+exec, unlike pyroute2's forked Python child (see netlink_in)."""
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        raise NetworkError(f"cannot create network namespace {name}: {res.stderr.strip() or res.returncode}")


def remove_netns(name: str) -> None:
    """Unmount and remove a named network namespace; a missing one is fine."""
    path = NETNS_DIR / name
    if path.exists():
        _LIBC.umount2(str(path).encode(), MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def create(net: HostNetwork, container: str, spec: EndpointSpec, *, up: bool) -> Path:
    """Make the container's netns with eth0 = spec, its veth's outer end on the bridge."""
    name = net.netns(container)
    if net.netns_path(container).exists():
        delete(net, container)

    def plug(br: Any) -> None:
        bridge = _index(br, net.bridge)
        if bridge is None:
            raise PreconditionError(f"bridge {net.bridge!r} not found (TUG_BRIDGE / TUG_BRIDGE_NETNS)")
        outer = net.outer(container)
        with open(net.netns_path(container)) as target:
            br.link("add", ifname=outer, kind="veth", peer={"ifname": "eth0", "net_ns_fd": target.fileno()})
        idx = _index(br, outer)
        br.link("set", index=idx, master=bridge)
        if up:
            br.link("set", index=idx, state="up")

    def configure(ns: Any) -> None:
        ns.link("set", index=_index(ns, "lo"), state="up")
        eth = _index(ns, "eth0")
        ns.link("set", index=eth, address=spec.mac)
        ns.addr("add", index=eth, address=spec.ip, prefixlen=spec.prefixlen)
        ns.link("set", index=eth, state="up")

    try:
        add_netns(name)
        netlink_in(net.bridge_netns, plug)
        netlink_in(name, configure)
    except (PreconditionError, NetworkError):
        delete(net, container)
        raise
    except Exception as exc:  # pyroute2 raises NetlinkError, OSError, ...
        delete(net, container)
        raise NetworkError(f"cannot create the network endpoint of {container!r}: {exc}") from None
    return net.netns_path(container)


def delete(net: HostNetwork, container: str) -> None:
    """Remove the endpoint; missing pieces are fine (idempotent cleanup)."""

    def unplug(br: Any) -> None:
        idx = _index(br, net.outer(container))
        if idx is not None:
            br.link("del", index=idx)

    with contextlib.suppress(Exception):
        netlink_in(net.bridge_netns, unplug)
    remove_netns(net.netns(container))


class Announcer:
    """Gratuitous ARP for the endpoint, from inside its netns, socket made ahead.

    After the move the bridge must learn the MAC's new port at once, and
    peers with the IP cached learn nothing new but refresh. The packet socket
    is made before the freeze (a socket belongs to the netns it was created
    in, so a short-lived thread enters the netns; setns affects only that
    thread), leaving just the sends inside the downtime.
    """

    def __init__(self, netns_path: Path, spec: EndpointSpec, ifname: str = "eth0") -> None:
        mac = bytes.fromhex(spec.mac.replace(":", ""))
        ip = socket.inet_aton(spec.ip)
        arp = b"\x00\x01\x08\x00\x06\x04\x00\x01" + mac + ip + b"\x00" * 6 + ip  # who-has ip tell ip
        self.frame = b"\xff" * 6 + mac + b"\x08\x06" + arp
        self.ip = spec.ip
        self.sock = _in_netns(netns_path, lambda: _packet_socket(ifname))

    def send(self, count: int = 2) -> None:
        try:
            for _ in range(count):
                self.sock.send(self.frame)
        except OSError as exc:
            raise NetworkError(f"gratuitous ARP for {self.ip} failed: {exc}") from None

    def close(self) -> None:
        self.sock.close()


def _packet_socket(ifname: str, *, vnet_hdr: bool = False, receive: bool = False) -> socket.socket:
    """A raw packet socket on ``ifname``; it receives frames only if ``receive``."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL) if receive else 0)
    try:
        if vnet_hdr:
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.bind((ifname, ETH_P_ALL if receive else 0))
    except OSError:
        s.close()
        raise
    return s


def bridge_socket(net: HostNetwork, ifname: str, *, vnet_hdr: bool = False, receive: bool = False) -> socket.socket:
    """A packet socket on an interface in the bridge's network namespace."""
    def make() -> socket.socket:
        return _packet_socket(ifname, vnet_hdr=vnet_hdr, receive=receive)

    if net.bridge_netns is None:
        try:
            return make()
        except OSError as exc:
            raise NetworkError(f"cannot open a packet socket on {ifname}: {exc}") from None
    return _in_netns(NETNS_DIR / net.bridge_netns, make)


#: Neighbour states worth carrying over: the entry has a link-layer address.
NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE, NUD_PERMANENT = 0x02, 0x04, 0x08, 0x10, 0x80
_KNOWN = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT


def read_neighbors(net: HostNetwork, container: str) -> list[dict[str, Any]]:
    """The container's ARP/NDP cache on eth0: part of its state that CRIU does not carry.

    Without it the restored kernel must resolve its peers first, and its
    first attempt happens while the destination's link is still down (the
    window probe CRIU's TCP repair sends on restore), so the answer to a
    client would wait for the neighbour retry timer, a full second.
    """

    def read(ns: Any) -> list[dict[str, Any]]:
        out = []
        for n in ns.get_neighbours(ifindex=_index(ns, "eth0")):
            dst, lladdr = n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR")
            if dst and lladdr and n["state"] & _KNOWN:
                out.append({"family": int(n["family"]), "dst": str(dst), "lladdr": str(lladdr)})
        return out

    try:
        return netlink_in(net.netns(container), read)
    except Exception as exc:  # pyroute2 raises NetlinkError, OSError, ...
        raise NetworkError(f"cannot read the neighbour table of {container!r}: {exc}") from None


def add_neighbors(net: HostNetwork, container: str, entries: list[dict[str, Any]]) -> int:
    """Seed the endpoint's neighbour cache (as STALE: used at once, confirmed on use)."""

    def seed(ns: Any) -> None:
        eth = _index(ns, "eth0")
        for e in entries:
            ns.neigh("replace", family=int(e["family"]), dst=str(e["dst"]), lladdr=str(e["lladdr"]),
                     ifindex=eth, state=NUD_STALE)

    try:
        netlink_in(net.netns(container), seed)
    except Exception as exc:
        raise NetworkError(f"cannot seed the neighbour table of {container!r}: {exc}") from None
    return len(entries)


def enter_netns(netns_path: Path) -> None:
    """Move the *calling thread* into a network namespace (setns is per thread)."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _LIBC.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns_path}")
    finally:
        os.close(fd)


def _in_netns(netns_path: Path, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that has entered ``netns_path``; the process stays put."""
    result: list[T] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            enter_netns(netns_path)
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller below
            errors.append(exc)

    t = threading.Thread(target=work, name="tug-netns")
    t.start()
    t.join()
    if errors:
        if isinstance(errors[0], (NetworkError, PreconditionError)):
            raise errors[0]
        raise NetworkError(f"in network namespace {netns_path}: {errors[0]}")
    return result[0]


def connect_in_netns(netns_path: Path, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP socket connected to ``127.0.0.1:port`` inside ``netns_path``.

    The socket is made by a thread that entered the namespace, and stays in
    it: this process can use it while living elsewhere. Blocking.
    """

    def connect() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.setblocking(False)
        return s

    return _in_netns(netns_path, connect)


def netns_path_in_spec(spec: dict[str, Any]) -> str | None:
    """The network namespace path a runc config joins, if any."""
    for ns in spec.get("linux", {}).get("namespaces", []) or []:
        if ns.get("type") == "network":
            path = ns.get("path")
            return str(path) if path else None
    return None


def set_netns_path_in_spec(spec: dict[str, Any], path: Path) -> None:
    namespaces = spec.setdefault("linux", {}).setdefault("namespaces", [])
    for ns in namespaces:
        if ns.get("type") == "network":
            ns["path"] = str(path)
            return
    namespaces.append({"type": "network", "path": str(path)})
