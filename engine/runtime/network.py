"""Container network endpoints: a netns, a veth, an address on a shared L2 segment.

A container's endpoint travels with it: the same IP and the same MAC on the
destination, so peers need no new ARP entry and TCP connections (restored by
CRIU's TCP repair) keep their addresses. The outer end of the veth joins the
host's bridge; on the lab that bridge lives in its own namespace, so the
bridge's netns is configurable (``TUG_BRIDGE``, ``TUG_BRIDGE_NETNS``).

The outer link is also the network lock. From the freeze until commit or
rollback the source's outer link is down: the frozen container's kernel can
neither acknowledge nor reset anything, so no byte is lost or duplicated. The
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
import ctypes.util
import hashlib
import ipaddress
import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PreconditionError

SPEC_FILE = "tug-network.json"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


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


def _ipr(ns: str | None) -> Any:
    from pyroute2 import IPRoute, NetNS

    return NetNS(ns) if ns else IPRoute()


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def create(net: HostNetwork, container: str, spec: EndpointSpec, *, up: bool) -> Path:
    """Make the container's netns with eth0 = spec, its veth's outer end on the bridge."""
    from pyroute2 import netns as pnetns

    name = net.netns(container)
    if net.netns_path(container).exists():
        delete(net, container)
    try:
        pnetns.create(name)
        with _ipr(net.bridge_netns) as br:
            bridge = _index(br, net.bridge)
            if bridge is None:
                raise PreconditionError(f"bridge {net.bridge!r} not found (TUG_BRIDGE / TUG_BRIDGE_NETNS)")
            outer = net.outer(container)
            br.link("add", ifname=outer, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            idx = _index(br, outer)
            br.link("set", index=idx, master=bridge)
            if up:
                br.link("set", index=idx, state="up")
        with _ipr(name) as ns:
            lo = _index(ns, "lo")
            ns.link("set", index=lo, state="up")
            eth = _index(ns, "eth0")
            ns.link("set", index=eth, address=spec.mac)
            ns.addr("add", index=eth, address=spec.ip, prefixlen=spec.prefixlen)
            ns.link("set", index=eth, state="up")
    except PreconditionError:
        delete(net, container)
        raise
    except Exception as exc:  # pyroute2 raises NetlinkError, OSError, ...
        delete(net, container)
        raise PreconditionError(f"cannot create the network endpoint of {container!r}: {exc}") from None
    return net.netns_path(container)


def set_link(net: HostNetwork, container: str, *, up: bool) -> None:
    """Bring the outer end up or down: the network lock."""
    try:
        with _ipr(net.bridge_netns) as br:
            idx = _index(br, net.outer(container))
            if idx is None:
                raise PreconditionError(f"network endpoint of {container!r} is missing ({net.outer(container)})")
            br.link("set", index=idx, state="up" if up else "down")
    except PreconditionError:
        raise
    except Exception as exc:
        raise PreconditionError(f"cannot set the link of {container!r} {'up' if up else 'down'}: {exc}") from None


def delete(net: HostNetwork, container: str) -> None:
    """Remove the endpoint; missing pieces are fine (idempotent cleanup)."""
    from pyroute2 import netns as pnetns

    with contextlib.suppress(Exception):
        with _ipr(net.bridge_netns) as br:
            idx = _index(br, net.outer(container))
            if idx is not None:
                br.link("del", index=idx)
    if net.netns_path(container).exists():
        with contextlib.suppress(Exception):
            pnetns.remove(net.netns(container))


def announce(netns_path: Path, spec: EndpointSpec, ifname: str = "eth0", count: int = 2) -> None:
    """Send gratuitous ARPs for spec from inside the container's netns.

    A socket belongs to the netns it was created in, so a short-lived thread
    enters the netns (setns affects only the calling thread), makes the
    packet socket and sends; the rest of the process is untouched.
    """
    mac = bytes.fromhex(spec.mac.replace(":", ""))
    ip = socket.inet_aton(spec.ip)
    arp = b"\x00\x01\x08\x00\x06\x04\x00\x01" + mac + ip + b"\x00" * 6 + ip  # who-has ip tell ip
    frame = b"\xff" * 6 + mac + b"\x08\x06" + arp
    errors: list[BaseException] = []

    def work() -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
                s.bind((ifname, 0))
                for _ in range(count):
                    s.send(frame)
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)

    t = threading.Thread(target=work, name="tug-garp")
    t.start()
    t.join()
    if errors:
        raise PreconditionError(f"gratuitous ARP for {spec.ip} failed: {errors[0]}")


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
