"""The agent's calls for ``tug recover``: what this host holds of a container, and adopting it.

Kept apart from the migration's own calls: recover runs in a fresh agent,
usually after the migration's agent died, and reads only what that one left
on disk (the bundle's marker, runc's state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tug.engine.destination import podmanstage
from tug.engine.destination.incoming import HELD, INCOMING_MARKER, AgentState, check_name, held_until
from tug.engine.errors import PreconditionError
from tug.engine.procfs import thread_state
from tug.engine.runtime import network as netif
from tug.engine.runtime import podloop
from tug.engine.runtime.endpoint import DestinationEndpoint


class RecoverCalls(AgentState):
    async def call_inspect(self, container: str) -> dict[str, Any]:
        """What this host holds of ``container``, for ``tug recover``. Changes nothing."""
        check_name(container)
        status = await podmanstage.status_here(self.runc, self.host, container)
        text = marker_of(self.host.bundle_dir(container))
        until = held_until(text)
        if status == "running" and until is not None:
            status = HELD  # restored with its processes stopped: it never ran
        return {
            "status": status,
            "bundle": self.host.bundle_dir(container).exists(),
            "marker": text,
            "held_until": until,
            "migrating": container in self.incoming,
        }

    async def call_adopt(self, container: str) -> dict[str, Any]:
        """``tug recover`` finishes a migration: a kept copy becomes this host's for good.

        A copy held stopped for its group (its agent died before releasing
        it) is let go here: recover asks only once the group's last member
        runs on this host. A frame hold its dead agent left engaged (frames
        for the container redirected into a sink nobody reads) is removed, and
        so is a pod's loopback hold (runtime/podloop.py).
        """
        check_name(container)
        if await podmanstage.status_here(self.runc, self.host, container) != "running":
            raise PreconditionError(f"{self.host.name} does not run {container!r}: nothing to adopt")
        bundle = self.host.bundle_dir(container)
        if container not in self.incoming:
            # Its agent died (recover runs in a fresh one): a held copy was
            # never let go, and any copy's frame hold may still be engaged.
            # So was one whose agent died after attaching its SysV segments and
            # before letting it go (destination/sysvattach.py): stopped, restoring.
            marker = marker_of(bundle)
            if held_until(marker) is not None or (marker == "restoring" and await self._any_stopped(container)):
                await self._continue(container)
            spec = netif.load_spec(bundle)
            if spec is not None and self.host.network is not None:
                await DestinationEndpoint(self.host.network, container, spec).open_after_crash()
                # A pod's holder: its loopback may still be held for members' restores (podloop.py).
                await podloop.release(self.host.network.netns_path(container))
        (bundle / INCOMING_MARKER).unlink(missing_ok=True)
        podmanstage.adopted(self.host, container)
        return {"adopted": True}

    async def _any_stopped(self, container: str) -> bool:
        return any(thread_state(pid, pid) == "T" for pid in await self.runc.pids(container))


def marker_of(bundle: Path) -> str | None:
    try:
        return (bundle / INCOMING_MARKER).read_text().strip()
    except OSError:
        return None
