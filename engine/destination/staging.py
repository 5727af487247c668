"""Staging a container on the destination: its bundle, rootfs, network and
the CRIU page servers its dumps stream into, before anything runs here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tug.engine import rootfs
from tug.engine.criu.dumpdigest import verify_pages_images
from tug.engine.criu.pageserver import PageServer, pages_bytes
from tug.engine.destination import podmanstage
from tug.engine.destination.incoming import (
    INCOMING_MARKER,
    AgentState,
    Incoming,
    PagesSink,
    RecordSink,
    check_name,
    check_parent,
    work_subdir,
)
from tug.engine.destination.pagestore import PageStore
from tug.engine.destination.volumes import stage_volumes
from tug.engine.errors import ConfigError, CriuError, PreconditionError, ProtocolError
from tug.engine.fsutil import private_dir, remove_tree
from tug.engine.runtime import ipcns
from tug.engine.runtime import network as netif
from tug.engine.runtime.endpoint import DestinationEndpoint
from tug.engine.runtime.network import EndpointSpec
from tug.engine.volumes import file_digest, read_nonce
from tug.transports.session import StreamSink

log = logging.getLogger("tug.agent")


class StagingCalls(AgentState):
    """Calls that receive a container (nothing of it runs yet)."""

    async def open_stream(self, kind: str, meta: dict[str, Any]) -> StreamSink:
        inc = self._get(meta.get("container"))
        if kind == "rootfs":
            return RecordSink(
                inc, kind, inc.bundle / "rootfs",
                lambda w: inc.stats.__setitem__("rootfs_bytes", inc.stats.get("rootfs_bytes", 0) + w.bytes),
            )
        if kind == "pages":
            if inc.store is None:
                inc.store = PageStore(inc.work / "store")
            return PagesSink(inc, inc.store)
        if kind == "images":
            inc.images.mkdir(parents=True, exist_ok=True)
            return RecordSink(inc, kind, inc.images, lambda w: inc.stats.__setitem__("image_bytes", w.bytes))
        if kind == "volume":
            return RecordSink(inc, kind, self._volume_root(inc, meta.get("volume")))
        raise ProtocolError(f"agent accepts no stream of kind {kind!r}")

    async def call_prepare(
        self,
        container: str,
        config: bytes,
        network: dict[str, Any] | None = None,
        volumes: Any = None,
        netns_of: str | None = None,
        ipc_of: str | None = None,
        podman: Any = None,
    ) -> dict[str, Any]:
        """Create the staging bundle and the work space (and the directories
        of copied volumes: destination/volumes.py)."""
        check_name(container)
        bundle = self.host.bundle_dir(container)
        if bundle.exists():
            if not (bundle / INCOMING_MARKER).exists():
                raise PreconditionError(f"bundle {bundle} already exists on {self.host.name}")
            shutil.rmtree(bundle)  # leftover of an attempt that died before cleaning up
        work = self.host.work_dir / container
        remove_tree(work)
        inc = Incoming(name=container, bundle=bundle, work=work)
        inc.network = EndpointSpec.from_dict(network) if network is not None else None
        if netns_of is not None:
            # A pod's member: it joins the namespace of a container received
            # in this session (prepared first), never anything else here.
            holder = self.incoming.get(netns_of) if isinstance(netns_of, str) else None
            if holder is None or holder.network is None or inc.network is not None:
                raise ProtocolError(f"{container!r} cannot join the network namespace of {netns_of!r}")
            inc.netns_of = netns_of
        if ipc_of is not None:
            # A pod's IPC namespace: made with its first member, joined by the others.
            check_name(ipc_of)
            if ipc_of != container and ipc_of not in self.ipc_made:
                raise ProtocolError(f"{container!r} cannot join the IPC namespace of {ipc_of!r}")
            if ipc_of not in self.ipc_made:
                path = ipcns.ns_dir(self.host.data_dir) / ipc_of
                await asyncio.to_thread(ipcns.create, path)
                self.ipc_made[ipc_of] = path
            inc.ipc_of = ipc_of
        self.incoming[container] = inc
        private_dir(self.host.bundles_dir)
        private_dir(self.host.work_dir)
        bundle.mkdir()
        (bundle / INCOMING_MARKER).write_text(f"{os.getpid()}\n")
        (bundle / "rootfs").mkdir()
        work.mkdir(parents=True)
        (bundle / "config.json").write_bytes(self._rewrite_config(inc, config, volumes))
        if inc.network is not None:
            netif.save_spec(bundle, inc.network)
        if podman is not None:  # recreated under this host's podman, its overlay at bundle/rootfs
            await podmanstage.prepare(self.host, inc, podman)
        return {"bundle": str(bundle), "work": str(work)}

    async def call_prepare_network(
        self, container: str, neighbors: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Pre-restore: the endpoint exists, with its outer link still down and
        the container's neighbour cache in place (see network.read_neighbors)."""
        inc = self._get(container)
        if inc.network is None:
            return {"endpoint": None}
        net = self.host.network
        assert net is not None  # checked in preflight
        await podmanstage.drop_placeholder(self.host, inc)
        inc.endpoint = DestinationEndpoint(net, container, inc.network)
        ms = await inc.endpoint.prepare(neighbors)
        if inc.podman is not None:  # podman's spec joins the endpoint's namespace
            await podmanstage.init_stopped(inc)
        return {"endpoint": str(net.netns_path(container)), "ms": ms}

    def _rewrite_config(self, inc: Incoming, raw: bytes, volumes: Any) -> bytes:
        try:
            spec = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"container config is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ConfigError("container config is not a JSON object")
        spec.setdefault("root", {})["path"] = "rootfs"
        if self.host.cgroup_parent:
            spec.setdefault("linux", {})["cgroupsPath"] = f"{self.host.cgroup_parent.rstrip('/')}/{inc.name}"
        if inc.network is not None or inc.netns_of is not None:
            assert self.host.network is not None
            netif.set_netns_path_in_spec(spec, self.host.network.netns_path(inc.netns_of or inc.name))
        if inc.ipc_of is not None:
            ipcns.set_path_in_spec(spec, self.ipc_made[inc.ipc_of])
        inc.volumes = {v.index: v for v in stage_volumes(inc.bundle, spec, volumes)}
        return json.dumps(spec, indent=2).encode()

    @staticmethod
    def _volume_root(inc: Incoming, index: Any) -> Path:
        vol = inc.volumes.get(index) if type(index) is int else None
        if vol is None or vol.root is None:
            raise ProtocolError(f"{inc.name!r} has no copied volume {index!r}")
        return vol.root

    async def call_volume_check(self, path: str, name: str) -> dict[str, Any]:
        """Read back the nonce the source wrote into a shared volume's directory
        (None: this host has other storage at that path)."""
        if not path.startswith("/"):
            raise ProtocolError("a volume path is absolute")
        return {"nonce": await asyncio.to_thread(read_nonce, Path(path), name)}

    async def call_volume_digest(self, path: str) -> dict[str, Any]:
        """The content digest of a shared bound file, as this host reads it."""
        if not path.startswith("/"):
            raise ProtocolError("a volume path is absolute")
        return {"digest": await asyncio.to_thread(file_digest, Path(path))}

    async def call_rootfs_plan(
        self, container: str, manifest: list[Any], last: bool = True, volume: int | None = None
    ) -> dict[str, Any]:
        """One part of the source's manifest; the last part applies the tree.

        A manifest comes in parts (each well under the frame limit) so that a
        tree of any size can be planned; the answer names the files to send
        by their index in the whole manifest, which keeps it small too.
        """
        inc = self._get(container)
        inc.manifest.extend(rootfs.Entry.from_wire(item) for item in manifest)
        if len(inc.manifest) > rootfs.MAX_ENTRIES:
            inc.manifest.clear()
            raise ProtocolError(f"rootfs manifest of {container!r} has more than {rootfs.MAX_ENTRIES} entries")
        if not last:
            return {"parts": True}
        source, inc.manifest = inc.manifest, []
        root = inc.bundle / "rootfs" if volume is None else self._volume_root(inc, volume)
        # Device nodes only in the rootfs, and only those its config makes anyway.
        devices = rootfs.config_devices(json.loads((inc.bundle / "config.json").read_bytes())) if volume is None else frozenset()
        plan = rootfs.plan(source, await asyncio.to_thread(rootfs.scan, root), devices)
        await asyncio.to_thread(rootfs.apply_structure, root, plan)
        index = {e.path: i for i, e in enumerate(source)}
        return {
            "need": [index[e.path] for e in plan.send],
            "deleted": len(plan.delete),
            "nodes": len(plan.nodes),
            "skipped": len(plan.skipped),
            "skipped_examples": plan.skipped[:5],
        }

    async def call_page_server_start(
        self, container: str, images: str, parent: str | None = None
    ) -> dict[str, Any]:
        """Start a CRIU page server for one dump into ``images`` (under the work dir).

        ``images`` is ``images`` (the final dump) or ``rounds/N`` (a pre-copy
        round); ``parent`` (``../N-1`` or ``../rounds/N-1``) names the previous
        round's dir, which must be here already: the server links it as
        ``parent`` and checks the pre-dump's holes against it.
        """
        inc = self._get(container)
        images_dir = work_subdir(inc.work, images)
        if parent is not None:
            check_parent(inc.work, images_dir, parent)
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
        return {"id": ident, "port": port, "ms": (time.monotonic() - t0) * 1000}

    async def call_page_server_wait(
        self, container: str, id: int, digests: dict[str, list[int]] | None = None
    ) -> dict[str, Any]:
        """Reap a page server after its session (it exits once it has written
        everything); a failure raises its CriuError with the log kept. Then
        its pages images are checked against the source's ``digests``
        (criu/dumpdigest.py)."""
        inc = self._get(container)
        ps = inc.page_servers.get(id)
        if ps is None:
            raise ProtocolError(f"no page server {id} for {container!r}")
        rc = await ps.wait()
        if rc != 0:
            ps.reported = True
            raise ps.failure(kept_log=self._keep_log(inc, ps.log.name))
        if not isinstance(digests, dict):
            raise ProtocolError("a page server's pages come with the source's digests")
        checked = await asyncio.to_thread(verify_pages_images, ps.images_dir, digests)
        return {"exit": rc, "pages_bytes": pages_bytes(ps.images_dir), "verified_bytes": checked}
