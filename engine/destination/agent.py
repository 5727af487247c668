"""The destination agent: ``python -m tug.engine.agent``, started over SSH.

It speaks the tug protocol on stdin/stdout, obeys the source, and reports.
It owns everything it creates on this host until the source commits: if the
session ends before commit (source crashed, link lost, rollback), the agent
removes the bundle, the images and any container it restored, and kills and
reaps any CRIU page server it started, so a failed migration leaves nothing
behind here (no process, no listening port).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any

from tug.engine.criu import tool as criu
from tug.engine.criu.pageserver import NOT_FLUSHED
from tug.engine.destination import podmanstage
from tug.engine.destination.incoming import (
    INCOMING_MARKER,
    KEPT,
    Incoming,
    check_name,
    held_until,
    stop_criu_daemons,
    write_marker,
)
from tug.engine.destination.leftovers import kill_cgroup_of
from tug.engine.destination.prestart import PrestartCalls, abandon_prestart
from tug.engine.destination.reattach import PipeStream, ReattachCalls, attach
from tug.engine.destination.recovercalls import RecoverCalls, marker_of
from tug.engine.destination.restore import RestoreCalls
from tug.engine.destination.staging import StagingCalls
from tug.engine.destination.volumes import remove_created
from tug.engine.errors import MigrationError, PreconditionError, ProtocolError
from tug.engine.fsutil import remove_tree
from tug.engine.hostcfg import HostConfig
from tug.engine.runtime import ipcns
from tug.engine.runtime import network as netif
from tug.engine.runtime.endpoint import DestinationEndpoint, chunk_frames
from tug.engine.runtime.network import EndpointSpec
from tug.transports import protocol as p
from tug.transports.session import Session

log = logging.getLogger("tug.agent")

SOFTWARE = "tug-agent/0.1"
#: Seconds a kept lazy copy may take to get its memory when its session is gone.
KEEP_SETTLE_TIMEOUT = 300.0
#: Seconds a cancelled restore gets to stop (CRIU is asked, then killed).
CANCEL_TIMEOUT = 30.0


class Agent(StagingCalls, RestoreCalls, PrestartCalls, RecoverCalls, ReattachCalls):
    """Dispatch, preflight, abort and cleanup; the call groups do the rest."""

    # ---- dispatch ----------------------------------------------------------

    async def handle_call(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        fn = getattr(self, f"call_{method}", None)
        if fn is None:
            raise ProtocolError(f"agent has no method {method!r}")
        log.info("call %s %s", method, {k: v for k, v in args.items() if not isinstance(v, (bytes, list))})
        result: dict[str, Any] = await fn(**args)
        return result

    # ---- calls -------------------------------------------------------------

    async def call_preflight(
        self, container: str, criu_version: str, cpuinfo: bytes = b"", network: dict[str, Any] | None = None,
        podman: Any = None,
    ) -> dict[str, Any]:
        """Can this host take ``container``? Nothing is changed here."""
        check_name(container)
        if podman is not None:  # its image is here, its name free in podman (destination/podmanstage.py)
            await podmanstage.preflight(container, podman)
        if network is not None:
            EndpointSpec.from_dict(network)
            if self.host.network is None:
                raise PreconditionError(
                    f"{container!r} has a network endpoint, but {self.host.name} has no bridge for it (set TUG_BRIDGE)"
                )
            if self.host.network.netns_path(container).exists() and not self.host.bundle_dir(container).exists():
                raise PreconditionError(f"destination {self.host.name} already has network namespace {self.host.network.netns(container)}")
        if os.geteuid() != 0:
            raise PreconditionError(f"the agent on {self.host.name} is not root")
        version = await criu.version()
        if not version.supported:
            raise PreconditionError(f"CRIU {version} on {self.host.name} is too old; need >= 4.2")
        runc_version = await self.runc.version()
        if await self.runc.state(container) is not None:
            raise PreconditionError(f"destination {self.host.name} already runs a container named {container!r}")
        bundle = self.host.bundle_dir(container)
        if bundle.exists() and not (bundle / INCOMING_MARKER).exists():
            raise PreconditionError(f"destination {self.host.name} already has a bundle for {container!r} at {bundle}")
        if cpuinfo:
            with tempfile.TemporaryDirectory(prefix="tug-cpuinfo-") as d:
                Path(d, "cpuinfo.img").write_bytes(cpuinfo)
                problem = await criu.cpuinfo_check(Path(d))
            if problem:
                raise PreconditionError(f"CPU of {self.host.name} cannot run this dump: {problem}")
        return {
            "host": self.host.name, "criu": str(version), "runc": runc_version, "bundle": str(bundle),
            # Can restores here run before their memory is in place (lazypages.py)?
            "lazy_restore": await criu.has_feature("uffd-noncoop"),
        }

    async def call_abort(self, container: str) -> dict[str, Any]:
        """Roll back what did not run; keep what ran (the one-copy rule).

        A restore still running is cancelled first, so none can finish after
        this answer. A copy whose processes ran is kept (clients may have
        been answered by it, so the source stays frozen) and the answer says
        so with ``ran``; otherwise everything is removed. The answer carries
        the frames held here (they go back to the source) and which page
        servers had died on their own.
        """
        inc = self.incoming.get(container)
        if inc is None:
            return {"aborted": False, "ran": False, "frames": [], "page_servers": []}
        await _cancel_restore(inc)
        # They go back in the answer, which has to fit in one frame: the
        # newest beyond that are dropped (their senders retransmit).
        frames = chunk_frames(inc.endpoint.take_held() if inc.endpoint is not None else [])[0]
        if inc.ran and not inc.broken:
            await self._guarded(inc.name, self._keep(inc))
            return {"aborted": False, "ran": True, "frames": frames, "page_servers": []}
        failed = await self._cleanup(inc)
        return {"aborted": True, "ran": inc.ran, "frames": frames, "page_servers": failed}

    async def call_discard(self, container: str) -> dict[str, Any]:
        """``tug recover`` undoes a migration: whatever of it is here and does not run goes."""
        check_name(container)
        st = await self.runc.state(container)
        bundle = self.host.bundle_dir(container)
        held = held_until(marker_of(bundle)) is not None
        if st is not None and st.status == "running" and not held:
            raise PreconditionError(f"{self.host.name} runs {container!r}: refusing to discard it")
        if bundle.exists() and not (bundle / INCOMING_MARKER).exists():
            raise PreconditionError(f"{bundle} is not a migration's leftover (no {INCOMING_MARKER}): left alone")
        inc = self.incoming.get(container)
        if inc is None:  # a migration of an earlier session (this agent is new)
            inc = Incoming(name=container, bundle=bundle, work=self.host.work_dir / container)
            await podmanstage.leftover(inc)  # its podman container goes too
            spec = netif.load_spec(bundle) if bundle.exists() else None
            if spec is not None and self.host.network is not None:
                inc.endpoint = DestinationEndpoint(self.host.network, container, spec)
                inc.endpoint.created = True
        await _cancel_restore(inc)
        await self._cleanup(inc)
        return {"discarded": True}

    # ---- cleanup -----------------------------------------------------------

    async def _cleanup(self, inc: Incoming) -> list[str]:
        """:meth:`_cleanup_now`, run to its end even if the call asking for it
        is cancelled (its session closing cancels every call in flight)."""
        result: list[str] = await self._guarded(inc.name, self._cleanup_now(inc))
        return result

    async def _guarded(self, name: str, aw: Coroutine[Any, Any, Any]) -> Any:
        task = self._finishing.get(name)
        if task is None or task.done():
            task = self._finishing[name] = asyncio.ensure_future(aw)
        else:
            aw.close()  # the same work is under way already
        return await asyncio.shield(task)

    async def _cleanup_now(self, inc: Incoming) -> list[str]:
        """Undo everything done for an uncommitted container.

        Returns how page servers that died on their own ended (their logs
        are kept); a server whose client merely went away is not news.
        """
        self.incoming.pop(inc.name, None)
        await abandon_prestart(inc)  # a runc restore never let go fails, cleaning up after itself
        failed: list[str] = []
        for ps in inc.page_servers.values():
            if ps.failed_on_its_own and not ps.reported:
                err = ps.failure(kept_log=self._keep_log(inc, ps.log.name))
                if not any(NOT_FLUSHED in ln for ln in err.error_lines):
                    failed.append(str(err))
        await stop_criu_daemons(inc)
        if inc.store is not None:
            inc.store.close()
        if inc.committed:
            if inc.endpoint is not None:
                await inc.endpoint.close()
            return failed
        # Every step is attempted whatever the others do (another agent may
        # have removed part of it already): the files always go last.
        try:
            if inc.endpoint is not None:
                # Cut off first: the killed container's sockets would send resets
                # to peers the resumed source still talks to.
                await _step(f"cutting off {inc.name}", inc.endpoint.cut_off())
            await _step(f"deleting {inc.name}", self._delete_container(inc.name))
            if inc.podman_made:
                await _step(f"removing podman's {inc.name}", podmanstage.remove(self.host, inc))
            # runc knows only what it started: a killed restore can leave CRIU's
            # own processes in the container's cgroup.
            await _step(f"emptying the cgroup of {inc.name}", kill_cgroup_of(self.host, inc.name))
            if inc.endpoint is not None:
                await _step(f"removing the endpoint of {inc.name}", inc.endpoint.remove())
            # A pod's IPC namespace made here goes with the last of its members.
            if await ipcns.drop_if_unused(inc.bundle, self.host.data_dir, self.runc) and inc.ipc_of is not None:
                self.ipc_made.pop(inc.ipc_of, None)
                self.ipc_filled.discard(inc.ipc_of)
        finally:
            remove_created(inc.bundle)  # copied volumes made outside the bundle
            if podmanstage.bundle_removable(inc):
                shutil.rmtree(inc.bundle, ignore_errors=True)
            remove_tree(inc.work)
        log.info("cleaned up uncommitted %s", inc.name)
        return failed

    async def _delete_container(self, name: str) -> None:
        if await self.runc.state(name) is not None:
            await self.runc.delete(name, force=True)
        if await self.runc.forget(name):
            log.warning("removed the state a killed restore of %s left behind", name)

    async def cleanup_all(self) -> None:
        """The session ended: what did not run goes, what ran is kept (call_abort)."""
        if self.reattach is not None:
            self.reattach.close()
        for inc in list(self.incoming.values()):
            # The source is gone for good: the fill's streams end (an unfinished
            # fill fails, and the guard freezes the copy).
            inc.close_relays()
            await _cancel_restore(inc)
            if inc.ran and not inc.broken and not inc.committed:
                log.warning("session lost after %s ran here: keeping it (the source stays frozen; see tug recover)", inc.name)
                await self._guarded(inc.name, self._keep(inc))
            else:
                await self._cleanup(inc)
        for task in list(self._finishing.values()):  # started by calls the session's end cancels
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def _keep(self, inc: Incoming) -> None:
        """A copy that ran stays, as after a commit but marked uncommitted.

        A lazy restore's memory is still arriving: its daemon must finish
        first (bounded); if that fails the copy is broken and removed.
        """
        if inc.lazy is not None:
            try:
                await inc.lazy.settle(KEEP_SETTLE_TIMEOUT)
            except MigrationError as exc:
                if inc.lazy.remote:
                    # Post-copy without its source: the missing memory exists
                    # only in the frozen source now. Frozen, never running
                    # with holes; tug recover on the source undoes it.
                    log.error("copy of %s lost its source mid-fill (%s): frozen with part of its memory; "
                              "'tug recover %s --to URL' on the source undoes the migration", inc.name, exc, inc.name)
                    inc.broken = True
                    await self._freeze_broken(inc)
                    return
                log.error("kept copy of %s could not get its memory (%s): removing it", inc.name, exc)
                inc.broken = True
                await self._kill_restored(inc)
                await self._cleanup(inc)
                return
        await self._let_go(inc, KEPT)

    async def _let_go(self, inc: Incoming, marker: str) -> None:
        """Stop guarding a copy that stays here (its daemons, store and work dir go; ``marker`` says why)."""
        self.incoming.pop(inc.name, None)
        await stop_criu_daemons(inc)
        if inc.store is not None:
            inc.store.close()
        if inc.endpoint is not None:
            await inc.endpoint.close()
        write_marker(inc.bundle, marker)
        remove_tree(inc.work)


    async def _freeze_broken(self, inc: Incoming) -> None:
        """Keep a copy that ran and cannot get the rest of its memory frozen, for tug recover.

        The fill's guard has frozen it already, or killed it where the cgroup
        v1 freezer cannot take a thread waiting on a page inside a system
        call. Never is it left to run on zero pages.
        """
        if inc.endpoint is not None:
            await inc.endpoint.cut_off()
        st = await self.runc.state(inc.name)
        if st is not None and st.status == "running":  # the fill's guard freezes it first (uffdguard.py)
            try:
                await self.runc.pause(inc.name)
            except MigrationError as exc:
                log.error("could not freeze %s (%s): killing it instead", inc.name, exc)
                await self._kill_restored(inc)
        if inc.lazy is not None:
            self._keep_log(inc, inc.lazy.log.name)
        await self._let_go(inc, "frozen: lost its source mid-fill")


async def _stdio_stream() -> PipeStream:
    """Protocol on the original stdin/stdout; stray prints go to stderr."""
    loop = asyncio.get_running_loop()
    out_fd = os.dup(1)
    os.dup2(2, 1)
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0))
    transport, proto = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(out_fd, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(transport, proto, reader, loop)
    return PipeStream(reader, writer)


async def serve(host: HostConfig | None = None) -> None:
    host = host or HostConfig.from_env()
    agent = Agent(host)
    # The sshd session's end must not end a fill whose link may come back (reattach.py).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stream = await _stdio_stream()
    session = Session(stream, p.Role.AGENT, handler=agent)
    try:
        info = {"criu": str(await criu.version()), "runc": await agent.runc.version(), "pid": os.getpid()}
        while True:
            try:
                await session.start(software=SOFTWARE, host=host.name, info=info)
                await session.wait_closed()
            except MigrationError as exc:
                log.error("session ended: %s", exc)
            new = await agent.await_reattach(session)
            if new is None:
                break
            await session.close()
            session = Session(new, p.Role.AGENT, handler=agent)
    finally:
        await asyncio.shield(agent.cleanup_all())
        await session.close()


def main() -> None:
    host = HostConfig.from_env()
    logs = host.data_dir / "logs"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    with contextlib.suppress(OSError):
        logs.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logs / "agent.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent[%(process)d] %(message)s", handlers=handlers)
    if len(sys.argv) == 3 and sys.argv[1] == "--attach":  # a source reattaching (reattach.py)
        asyncio.run(attach(sys.argv[2]))
        return
    try:
        import uvloop
    except ImportError:  # only the import: an ImportError from inside serve() must surface
        asyncio.run(serve(host))
        return
    uvloop.run(serve(host))



async def _step(what: str, aw: Awaitable[Any]) -> None:
    try:
        await aw
    except Exception as exc:  # logged; cleanup goes on with the next step
        log.error("cleanup: %s failed: %s", what, exc)


async def _cancel_restore(inc: Incoming) -> None:
    """Stop a restore still running (its CRIU is stopped and reaped) and wait for it."""
    task = inc.restoring
    if task is None or task.done() or task is asyncio.current_task():
        return
    task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(asyncio.shield(task), timeout=CANCEL_TIMEOUT)


if __name__ == "__main__":
    main()
