"""The frozen window, source side: freeze, dump, transfer, restore, fill, commit.

The base of :class:`tug.engine.source.migration.Migration` that runs the
phases from the freeze on, over every member of the group: one freeze of all
of them (every member paused before any network lock engages and before any
dump starts), their dumps side by side, then the restores in group order,
except that a pod's namespace holder comes after the members joining it
(its restore brings the pod's link up). The downtime ends when the last member runs; the commit
point is the first member that runs (from then on no member's source
resumes, see :mod:`.member`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from tug.engine.criu.stats import criu_dump_steps
from tug.engine.errors import MigrationError, PhaseTimeoutError, RanThenFailed, TransportError
from tug.engine.phases import Phase
from tug.engine.progress import Meter
from tug.engine.runtime.endpoint import chunk_frames
from tug.engine.source.container import file_lock_holders, held_file_locks, retire_source, start_final_page_server
from tug.engine.source.earlystart import start_early
from tug.engine.source.failure import FailureHandling
from tug.engine.source.member import Member
from tug.engine.source.relink import reattach
from tug.engine.source.rollback import Destination
from tug.engine.source.transfer import send_images_except, sync_rootfs
from tug.engine.volumes import COPY
from tug.transports import protocol as p
from tug.transports.session import Session

#: Steps of the agent's restore answer that go into the frozen window's breakdown.
RESTORE_STEPS = ("restore_ms", "rebuild_ms", "network_up_ms", "criu_restore_ms", "criu_forking_ms")


class FrozenWindow(FailureHandling):
    @property
    def s(self) -> Session:
        assert self.session is not None
        return self.session

    # ---- checkpoint: one freeze, every member's dump ---------------------------

    #: Where the agent waits for us if the link drops during the fill (relink.py).
    attach: dict[str, Any] | None = None

    def _on_notice(self, ev: p.Notice) -> None:
        """The agent's notices (the driver reports them)."""

    async def _checkpoint(self) -> None:
        if any(m.strategy.serves_fill for m in self.members):
            # A fill served by the frozen source survives a lost link (relink.py).
            self.attach = await self.s.call("link_recovery", deadline_s=self.opts.link_recovery)
        for m in self.members:
            if m.net is not None:
                # tug's lock (engaged after the freeze, before any CRIU runs) holds
                # its network: CRIU's own would only repeat it, slowly (criu/netlockskip.py).
                self.runc.net_held.add(m.name)
            if m.strategy.dump_to_destination and m.final_ps is None:
                await self._start_final_page_server(m, m.strategy.final_parent)
            await m.strategy.prepare_final(m.work / "images")
        # runc on both hosts, CRIU held until the freeze lets it go (earlystart.py).
        await start_early(self.runc, self.s, self.members, self.opts, self.opts.timeout(Phase.CHECKPOINT.value), self.note)
        for m in self.members:
            m.freezer = self.runc.freezer(m.name)
        # A process's first read of /proc/locks takes ~25 ms here (its later
        # ones ~0.1 ms): that first one is not to fall in the frozen window.
        file_lock_holders()
        self.tally.frozen_at = time.monotonic()
        self.tally.frozen_sent_at_freeze = self.wire_bytes()
        for m in self.members:
            m.paused = True  # before the call: a half-done pause must still be undone
            await self.runc.freeze(m.name, m.freezer)
        # Frozen, nobody takes or drops a lock any more: CRIU must carry those
        # held (it refuses to dump them otherwise), and the restore too. One
        # read of /proc/locks for the group; a member's pids (a runc call in
        # the downtime) only if some process on this host holds a lock.
        holders = file_lock_holders()
        for m in self.members:
            m.file_locks = bool(holders) and held_file_locks(await self.runc.cgroup_pids(m.name, m.freezer), holders)
            if m.file_locks:
                self.runc.file_locks.add(m.name)
                self.note(f"{m.name!r} holds file locks: dumped and restored with them")
        for m in self.members:
            if m.net is not None:
                # After every pause: no process can answer anything any more,
                # and whatever the kernel still sends before this point is
                # older than the dump, TCP timestamps included (runtime.netlock).
                await m.net.lock()
        t_dump = time.monotonic()
        dumped_at: list[float] = []
        async with asyncio.TaskGroup() as tg:
            for m in self.members:
                tg.create_task(self._dump(m, dumped_at))
                # Frozen, the rootfs changes no more: its last pass crosses
                # while CRIU dumps, not after it.
                tg.create_task(self._sync_rootfs(m, Phase.CHECKPOINT))
        self.tally.timings["pause_ms"] = (t_dump - self.tally.frozen_at) * 1000
        self.tally.timings["dump_ms"] = (max(dumped_at) - t_dump) * 1000
        for m in self.members:
            for step, ms in criu_dump_steps(m.work / "criu").items():
                # Side by side, the members' CRIU steps overlap: the longest counts.
                self.tally.timings[step] = max(ms, self.tally.timings.get(step, 0.0))
            # A dump that goes on serving the memory holds the processes stopped
            # itself (the freezer is thawed meanwhile), until it ends.
            if m.strategy.dump_keeps_serving:
                continue
            st = await self.runc.require(m.name)
            if st.status != "paused":
                raise MigrationError(f"container {m.name!r} is {st.status} after checkpoint; expected paused")

    async def _dump(self, m: Member, dumped_at: list[float]) -> None:
        parent = m.strategy.final_parent

        async def dump(page_server: str | None) -> None:
            await self.runc.checkpoint_frozen(
                m.name,
                image_dir=m.work / "images",
                work_dir=m.work / "criu",
                tcp_established=True,
                page_server=page_server,
                parent_path=parent,
                timeout=self.opts.timeout(Phase.CHECKPOINT.value),
            )

        async with contextlib.AsyncExitStack() as stack:
            if m.final_ps is not None:
                # The pages cross while CRIU dumps: show their progress now.
                meter = Meter(Phase.CHECKPOINT.value, "pages", None, self.emit)
                await stack.enter_async_context(m.final_ps.progress(meter))
            await m.strategy.final_dump(dump, m.final_ps.address if m.final_ps is not None else None)
        dumped_at.append(time.monotonic())

    async def _start_final_page_server(self, m: Member, parent: str | None) -> None:
        assert self.agent is not None
        m.final_ps = await start_final_page_server(self.s, self.agent, m.name, parent, optional=not m.strategy.has_rounds)

    # ---- transfer ----------------------------------------------------------------

    async def _transfer(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for m in self.members:
                tg.create_task(self._transfer_member(m))

    async def _transfer_member(self, m: Member) -> None:
        # The content tracker's delta already crossed during the dump; the
        # agent rebuilds those pages images from its store.
        rebuilt = m.strategy.rebuilt_pages()

        async def send_images() -> None:
            self.tally.image_bytes += await send_images_except(
                self.s, m.name, m.work / "images", rebuilt, Meter(Phase.TRANSFER.value, "images", None, self.emit)
            )

        async def pages_written() -> None:
            # The page server exits once it has written every page it got.
            assert m.final_ps is not None
            await m.final_ps.finish()
            self.note(f"memory of {m.name!r} streamed to the CRIU page server on {self.target.host}: "
                      f"{m.final_ps.wire_bytes / 2**20:.1f} MiB")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(send_images())
            tg.create_task(m.strategy.finish_memory())
            if m.final_ps is not None:
                tg.create_task(pages_written())
        m.rebuild_pages = bool(rebuilt)

    # ---- restore: in group order; the first that runs is the commit point --------

    async def _restore(self) -> None:
        # A pod's members first, into the namespace the destination made for
        # it in pre-restore; its holder last, whose restore brings the pod's
        # link up: no packet reaches the pod before every member's sockets
        # exist (a member restored after that would have its peers reset).
        order = [m for m in self.members if m.netns_of is not None] + [m for m in self.members if m.netns_of is None]
        # Every member but the last is held stopped once restored: until the
        # last is in, nothing of the group has run, and a failure rolls the
        # whole group back. The last one's restore is the commit point; the
        # held ones are let go right after it.
        last = order[-1].name
        answers = [await self._restore_member(m, held_until=None if m.name == last else last) for m in order]
        for m, (res, _held_frames) in zip(order, answers, strict=True):
            if res.get("held"):
                await self._release(m, res)
        self.tally.running_at = time.monotonic()
        self.tally.wire_at_running = self.wire_bytes()
        self.tally.frozen_bytes = self.wire_bytes() - self.tally.frozen_sent_at_freeze
        for m, (res, held) in zip(order, answers, strict=True):
            if m.net is not None:

                async def deliver(late: list[bytes], name: str = m.name) -> int:
                    done = 0
                    for part in chunk_frames(late):
                        got = await self.s.call("deliver", container=name, frames=part)
                        done += int(got.get("delivered", 0))
                    return done

                counts = await m.net.hand_over(held, res, deliver)
                for k, v in counts.items():
                    self.tally.held_frames[k] = self.tally.held_frames.get(k, 0) + v
            for key in RESTORE_STEPS:
                if isinstance(res.get(key), (int, float)):
                    self.tally.timings[key] = self.tally.timings.get(key, 0.0) + float(res[key])
            self.note(f"{m.name!r} restored on {self.target.host} as pid {res.get('pid')} in {res.get('restore_ms', 0):.0f} ms")
            if m.lazy and not res.get("lazy"):
                self.note("restored eagerly: the pre-copied pages sit in parent images, which CRIU's lazy-pages daemon cannot read")
            elif m.lazy:
                # Running, but its memory is still being filled (the FILL
                # phase): the commit waits for that; the source never resumes now.
                m.filling = True
        if not any(m.filling for m in self.members):
            self.tally.bytes_after_commit = self.wire_bytes() - self.tally.wire_at_running

    async def _release(self, m: Member, res: dict[str, Any]) -> None:
        """Let a held member run (the group's last restore ran already)."""
        m.dest = Destination.RAN  # whatever the answer: it may run from now on
        res.update(await self.s.call("release", container=m.name))

    async def _restore_member(self, m: Member, *, held_until: str | None = None) -> tuple[dict[str, Any], int]:
        """Restore ``m`` on the destination; returns the answer and how many
        held frames went along. ``held_until``: the group's last member; ``m``,
        restored before it, stays stopped until :meth:`_release`."""
        # What clients sent during the freeze goes along, to be answered by the
        # destination the moment its sockets exist (runtime.netlock).
        frames = m.net.take() if m.net is not None else []
        # Many held frames go ahead in parts; the restore call carries the last.
        *ahead, last = chunk_frames(frames)
        for part in ahead:
            await self.s.call("stage_frames", container=m.name, frames=part)
        extra: dict[str, Any] = await m.strategy.restore_args()
        if m.file_locks:
            extra["file_locks"] = True
        if self.opts.criu_opts:
            extra["criu_opts"] = list(self.opts.criu_opts)
        if held_until is not None:
            extra["held_until"] = held_until
        # From here until an answer, the destination may run the container.
        m.dest = Destination.UNKNOWN
        try:
            res = await self.s.call(
                "restore", container=m.name, tcp_close=self.opts.tcp_close, rebuild_pages=m.rebuild_pages,
                frames=last, lazy=m.lazy, **extra,
            )
        except RanThenFailed:
            m.dest = Destination.RAN
            raise
        except (TransportError, PhaseTimeoutError, asyncio.CancelledError):
            raise  # no answer: still UNKNOWN
        except MigrationError:
            # The agent answers a failed restore only once nothing of it runs.
            m.dest = Destination.UNTOUCHED
            raise
        # Held: restored, stopped, its network gate shut; nothing of it ran,
        # and an abort removes it like a copy that was never restored.
        m.dest = Destination.UNTOUCHED if res.get("held") else Destination.RAN
        if res.get("held"):
            self.note(f"{m.name!r} restored on {self.target.host}, held stopped until the group is in")
        if res.get("sysv_attached"):
            self.note(f"{m.name!r}: {res['sysv_attached']} SysV segment attachment(s) of its pod's IPC namespace "
                      f"mapped by tug before it ran, in {res.get('sysv_attach_ms') or '<1'} ms (CRIU maps them only "
                      "in the first member's restore)")
        return res, len(frames)

    # ---- fill and commit -----------------------------------------------------------

    async def _fill(self) -> None:
        for m in self.members:
            if m.filling:
                await self._fill_member(m)
        self.tally.bytes_after_commit = self.wire_bytes() - self.tally.wire_at_running

    async def _fill_member(self, m: Member) -> None:
        while True:
            try:
                settled = await self.s.call("settle", container=m.name, timeout=self.opts.timeout(Phase.FILL.value) + 30)
                break
            except TransportError as exc:
                await self._recover_link(exc)
        # The members fill side by side: the last to finish is the group's fill.
        self.tally.lazy_fill_ms = max(float(settled.get("lazy_ms", 0.0)), self.tally.lazy_fill_ms or 0.0)
        fill = m.strategy.fill_stats()
        # The destination's lazy-pages daemon logged each fault and when its page
        # landed; a dump that keeps serving (post-copy) answered every one of them.
        counts: dict[str, int] = {}
        if isinstance(settled.get("faults"), int) and m.strategy.serves_fill:
            counts["remote_faults"] = settled["faults"]
        # A page server that serves from a store and asks the source only for
        # some pages (hybrid) counts which faults went to the source itself.
        for key in ("remote_faults", "store_pages", "source_pages"):
            if isinstance(settled.get(key), int) and m.strategy.serves_fill:
                counts[key] = settled[key]
        for key, n in counts.items():  # the group's members add up
            fill[key] = n + int(self.tally.fill.get(key) or 0)
        lat = settled.get("fault_latency_ms")
        if isinstance(lat, dict) and all(isinstance(v, (int, float)) for v in lat.values()):
            fill["fault_latency_ms"] = {str(k): float(v) for k, v in lat.items()}
        self.tally.fill.update(fill)
        self.note(f"memory of {m.name!r} filled in place on {self.target.host} in {float(settled.get('lazy_ms', 0.0)):.0f} ms")
        if isinstance(settled.get("store_pages"), int):
            self.note(f"the page store served {settled['store_pages']} pages to the fill "
                      f"({settled.get('store_requests')} requests, {settled.get('store_faults')} of them faults)")
        if m.strategy.serves_fill:
            try:
                await m.strategy.after_fill()
            except MigrationError as exc:
                # The destination has every page: a late error here
                # changes nothing there. The source stays frozen.
                self.note(f"the source's dump of {m.name!r} ended badly after the fill: {exc}", "warning")
                await m.strategy.release_source()

    async def _recover_link(self, lost: TransportError) -> None:
        """The link dropped mid-fill: reconnect, reattach, and resume every relayed stream (relink.py).

        Raises ``lost`` (with why recovery failed) when the fill's streams
        cannot resume or the link does not come back within the deadline
        (a link that drops again while recovering is retried within the
        same deadline): then both sides stay frozen, as before recovery existed.
        """
        relayed = [(m, fwd, rid) for m in self.members for fwd, rid in m.strategy.relayed()]
        if self.attach is None or not relayed or any(fwd.closed for _, fwd, _ in relayed):
            raise lost
        self.note(f"link lost during the fill ({lost}): reconnecting for up to {self.opts.link_recovery:g} s", "warning")
        t0 = time.monotonic()
        deadline = t0 + self.opts.link_recovery
        while True:
            old_agent, old = self.agent, self.s
            assert old_agent is not None
            try:
                agent, session = await reattach(self.target, self.opts, self.host, self.attach, on_notice=self._on_notice,
                                                deadline=deadline)
            except MigrationError as exc:
                raise TransportError(f"{lost}; {exc}") from None
            # The byte counts go on from the old session's.
            session.bytes_sent += old.bytes_sent
            session.bytes_received += old.bytes_received
            self.agent, self.session = agent, session
            for m in self.members:
                m.strategy.ctx.session, m.strategy.ctx.agent = session, agent
            try:
                await agent.adopt(old_agent)  # moves the forwards out of old_agent first
                for m, fwd, rid in relayed:
                    await session.call("relay_reconnect", container=m.name, relay=rid, port=fwd.remote_port, timeout=60)
                break
            except TransportError as exc:  # the new link dropped too: again, within the same deadline
                if time.monotonic() >= deadline:
                    raise TransportError(f"{lost}; then {exc}") from None
            finally:
                await old.close(timeout=0.1)
                await old_agent.close(timeout=1.0)
        self.tally.link_recoveries += 1
        self.note(f"link recovered in {(time.monotonic() - t0) * 1000:.0f} ms: the fill resumed "
                  f"({self.tally.link_recoveries} recoveries)")

    async def _commit(self) -> None:
        for m in self.members:
            ack = await self.s.call("commit", container=m.name)
            for k, v in ack.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tally.agent_usage[k] = float(v)
        # Past the commit point: the destination owns the group. Failures
        # from here on are reported, never rolled back.
        for m in reversed(self.members):  # a pod's members before the namespace they join
            net, m.net = m.net, None
            m.paused = not await retire_source(self.runc, m.name, self.host, m.bundle, net, self.note)

    # ---- rootfs passes -------------------------------------------------------------

    async def _sync_rootfs(self, m: Member, phase: Phase) -> None:
        """A pass over ``m``'s rootfs and its copied volumes."""
        assert m.rootfs is not None
        # Once the container is frozen, a file that changes under the sync is
        # an error, not something the next pass fixes: there is none.
        self.tally.rootfs_bytes += await sync_rootfs(
            self.s, container=m.name, root=m.rootfs, phase=phase.value, emit=self.emit, note=self.note,
            frozen=m.paused,
        )
        for vol in m.volumes:
            if vol.mode == COPY:
                root, only = vol.tree
                sent = await sync_rootfs(
                    self.s, container=m.name, root=root, phase=phase.value, emit=self.emit, note=self.note,
                    frozen=m.paused, volume=vol.index, only=only,
                )
                m.volume_bytes[vol.destination] = m.volume_bytes.get(vol.destination, 0) + sent
