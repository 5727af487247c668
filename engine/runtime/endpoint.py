"""A container's network endpoint during a migration, on each side.

The pieces (netns and veth, the frame-holding lock, gratuitous ARP, the
neighbour cache) live in ``runtime.network`` and ``runtime.netlock``; this
module puts them in the order a migration needs, once per side, so that the
migration and the agent only say *when*:

* :class:`SourceEndpoint`: opened before the freeze; ``lock()`` just after the
  freezer stopped the processes (frames to the container are held, nothing it
  sends leaves); ``take()`` hands the held frames to the destination; on
  rollback ``unlock()`` delivers every held frame to the resumed source and
  re-announces it; after commit ``remove()`` deletes it, before the lock is
  lifted, so the killed source's sockets cannot reach a peer.
* :class:`DestinationEndpoint`: created in pre-restore with its link down and
  the container's neighbour cache in place; ``before_restore()`` brings the
  link up with arrivals held (what the restored processes send must not meet
  a down link; what arrives must not meet a namespace without sockets);
  ``after_restore()`` delivers the source's frames then its own, and
  announces the MAC; ``cut_off()`` takes the link down before a failed
  restore's container is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tug.engine.errors import MigrationError
from tug.engine.runtime import network as netif
from tug.engine.runtime.netlock import FrameHold, LinkSwitch
from tug.engine.runtime.network import EndpointSpec, HostNetwork

#: Held frames carried by one call (the protocol's frames are 16 MiB at most).
FRAMES_PER_CALL_BYTES = 4 << 20


def chunk_frames(frames: list[bytes], budget: int = FRAMES_PER_CALL_BYTES) -> list[list[bytes]]:
    """``frames`` in order, in chunks of at most ``budget`` bytes (one frame over it goes alone)."""
    chunks: list[list[bytes]] = [[]]
    size = 0
    for f in frames:
        if chunks[-1] and size + len(f) > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(f)
        size += len(f)
    return chunks


class SourceEndpoint:
    def __init__(self, net: HostNetwork, container: str, hold: FrameHold, announcer: netif.Announcer) -> None:
        self.net, self.container = net, container
        self.hold, self.announcer = hold, announcer
        #: True while frames to the container are held (the lock is on).
        self.locked = False
        #: Held frames handed to the destination with the restore call: if
        #: that restore fails they belong to the resumed source again.
        self.in_flight: list[bytes] = []

    @classmethod
    async def open(cls, net: HostNetwork, container: str, spec: EndpointSpec) -> SourceEndpoint:
        hold = await FrameHold.open(net, container)
        try:
            announcer = await asyncio.to_thread(netif.Announcer, net.netns_path(container), spec)
        except BaseException:
            await hold.close()
            raise
        return cls(net, container, hold, announcer)

    async def neighbors(self) -> list[dict[str, Any]]:
        """The container's neighbour cache, for the destination to start with."""
        return await asyncio.to_thread(netif.read_neighbors, self.net, self.container)

    async def lock(self) -> None:
        self.locked = True  # before the call: a half-engaged lock must still be undone
        await self.hold.engage()

    def take(self) -> list[bytes]:
        """Held frames so far, for the destination; kept until :meth:`delivered`."""
        frames = self.hold.take()
        self.in_flight += frames
        return frames

    def delivered(self) -> None:
        self.in_flight = []

    async def hand_over(
        self, sent: int, restore_reply: dict[str, Any], deliver: Callable[[list[bytes]], Awaitable[int]]
    ) -> dict[str, int]:
        """After the destination restored with ``sent`` held frames: what
        arrived here meanwhile goes too (``deliver`` returns how many it
        delivered). Returns the counts for the report."""
        held = sent + int(restore_reply.get("frames_held_here", 0))
        delivered = int(restore_reply.get("frames_delivered", 0))
        self.delivered()
        late = self.take()  # arrived here while the destination restored
        if late:
            delivered += await deliver(late)
            self.delivered()
            held += len(late)
        return {"held": held, "delivered": delivered, "dropped": self.hold.dropped}

    async def unlock(self, returned: list[bytes]) -> dict[str, int]:
        """Rollback: every held frame goes to the resumed source, oldest first."""
        frames = self.in_flight + await self.hold.open_gate() + returned
        self.in_flight = []
        self.locked = False
        delivered = self.hold.inject(frames)
        self.announcer.send()  # the bridge may have learned the MAC on the destination's port
        return {"held": len(frames), "delivered": delivered, "dropped": self.hold.dropped}

    async def remove(self) -> None:
        """After commit: the endpoint goes first, then the lock (module doc)."""
        await asyncio.to_thread(netif.delete, self.net, self.container)
        self.locked = False
        await self.close()

    async def abandon(self) -> None:
        """The source stays frozen behind its lock after tug exits (FrameHold.abandon)."""
        await self.hold.abandon()
        self.announcer.close()

    async def close(self) -> None:
        await self.hold.close()
        self.announcer.close()


class DestinationEndpoint:
    def __init__(self, net: HostNetwork, container: str, spec: EndpointSpec) -> None:
        self.net, self.container, self.spec = net, container, spec
        self.created = False
        self.link: LinkSwitch | None = None
        self.announcer: netif.Announcer | None = None
        self.hold: FrameHold | None = None

    async def prepare(self, neighbors: list[dict[str, Any]] | None) -> float:
        """Create it, link down; returns the ms it took."""
        t0 = time.monotonic()
        path = await asyncio.to_thread(netif.create, self.net, self.container, self.spec, up=False)
        self.created = True
        self.link = await LinkSwitch.open(self.net, self.container)
        self.announcer = await asyncio.to_thread(netif.Announcer, path, self.spec)
        self.hold = await FrameHold.open(self.net, self.container)
        if neighbors:
            await asyncio.to_thread(netif.add_neighbors, self.net, self.container, neighbors)
        return (time.monotonic() - t0) * 1000

    async def before_restore(self) -> None:
        assert self.link is not None and self.hold is not None
        await self.hold.engage(outbound=False)
        await self.link.set(up=True)

    async def after_restore(self, frames: list[bytes]) -> dict[str, int]:
        """The restored sockets exist: held frames in (the source's first), then announce."""
        assert self.hold is not None and self.announcer is not None
        t0 = time.monotonic()
        own = await self.hold.open_gate()
        delivered = self.hold.inject(frames + own)
        self.announcer.send()
        return {"frames_delivered": delivered, "frames_held_here": len(own),
                "network_up_ms": int((time.monotonic() - t0) * 1000)}

    async def open_after_crash(self) -> None:
        """A held copy let go after its agent died: the frame hold that agent
        left engaged goes (opening one clears a crashed run's), and the MAC
        is announced from here."""
        hold = await FrameHold.open(self.net, self.container)
        await hold.close()
        announcer = await asyncio.to_thread(netif.Announcer, self.net.netns_path(self.container), self.spec)
        try:
            announcer.send()
        finally:
            announcer.close()

    def deliver(self, frames: list[bytes]) -> int:
        if self.hold is None:
            raise MigrationError(f"no network endpoint for {self.container!r} to deliver frames to")
        return self.hold.inject(frames)

    def take_held(self) -> list[bytes]:
        """For a rollback: what was held here goes back to the source."""
        return self.hold.take() if self.hold is not None else []

    async def cut_off(self) -> None:
        """Link down: a container about to be killed must not reset its peers' connections."""
        if self.link is not None:
            with contextlib.suppress(MigrationError):
                await self.link.set(up=False)

    async def close(self) -> None:
        """Release the handles (the endpoint itself stays: it is the container's now)."""
        if self.link is not None:
            await self.link.close()
        if self.hold is not None:
            await self.hold.close()
        if self.announcer is not None:
            self.announcer.close()
        self.link = self.hold = self.announcer = None

    async def remove(self) -> None:
        await self.close()
        if self.created:
            await asyncio.to_thread(netif.delete, self.net, self.container)
