"""What the agent holds for each container it receives, and where received
bytes land.

:class:`Incoming` is the unit of cleanup: everything the agent creates for a
container hangs off it until the source commits. :class:`AgentState` is what
the agent's call groups (:mod:`.staging`, :mod:`.restore`) share.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tug.engine import records, rootfs
from tug.engine.criu.daemon import kill_strays
from tug.engine.criu.gate import CriuGate
from tug.engine.criu.mmimage import Attach
from tug.engine.criu.pageserver import PageServer
from tug.engine.destination.lazypages import LazyPages
from tug.engine.destination.pagestore import PageStore
from tug.engine.destination.relay import Relay
from tug.engine.destination.storeserver import StorePageServer
from tug.engine.destination.verdicts import PushedMemory
from tug.engine.destination.volumes import ReceivedVolume
from tug.engine.errors import ConfigError, IntegrityError, MigrationError, ProtocolError
from tug.engine.hostcfg import HostConfig
from tug.engine.pagestream import RunDecoder
from tug.engine.runtime.endpoint import DestinationEndpoint
from tug.engine.runtime.network import EndpointSpec
from tug.engine.runtime.runc import Runc

log = logging.getLogger("tug.agent")

INCOMING_MARKER = ".tug-incoming"
#: The marker's text once a restored copy was kept without a commit (its
#: session ended after it ran): ``tug recover`` adopts it or finds it gone.
KEPT = "uncommitted"
#: The marker of a group's member restored and held stopped (restore.py
#: ``held_until``), followed by the name of the group's last member: it never
#: ran; tug recover lets it go if that one runs here, else removes it.
HELD = "held"
#: Image dirs the source may name, relative to the work dir, and their parents.
_WORK_SUBDIR = re.compile(r"images|rounds/[0-9]{1,6}")
_PARENT = re.compile(r"\.\./(rounds/)?[0-9]{1,6}")


@dataclass(eq=False)
class PrestartedRestore:
    """A ``runc restore`` waiting for its images at the gate."""

    gate: CriuGate
    task: asyncio.Task[int]
    tcp_established: bool
    lazy: bool
    #: The container's own lines of its CRIU config file (criuconf.py).
    own: list[str] = field(default_factory=list)

    async def run(self) -> int:
        """Let CRIU restore (every image is in); the container's pid."""
        self.gate.release()
        return await self.task


@dataclass(slots=True)
class Incoming:
    """One container this agent is receiving; the unit of cleanup."""

    name: str
    bundle: Path
    work: Path
    restored: bool = False
    #: Restored with its processes stopped, until the source releases it (or,
    #: held by itself, until tug attached its SysV segments: sysvattach.py).
    held: bool = False
    #: The group's last member, whose restore comes before the release; its
    #: own name while it waits for its SysV attach.
    held_until: str | None = None
    store: PageStore | None = None
    network: EndpointSpec | None = None
    endpoint: DestinationEndpoint | None = None
    committed: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    #: CRIU page servers started for this container, one per dump, by id.
    page_servers: dict[int, PageServer] = field(default_factory=dict)
    #: The lazy-pages daemon of a lazy restore, until it has filled the memory.
    lazy: LazyPages | None = None
    #: The agent's page server feeding that daemon from the page store (after pre-copy).
    store_server: StorePageServer | None = None
    #: Pre-copy's eager step: the frozen source's verdicts on every page, before the restore.
    push: PushedMemory | None = None
    #: The task running the restore call, while it runs: an abort or a lost
    #: session cancels it before deciding (a restore finishing after the
    #: cleanup would leave an orphan container).
    restoring: asyncio.Task[Any] | None = None
    #: The source's rootfs manifest, while its parts arrive.
    manifest: list[rootfs.Entry] = field(default_factory=list)
    #: Frames the source held, sent ahead of the restore when they are many.
    staged_frames: list[bytes] = field(default_factory=list)
    #: The restored copy ran and then broke (its lazy fill failed): it was
    #: killed, and nothing of it may be kept.
    broken: bool = False
    #: When its restore let the processes run (monotonic), for the fill's duration.
    ran_at: float | None = None
    #: Its processes held file locks when dumped: the restore takes them again.
    file_locks: bool = False
    #: A pod's member: the container whose network namespace it joins.
    netns_of: str | None = None
    #: A pod's member: the name of the IPC namespace it shares (runtime/ipcns.py).
    ipc_of: str | None = None
    #: A later member of a shared IPC namespace: the SysV segments its processes
    #: (by container pid) attach, cut out of its images (destination/sysvattach.py).
    sysv: dict[int, list[Attach]] = field(default_factory=dict)
    #: Its copied and shared volumes, by mount index (destination/volumes.py).
    volumes: dict[int, ReceivedVolume] = field(default_factory=dict)
    #: Streams of this container still arriving (opened, not yet closed whole).
    streams_open: int = 0
    #: Why the first of its streams that failed here failed: what arrived
    #: cannot be trusted, and no restore may use it (check_received).
    stream_failure: MigrationError | None = None
    #: A podman container: what the destination's podman recreates it from
    #: (destination/podmanstage.py), and the container made for it.
    podman: dict[str, Any] | None = None
    podman_made: bool = False
    #: A ``runc restore`` started before the freeze, waiting at its gate (prestart.py).
    prestart: PrestartedRestore | None = None

    @property
    def ran(self) -> bool:
        """Whether its restored processes may have run (a held copy has not)."""
        return self.restored and not self.held
    #: The fill's streams held here across a lost link (relay.py), by id.
    relays: list[Relay] = field(default_factory=list)

    def close_relays(self) -> None:
        for r in self.relays:
            r.close()

    @property
    def images(self) -> Path:
        return self.work / "images"

    @property
    def criu_work(self) -> Path:
        return self.work / "criu"

    def check_received(self) -> None:
        """Before a restore: every stream of this container arrived whole and verified.

        A failed stream's IntegrityError is raised again as such (the source
        rebuilds it with its details); any other failure, or a stream still
        open, refuses the restore too: it would read incomplete files.
        """
        failure = self.stream_failure
        if isinstance(failure, IntegrityError):
            raise IntegrityError(
                f"refusing to restore {self.name!r}: {failure}",
                subject=failure.subject, check=failure.check, expected=failure.expected, got=failure.got,
            )
        if failure is not None:
            raise MigrationError(f"refusing to restore {self.name!r}: a stream it needs failed here: {failure}")
        if self.streams_open:
            raise ProtocolError(f"refusing to restore {self.name!r}: {self.streams_open} of its streams are still open")


class _Received(abc.ABC):
    """A stream whose contents a restore will use: its failure is kept on the container.

    The session reports a failed stream to the source, which learns of it at
    its next call; the restore must not wait for that. Whatever broke a
    stream here (a digest or size mismatch, a malformed record, a write
    error) is remembered on the :class:`Incoming`, and
    :meth:`Incoming.check_received` refuses the restore with it.
    """

    def __init__(self, inc: Incoming, kind: str) -> None:
        self.inc = inc
        self.kind = kind
        inc.streams_open += 1
        self._open = True

    def _ended(self, failure: BaseException | None) -> None:
        if self._open:
            self._open = False
            self.inc.streams_open -= 1
        if failure is not None and self.inc.stream_failure is None:
            if isinstance(failure, MigrationError):
                self.inc.stream_failure = failure
            else:
                self.inc.stream_failure = MigrationError(f"the {self.kind} stream failed here: {failure}")

    async def write(self, data: bytes) -> None:
        try:
            self._write(data)
        except Exception as exc:
            self._ended(exc)
            raise

    async def close(self, meta: dict[str, Any]) -> None:
        try:
            self._close(meta)
        except Exception as exc:
            self._ended(exc)
            raise
        self._ended(None)

    async def abort(self, reason: str) -> None:
        self._abort()
        if self._open:  # the source gave up on it, or the session ended: incomplete
            self._ended(MigrationError(f"the {self.kind} stream was aborted: {reason}"))

    @abc.abstractmethod
    def _write(self, data: bytes) -> None:
        """Take one chunk of the stream (raise on anything wrong with it)."""

    @abc.abstractmethod
    def _close(self, meta: dict[str, Any]) -> None:
        """The stream ended whole: check it against ``meta`` (its counts) and commit it."""

    def _abort(self) -> None:
        pass


class RecordSink(_Received):
    """Receives a rootfs or images record stream into a directory (records.py)."""

    def __init__(self, inc: Incoming, kind: str, root: Path, on_done: Any = None) -> None:
        super().__init__(inc, kind)
        what = "image file" if kind == "images" else f"{kind} file"
        self.decoder = records.RecordDecoder(what)
        self.writer = rootfs.FileWriter(root, what)
        self.on_done = on_done

    def _write(self, data: bytes) -> None:
        for entry, chunk, end in self.decoder.feed(data):
            if end is None:
                self.writer.write(entry, chunk)
            else:
                self.writer.end(entry, keep=end is records.End.INTACT)

    def _close(self, meta: dict[str, Any]) -> None:
        try:
            self.decoder.close(meta)
        finally:
            self.writer.close()
        if self.on_done is not None:
            self.on_done(self.writer)

    def _abort(self) -> None:
        self.writer.abort()


class PagesSink(_Received):
    """Receives page runs (pre-copy rounds and the final delta) into the store."""

    def __init__(self, inc: Incoming, store: PageStore) -> None:
        super().__init__(inc, "pages")
        self.store = store
        self.decoder = RunDecoder()

    def _write(self, data: bytes) -> None:
        for pid, vaddr, piece in self.decoder.feed(data):
            self.store.write(pid, vaddr, piece)

    def _close(self, meta: dict[str, Any]) -> None:
        self.decoder.close(meta)


class AgentState:
    """The agent's state, shared by its call groups."""

    def __init__(self, host: HostConfig) -> None:
        self.host = host
        self.runc = Runc(host.runc_root, log_dir=host.data_dir / "logs")
        self.incoming: dict[str, Incoming] = {}
        #: Cleanups and keeps under way, by container: they run to their end
        #: even when the call that started them is cancelled.
        self._finishing: dict[str, asyncio.Future[Any]] = {}
        #: IPC namespaces made for pods in this session, by name, and those a
        #: member's restore has filled with the pod's SysV objects already.
        self.ipc_made: dict[str, Path] = {}
        self.ipc_filled: set[str] = set()
        #: Pods (by holder) whose loopback drops TCP while their members are restored.
        self.loop_held: set[str] = set()

    def _get(self, name: object) -> Incoming:
        if not isinstance(name, str) or name not in self.incoming:
            raise ProtocolError(f"no migration in progress for container {name!r}")
        return self.incoming[name]

    async def _continue(self, container: str) -> None:
        """SIGCONT to every process of a container restored held (CRIU's leave-stopped)."""
        for pid in await self.runc.pids(container):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def _keep_log(self, inc: Incoming, name: str) -> Path | None:
        """Copy a CRIU log out of the work dir, which cleanup will remove."""
        src = inc.criu_work / name
        if not src.exists():
            return None
        dst_dir = self.host.data_dir / "logs"
        dst_dir.mkdir(parents=True, exist_ok=True)
        dst = dst_dir / f"{inc.name}-{time.strftime('%Y%m%d-%H%M%S')}-{name}"
        shutil.copy2(src, dst)
        return dst



def write_marker(bundle: Path, text: str) -> None:
    """Set the bundle's migration marker in one step (a new file renamed over
    the old): an agent killed at any moment leaves the old text or the new,
    never no marker, which would make the bundle look like no migration's."""
    tmp = bundle / f"{INCOMING_MARKER}.tmp"
    tmp.write_text(f"{text}\n")
    os.replace(tmp, bundle / INCOMING_MARKER)


def held_until(marker: str | None) -> str | None:
    """The group's last member a held copy waits for (its marker, see HELD), or None."""
    parts = (marker or "").split()
    return parts[1] if len(parts) == 2 and parts[0] == HELD else None


def check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or len(name) > 200:
        raise ConfigError(f"invalid container name {name!r}")


def work_subdir(work: Path, rel: str) -> Path:
    """A dump directory the source may name: ``images`` or ``rounds/N``."""
    if not isinstance(rel, str) or not _WORK_SUBDIR.fullmatch(rel):
        raise ProtocolError(f"invalid dump directory {rel!r}")
    return work / rel


def check_parent(work: Path, images_dir: Path, parent: str) -> None:
    """``parent`` is relative to ``images_dir``, stays in ``work`` and exists."""
    if not isinstance(parent, str) or not _PARENT.fullmatch(parent):
        raise ProtocolError(f"invalid parent dump directory {parent!r}")
    target = (images_dir / parent).resolve()
    if not target.is_relative_to(work.resolve()) or not target.is_dir():
        raise ProtocolError(f"parent dump directory {parent!r} (from {images_dir.name}) does not exist here")


async def stop_criu_daemons(inc: Incoming) -> None:
    """Kill (if still running) and reap every page server and lazy-pages daemon of ``inc``."""
    for ps in inc.page_servers.values():
        await ps.kill()
    inc.close_relays()
    if inc.lazy is not None:
        await inc.lazy.kill()
    if inc.store_server is not None:
        await inc.store_server.close()
    if inc.push is not None:
        await inc.push.close()
    if n := await asyncio.to_thread(kill_strays, inc.work):
        log.warning("killed %d CRIU process(es) of %s that had outlived their daemon", n, inc.name)
