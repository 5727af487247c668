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

The frozen dump's memory takes one of three routes. By default it streams
to a CRIU page server on the destination while CRIU dumps (``stream_dump``;
always with the soft-dirty tracker): dump and transfer of the pages overlap,
and only the small remaining images cross after the dump. The page server is
started, and the SSH forward to it connected, before the freeze. With the
content tracker it goes to tug's own page server on the source (psfilter),
which sends on only the pages that differ from what the rounds sent. With
``--no-stream-dump`` (stop-copy) it goes to a local tmpfs dir whose files are
then sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tug.engine import rootfs
from tug.engine.api import STRATEGIES, MigrationOptions
from tug.engine.criu import tool as criu
from tug.engine.criu.pageserver import RemotePageServer
from tug.engine.errors import (
    ConfigError,
    ForwardingRefusedError,
    MigrationError,
    PhaseTimeoutError,
    PreconditionError,
    RollbackError,
    TransportError,
)
from tug.engine.events import ErrorInfo, Event, MigrationReport, Note, PhaseFinished, PhaseStarted
from tug.engine.fsutil import private_dir, remove_tree
from tug.engine.hostcfg import HostConfig
from tug.engine.phases import Phase, PhaseMachine
from tug.engine.progress import Meter
from tug.engine.runtime import network as netif
from tug.engine.runtime.endpoint import SourceEndpoint
from tug.engine.runtime.network import EndpointSpec
from tug.engine.runtime.runc import Runc
from tug.engine.source.strategies.precopy import Precopy, Rounds, choose_tracker
from tug.engine.source.trackers.softdirty import PreDump
from tug.engine.source.transfer import send_entries
from tug.policies import ConvergencePolicy, PolicySpecError, parse_policy
from tug.transports import protocol as p
from tug.transports.session import Session
from tug.transports.ssh import AgentProcess, connect_agent, parse_url

SOFTWARE = "tug/0.1"


def primary_error(exc: BaseException) -> BaseException:
    """The error a failed TaskGroup stands for: its first MigrationError.

    Phases run concurrent steps in TaskGroups (rootfs sync next to pages or
    images), whose failure arrives as an exception group; the report and
    the CLI want the step's own error (a CriuError with its log), not
    "internal error: ExceptionGroup".
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves: list[BaseException] = []
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack[:0] = list(e.exceptions)
        else:
            leaves.append(e)
    for leaf in leaves:
        if isinstance(leaf, MigrationError):
            return leaf
    return leaves[0] if leaves else exc


class Migration:
    def __init__(
        self, container: str, destination: str, opts: MigrationOptions, on_event: Callable[[Event], None] | None
    ) -> None:
        if opts.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {opts.strategy!r} (available: {', '.join(STRATEGIES)})")
        self.policy: ConvergencePolicy | None = None
        if opts.strategy == "precopy":
            try:
                self.policy = parse_policy(opts.policy) if isinstance(opts.policy, str) else opts.policy
            except PolicySpecError as exc:
                raise ConfigError(f"bad --policy: {exc}") from None
        self.name = container
        self.target = parse_url(destination)
        self.opts = opts
        self.on_event = on_event
        self.host = opts.host or HostConfig.from_env()
        self.runc = Runc(self.host.runc_root, log_dir=self.host.data_dir / "logs")
        self.machine = PhaseMachine()
        self.t0 = time.monotonic()
        self.agent: AgentProcess | None = None
        self.session: Session | None = None
        self.work = self.host.work_dir / f"{container}.out"
        self.bundle: Path | None = None
        self.rootfs_dir: Path | None = None
        self.paused = False
        self.endpoint: EndpointSpec | None = None
        #: The container's network endpoint here, lock made ready before the freeze.
        self.net: SourceEndpoint | None = None
        self.held_frames: dict[str, int] = {}
        #: Set once anything was changed on either host; before that a failure
        #: has nothing to undo and its outcome is "aborted", not "rolled-back".
        self.changed = False
        self.rebuild_pages = False
        #: Whether the destination restores lazily (decided in pre-checkpoint).
        self.lazy = False
        self.lazy_fill_ms: float | None = None
        self.agent_usage: dict[str, float] = {}
        #: Steps inside the frozen window, in ms (pause, dump, rebuild, restore).
        self.timings: dict[str, float] = {}
        self.commit_unconfirmed = False
        self.frozen_at: float | None = None
        self.running_at: float | None = None
        self.frozen_sent_at_freeze = 0
        self.frozen_bytes = 0
        self.bytes_by_phase: dict[str, int] = {}
        self.image_bytes = 0
        self.rootfs_bytes = 0
        self.notes: list[str] = []
        self.precopy: Rounds | None = None
        self.tracker: str | None = None
        #: Whether the frozen dump streams its memory to the destination's
        #: page server (decided in pre-checkpoint, once the tracker is known).
        self.stream_dump = False
        #: The destination's page server for the frozen dump, when streaming.
        self.final_ps: RemotePageServer | None = None
        self._meter: Meter | None = None

    # ---- plumbing -----------------------------------------------------------

    def emit(self, ev: Event) -> None:
        if self.on_event is not None:
            self.on_event(ev)

    def note(self, message: str, level: str = "info") -> None:
        self.notes.append(message)
        self.emit(Note(level=level, message=message))

    def wire_bytes(self) -> int:
        """Payload bytes on the wire so far: the session and every forward."""
        s = self.session
        forwarded = self.agent.forwarded_bytes if self.agent is not None else 0
        return forwarded + (0 if s is None else s.bytes_sent + s.bytes_received)

    async def _phase(self, phase: Phase, body: Callable[[], Awaitable[None]]) -> None:
        self.machine.advance(phase)
        start = time.monotonic()
        before = self.wire_bytes()
        self.emit(PhaseStarted(phase=phase.value, at_s=start - self.t0))
        seconds = self.opts.timeout(phase.value)
        try:
            async with asyncio.timeout(seconds):
                await body()
        except TimeoutError:
            raise PhaseTimeoutError(phase.value, seconds) from None
        finally:
            self.bytes_by_phase[phase.value] = self.bytes_by_phase.get(phase.value, 0) + self.wire_bytes() - before
        end = time.monotonic()
        self.emit(PhaseFinished(phase=phase.value, at_s=end - self.t0, duration_s=end - start))

    @property
    def s(self) -> Session:
        assert self.session is not None
        return self.session

    # ---- the flow -----------------------------------------------------------

    async def run(self) -> MigrationReport:
        try:
            await self._phase(Phase.PRE_CHECKPOINT, self._pre_checkpoint)
            await self._phase(Phase.PRE_RESTORE, self._pre_restore)
            if self.precopy is not None:
                await self._phase(Phase.PRECOPY, self.precopy.run)
            await self._phase(Phase.CHECKPOINT, self._checkpoint)
            await self._phase(Phase.TRANSFER, self._transfer)
            await self._phase(Phase.RESTORE, self._restore)
            await self._phase(Phase.COMMIT, self._commit)
            self.machine.advance(Phase.DONE)
            return self._report("migrated")
        except BaseException as raised:
            exc = primary_error(raised)
            report = await asyncio.shield(self._fail(exc))
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
            await asyncio.shield(self._close())

    async def _pre_checkpoint(self) -> None:
        st = await self.runc.require(self.name)
        if st.status != "running":
            raise ConfigError(f"container {self.name!r} is {st.status}; only a running container can be migrated")
        self.bundle = st.bundle
        config_raw = (st.bundle / "config.json").read_bytes()
        spec = json.loads(config_raw)
        root = Path(spec.get("root", {}).get("path", "rootfs"))
        self.rootfs_dir = root if root.is_absolute() else st.bundle / root
        self.endpoint = netif.load_spec(st.bundle)
        joined = netif.netns_path_in_spec(spec)
        if self.endpoint is None and joined:
            raise PreconditionError(
                f"container {self.name!r} joins network namespace {joined}, which tug does not manage "
                f"(no {netif.SPEC_FILE} in its bundle): its network cannot be recreated on the destination"
            )
        if self.endpoint is not None and self.host.network is None:
            raise PreconditionError(f"container {self.name!r} has a network endpoint but TUG_BRIDGE is not set here")
        version = await criu.version()
        if not version.supported:
            raise PreconditionError(f"CRIU {version} here is too old; need >= 4.2 (run 'tug doctor')")
        if self.policy is not None:
            self.tracker = await choose_tracker(self.opts.tracker)
            self.precopy = PreDump(self, self.policy) if self.tracker == "soft-dirty" else Precopy(self, self.policy)
            self.stream_dump = self.precopy.final_to_destination
        else:
            self.stream_dump = self.opts.stream_dump

        self.agent = await connect_agent(
            self.target,
            identity=self.opts.identity or self.host.ssh_identity,
            known_hosts=self.opts.known_hosts or self.host.ssh_known_hosts,
            agent_command=self.opts.agent_command,
            connect_timeout=self.opts.connect_timeout,
        )
        self.session = Session(self.agent.stream, p.Role.SOURCE, on_notice=self._on_notice)
        try:
            peer = await self.session.start(
                software=SOFTWARE, host=self.host.name, info={"criu": str(version)}, timeout=self.opts.connect_timeout + 15
            )
        except MigrationError as exc:
            tail = [ln for ln in self.agent.stderr_tail() if ln.strip()]
            hint = f" (agent said: {tail[-1].strip()})" if tail else ""
            raise TransportError(f"the tug agent on {self.target} did not start: {exc}{hint}") from None
        self.note(f"agent on {peer.host}: CRIU {peer.info.get('criu')}, runc {peer.info.get('runc')}")

        with tempfile.TemporaryDirectory(prefix="tug-cpuinfo-") as d:
            cpuinfo = (await criu.cpuinfo_dump(Path(d))).read_bytes()
        network = self.endpoint.to_dict() if self.endpoint is not None else None
        pre = await self.s.call("preflight", container=self.name, criu_version=str(version), cpuinfo=cpuinfo, network=network)
        self.lazy = self.opts.lazy_restore and bool(pre.get("lazy_restore"))
        if self.opts.lazy_restore and not self.lazy:
            self.note(f"{self.target.host} has no userfaultfd (see tug doctor): its restore loads all memory first")
        self.changed = True
        await self.s.call("prepare", container=self.name, config=config_raw, network=network)
        await self._sync_rootfs(Phase.PRE_CHECKPOINT)

    async def _pre_restore(self) -> None:
        private_dir(self.host.work_dir)
        remove_tree(self.work)  # leftovers of an attempt that died before cleaning up
        self.work.mkdir()
        if self.stream_dump and self.precopy is None:
            await self._start_final_page_server(None)
        if self.endpoint is not None:
            assert self.host.network is not None
            self.net = await SourceEndpoint.open(self.host.network, self.name, self.endpoint)
            neighbors = await self.net.neighbors()
            await self.s.call("prepare_network", container=self.name, neighbors=neighbors, fault=self.opts.fault)

    async def _checkpoint(self) -> None:
        parent = self.precopy.final_parent if self.precopy is not None else None
        if self.stream_dump and self.final_ps is None:
            await self._start_final_page_server(parent)
        if self.precopy is not None:
            await self.precopy.prepare_final(self.work / "images")
        self.paused = True  # before the call: a half-done pause must still be undone
        self.frozen_at = time.monotonic()
        self.frozen_sent_at_freeze = self.wire_bytes()
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
            if self.precopy is not None:
                await self.precopy.final_dump(dump)
            else:
                await dump(self.final_ps.address if self.final_ps is not None else None)
        self.timings["pause_ms"] = (t_dump - self.frozen_at) * 1000
        self.timings["dump_ms"] = (time.monotonic() - t_dump) * 1000
        st = await self.runc.require(self.name)
        if st.status != "paused":
            raise MigrationError(f"container {self.name!r} is {st.status} after checkpoint; expected paused")

    async def _start_final_page_server(self, parent: str | None) -> None:
        """The destination's page server for the frozen dump, and the forward to it.

        Started before the freeze (stop-copy: in pre-restore; pre-copy: once
        the rounds are done and the parent is known), so CRIU's start-up and
        the forward's channel open are not paid in the downtime, and a
        destination that refuses TCP forwarding fails before anything froze.
        """
        assert self.agent is not None
        try:
            self.final_ps = await RemotePageServer.start(
                self.s, self.agent, self.name, images="images", parent=parent, fault=self.opts.fault
            )
        except ForwardingRefusedError as exc:
            if self.precopy is None:
                raise ForwardingRefusedError(f"{exc} (or migrate with --no-stream-dump)") from None
            raise

    async def _transfer(self) -> None:
        images = self.work / "images"
        # The content tracker's delta already crossed during the dump; the
        # agent rebuilds those pages images from its store.
        rebuilt = self.precopy.rebuilt_pages() if self.precopy is not None else set()
        entries = [
            e for e in await asyncio.to_thread(rootfs.scan, images) if e.kind == rootfs.FILE and e.path not in rebuilt
        ]
        meter = Meter(Phase.TRANSFER.value, "images", sum(e.size for e in entries), self.emit)

        async def send_images() -> None:
            self.image_bytes = await send_entries(
                self.s, kind="images", container=self.name, root=images, entries=entries, meter=meter
            )

        async def pages_written() -> None:
            # The page server exits once it has written every page it got.
            assert self.final_ps is not None
            await self.final_ps.finish()
            self.note(
                f"memory streamed to the CRIU page server on {self.target.host}: {self.final_ps.wire_bytes / 2**20:.1f} MiB"
            )

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
        res = await self.s.call(
            "restore",
            container=self.name,
            tcp_close=self.opts.tcp_close,
            rebuild_pages=self.rebuild_pages,
            frames=frames,
            lazy=self.lazy,
            fault=self.opts.fault,
        )
        self.running_at = time.monotonic()
        self.frozen_bytes = self.wire_bytes() - self.frozen_sent_at_freeze
        if self.net is not None:
            held = len(frames) + int(res.get("frames_held_here", 0))
            delivered = int(res.get("frames_delivered", 0))
            self.net.delivered()
            late = self.net.take()  # arrived here while the destination restored
            if late:
                got = await self.s.call("deliver", container=self.name, frames=late)
                self.net.delivered()
                held += len(late)
                delivered += int(got.get("delivered", 0))
            self.held_frames = {"held": held, "delivered": delivered, "dropped": self.net.hold.dropped}
        for key in ("restore_ms", "rebuild_ms", "network_up_ms"):
            if isinstance(res.get(key), (int, float)):
                self.timings[key] = float(res[key])
        self.note(f"restored on {self.target.host} as pid {res.get('pid')} in {res.get('restore_ms', 0):.0f} ms")
        if self.lazy and not res.get("lazy"):
            self.note("restored eagerly: the pre-copied pages sit in parent images, which CRIU's lazy-pages daemon cannot read")
        elif self.lazy:
            # Running, but its memory is still being filled: the commit waits
            # for that, so a failure here still resumes the source.
            settled = await self.s.call("settle", container=self.name, timeout=self.opts.timeout(Phase.RESTORE.value) + 30)
            self.lazy_fill_ms = float(settled.get("lazy_ms", 0.0))
            self.note(f"memory filled in place on {self.target.host} in {self.lazy_fill_ms:.0f} ms")

    async def _commit(self) -> None:
        self.commit_unconfirmed = True
        ack = await self.s.call("commit", container=self.name)
        self.commit_unconfirmed = False
        self.agent_usage = {k: float(v) for k, v in ack.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # Past the commit point: the destination owns the container. Failures
        # from here on are reported, never rolled back.
        try:
            await self.runc.delete(self.name, force=True)
            self.paused = False
        except MigrationError as exc:
            self.note(f"could not delete the frozen source container: {exc}", "warning")
        if self.net is not None:
            net, self.net = self.net, None
            await net.remove()
        if self.bundle is not None and self.bundle.parent == self.host.bundles_dir:
            shutil.rmtree(self.bundle, ignore_errors=True)

    async def _sync_rootfs(self, phase: Phase) -> None:
        assert self.rootfs_dir is not None
        entries = await asyncio.to_thread(rootfs.scan, self.rootfs_dir)
        res = await self.s.call("rootfs_plan", container=self.name, manifest=[e.to_wire() for e in entries])
        need = set(res.get("need", []))
        send = [e for e in entries if e.path in need]
        if res.get("skipped"):
            self.note(f"rootfs: {len(res['skipped'])} special files not copied (e.g. {res['skipped'][0]})", "warning")
        meter = Meter(phase.value, "rootfs", sum(e.size for e in send), self.emit)
        self.rootfs_bytes += await send_entries(
            self.s, kind="rootfs", container=self.name, root=self.rootfs_dir, entries=send, meter=meter
        )

    async def sync_rootfs_now(self) -> None:
        """A rootfs pass in the current phase (pre-copy rounds run one each)."""
        await self._sync_rootfs(self.machine.phase)

    def start_meter(self, what: str, total: int | None) -> None:
        self._meter = Meter(self.machine.phase.value, what, total, self.emit)

    def meter_add(self, n: int) -> None:
        if self._meter is not None:
            self._meter.add(n)

    def _on_notice(self, ev: p.Notice) -> None:
        self.emit(Note(level=ev.level, message=f"{self.target.host}: {ev.message}"))

    # ---- failure and cleanup ------------------------------------------------

    async def _fail(self, exc: BaseException) -> MigrationReport:
        failed_in = self.machine.phase.value
        outcome = "rolled-back" if self.changed else "aborted"
        if self.machine.phase is Phase.INIT:
            self.machine.advance(Phase.FAILED)
            return self._report("aborted", exc, failed_in)
        if self.machine.can_roll_back:
            self.machine.advance(Phase.ROLLBACK)
            if self.changed:
                self.emit(PhaseStarted(phase=Phase.ROLLBACK.value, at_s=time.monotonic() - self.t0))
        try:
            async with asyncio.timeout(self.opts.timeout(Phase.ROLLBACK.value)):
                if self.commit_unconfirmed:
                    outcome = "failed"
                    self.note(
                        f"the destination did not confirm the commit: {self.name!r} is left frozen here; "
                        f"check {self.target.host}, then 'runc resume' or 'runc delete' it here",
                        "warning",
                    )
                else:
                    # Destination first: if it restored just before the link
                    # broke, its copy must be gone before the source's address
                    # comes back, or both would answer for one IP and MAC.
                    returned = await self._abort_destination()
                    if self.paused:
                        await self._resume_source()
                    if self.net is not None and self.net.locked:
                        self.held_frames = await self.net.unlock(returned)
        except (MigrationError, TimeoutError) as rb:
            outcome = "failed"
            self.note(f"rollback incomplete: {rb}", "warning")
        if self.machine.phase is not Phase.FAILED:
            self.machine.advance(Phase.FAILED)
        return self._report(outcome, exc, failed_in)

    async def _resume_source(self) -> None:
        st = await self.runc.state(self.name)
        if st is None:
            raise RollbackError(f"source container {self.name!r} vanished during the migration")
        if st.status == "paused":
            await self.runc.resume(self.name)
        self.paused = False
        self.note(f"source container {self.name!r} resumed")

    async def _abort_destination(self) -> list[bytes]:
        """Tell the agent to undo everything; returns the frames it had held."""
        if self.session is None or self.session.peer is None:
            return []
        try:
            res = await self.s.call("abort", container=self.name, timeout=60)
            # A page server that died on its own (mid-dump, say) explains the
            # dump's failure better than the dumper's "Broken pipe".
            for why in res.get("page_servers") or []:
                self.note(f"{self.target.host}: {why}", "warning")
        except MigrationError as exc:
            # The agent also cleans up when the session ends; say so, don't fail.
            self.note(f"destination abort call failed ({exc}); the agent cleans up when the session ends")
            return []
        frames = res.get("frames", [])
        return [f for f in frames if isinstance(f, bytes)] if isinstance(frames, list) else []

    async def _close(self) -> None:
        if self.final_ps is not None:
            self.final_ps.close()
        if self.precopy is not None:
            self.precopy.close()
        if self.session is not None:
            with contextlib.suppress(MigrationError):
                await self.session.close()
        if self.agent is not None:
            await self.agent.close()
        if self.net is not None:
            await self.net.close()
        remove_tree(self.work)

    def _report(self, outcome: str, exc: BaseException | None = None, phase: str = "") -> MigrationReport:
        now = time.monotonic()
        downtime = 0.0
        if self.frozen_at is not None:
            downtime = ((self.running_at or now) - self.frozen_at) * 1000
        error = None
        if exc is not None:
            kind = exc.kind if isinstance(exc, MigrationError) else ("cancelled" if isinstance(exc, asyncio.CancelledError) else "internal")
            details: dict[str, Any] = {}
            lines = getattr(exc, "error_lines", None)
            if lines:
                details["error_lines"] = list(lines)
            log_path = getattr(exc, "log_path", None)
            if log_path:
                details["log_path"] = str(log_path)
            error = ErrorInfo(kind=kind, message=str(exc) or type(exc).__name__, phase=phase, details=details)
        return MigrationReport(
            container=self.name,
            source=self.host.name,
            destination=str(self.target),
            strategy=self.opts.strategy,
            outcome=outcome,
            total_s=now - self.t0,
            downtime_ms=downtime if outcome == "migrated" else 0.0,
            frozen_ms=downtime,
            bytes_total=self.wire_bytes(),
            frozen_bytes=self.frozen_bytes,
            bytes_by_phase=dict(self.bytes_by_phase),
            phases=self.machine.durations(),
            image_bytes=self.image_bytes,
            rootfs_bytes=self.rootfs_bytes,
            error=error,
            notes=list(self.notes),
            rounds=list(self.precopy.events) if self.precopy is not None else [],
            tracker=self.tracker,
            dump_streamed=self.stream_dump,
            page_server_bytes=self.final_ps.wire_bytes if self.final_ps is not None else 0,
            frozen_steps_ms=dict(self.timings),
            held_frames=dict(self.held_frames),
            lazy_fill_ms=self.lazy_fill_ms,
            agent_cpu_s=self.agent_usage.get("cpu_s"),
            agent_children_cpu_s=self.agent_usage.get("children_cpu_s"),
            agent_max_rss_kib=self.agent_usage.get("max_rss_kib"),
        )
