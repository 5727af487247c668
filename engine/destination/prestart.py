"""``runc restore`` started before the freeze, its CRIU held at a gate (criu/gate.py).

runc's part of a restore (the Go runtime, the new container's state and
cgroups, the rootfs bind mount CRIU wants, its CRIU version check) took 30-40
ms of the frozen window here, none of it depending on the images. For
post-copy and hybrid the source sends, before the freeze, the one file runc
reads from the images before it starts CRIU: ``descriptors.json``, runc's
record of the container's stdio, which runc writes from its own state before
the dump's CRIU runs (never from what the container did). The agent starts
runc then; its CRIU restore request waits at the gate until the restore call,
with every image in, lets it go.

CRIU reads everything else when it runs: the images, and the restore's CRIU
config file. runc names that file when it starts (the bundle's
``org.criu.config``, which a prestart always sets), and the restore call
writes its final lines (file locks are known only once the source froze)
before it opens the gate.

A prestart nobody lets go (an abort, a lost session, the agent killed) ends
with its gate: the script exits, runc fails and removes the container it had
begun; no CRIU ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from tug.engine.criu.gate import REQ_RESTORE, CriuGate
from tug.engine.criu.tool import check_criu_opts
from tug.engine.destination import criuconf
from tug.engine.destination.incoming import AgentState, Incoming, PrestartedRestore
from tug.engine.errors import MigrationError, ProtocolError

log = logging.getLogger("tug.agent")

#: The largest descriptors.json accepted (runc's has three short paths).
MAX_DESCRIPTORS = 64 << 10


class PrestartCalls(AgentState):
    async def call_restore_prestart(
        self, container: str, descriptors: bytes, tcp_close: bool = False, lazy: bool = False,
        criu_opts: list[str] | None = None,
    ) -> dict[str, Any]:
        """Start ``runc restore`` now, its CRIU held until the restore call (module doc)."""
        inc = self._get(container)
        if inc.prestart is not None or inc.restoring is not None or inc.restored:
            raise ProtocolError(f"{container!r} is being or was restored already")
        if inc.podman is not None or inc.netns_of is not None or inc.ipc_of is not None:
            raise ProtocolError(f"{container!r}: only a lone runc container's restore starts early")
        if not isinstance(descriptors, bytes) or len(descriptors) > MAX_DESCRIPTORS:
            raise ProtocolError("restore_prestart: descriptors must be bytes of at most 64 KiB")
        try:
            fds = json.loads(descriptors)
        except ValueError:
            fds = None
        if not (isinstance(fds, list) and all(isinstance(x, str) for x in fds)):
            raise ProtocolError("restore_prestart: descriptors is not runc's list of stdio paths")
        options = check_criu_opts(criu_opts or []) + (["tcp-close"] if tcp_close else [])
        inc.images.mkdir(parents=True, exist_ok=True)
        (inc.images / "descriptors.json").write_bytes(descriptors)
        # runc names this file to CRIU when it starts: it must be there now,
        # and the restore call writes its final lines (module doc).
        own = criuconf.write_restore_config(inc.bundle, inc.name, options)
        gate = CriuGate(inc.criu_work / "gate", hold=REQ_RESTORE)
        gate.make()
        task = asyncio.create_task(self.runc.restore_detached(
            container, bundle=inc.bundle, image_dir=inc.images, work_dir=inc.criu_work,
            tcp_established=not tcp_close, lazy_pages=lazy, net_held=inc.endpoint is not None, gate=gate,
        ), name=f"tug-prestart-{container}")  # fmt: skip
        inc.prestart = PrestartedRestore(gate, task, not tcp_close, lazy, own)
        if not await gate.held_before(task, 30):
            inc.prestart = None
            await gate.abandon(task)
            criuconf.keep_own_lines(inc.bundle, own)
            exc = task.exception() if task.done() and not task.cancelled() else None
            raise MigrationError(f"runc restore of {container!r} did not reach its CRIU gate: {exc or 'timed out'}")
        return {"prestarted": True}


async def abandon_prestart(inc: Incoming, *, keep_own_lines: bool = True) -> None:
    """A prestart never let go ends here (idempotent). Cleanup puts the
    container's own CRIU config lines back; a restore that runs without it
    (``keep_own_lines=False``) keeps the lines it wrote."""
    pre, inc.prestart = inc.prestart, None
    if pre is not None:
        await pre.gate.abandon(pre.task)  # runc fails and removes what it began
        if keep_own_lines:
            with contextlib.suppress(OSError):
                criuconf.keep_own_lines(inc.bundle, pre.own)


def prestart_fits(inc: Incoming, tcp_close: bool, lazy: bool) -> bool:
    """Whether the prestarted runc (if any) was started as this restore wants
    (a pre-copy whose pages sit in parent images restores eagerly after all)."""
    pre = inc.prestart
    return pre is not None and pre.tcp_established == (not tcp_close) and pre.lazy == lazy
