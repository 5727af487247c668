"""One migration, source side: the phases, the commit point, the rollback.

A migration moves a group of containers (:mod:`.member`; one for now, a
pod's members with the pods issue): one freeze, one commit point and one
rollback for all of them. The phases of the frozen window, from the freeze
to the commit, are in :mod:`.window`; the failure paths in :mod:`.failure`.

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
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

from tug.engine.criu import tool as criu
from tug.engine.criu.tool import check_criu_opts
from tug.engine.errors import (
    MigrationError,
    PhaseTimeoutError,
    PreconditionError,
    primary_error,
)
from tug.engine.events import Event, MigrationReport, Note, PhaseFinished, PhaseStarted
from tug.engine.fsutil import private_dir, remove_tree
from tug.engine.hostcfg import HostConfig
from tug.engine.options import MigrationOptions
from tug.engine.phases import Phase, PhaseMachine
from tug.engine.runtime.endpoint import SourceEndpoint
from tug.engine.runtime.podman import PodmanContainer
from tug.engine.runtime.runc import Runc
from tug.engine.source import podmansrc, strategies
from tug.engine.source.container import (
    inspect_container,
    local_cpuinfo,
    open_session,
    preflight_destination,
)
from tug.engine.source.context import SourceContext
from tug.engine.source.member import Member, check_group
from tug.engine.source.pod import check_pods, expand_pods, ipc_sets, read_sharing, restore_order
from tug.engine.source.rollback import finish_uncancelled
from tug.engine.source.strategies import RestoreMode
from tug.engine.source.tally import Tally
from tug.engine.source.window import FrozenWindow
from tug.engine.volumes import SHARED, parse_volume_options, verify_shared
from tug.transports import protocol as p
from tug.transports.session import Session
from tug.transports.ssh import AgentProcess, parse_url


class Migration(FrozenWindow):
    def __init__(
        self,
        containers: str | Sequence[str],
        destination: str,
        opts: MigrationOptions,
        on_event: Callable[[Event], None] | None,
    ) -> None:
        names = check_group([containers] if isinstance(containers, str) else containers)
        #: How each host mount moves, by its path inside the container.
        self.volume_choices = parse_volume_options(opts.volumes)
        check_criu_opts(list(opts.criu_opts))  # bad input fails before anything happens
        self.target = parse_url(destination)
        self.opts = opts
        self.on_event = on_event
        self.host = opts.host or HostConfig.from_env()
        self.runc = Runc(self.host.runc_root, log_dir=self.host.data_dir / "logs")
        #: The container is podman's (source/podmansrc.py): set in pre-checkpoint.
        self.podman: PodmanContainer | None = None
        self.machine = PhaseMachine()
        self.tally = Tally()
        self.agent: AgentProcess | None = None
        self.session: Session | None = None
        #: What happens before the freeze, where the frozen dump's memory goes
        #: and how the destination restores: the driver asks each member's
        #: strategy, never branches on one.
        self.members = [self._member(n) for n in names]
        #: Set once anything was changed on either host; before that a failure
        #: has nothing to undo and its outcome is "aborted", not "rolled-back".
        self.changed = False
        #: Set when a failure leaves the source frozen (the one-copy rule).
        self.left_frozen = False

    def _member(self, name: str) -> Member:
        return Member(name=name, strategy=strategies.create(self.opts), work=self.host.work_dir / f"{name}.out")

    async def _form_group(self) -> None:
        """Pods: the group gains the containers joining its members' network
        namespaces (``--pod``), must not split a pod, and restores holders first."""
        net = self.host.network
        sharing = await read_sharing(self.runc, lambda n: net.netns_path(n) if net is not None else None)
        names = [m.name for m in self.members]
        if self.opts.pod:
            names = check_group(expand_pods(names, sharing))
        holders = check_pods(names, sharing)
        by_name = {m.name: m for m in self.members}
        order = restore_order(names, holders)
        self.members = [by_name.get(n) or self._member(n) for n in order]
        ipc = ipc_sets(order, sharing)
        for m in self.members:
            m.netns_of = holders.get(m.name)
            m.ipc_of = ipc.get(m.name)
        if len(self.members) > len(by_name):
            self.note(f"pod: moving {', '.join(m.name for m in self.members)} as one group")

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

    # ---- the flow -----------------------------------------------------------

    async def run(self) -> MigrationReport:
        try:
            await self._phase(Phase.PRE_CHECKPOINT, self._pre_checkpoint)
            await self._phase(Phase.PRE_RESTORE, self._pre_restore)
            if self.strategy.has_rounds:
                await self._phase(Phase.PRECOPY, self._rounds)
            await self._phase(Phase.CHECKPOINT, self._checkpoint)
            await self._phase(Phase.TRANSFER, self._transfer)
            await self._phase(Phase.RESTORE, self._restore)
            if any(m.filling for m in self.members):
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
        self.runc, self.podman = await podmansrc.resolve(self.runc, [m.name for m in self.members], self.opts)
        if self.podman is None:
            await self._form_group()
        for m in self.members:
            src = await inspect_container(
                self.runc, m.name, self.host, self.volume_choices, netns_of=m.netns_of, ipc_of=m.ipc_of
            )
            m.bundle, m.rootfs, m.endpoint, m.config_raw = src.bundle, src.rootfs, src.endpoint, src.config_raw
            m.volumes = src.volumes
        version = await criu.version()
        if not version.supported:
            raise PreconditionError(f"CRIU {version} here is too old; need >= 4.2 (run 'tug doctor')")
        for m in self.members:
            await m.strategy.preflight()

        self.agent, self.session, peer = await open_session(
            self.target, self.opts, self.host, info={"criu": str(version)}, on_notice=self._on_notice
        )
        self.note(f"agent on {peer.host}: CRIU {peer.info.get('criu')}, runc {peer.info.get('runc')}")
        cpuinfo = await local_cpuinfo()
        lazy_possible = True
        for i, m in enumerate(self.members):
            network = m.endpoint.to_dict() if m.endpoint is not None else None
            # One CPU check for the group: every member's dump is made here.
            pre = await preflight_destination(self.s, m.name, str(version), network, cpuinfo if i == 0 else b"",
                                              podman=self._podman_wire())
            lazy_possible = lazy_possible and self.opts.lazy_restore and bool(pre.get("lazy_restore"))
        explained = await self._resolve_strategy(lazy_possible)
        for m in self.members:
            m.strategy.bind(
                SourceContext(
                    name=m.name, session=self.session, agent=self.agent, runc=self.runc, work=m.work,
                    opts=self.opts, timings=self.tally.timings, emit=self.emit, wire_bytes=self.wire_bytes,
                    sync_rootfs=self._rootfs_pass_of(m), notes=self.tally.notes,
                )
            )
            m.lazy = m.strategy.restore_mode(lazy_possible) in (RestoreMode.LAZY_LOCAL, RestoreMode.LAZY_REMOTE)
        if self.opts.lazy_restore and not lazy_possible and not explained:
            self.note(f"{self.target.host} has no userfaultfd (see tug doctor): its restore loads all memory first")
        for m in self.members:
            for vol in m.volumes:
                if vol.mode == SHARED:
                    await verify_shared(self.s, m.name, vol, self.target.host)
                    self.note(f"volume {vol.destination} of {m.name!r}: {vol.source} is the same storage on {self.target.host}")
        self.changed = True
        for m in self.members:
            network = m.endpoint.to_dict() if m.endpoint is not None else None
            extra: dict[str, Any] = {"volumes": [v.to_wire() for v in m.volumes]} if m.volumes else {}
            if m.netns_of is not None:
                extra["netns_of"] = m.netns_of
            if m.ipc_of is not None:
                extra["ipc_of"] = m.ipc_of
            if self.podman is not None:
                extra["podman"] = self._podman_wire()
            await self.s.call("prepare", container=m.name, config=m.config_raw, network=network, **extra)
            await self._sync_rootfs(m, Phase.PRE_CHECKPOINT)

    async def _resolve_strategy(self, lazy_possible: bool) -> bool:
        """``--strategy precopy`` ends as hybrid where it can (strategies.resolve):
        decided here, once the destination said whether it has userfaultfd and
        before anything changed on either host. True if its note already said
        that the destination has no userfaultfd (not said twice)."""
        cls, why = strategies.resolve(self.opts, lazy_possible=lazy_possible)
        if why is not None:
            self.note(why)
        if cls is not type(self.strategy):
            self.opts = replace(self.opts, strategy=cls.name)
            for m in self.members:
                m.strategy.close()
                m.strategy = cls(self.opts)
                await m.strategy.preflight()
        return why is not None and self.opts.lazy_restore and not lazy_possible

    def _podman_wire(self) -> dict[str, Any] | None:
        return podmansrc.wire(self.podman) if self.podman is not None else None

    async def _pre_restore(self) -> None:
        private_dir(self.host.work_dir)
        for m in self.members:
            remove_tree(m.work)  # leftovers of an attempt that died before cleaning up
            m.work.mkdir()
            if m.strategy.page_server_early:
                await self._start_final_page_server(m, None)
            if m.endpoint is not None:
                assert self.host.network is not None
                m.net = await SourceEndpoint.open(self.host.network, m.name, m.endpoint)
                neighbors = await m.net.neighbors()
                await self.s.call("prepare_network", container=m.name, neighbors=neighbors)

    async def _rounds(self) -> None:
        await type(self.strategy).run_rounds_together([m.strategy for m in self.members])

    def _rootfs_pass_of(self, m: Member) -> Callable[[], Coroutine[Any, Any, None]]:
        """A rootfs pass of ``m`` in the current phase (pre-copy rounds run one each)."""

        async def one_pass() -> None:
            await self._sync_rootfs(m, self.machine.phase)

        return one_pass

    def _on_notice(self, ev: p.Notice) -> None:
        self.emit(Note(level=ev.level, message=f"{self.target.host}: {ev.message}"))
