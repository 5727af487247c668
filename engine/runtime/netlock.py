"""The network lock: frames sent to a frozen container are held, then delivered where it runs.

From the freeze until the commit (or the rollback) the source container's
kernel must see nothing: a segment it acknowledged after its dump would be
lost to the destination. Dropping those frames is safe but slow for the
client, whose TCP retransmits with exponential backoff (200 ms, 400, 800 ...):
after a 500 ms freeze its next attempt comes about 1.4 s after the freeze, so
the client would see three times the downtime.

So nothing is dropped. From the freeze on, a tc filter (clsact egress, u32
match-all, mirred redirect) on the outer end of the container's veth sends
every frame the bridge forwards towards the container into a sink veth pair,
where a packet socket holds it. Once the destination has restored the
container and announced its MAC, the held frames are injected into the
destination's endpoint: requests sent during the freeze are answered at once
and the client's retransmission timers never come into play. On rollback they
are injected into the resumed source instead. Either way each frame reaches
exactly one kernel that holds the dumped state.

Frames the frozen source itself sends are redirected into the other end of
the sink and dropped, from the same moment (just after the freezer stopped its
processes, just before the dump). Two reasons. Once the destination has
announced the MAC, a stray retransmission from the old port would make the
bridge learn the MAC there again. And TCP timestamps: CRIU restores a
socket's timestamp clock at the value it had when dumped, so any segment the
source sent after its dump (CRIU's own window probe when it leaves repair
mode, a retransmission) would carry a newer timestamp than the destination's
first ones, and the peer's PAWS check would silently drop the destination's
segments until its clock caught up.

The destination holds frames too, from the moment its link comes up (just
before CRIU restores, so that nothing the restored processes send is lost to a
down link and retransmitted only after TCP's initial 1 s timeout) until its
restore has finished (a frame reaching the namespace before its socket exists
would be answered with a reset). Its link carries the destination's own
frames at once, so the bridge may learn the MAC there early; what clients then
send is held on the destination's side and delivered after the source's.

Frames keep their virtio-net header (``PACKET_VNET_HDR``): a frame from a
local veth carries only a partial checksum and may be a GSO super-frame, and
the header lets the kernel complete both when it injects the frame.

pyroute2's synchronous API runs an asyncio loop of its own, which cannot nest
inside ours (and its netlink transport does not run on uvloop), so each
handle lives on one dedicated thread for its whole life.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from tug.engine.errors import NetworkError
from tug.engine.runtime.network import NETNS_DIR, HostNetwork, add_netns, bridge_socket, enter_netns, netlink_in, remove_netns

T = TypeVar("T")

SOL_PACKET = 263
PACKET_VNET_HDR = 15
ETH_P_ALL = 0x0003
#: clsact's pseudo-parents: frames a device receives, and frames it transmits.
TC_INGRESS = 0xFFFFFFF2
TC_EGRESS = 0xFFFFFFF3
#: What the hold keeps at most; beyond it frames are dropped (and counted):
#: TCP retransmits them, only later.
MAX_HELD_BYTES = 16 << 20


class BridgeNetlink:
    """A pyroute2 handle on the bridge's network namespace, on its own thread."""

    def __init__(self, net: HostNetwork) -> None:
        self.net = net
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tug-netlink")
        self._ipr: Any = None

    async def call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(ipr)`` on the handle's thread; any failure becomes a NetworkError about ``what``."""

        def run() -> T:
            try:
                if self._ipr is None:
                    from pyroute2 import IPRoute

                    # This thread lives in the bridge's netns for good (see
                    # network.netlink_in for why not pyroute2's NetNS).
                    if self.net.bridge_netns is not None:
                        enter_netns(NETNS_DIR / self.net.bridge_netns)
                    self._ipr = IPRoute()
                return fn(self._ipr)
            except NetworkError:
                raise
            except Exception as exc:  # pyroute2 raises NetlinkError, OSError, ...
                raise NetworkError(f"{what}: {exc}") from None

        return await asyncio.wrap_future(self._thread.submit(run))

    async def index(self, ifname: str) -> int:
        def lookup(ipr: Any) -> int:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise NetworkError(f"network interface {ifname} is missing")
            return int(found[0])

        return await self.call(f"looking up {ifname}", lookup)

    async def close(self) -> None:
        def shut(ipr: Any) -> None:
            ipr.close()

        if self._ipr is not None:
            with contextlib.suppress(NetworkError):
                await self.call("closing netlink", shut)
        self._thread.shutdown(wait=False)


class LinkSwitch:
    """The outer end of one container's veth, held open to bring it up in a millisecond.

    Opening is the slow part (importing pyroute2 and entering the bridge's
    netns cost ~150 ms the first time), so it happens before the freeze.
    """

    def __init__(self, nl: BridgeNetlink, container: str, index: int) -> None:
        self._nl, self.container, self._index = nl, container, index

    @classmethod
    async def open(cls, net: HostNetwork, container: str) -> LinkSwitch:
        nl = BridgeNetlink(net)
        try:
            return cls(nl, container, await nl.index(net.outer(container)))
        except BaseException:
            await nl.close()
            raise

    async def set(self, *, up: bool) -> None:
        await self._nl.call(
            f"setting the link of {self.container!r} {'up' if up else 'down'}",
            lambda ipr: ipr.link("set", index=self._index, state="up" if up else "down"),
        )

    async def close(self) -> None:
        await self._nl.close()


class FrameHold:
    """Hold the frames sent to one container's endpoint, then deliver them (module doc)."""

    def __init__(self, nl: BridgeNetlink, net: HostNetwork, container: str) -> None:
        self._nl, self.net, self.container = nl, net, container
        tag = hashlib.sha1(f"{net.host}/{container}".encode()).hexdigest()[:12]
        self.outer = net.outer(container)
        #: The sink pair: held frames go out of ``_sink_in`` and arrive at
        #: ``_sink_out``, where the socket reads them; the frozen source's
        #: own frames go out of ``_sink_out`` and die at ``_sink_in``.
        self._sink_in, self._sink_out = f"th{tag}", f"tH{tag}"
        self._outer_index = 0
        self._sock: socket.socket | None = None
        self._inject: socket.socket | None = None
        self._qdisc = False
        self._engaged = False
        self.frames: list[bytes] = []
        self._bytes = 0
        self.dropped = 0

    @classmethod
    async def open(cls, net: HostNetwork, container: str) -> FrameHold:
        """Everything but the filters, made before the freeze."""
        hold = cls(BridgeNetlink(net), net, container)
        try:
            await hold._prepare()
        except BaseException:
            await hold.close()
            raise
        return hold

    async def _prepare(self) -> None:
        def make_sink(ipr: Any) -> None:
            for name in (self._sink_in, self._sink_out):  # a crashed run's leftovers
                for idx in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=idx)
            ipr.link("add", ifname=self._sink_in, kind="veth", peer={"ifname": self._sink_out})
            for name in (self._sink_in, self._sink_out):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")

        await self._nl.call(f"creating the frame hold of {self.container!r}", make_sink)
        self._outer_index = await self._nl.index(self.outer)
        self._sock = bridge_socket(self.net, self._sink_out, vnet_hdr=True, receive=True)
        self._sock.setblocking(False)
        self._inject = bridge_socket(self.net, self.outer, vnet_hdr=True)

        def qdisc(ipr: Any) -> None:
            with contextlib.suppress(Exception):  # none there is the normal case
                ipr.tc("del", "clsact", self._outer_index)
            ipr.tc("add", "clsact", self._outer_index)

        await self._nl.call(f"preparing tc on {self.outer}", qdisc)
        self._qdisc = True

    async def _redirect(self, parent: int, to: str) -> None:
        sink = await self._nl.index(to)
        await self._nl.call(
            f"redirecting the frames of {self.container!r}",
            lambda ipr: ipr.tc(
                "add-filter", "u32", self._outer_index, parent=parent, protocol=ETH_P_ALL, prio=1,
                target=0x10001, keys=["0x0/0x0+0"],
                action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": sink},
            ),
        )

    async def engage(self, *, outbound: bool = True) -> None:
        """From now on nothing reaches the container (frames are held); with
        ``outbound`` nothing it sends leaves its port either."""
        assert self._sock is not None
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._drain)
        self._engaged = True
        await self._redirect(TC_EGRESS, self._sink_in)
        if outbound:
            await self._redirect(TC_INGRESS, self._sink_out)

    def _drain(self) -> None:
        assert self._sock is not None
        while True:
            try:
                frame = self._sock.recv(1 << 17)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.dropped += 1
                return
            if self._bytes + len(frame) > MAX_HELD_BYTES:
                self.dropped += 1
                continue
            self.frames.append(frame)
            self._bytes += len(frame)

    def take(self) -> list[bytes]:
        """The frames held so far (virtio-net header + frame each), in arrival order."""
        if self._sock is not None:
            self._drain()
        out, self.frames, self._bytes = self.frames, [], 0
        return out

    async def open_gate(self) -> list[bytes]:
        """Frames flow to the container again; returns those held until now.

        The caller injects them (:meth:`inject`), usually after frames that
        are older still, held elsewhere.
        """
        held = self.take()
        await self._remove_filters()
        return held + self.take()  # any that arrived while the filters went

    def inject(self, frames: list[bytes]) -> int:
        """Deliver frames into the container, as if from the bridge."""
        assert self._inject is not None
        return inject(self._inject, frames)

    async def _remove_filters(self) -> None:
        if self._engaged and self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._engaged = False
        if self._qdisc:
            await self._nl.call(f"removing tc from {self.outer}", lambda ipr: ipr.tc("del", "clsact", self._outer_index))
            self._qdisc = False

    async def abandon(self) -> None:
        """Release our handles but leave the filters and the sink in place.

        For a source that a failure leaves frozen (the one-copy rule): after
        tug exits, nothing may reach its kernel, which would acknowledge
        segments its dump does not hold. ``tug recover`` removes them (a new
        :meth:`open` clears a crashed run's leftovers).
        """
        if self._engaged and self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._engaged = False
        for s in (self._sock, self._inject):
            if s is not None:
                s.close()
        self._sock = self._inject = None
        self._qdisc = False
        await self._nl.close()

    async def close(self) -> None:
        """Remove the filters (if still there) and the sink; idempotent, never raises."""
        with contextlib.suppress(NetworkError):
            await self._remove_filters()
        for s in (self._sock, self._inject):
            if s is not None:
                s.close()
        self._sock = self._inject = None

        def remove_sink(ipr: Any) -> None:
            for idx in ipr.link_lookup(ifname=self._sink_in):
                ipr.link("del", index=idx)  # takes its peer along

        with contextlib.suppress(NetworkError):
            await self._nl.call(f"removing the frame hold of {self.container!r}", remove_sink)
        await self._nl.close()


def inject(sock: socket.socket, frames: list[bytes]) -> int:
    """Send frames out of the socket's interface; returns how many went out.

    A frame the kernel refuses (say, one that no longer fits a changed MTU)
    is skipped: TCP retransmits it, which is all dropping costs.
    """
    sent = 0
    for frame in frames:
        try:
            sock.send(frame)
            sent += 1
        except OSError:
            continue
    return sent


def probe() -> str | None:
    """Can this kernel hold frames (clsact, u32, mirred)? None if yes, else why not.

    Tried for real in a throwaway network namespace, which is the only
    reliable test: the features are config options, often modules, and
    minimal kernels (this project's CI among them) leave some out.
    """
    import os

    name = f"tug-probe-{os.getpid()}"

    def attempt(ns: Any) -> None:
        ns.link("add", ifname="p0", kind="veth", peer={"ifname": "p1"})
        p0, p1 = ns.link_lookup(ifname="p0")[0], ns.link_lookup(ifname="p1")[0]
        ns.tc("add", "clsact", p0)
        ns.tc("add-filter", "u32", p0, parent=TC_EGRESS, protocol=ETH_P_ALL, prio=1, target=0x10001,
              keys=["0x0/0x0+0"], action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": p1})

    try:
        add_netns(name)
        netlink_in(name, attempt)
        return None
    except Exception as exc:  # pyroute2 raises NetlinkError, OSError, ...
        return str(exc) or type(exc).__name__
    finally:
        remove_netns(name)
