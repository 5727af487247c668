"""One migration, source side: the phases, the commit point, the rollback.

:class:`Migration` is the single owner of the phase machine. Each phase runs
under its own deadline; any failure before the commit point rolls back under
``asyncio.shield`` (resume the frozen source, tell the agent to discard what
it received) so neither a timeout nor Ctrl-C can leave the source frozen.

Commit protocol: the agent restores and answers (downtime ends there), then
the source sends ``commit`` and waits for the acknowledgement. Only then is
the frozen source deleted. If that acknowledgement is lost we cannot know
whether the destination kept the container, so the source is left frozen (not
resumed, not deleted) and the error says so: a duplicate or a lost container
would both be worse than a paused one.

The driver knows no strategy by name (:mod:`.strategies`): it asks the
strategy whether rounds run before the freeze, where the frozen dump's
memory goes (a CRIU page server on the destination, started and forwarded
before the freeze; tug's filtering page server here; or local files) and how
the destination restores.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tug.engine.criu import tool as criu
from tug.engine.criu.pageserver import RemotePageServer
from tug.engine.criu.stats import criu_dump_steps
from tug.engine.errors import (
    MigrationError,
    PhaseTimeoutError,
    PreconditionError,
    RanThenFailed,
    TransportError,
    primary_error,
)
from tug.engine.events import Event, MigrationReport, Note, PhaseFinished, PhaseStarted
from tug.engine.fsutil import private_dir, remove_tree
from tug.engine.hostcfg import HostConfig
from tug.engine.options import MigrationOptions
from tug.engine.phases import Phase, PhaseMachine
from tug.engine.progress import Meter
from tug.engine.runtime.endpoint import SourceEndpoint, chunk_frames
from tug.engine.runtime.network import EndpointSpec
from tug.engine.runtime.runc import Runc
from tug.engine.source import strategies
from tug.engine.source.container import (
    inspect_container,
    open_session,
    preflight_destination,
    retire_source,
    start_final_page_server,
)
from tug.engine.source.context import SourceContext
from tug.engine.source.failure import FailureHandling
from tug.engine.source.rollback import (
    Destination,
    finish_uncancelled,
)
from tug.engine.source.strategies import RestoreMode
from tug.engine.source.tally import Tally
from tug.engine.source.transfer import send_images_except, sync_rootfs
from tug.transports import protocol as p
from tug.transports.session import Session
from tug.transports.ssh import AgentProcess, parse_url


class Migration(FailureHandling):
    def __init__(
        self, container: str, destination: str, opts: MigrationOptions, on_event: Callable[[Event], None] | None
    ) -> None:
        #: What happens before the freeze, where the frozen dump's memory goes
        #: and how the destination restores: the driver asks, never branches.
        self.strategy = strategies.create(opts)
        self.name = container
        self.target = parse_url(destination)
        self.opts = opts
        self.on_event = on_event
        self.host = opts.host or HostConfig.from_env()
        self.runc = Runc(self.host.runc_root, log_dir=self.host.data_dir / "logs")
        self.machine = PhaseMachine()
        self.tally = Tally()
        self.agent: AgentProcess | None = None
        self.session: Session | None = None
        self.work = self.host.work_dir / f"{container}.out"
        self.bundle: Path | None = None
        self.rootfs_dir: Path | None = None
        self.paused = False
        self.endpoint: EndpointSpec | None = None
        #: The container's network endpoint here, lock made ready before the freeze.
        self.net: SourceEndpoint | None = None
        #: Set once anything was changed on either host; before that a failure
        #: has nothing to undo and its outcome is "aborted", not "rolled-back".
        self.changed = False
        self.rebuild_pages = False
        #: Whether the destination restores lazily (decided in pre-checkpoint).
        self.lazy = False
        #: The destination runs and its memory is still arriving (Phase.FILL follows).
        self.filling = False
        #: What the source knows of the destination's copy (source/rollback.py).
        self.dest = Destination.UNTOUCHED
        #: Set when a failure leaves the source frozen (the one-copy rule).
        self.left_frozen = False
        #: Whether the frozen dump streams its memory to the destination's
        #: page server (decided in pre-checkpoint, once the tracker is known).
        self.stream_dump = False
        #: The destination's page server for the frozen dump, when streaming.
        self.final_ps: RemotePageServer | None = None

    # ---- plumbing -----------------------------------------------------------

    async def _phase(self, phase: Phase, body: Callable[[], Awaitable[None]]) -> None:
        self.machine.advance(phase)
        start = time.monotonic()
        before = self.wire_bytes()
        self.emit(PhaseStarted(phase=phase.value, at_s=start - self.tally.t0))
        seconds = self.opts.timeout(phase.value)
        try:
            async with asyncio.timeout(seconds):
                await body()
        except TimeoutError:
            raise PhaseTimeoutError(phase.value, seconds) from None
        finally:
            self.tally.bytes_by_phase[phase.value] = self.tally.bytes_by_phase.get(phase.value, 0) + self.wire_bytes() - before
        end = time.monotonic()
        self.emit(PhaseFinished(phase=phase.value, at_s=end - self.tally.t0, duration_s=end - start))

    @property
    def s(self) -> Session:
        assert self.session is not None
        return self.session

    # ---- the flow -----------------------------------------------------------

    async def run(self) -> MigrationReport:
        try:
            await self._phase(Phase.PRE_CHECKPOINT, self._pre_checkpoint)
            await self._phase(Phase.PRE_RESTORE, self._pre_restore)
            if self.strategy.has_rounds:
                await self._phase(Phase.PRECOPY, self.strategy.run_rounds)
            await self._phase(Phase.CHECKPOINT, self._checkpoint)
            await self._phase(Phase.TRANSFER, self._transfer)
            await self._phase(Phase.RESTORE, self._restore)
            if self.filling:
                await self._phase(Phase.FILL, self._fill)
            await self._phase(Phase.COMMIT, self._commit)
            self.machine.advance(Phase.DONE)
            return self._report("migrated")
        except BaseException as raised:
            exc = primary_error(raised)
            report, again = await finish_uncancelled(asyncio.ensure_future(self._fail(exc)))
            if again and not isinstance(exc, asyncio.CancelledError):
                exc = asyncio.CancelledError()  # a Ctrl-C during the rollback: it finished first
            if isinstance(exc, MigrationError):
                exc.report = report  # type: ignore[attr-defined]
                if exc is raised:
                    raise
                raise exc from None
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
                # Cancellation propagates as itself; the report rides along so
                # a caller can still tell whether the source was resumed.
                exc.report = report  # type: ignore[union-attr]
                raise
            err = MigrationError(f"internal error: {type(exc).__name__}: {exc}")
            err.report = report  # type: ignore[attr-defined]
            raise err from exc
        finally:
            await finish_uncancelled(asyncio.ensure_future(self._close()))

    async def _pre_checkpoint(self) -> None:
        src = await inspect_container(self.runc, self.name, self.host)
        self.bundle, self.rootfs_dir, self.endpoint = src.bundle, src.rootfs, src.endpoint
        config_raw = src.config_raw
        version = await criu.version()
        if not version.supported:
            raise PreconditionError(f"CRIU {version} here is too old; need >= 4.2 (run 'tug doctor')")
        await self.strategy.preflight()
        self.stream_dump = self.strategy.dump_to_destination

        self.agent, self.session, peer = await open_session(
            self.target, self.opts, self.host, info={"criu": str(version)}, on_notice=self._on_notice
        )
        self.note(f"agent on {peer.host}: CRIU {peer.info.get('criu')}, runc {peer.info.get('runc')}")
        self.strategy.bind(
            SourceContext(
                name=self.name, session=self.session, agent=self.agent, runc=self.runc, work=self.work,
                opts=self.opts, timings=self.tally.timings, emit=self.emit, wire_bytes=self.wire_bytes,
                sync_rootfs=self.sync_rootfs_now, notes=self.tally.notes,
            )
        )

        network = self.endpoint.to_dict() if self.endpoint is not None else None
        pre = await preflight_destination(self.s, self.name, str(version), network)
        lazy_possible = self.opts.lazy_restore and bool(pre.get("lazy_restore"))
        self.lazy = self.strategy.restore_mode(lazy_possible) in (RestoreMode.LAZY_LOCAL, RestoreMode.LAZY_REMOTE)
        if self.opts.lazy_restore and not self.lazy:
            self.note(f"{self.target.host} has no userfaultfd (see tug doctor): its restore loads all memory first")
        self.changed = True
        await self.s.call("prepare", container=self.name, config=config_raw, network=network)
        await self._sync_rootfs(Phase.PRE_CHECKPOINT)

    async def _pre_restore(self) -> None:
        private_dir(self.host.work_dir)
        remove_tree(self.work)  # leftovers of an attempt that died before cleaning up
        self.work.mkdir()
        if self.strategy.page_server_early:
            await self._start_final_page_server(None)
        if self.endpoint is not None:
            assert self.host.network is not None
            self.net = await SourceEndpoint.open(self.host.network, self.name, self.endpoint)
            neighbors = await self.net.neighbors()
            await self.s.call("prepare_network", container=self.name, neighbors=neighbors)

    async def _checkpoint(self) -> None:
        parent = self.strategy.final_parent
        if self.stream_dump and self.final_ps is None:
            await self._start_final_page_server(parent)
        await self.strategy.prepare_final(self.work / "images")
        self.paused = True  # before the call: a half-done pause must still be undone
        self.tally.frozen_at = time.monotonic()
        self.tally.frozen_sent_at_freeze = self.wire_bytes()
        await self.runc.pause(self.name)
        if self.net is not None:
            # After the pause: no process can answer anything any more, and
            # whatever the kernel still sends before this point is older
            # than the dump, TCP timestamps included (see runtime.netlock).
            await self.net.lock()
        t_dump = time.monotonic()

        async def dump(page_server: str | None) -> None:
            await self.runc.checkpoint_frozen(
                self.name,
                image_dir=self.work / "images",
                work_dir=self.work / "criu",
                tcp_established=True,
                page_server=page_server,
                parent_path=parent,
                timeout=self.opts.timeout(Phase.CHECKPOINT.value),
            )

        async with contextlib.AsyncExitStack() as stack:
            if self.final_ps is not None:
                # The pages cross while CRIU dumps: show their progress now.
                meter = Meter(Phase.CHECKPOINT.value, "pages", None, self.emit)
                await stack.enter_async_context(self.final_ps.progress(meter))
            await self.strategy.final_dump(dump, self.final_ps.address if self.final_ps is not None else None)
        self.tally.timings["pause_ms"] = (t_dump - self.tally.frozen_at) * 1000
        self.tally.timings["dump_ms"] = (time.monotonic() - t_dump) * 1000
        self.tally.timings.update(criu_dump_steps(self.work / "criu"))
        st = await self.runc.require(self.name)
        # A dump that goes on serving the memory holds the processes stopped
        # itself (the freezer is thawed meanwhile), until it ends.
        if st.status != "paused" and not self.strategy.dump_keeps_serving:
            raise MigrationError(f"container {self.name!r} is {st.status} after checkpoint; expected paused")

    async def _start_final_page_server(self, parent: str | None) -> None:
        assert self.agent is not None
        self.final_ps = await start_final_page_server(
            self.s, self.agent, self.name, parent, optional=not self.strategy.has_rounds
        )

    async def _transfer(self) -> None:
        # The content tracker's delta already crossed during the dump; the
        # agent rebuilds those pages images from its store.
        rebuilt = self.strategy.rebuilt_pages()

        async def send_images() -> None:
            self.tally.image_bytes = await send_images_except(
                self.s, self.name, self.work / "images", rebuilt, Meter(Phase.TRANSFER.value, "images", None, self.emit)
            )

        async def pages_written() -> None:
            # The page server exits once it has written every page it got.
            assert self.final_ps is not None
            await self.final_ps.finish()
            self.note(f"memory streamed to the CRIU page server on {self.target.host}: {self.final_ps.wire_bytes / 2**20:.1f} MiB")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(send_images())
            tg.create_task(self._sync_rootfs(Phase.TRANSFER))
            if self.final_ps is not None:
                tg.create_task(pages_written())
        self.rebuild_pages = bool(rebuilt)

    async def _restore(self) -> None:
        # What clients sent during the freeze goes along, to be answered by the
        # destination the moment its sockets exist (runtime.netlock).
        frames = self.net.take() if self.net is not None else []
        # Many held frames go ahead in parts; the restore call carries the last.
        *ahead, last = chunk_frames(frames)
        for part in ahead:
            await self.s.call("stage_frames", container=self.name, frames=part)
        # From here until an answer, the destination may run the container.
        self.dest = Destination.UNKNOWN
        try:
            res = await self.s.call(
                "restore",
                container=self.name,
                tcp_close=self.opts.tcp_close,
                rebuild_pages=self.rebuild_pages,
                frames=last,
                lazy=self.lazy,
                **await self.strategy.restore_args(),
            )
        except RanThenFailed:
            self.dest = Destination.RAN
            raise
        except (TransportError, PhaseTimeoutError, asyncio.CancelledError):
            raise  # no answer: still UNKNOWN
        except MigrationError:
            # The agent answers a failed restore only once nothing of it runs.
            self.dest = Destination.UNTOUCHED
            raise
        self.dest = Destination.RAN
        self.tally.running_at = time.monotonic()
        self.tally.wire_at_running = self.wire_bytes()
        self.tally.frozen_bytes = self.wire_bytes() - self.tally.frozen_sent_at_freeze
        if self.net is not None:

            async def deliver(late: list[bytes]) -> int:
                done = 0
                for part in chunk_frames(late):
                    got = await self.s.call("deliver", container=self.name, frames=part)
                    done += int(got.get("delivered", 0))
                return done

            self.tally.held_frames = await self.net.hand_over(len(frames), res, deliver)
        for key in ("restore_ms", "rebuild_ms", "network_up_ms", "criu_restore_ms", "criu_forking_ms"):
            if isinstance(res.get(key), (int, float)):
                self.tally.timings[key] = float(res[key])
        self.note(f"restored on {self.target.host} as pid {res.get('pid')} in {res.get('restore_ms', 0):.0f} ms")
        if self.lazy and not res.get("lazy"):
            self.note("restored eagerly: the pre-copied pages sit in parent images, which CRIU's lazy-pages daemon cannot read")
        elif self.lazy:
            # Running, but its memory is still being filled (the FILL phase):
            # the commit waits for that; the source never resumes now.
            self.filling = True
            return
        self.tally.bytes_after_commit = self.wire_bytes() - self.tally.wire_at_running

    async def _fill(self) -> None:
        settled = await self.s.call("settle", container=self.name, timeout=self.opts.timeout(Phase.FILL.value) + 30)
        self.tally.lazy_fill_ms = float(settled.get("lazy_ms", 0.0))
        self.tally.fill = fill = self.strategy.fill_stats()
        # The destination's lazy-pages daemon logged each fault and when its page
        # landed; a dump that keeps serving (post-copy) answered every one of them.
        if isinstance(settled.get("faults"), int) and self.strategy.dump_keeps_serving:
            fill["remote_faults"] = settled["faults"]
        # A page server that serves from a store and asks the source only for
        # some pages (hybrid) counts which faults went to the source itself.
        for key in ("remote_faults", "store_pages", "source_pages"):
            if isinstance(settled.get(key), int) and self.strategy.dump_keeps_serving:
                fill[key] = settled[key]
        lat = settled.get("fault_latency_ms")
        if isinstance(lat, dict) and all(isinstance(v, (int, float)) for v in lat.values()):
            fill["fault_latency_ms"] = {str(k): float(v) for k, v in lat.items()}
        self.note(f"memory filled in place on {self.target.host} in {self.tally.lazy_fill_ms:.0f} ms")
        if isinstance(settled.get("store_pages"), int):
            self.note(f"the page store served {settled['store_pages']} pages to the fill "
                      f"({settled.get('store_requests')} requests, {settled.get('store_faults')} of them faults)")
        if self.strategy.dump_keeps_serving:
            try:
                await self.strategy.after_fill()
            except MigrationError as exc:
                # The destination has every page: a late error here
                # changes nothing there. The source stays frozen.
                self.note(f"the source's dump ended badly after the fill: {exc}", "warning")
                await self.strategy.release_source()
        self.tally.bytes_after_commit = self.wire_bytes() - self.tally.wire_at_running

    async def _commit(self) -> None:
        ack = await self.s.call("commit", container=self.name)
        self.tally.agent_usage = {k: float(v) for k, v in ack.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # Past the commit point: the destination owns the container. Failures
        # from here on are reported, never rolled back.
        net, self.net = self.net, None
        self.paused = not await retire_source(self.runc, self.name, self.host, self.bundle, net, self.note)

    async def sync_rootfs_now(self) -> None:
        """A rootfs pass in the current phase (pre-copy rounds run one each)."""
        await self._sync_rootfs(self.machine.phase)

    async def _sync_rootfs(self, phase: Phase) -> None:
        assert self.rootfs_dir is not None
        # Once the container is frozen, a file that changes under the sync is
        # an error, not something the next pass fixes: there is none.
        self.tally.rootfs_bytes += await sync_rootfs(
            self.s, container=self.name, root=self.rootfs_dir, phase=phase.value, emit=self.emit, note=self.note,
            frozen=self.paused,
        )

    def _on_notice(self, ev: p.Notice) -> None:
        self.emit(Note(level=ev.level, message=f"{self.target.host}: {ev.message}"))

    # ---- failure and cleanup ------------------------------------------------
