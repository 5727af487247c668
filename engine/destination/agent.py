"""The destination agent: ``python -m tug.engine.destination.agent``, started over SSH.

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
import json
import logging
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tug.engine import rootfs
from tug.engine.criu import tool as criu
from tug.engine.criu.pageserver import NOT_FLUSHED, PageServer, pages_bytes
from tug.engine.destination.lazypages import LazyPages
from tug.engine.destination.pagestore import PageStore
from tug.engine.errors import ConfigError, CriuError, MigrationError, PreconditionError, ProtocolError
from tug.engine.fsutil import private_dir, remove_tree
from tug.engine.hostcfg import HostConfig
from tug.engine.pagestream import RunDecoder
from tug.engine.runtime import network as netif
from tug.engine.runtime.endpoint import DestinationEndpoint
from tug.engine.runtime.network import EndpointSpec
from tug.engine.runtime.runc import Runc
from tug.transports import protocol as p
from tug.transports.session import Session, StreamSink

log = logging.getLogger("tug.agent")

SOFTWARE = "tug-agent/0.1"
INCOMING_MARKER = ".tug-incoming"


@dataclass(slots=True)
class Incoming:
    """One container this agent is receiving; the unit of cleanup."""

    name: str
    bundle: Path
    work: Path
    restored: bool = False
    store: PageStore | None = None
    network: EndpointSpec | None = None
    endpoint: DestinationEndpoint | None = None
    committed: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    #: CRIU page servers started for this container, one per dump, by id.
    page_servers: dict[int, PageServer] = field(default_factory=dict)
    #: The lazy-pages daemon of a lazy restore, until it has filled the memory.
    lazy: LazyPages | None = None

    @property
    def images(self) -> Path:
        return self.work / "images"

    @property
    def criu_work(self) -> Path:
        return self.work / "criu"


class RecordSink:
    """Receives a rootfs or images record stream into a directory."""

    def __init__(self, root: Path, on_done: Any = None) -> None:
        self.decoder = rootfs.RecordDecoder()
        self.writer = rootfs.FileWriter(root)
        self.on_done = on_done

    async def write(self, data: bytes) -> None:
        for entry, chunk, last in self.decoder.feed(data):
            self.writer.write(entry, chunk, last)

    async def close(self, meta: dict[str, Any]) -> None:
        try:
            self.decoder.finish()
        finally:
            self.writer.close()
        if self.on_done is not None:
            self.on_done(self.writer)

    async def abort(self, reason: str) -> None:
        self.writer.abort()


class PagesSink:
    """Receives page runs (pre-copy rounds and the final delta) into the store."""

    def __init__(self, store: PageStore) -> None:
        self.store = store
        self.decoder = RunDecoder()

    async def write(self, data: bytes) -> None:
        for pid, vaddr, piece in self.decoder.feed(data):
            self.store.write(pid, vaddr, piece)

    async def close(self, meta: dict[str, Any]) -> None:
        self.decoder.finish()

    async def abort(self, reason: str) -> None:
        pass


class Agent:
    def __init__(self, host: HostConfig) -> None:
        self.host = host
        self.runc = Runc(host.runc_root, log_dir=host.data_dir / "logs")
        self.incoming: dict[str, Incoming] = {}

    # ---- dispatch ----------------------------------------------------------

    async def handle_call(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        fn = getattr(self, f"call_{method}", None)
        if fn is None:
            raise ProtocolError(f"agent has no method {method!r}")
        log.info("call %s %s", method, {k: v for k, v in args.items() if not isinstance(v, (bytes, list))})
        result: dict[str, Any] = await fn(**args)
        return result

    async def open_stream(self, kind: str, meta: dict[str, Any]) -> StreamSink:
        inc = self._get(meta.get("container"))
        if kind == "rootfs":
            return RecordSink(inc.bundle / "rootfs", lambda w: inc.stats.__setitem__("rootfs_bytes", inc.stats.get("rootfs_bytes", 0) + w.bytes))
        if kind == "pages":
            if inc.store is None:
                inc.store = PageStore(inc.work / "store")
            return PagesSink(inc.store)
        if kind == "images":
            inc.images.mkdir(parents=True, exist_ok=True)
            return RecordSink(inc.images, lambda w: inc.stats.__setitem__("image_bytes", w.bytes))
        raise ProtocolError(f"agent accepts no stream of kind {kind!r}")

    def _get(self, name: object) -> Incoming:
        if not isinstance(name, str) or name not in self.incoming:
            raise ProtocolError(f"no migration in progress for container {name!r}")
        return self.incoming[name]

    # ---- calls -------------------------------------------------------------

    async def call_preflight(
        self, container: str, criu_version: str, cpuinfo: bytes = b"", network: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Can this host take ``container``? Nothing is changed here."""
        _check_name(container)
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

    async def call_prepare(self, container: str, config: bytes, network: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create the staging bundle and the work space."""
        _check_name(container)
        bundle = self.host.bundle_dir(container)
        if bundle.exists():
            if not (bundle / INCOMING_MARKER).exists():
                raise PreconditionError(f"bundle {bundle} already exists on {self.host.name}")
            shutil.rmtree(bundle)  # leftover of an attempt that died before cleaning up
        work = self.host.work_dir / container
        remove_tree(work)
        inc = Incoming(name=container, bundle=bundle, work=work)
        inc.network = EndpointSpec.from_dict(network) if network is not None else None
        self.incoming[container] = inc
        private_dir(self.host.bundles_dir)
        private_dir(self.host.work_dir)
        bundle.mkdir()
        (bundle / INCOMING_MARKER).write_text(f"{os.getpid()}\n")
        (bundle / "rootfs").mkdir()
        work.mkdir(parents=True)
        (bundle / "config.json").write_bytes(self._rewrite_config(container, config, inc.network is not None))
        if inc.network is not None:
            netif.save_spec(bundle, inc.network)
        return {"bundle": str(bundle), "work": str(work)}

    async def call_prepare_network(
        self, container: str, neighbors: list[dict[str, Any]] | None = None, fault: str | None = None
    ) -> dict[str, Any]:
        """Pre-restore: the endpoint exists, with its outer link still down and
        the container's neighbour cache in place (see network.read_neighbors)."""
        inc = self._get(container)
        if inc.network is None:
            return {"endpoint": None}
        net = self.host.network
        assert net is not None  # checked in preflight
        inc.endpoint = DestinationEndpoint(net, container, inc.network)
        ms = await inc.endpoint.prepare(neighbors, fault=fault)
        return {"endpoint": str(net.netns_path(container)), "ms": ms}

    def _criu_config(self, inc: Incoming, options: list[str]) -> None:
        """Point runc at a CRIU config file for this restore (org.criu.config)."""
        conf = inc.work / "criu-restore.conf"
        conf.write_text("\n".join(options) + "\n")
        cfg_path = inc.bundle / "config.json"
        spec = json.loads(cfg_path.read_text())
        spec.setdefault("annotations", {})["org.criu.config"] = str(conf)
        cfg_path.write_text(json.dumps(spec, indent=2))

    def _rewrite_config(self, container: str, raw: bytes, has_endpoint: bool) -> bytes:
        try:
            spec = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"container config is not valid JSON: {exc}") from None
        spec.setdefault("root", {})["path"] = "rootfs"
        if self.host.cgroup_parent:
            spec.setdefault("linux", {})["cgroupsPath"] = f"{self.host.cgroup_parent.rstrip('/')}/{container}"
        if has_endpoint:
            assert self.host.network is not None
            netif.set_netns_path_in_spec(spec, self.host.network.netns_path(container))
        return json.dumps(spec, indent=2).encode()

    async def call_rootfs_plan(self, container: str, manifest: list[Any]) -> dict[str, Any]:
        inc = self._get(container)
        source = [rootfs.Entry.from_wire(item) for item in manifest]
        root = inc.bundle / "rootfs"
        plan = rootfs.plan(source, await asyncio.to_thread(rootfs.scan, root))
        await asyncio.to_thread(rootfs.apply_structure, root, plan)
        return {
            "need": [e.path for e in plan.send],
            "deleted": len(plan.delete),
            "skipped": plan.skipped,
        }

    async def call_page_server_start(
        self, container: str, images: str, parent: str | None = None, fault: str | None = None
    ) -> dict[str, Any]:
        """Start a CRIU page server for one dump into ``images`` (under the work dir).

        ``images`` is ``images`` (the final dump) or ``rounds/N`` (a pre-copy
        round); ``parent`` (``../N-1`` or ``../rounds/N-1``) names the previous
        round's dir, which must be here already: the server links it as
        ``parent`` and checks the pre-dump's holes against it.
        """
        inc = self._get(container)
        images_dir = _work_subdir(inc.work, images)
        if parent is not None:
            _check_parent(inc.work, images_dir, parent)
        images_dir.mkdir(parents=True, exist_ok=True)
        if any(images_dir.glob("pagemap-*.img")):
            raise ProtocolError(f"{images} already holds a dump; each dump needs a fresh directory")
        ident = max(inc.page_servers, default=0) + 1
        ps = PageServer(ident, images_dir, inc.criu_work / f"page-server-{ident}.log", parent)
        inc.page_servers[ident] = ps
        t0 = time.monotonic()
        try:
            port = await ps.start()
        except CriuError as exc:
            exc.log_path = self._keep_log(inc, ps.log.name) or exc.log_path
            raise
        if fault == "kill-page-server":
            ps.kill_when_receiving()
        return {"id": ident, "port": port, "ms": (time.monotonic() - t0) * 1000}

    async def call_page_server_wait(self, container: str, id: int) -> dict[str, Any]:
        """Reap a page server after its session (it exits once it has written
        everything); a failure raises its CriuError with the log kept."""
        inc = self._get(container)
        ps = inc.page_servers.get(id)
        if ps is None:
            raise ProtocolError(f"no page server {id} for {container!r}")
        rc = await ps.wait()
        if rc != 0:
            ps.reported = True
            raise ps.failure(kept_log=self._keep_log(inc, ps.log.name))
        return {"exit": rc, "pages_bytes": pages_bytes(ps.images_dir)}

    async def call_restore(
        self,
        container: str,
        tcp_close: bool = False,
        rebuild_pages: bool = False,
        frames: list[bytes] | None = None,
        lazy: bool = False,
        fault: str | None = None,
    ) -> dict[str, Any]:
        """Restore; ``frames`` were held by the source's network lock, to be
        delivered once the restored sockets exist (see runtime.netlock).
        ``lazy``: the processes run before their memory is in place (see
        lazypages.py); :meth:`call_settle` waits for it."""
        inc = self._get(container)
        if tcp_close:
            self._criu_config(inc, ["tcp-close"])
        if rebuild_pages:
            if inc.store is None:
                raise ProtocolError("asked to rebuild pages images, but no pages were received")
            t_rebuild = time.monotonic()
            inc.stats.update(await asyncio.to_thread(inc.store.rebuild, inc.images))
            inc.stats["rebuild_ms"] = int((time.monotonic() - t_rebuild) * 1000)
            log.info("rebuilt pages images of %s: %s", container, inc.stats)
        if fault == "corrupt-images":
            _corrupt_images(inc.images)
        (inc.bundle / INCOMING_MARKER).unlink(missing_ok=True)
        (inc.bundle / INCOMING_MARKER).write_text("restoring\n")
        t0 = time.monotonic()
        if inc.endpoint is not None:
            await inc.endpoint.before_restore()
        # CRIU's lazy-pages daemon cannot read pages from parent images (a
        # page it finds in a parent is read but never handed to the faulting
        # process: the restore hangs), so a chained page store restores eagerly.
        chained = (inc.images / "parent").is_symlink()
        lazy = lazy and not chained
        inc.stats["lazy"] = int(lazy)
        if lazy:
            inc.lazy = LazyPages(inc.images, inc.criu_work)
            await inc.lazy.start()
        try:
            await self.runc.restore_detached(
                container, bundle=inc.bundle, image_dir=inc.images, work_dir=inc.criu_work,
                tcp_established=not tcp_close, lazy_pages=lazy,
            )
        except CriuError as exc:
            exc.log_path = self._keep_log(inc, "restore.log") or exc.log_path
            raise
        inc.restored = True
        if fault == "kill-lazy-pages" and inc.lazy is not None:
            inc.lazy.signal(signal.SIGKILL)  # test hook: the fill fails after the processes run
        if inc.endpoint is not None:
            inc.stats.update(await inc.endpoint.after_restore(list(frames or ()), fault=fault))
        st = await self.runc.require(container)
        return {"pid": st.pid, "status": st.status, "restore_ms": (time.monotonic() - t0) * 1000, **inc.stats}

    async def call_settle(self, container: str, timeout: float = 600.0) -> dict[str, Any]:
        """After a lazy restore: wait until the container's whole memory is in place."""
        inc = self._get(container)
        if inc.lazy is None:
            return {"lazy_ms": 0}
        t0 = time.monotonic()
        try:
            await inc.lazy.settle(timeout)
        except CriuError as exc:
            exc.log_path = self._keep_log(inc, inc.lazy.log.name) or exc.log_path
            raise
        return {"lazy_ms": (time.monotonic() - t0) * 1000}

    async def call_deliver(self, container: str, frames: list[bytes]) -> dict[str, Any]:
        """Frames sent to the container while it was frozen (see runtime.netlock)."""
        inc = self._get(container)
        if not inc.restored or inc.endpoint is None:
            raise ProtocolError(f"frames for {container!r} before its network is up")
        return {"delivered": inc.endpoint.deliver(frames)}

    async def call_commit(self, container: str) -> dict[str, Any]:
        """The destination now owns the container: stop guarding it for cleanup."""
        inc = self._get(container)
        if not inc.restored:
            raise ProtocolError(f"commit of {container!r} before restore")
        inc.committed = True
        await _stop_criu_daemons(inc)
        if inc.store is not None:
            inc.store.close()
        if inc.endpoint is not None:
            await inc.endpoint.close()
        (inc.bundle / INCOMING_MARKER).unlink(missing_ok=True)
        remove_tree(inc.work)
        del self.incoming[container]
        return {"committed": True, **_usage()}

    async def call_abort(self, container: str) -> dict[str, Any]:
        """Roll back: clean up; the answer carries the frames held here (they go back
        to the source) and which page servers had died on their own."""
        inc = self.incoming.get(container)
        frames = inc.endpoint.take_held() if inc is not None and inc.endpoint is not None else []
        failed: list[str] = []
        if inc is not None:
            failed = await self._cleanup(inc)
        return {"aborted": inc is not None, "frames": frames, "page_servers": failed}

    # ---- cleanup -----------------------------------------------------------

    async def _cleanup(self, inc: Incoming) -> list[str]:
        """Undo everything done for an uncommitted container.

        Returns how page servers that died on their own ended (their logs
        are kept); a server whose client merely went away is not news.
        """
        self.incoming.pop(inc.name, None)
        failed: list[str] = []
        for ps in inc.page_servers.values():
            if ps.failed_on_its_own and not ps.reported:
                err = ps.failure(kept_log=self._keep_log(inc, ps.log.name))
                if not any(NOT_FLUSHED in ln for ln in err.error_lines):
                    failed.append(str(err))
        await _stop_criu_daemons(inc)
        if inc.store is not None:
            inc.store.close()
        if inc.committed:
            if inc.endpoint is not None:
                await inc.endpoint.close()
            return failed
        if inc.endpoint is not None:
            # Cut off first: the killed container's sockets would send resets
            # to peers the resumed source still talks to.
            await inc.endpoint.cut_off()
        with contextlib.suppress(MigrationError):
            if await self.runc.state(inc.name) is not None:
                await self.runc.delete(inc.name, force=True)
            if await self.runc.forget(inc.name):
                log.warning("removed the state a killed restore of %s left behind", inc.name)
        if inc.endpoint is not None:
            await inc.endpoint.remove()
        shutil.rmtree(inc.bundle, ignore_errors=True)
        remove_tree(inc.work)
        log.info("cleaned up uncommitted %s", inc.name)
        return failed

    async def cleanup_all(self) -> None:
        for inc in list(self.incoming.values()):
            await self._cleanup(inc)

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


def _usage() -> dict[str, float]:
    """This agent's CPU time and peak memory (with its children: runc, CRIU)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_s": me.ru_utime + me.ru_stime,
        "children_cpu_s": kids.ru_utime + kids.ru_stime,
        "max_rss_kib": float(me.ru_maxrss),
    }


_WORK_SUBDIR = re.compile(r"images|rounds/[0-9]{1,6}")
_PARENT = re.compile(r"\.\./(rounds/)?[0-9]{1,6}")


def _work_subdir(work: Path, rel: str) -> Path:
    """A dump directory the source may name: ``images`` or ``rounds/N``."""
    if not isinstance(rel, str) or not _WORK_SUBDIR.fullmatch(rel):
        raise ProtocolError(f"invalid dump directory {rel!r}")
    return work / rel


def _check_parent(work: Path, images_dir: Path, parent: str) -> None:
    """``parent`` is relative to ``images_dir``, stays in ``work`` and exists."""
    if not isinstance(parent, str) or not _PARENT.fullmatch(parent):
        raise ProtocolError(f"invalid parent dump directory {parent!r}")
    target = (images_dir / parent).resolve()
    if not target.is_relative_to(work.resolve()) or not target.is_dir():
        raise ProtocolError(f"parent dump directory {parent!r} (from {images_dir.name}) does not exist here")


async def _stop_criu_daemons(inc: Incoming) -> None:
    """Kill (if still running) and reap every page server and lazy-pages daemon of ``inc``."""
    for ps in inc.page_servers.values():
        await ps.kill()
    if inc.lazy is not None:
        await inc.lazy.kill()


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or len(name) > 200:
        raise ConfigError(f"invalid container name {name!r}")


def _corrupt_images(images: Path) -> None:
    """Test hook (``--fault corrupt-images``): damage the dump like a bad disk would."""
    for img in sorted(images.glob("pagemap-*.img")) + sorted(images.glob("core-*.img")):
        data = bytearray(img.read_bytes())
        for i in range(8, len(data)):
            data[i] ^= 0xFF
        img.write_bytes(bytes(data))


# ---- process entry -----------------------------------------------------------


class _PipeStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        return await self.reader.read(1 << 20)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()


async def _stdio_stream() -> _PipeStream:
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
    return _PipeStream(reader, writer)


async def serve(host: HostConfig | None = None) -> None:
    host = host or HostConfig.from_env()
    agent = Agent(host)
    stream = await _stdio_stream()
    session = Session(stream, p.Role.AGENT, handler=agent)
    try:
        info = {"criu": str(await criu.version()), "runc": await agent.runc.version(), "pid": os.getpid()}
        await session.start(software=SOFTWARE, host=host.name, info=info)
        await session.wait_closed()
    except MigrationError as exc:
        log.error("session ended: %s", exc)
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
    try:
        import uvloop
    except ImportError:  # only the import: an ImportError from inside serve() must surface
        asyncio.run(serve(host))
        return
    uvloop.run(serve(host))


if __name__ == "__main__":
    main()
