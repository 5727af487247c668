"""Restoring on the destination, up to the commit point and past it.

The restore runs the container's processes here; until the source commits,
the agent still owns (and on failure removes) everything, and the source
stays frozen. :meth:`RestoreCalls.call_commit` is where the destination takes
the container over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from typing import Any

from tug.engine.criu.stats import criu_restore_steps
from tug.engine.criu.tool import check_criu_opts
from tug.engine.destination import criuconf, podmanstage, sysvattach
from tug.engine.destination.incoming import (
    HELD,
    INCOMING_MARKER,
    Incoming,
    check_name,
    stop_criu_daemons,
    write_marker,
)
from tug.engine.destination.lazypages import LazyPages, fault_latencies, latency_summary
from tug.engine.destination.leftovers import kill_cgroup_of
from tug.engine.destination.prestart import abandon_prestart, prestart_fits
from tug.engine.destination.sourcecalls import SourceChannelCalls
from tug.engine.destination.storeserver import StorePageServer
from tug.engine.destination.volumes import CREATED_FILE
from tug.engine.errors import CriuError, MigrationError, ProtocolError, RanThenFailed
from tug.engine.fsutil import remove_tree
from tug.engine.runtime import podloop
from tug.engine.runtime.podman import PodmanContainer

log = logging.getLogger("tug.agent")


class RestoreCalls(SourceChannelCalls):
    """Calls that run the container here and hand it over."""

    async def call_restore(
        self,
        container: str,
        tcp_close: bool = False,
        rebuild_pages: bool = False,
        frames: list[bytes] | None = None,
        lazy: bool = False,
        lazy_source_port: int | None = None,
        file_locks: bool = False,
        criu_opts: list[str] | None = None,
        hybrid_ports: list[int] | None = None,
        held_until: str | None = None,
        pushed: bool = False,
    ) -> dict[str, Any]:
        """Restore; ``frames`` were held by the source's network lock, to be
        delivered once the restored sockets exist (see runtime.netlock).
        ``lazy``: the processes run before their memory is in place (see
        lazypages.py); :meth:`call_settle` waits for it.

        ``held_until``: a group's member restored before the group's last
        one (so named). Its processes are left stopped (CRIU's
        ``leave-stopped``) and its network gate stays shut until
        :meth:`call_release`, so that until every member is in, nothing of the
        group has run and a failure still rolls the whole group back (the
        source resumes). Its marker names the last member: ``tug recover``
        lets it go if that one runs here, and removes it if not."""
        inc = self._get(container)
        if inc.restoring is not None or inc.restored:
            raise ProtocolError(f"{container!r} is being or was restored already")
        # Nothing runs from files, images or pages that did not arrive whole
        # and verified (a digest or size mismatch fails the migration here,
        # before anything changed: the source resumes).
        inc.check_received()
        inc.restoring = asyncio.current_task()
        try:
            inc.file_locks = file_locks is True
            options = check_criu_opts(criu_opts or [])
            if tcp_close:
                options.append("tcp-close")
            if held_until is not None:
                if inc.prestart is not None:
                    raise ProtocolError(f"{container!r}: a group's member is never prestarted")
                check_name(held_until)
                options.append("leave-stopped")
                inc.held = True
                inc.held_until = held_until
            if inc.ipc_of is not None and inc.ipc_of in self.ipc_filled and await sysvattach.prepare(inc) and not inc.held:
                # Its SysV segments are attached before it runs (sysvattach.py):
                # held by itself until then, so it never ran if that fails.
                options.append("leave-stopped")
                inc.held, inc.held_until = True, inc.name
            if inc.prestart is not None:
                # runc already named the file; CRIU reads it once let go (prestart.py).
                own: list[str] | None = inc.prestart.own
                criuconf.rewrite(inc.bundle, own or [], options + (["file-locks"] if inc.file_locks else []))
            else:
                own = criuconf.write_restore_config(inc.bundle, inc.name, options) if options else None
            try:
                if pushed:
                    other = rebuild_pages or hybrid_ports is not None or lazy_source_port is not None
                    lazy_source_port = await self._rebuild_pushed(inc, lazy, other)
                return await self._restore(inc, tcp_close, rebuild_pages, frames, lazy, lazy_source_port, hybrid_ports)
            finally:
                if own is not None:
                    criuconf.keep_own_lines(inc.bundle, own)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if inc.ran:  # (_restore changed it since the check above)
                # It ran: clients may have been answered by it. Say so, so
                # that the source never resumes on its own (the one-copy
                # rule); a copy that failed half way serves nobody: it goes.
                inc.broken = True
                await self._kill_restored(inc)
                raise RanThenFailed(f"the restored container ran, then failed (it was removed): {exc}") from exc
            # Nothing of it may run once we answer: the source will resume.
            await self._kill_restored(inc)
            raise
        finally:
            inc.restoring = None

    async def _restore(
        self, inc: Incoming, tcp_close: bool, rebuild_pages: bool, frames: list[bytes] | None, lazy: bool,
        lazy_source_port: int | None, hybrid_ports: list[int] | None,
    ) -> dict[str, Any]:
        container = inc.name
        if lazy_source_port is not None and (not lazy or rebuild_pages or not 0 < lazy_source_port < 65536):
            raise ProtocolError(f"a post-copy restore of {container!r} is lazy and needs no page store")
        if hybrid_ports is not None:
            lazy_source_port = await self._hybrid_server(inc, lazy, rebuild_pages, lazy_source_port, hybrid_ports)
        if rebuild_pages:
            if inc.store is None:
                raise ProtocolError("asked to rebuild pages images, but no pages were received")
            t_rebuild = time.monotonic()
            if lazy:
                # The pages stay in the store; the agent serves them to the
                # lazy-pages daemon (storeserver.py): no chain, no copy.
                inc.stats.update(await asyncio.to_thread(inc.store.rebuild_lazy, inc.images))
                inc.store_server = StorePageServer(inc.store, container)
                lazy_source_port = await inc.store_server.start()
            else:
                inc.stats.update(await asyncio.to_thread(inc.store.rebuild, inc.images))
            inc.stats["rebuild_ms"] = int((time.monotonic() - t_rebuild) * 1000)
            log.info("rebuilt pages images of %s: %s", container, inc.stats)
        # Left stopped for tug's SysV attach, it cannot run before tug lets it (sysvattach.py).
        write_marker(inc.bundle, f"{HELD} {inc.held_until}" if inc.sysv else "restoring")
        t0 = time.monotonic()
        # A pod's member: its peers' loopback connections must not be reset
        # by the probes of sockets restored before theirs.
        await self._hold_pod_loopback(inc)
        if inc.endpoint is not None:
            await inc.endpoint.before_restore()
        # CRIU's lazy-pages daemon cannot read pages from parent images (a
        # page it finds in a parent is read but never handed to the faulting
        # process: the restore hangs), so a chained page store restores eagerly.
        lazy = lazy and not (inc.images / "parent").is_symlink()
        inc.stats["lazy"] = int(lazy)
        made = await podmanstage.before_restore(inc) if inc.podman is not None else None
        if lazy:
            inc.lazy = LazyPages(inc.images, inc.criu_work, remote_port=lazy_source_port)
            await inc.lazy.start()
        if made is not None:  # podman restores it, under its own conmon (podmanstage.py)
            return await self._podman_restore(inc, made, t0, frames, not tcp_close)
        try:
            if inc.prestart is not None and not prestart_fits(inc, tcp_close, lazy):
                # Started for another restore: this one runs as usual, with the
                # CRIU config lines call_restore wrote (the same file runc names).
                await abandon_prestart(inc, keep_own_lines=False)
            restoring = inc.prestart.run() if inc.prestart is not None else self.runc.restore_detached(
                container, bundle=inc.bundle, image_dir=inc.images, work_dir=inc.criu_work,
                tcp_established=not tcp_close, lazy_pages=lazy, file_locks=inc.file_locks,
                # Nothing reaches the namespace before its gate opens (held frames,
                # a pod's loopback hold): CRIU's own lock would only repeat it.
                net_held=inc.endpoint is not None or inc.netns_of is not None,
            )
            # A daemon that dies once the processes run must not leave zero pages behind (lazypages.py).
            pid = await (inc.lazy.guarded(restoring, self.runc.root, container) if inc.lazy is not None else restoring)
        except CriuError as exc:
            exc.log_path = self._keep_log(inc, "restore.log") or exc.log_path
            raise
        inc.restored = True
        if inc.ipc_of is not None:
            self.ipc_filled.add(inc.ipc_of)
        steps = criu_restore_steps(inc.criu_work)
        if inc.held:
            write_marker(inc.bundle, f"{HELD} {inc.held_until}")
        if inc.sysv and await sysvattach.attach_restored(inc, await self.runc.pids(container)):
            await self._continue(container)
        if inc.held:
            inc.staged_frames.extend(frames or ())
            st = await self.runc.require(container)
            return {"pid": st.pid, "status": st.status, "held": True,
                    "restore_ms": (time.monotonic() - t0) * 1000, **steps, **inc.stats}
        inc.ran_at = time.monotonic()
        await self._release_pod_loopback(inc)
        inc.stats.update(await self._open_gate(inc, frames))
        return {"pid": pid, "status": "running", "restore_ms": (time.monotonic() - t0) * 1000, **steps, **inc.stats}

    async def _podman_restore(
        self, inc: Incoming, made: PodmanContainer, t0: float, frames: list[bytes] | None, tcp: bool
    ) -> dict[str, Any]:
        with podmanstage.lazy_config(made, inc, inc.lazy is not None):
            restoring = podmanstage.run_restore(inc, made, tcp_established=tcp, file_locks=inc.file_locks)
            try:
                await (inc.lazy.guarded(restoring, made.runc_root, made.id) if inc.lazy is not None else restoring)
            except CriuError as exc:
                exc.log_path = self._keep_log(inc, "restore.log") or exc.log_path
                raise
        pid = await podmanstage.pid_of(inc)
        inc.restored = True
        inc.ran_at = time.monotonic()
        inc.stats.update(await self._open_gate(inc, frames))
        steps = criu_restore_steps(inc.criu_work)
        return {"pid": pid, "status": "running", "restore_ms": (time.monotonic() - t0) * 1000, **steps, **inc.stats}

    async def _rebuild_pushed(self, inc: Incoming, lazy: bool, other_mode: bool) -> int | None:
        """A restore after pre-copy's pushed eager step: every lazy page confirmed by
        the source, then read from the store's chain, or (``lazy``) served from the
        store to the lazy-pages daemon; returns that server's port (pagestore.py)."""
        if other_mode or inc.push is None or inc.store is None:
            raise ProtocolError(f"a restore of {inc.name!r} from pushed memory is its own kind, and needs it connected")
        verdicts = inc.push.complete()
        await inc.push.close()
        t0 = time.monotonic()
        if lazy:
            inc.stats.update(await asyncio.to_thread(inc.store.check_pushed, inc.images, verdicts.confirmed))
            inc.store_server = StorePageServer(inc.store, inc.name)
            port: int | None = await inc.store_server.start()
        else:
            inc.stats.update(await asyncio.to_thread(inc.store.rebuild, inc.images, verdicts.confirmed))
            port = None
        inc.stats.update(rebuild_ms=int((time.monotonic() - t0) * 1000), pushed_pages=verdicts.fetched_pages)
        log.info("pages of %s from pushed memory: %s", inc.name, inc.stats)
        return port

    async def call_release(self, container: str) -> dict[str, Any]:
        """Let a held member run: every member of its group is restored.

        Its processes get SIGCONT (CRIU left each one stopped; a process that
        was itself stopped when dumped is continued too: CRIU's restore
        cannot tell the two apart once ``leave-stopped`` applies), then its
        network gate opens with the frames held meanwhile.
        """
        inc = self._get(container)
        if not inc.held or not inc.restored:
            raise ProtocolError(f"{container!r} is not held here")
        inc.held = False  # from here on, whatever happens, it may have run
        inc.ran_at = time.monotonic()
        write_marker(inc.bundle, "restoring")
        try:
            await self._continue(container)
            await self._release_pod_loopback(inc)
            out = await self._open_gate(inc)
        except Exception as exc:
            inc.broken = True
            await self._kill_restored(inc)
            raise RanThenFailed(f"the restored container could not be let go (it was removed): {exc}") from exc
        st = await self.runc.require(container)
        return {"pid": st.pid, "status": st.status, **out}

    async def _open_gate(self, inc: Incoming, frames: list[bytes] | None = None) -> dict[str, Any]:
        """The restored sockets exist: the frames held here and by the source go in (runtime.netlock)."""
        if inc.endpoint is None:
            return {}
        staged, inc.staged_frames = inc.staged_frames, []
        return await inc.endpoint.after_restore(staged + list(frames or ()))

    async def _hold_pod_loopback(self, inc: Incoming) -> None:
        """A pod's member is about to be restored: its pod's loopback drops TCP
        until the holder runs (podloop.py). Once per pod: the rule is checked
        with a process run, inside the frozen window."""
        if inc.netns_of is not None and inc.netns_of not in self.loop_held:
            assert self.host.network is not None
            await podloop.hold(self.host.network.netns_path(inc.netns_of))
            self.loop_held.add(inc.netns_of)

    async def _release_pod_loopback(self, inc: Incoming) -> None:
        """A pod's holder runs: every member was restored before it (podloop.py)."""
        if inc.name in self.loop_held:
            assert self.host.network is not None
            await podloop.release(self.host.network.netns_path(inc.name))
            self.loop_held.discard(inc.name)

    async def call_settle(self, container: str, timeout: float = 600.0) -> dict[str, Any]:
        """After a lazy restore: wait until the container's whole memory is in place."""
        inc = self._get(container)
        if inc.lazy is None:
            return {"lazy_ms": 0}
        # From its processes running (not from this call: a group's later
        # members run, and fill, before their settle is asked for).
        t0 = inc.ran_at if inc.ran_at is not None else time.monotonic()
        try:
            await inc.lazy.settle(timeout)
        except CriuError as exc:
            exc.log_path = self._keep_log(inc, inc.lazy.log.name) or exc.log_path
            # Its memory will never arrive: the copy is dead weight (its
            # processes wait on faults forever). It ran, so the source stays
            # frozen; tug recover resumes it once it sees this copy gone.
            inc.broken = True
            await self._kill_restored(inc)
            raise
        out: dict[str, Any] = {"lazy_ms": (time.monotonic() - t0) * 1000}
        with contextlib.suppress(OSError):
            lat = fault_latencies(await asyncio.to_thread(inc.lazy.log.read_text, errors="replace"))
            out.update({"faults": len(lat), "fault_latency_ms": latency_summary(lat)})
        if inc.store_server is not None:
            out.update(inc.store_server.stats())
        return out

    async def call_stage_frames(self, container: str, frames: list[bytes]) -> dict[str, Any]:
        """Held frames sent ahead of a restore whose call cannot carry them all."""
        inc = self._get(container)
        if inc.restored or not all(isinstance(f, bytes) for f in frames):
            raise ProtocolError(f"frames for {container!r} staged out of turn")
        inc.staged_frames.extend(frames)
        return {"staged": len(inc.staged_frames)}

    async def call_deliver(self, container: str, frames: list[bytes]) -> dict[str, Any]:
        """Frames sent to the container while it was frozen (see runtime.netlock)."""
        inc = self._get(container)
        if not inc.restored or inc.endpoint is None:
            raise ProtocolError(f"frames for {container!r} before its network is up")
        return {"delivered": inc.endpoint.deliver(frames)}

    async def _kill_restored(self, inc: Incoming) -> None:
        """Every process of the container gone (runc's and any CRIU left in its cgroup)."""
        if inc.endpoint is not None:
            # Cut off first: the killed container's sockets would send resets
            # to peers the source still talks to.
            await inc.endpoint.cut_off()
        with contextlib.suppress(MigrationError):
            if inc.podman_made:
                await podmanstage.remove(self.host, inc)
            elif await self.runc.state(inc.name) is not None:
                await self.runc.delete(inc.name, force=True)
        await kill_cgroup_of(self.host, inc.name)

    async def call_commit(self, container: str) -> dict[str, Any]:
        """The destination now owns the container: stop guarding it for cleanup."""
        inc = self._get(container)
        if not inc.restored:
            raise ProtocolError(f"commit of {container!r} before restore")
        inc.committed = True
        await stop_criu_daemons(inc)
        if inc.store is not None:
            inc.store.close()
        if inc.endpoint is not None:
            await inc.endpoint.close()
        (inc.bundle / INCOMING_MARKER).unlink(missing_ok=True)
        (inc.bundle / CREATED_FILE).unlink(missing_ok=True)  # the copies are the container's now
        if inc.podman is not None and podmanstage.bundle_removable(inc):
            remove_tree(inc.bundle)  # only staging: podman's userdata is the container's bundle now
        remove_tree(inc.work)
        del self.incoming[container]
        return {"committed": True, **_usage()}


def _usage() -> dict[str, float]:
    """This agent's CPU time and peak memory (with its children: runc, CRIU)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_s": me.ru_utime + me.ru_stime,
        "children_cpu_s": kids.ru_utime + kids.ru_stime,
        "max_rss_kib": float(me.ru_maxrss),
    }

