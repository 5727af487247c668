"""The frozen source's channels to this agent: hybrid's two, pre-copy's eager push, and who may use them.

After a lazy dump the source's memory stays in its stopped processes, and the
source reaches this agent through reverse forwards over tug's SSH link. Those
forwards listen on this host's loopback, where any local process could
connect: each connection is admitted only if it is this agent's own (or, for
post-copy, root's CRIU lazy-pages daemon).

- hybrid (hybridserver.py): a fault channel and a sweep channel, connected
  before the freeze through relays that survive a lost link;
- pre-copy's eager step (verdicts.py ``PushedMemory``): one channel on which
  the source pushes every page's verdict before the restore. Nothing of the
  container runs before it is complete, so a lost link simply fails the
  migration (the source resumes): no relay.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tug.engine.criu.uncork import peer_is_criu
from tug.engine.destination.hybridserver import HybridPageServer
from tug.engine.destination.incoming import AgentState, Incoming
from tug.engine.destination.relay import Relay
from tug.engine.destination.verdicts import PushedMemory
from tug.engine.errors import ProtocolError
from tug.transports.forward import LOOPBACK


class SourceChannelCalls(AgentState):
    async def _hybrid_server(
        self, inc: Incoming, lazy: bool, rebuild_pages: bool, lazy_source_port: int | None, ports: list[int]
    ) -> int:
        """Hybrid: the daemon asks the agent's page server, which asks the frozen source (hybridserver.py)."""
        if (
            not lazy or rebuild_pages or lazy_source_port is not None or inc.store is None
            or len(ports) != 2 or not all(isinstance(p, int) and 0 < p < 65536 for p in ports)
        ):
            raise ProtocolError(f"a hybrid restore of {inc.name!r} is lazy, from its page store, through two source ports")
        server = inc.store_server
        if isinstance(server, HybridPageServer) and server.source_ports == (ports[0], ports[1]) and server.port:
            return server.port  # connected before the freeze (call_hybrid_connect)
        inc.store_server = server = HybridPageServer(inc.store, inc.name, ports[0], ports[1])
        relays = [Relay(f"the hybrid {what} channel of {inc.name}", port) for what, port in zip(("fault", "sweep"), ports)]
        inc.relays.extend(relays)
        server.relayed = (relays[0].local_socket(), relays[1].local_socket())
        for r in relays:
            await r.connect(r.remote_port)
        return await server.start()

    async def call_hybrid_connect(self, container: str, ports: list[int]) -> dict[str, Any]:
        """Hybrid, before the freeze: connect to the source's two forwards now, not inside the downtime."""
        inc = self._get(container)
        if inc.restoring is not None or inc.restored or inc.store_server is not None or inc.push is not None:
            raise ProtocolError(f"hybrid channels of {container!r} asked for out of turn")
        port = await self._hybrid_server(inc, True, False, None, ports)
        return {"port": port, "relays": [len(inc.relays) - 2, len(inc.relays) - 1]}

    async def call_push_connect(self, container: str, port: int) -> dict[str, Any]:
        """Pre-copy's eager step, before the freeze: connect to the source's push channel now."""
        inc = self._get(container)
        if (
            inc.restoring is not None or inc.restored or inc.push is not None or inc.store_server is not None
            or inc.store is None or not isinstance(port, int) or not 0 < port < 65536
        ):
            raise ProtocolError(f"the pushed memory of {container!r} asked for out of turn")
        inc.push = PushedMemory(inc.store, inc.name, port)
        await inc.push.connect()
        return {}

    async def call_admit_lazy_peer(self, container: str, port: int, peer_port: int) -> dict[str, Any]:
        """Post-copy: may the process at ``127.0.0.1:peer_port`` here fetch the frozen memory?

        The source's reverse forward listens on ``127.0.0.1:port`` of this
        host (sshd holds it), where any local process could connect: only
        root's CRIU (our lazy-pages daemon) is admitted.
        """
        inc = self._get(container)
        if any(peer_port in r.own_ports for r in inc.relays):
            return {"refused": None}  # this agent's own relay (relay.py), which vetted its client
        if inc.push is not None:
            own = await inc.push.is_own(peer_port)
            return {"refused": None if own else "not the agent's own connection to the frozen source"}
        if isinstance(inc.store_server, HybridPageServer):
            # Hybrid: only the agent's own two connections to the frozen source.
            own = await inc.store_server.is_own(peer_port)
            return {"refused": None if own else "not the agent's own connection to the frozen source"}
        if inc.lazy is None or not inc.lazy.remote:
            return {"refused": f"no post-copy restore of {container!r} is waiting for its memory"}
        why = await asyncio.to_thread(peer_is_criu, (LOOPBACK, port), (LOOPBACK, peer_port))
        return {"refused": why}
