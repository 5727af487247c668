"""The content tracker's final step with runc, on one host and without the lab.

A runc container (busybox + tug-workload, 64 MiB, dirtying pages) in a
private runc root plays the source. Two rounds record its memory in the
tracker and a page store (the destination's); then, as migration.py does,
the container is paused and ``ContentRounds.final_dump`` runs ``runc checkpoint
--leave-running --tcp-established --page-server`` into the filter, whose delta
goes on a stub "pages" stream into the same store. The store rebuilds the
pages image, a copy of the container is restored from the images with
``runc restore``, and the workload verifies every page of its memory.

Needs root, runc, criu, gcc (static libc) and busybox; fails when missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tug.engine.destination.pagestore import PageStore
from tug.engine.lab.demo import APPLETS
from tug.engine.lab.workload import build_workload, read_verify, verify_seq
from tug.engine.pagestream import RunDecoder
from tug.engine.runtime.runc import Runc
from tug.engine.source.trackers.content import ContentRounds
from tug.engine.source.trackers.shadow import ProcessMemory
from tug.policies import parse_policy

from ..unit.test_precopy_final import StubMigration
from .conftest import remove_cgroups
from .test_images_criu import require_tools

pytestmark = pytest.mark.e2e

NAME = "psf-src"
COPY = "psf-copy"


def bundle(path: Path, name: str, cgroup: str, rootfs: Path | None) -> None:
    path.mkdir(parents=True)
    subprocess.run(["runc", "spec"], cwd=path, check=True, capture_output=True)
    spec = json.loads((path / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = [
        "/usr/bin/tug-workload", "--memory", "64", "--dirty-rate", "2000", "--hot-set", "0.05",
        "--state", "/state", "--port", "7000",
    ]  # fmt: skip
    spec["root"] = {"path": "rootfs", "readonly": False}
    spec["linux"]["cgroupsPath"] = f"{cgroup}/{name}"
    (path / "config.json").write_text(json.dumps(spec))
    if rootfs is not None:
        shutil.copytree(rootfs, path / "rootfs", symlinks=True)


def make_rootfs(dst: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None or shutil.which("runc") is None:
        pytest.fail("this test needs runc and busybox: run 'make test' (scripts/setup.sh installs them)")
    workload = build_workload(dst.parent / "tug-workload")
    for d in ("bin", "usr/bin", "proc", "sys", "dev", "tmp", "etc", "state", "root"):
        (dst / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, dst / "bin/busybox")
    for applet in APPLETS:
        (dst / "bin" / applet).symlink_to("busybox")
    shutil.copy2(workload, dst / "usr/bin/tug-workload")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[Runc, Path, str]]:
    require_tools()
    root = tmp_path / "runc-root"
    cgroup = f"/tug-psfilter-test-{os.getpid()}"
    try:
        yield Runc(root, log_dir=tmp_path / "logs"), tmp_path, cgroup
    finally:
        for name in (NAME, COPY):
            subprocess.run(["runc", "--root", str(root), "delete", "--force", name], capture_output=True)
        remove_cgroups(cgroup)


async def record_round(runc: Runc, pc: ContentRounds, store: PageStore) -> int:
    """A content-tracker round without the session: what ContentRounds.round sends."""
    sent = 0
    for host_pid in await runc.pids(NAME):
        mem = ProcessMemory(host_pid)
        try:
            for region in mem.regions():
                for vaddr, n in mem.runs(region):
                    for run_vaddr, data in pc.tracker.scan(mem, vaddr, n).changed:
                        store.write(mem.ns_pid, run_vaddr, data)
                        sent += len(data) // 4096
        finally:
            mem.close()
    return sent


async def test_runc_final_dump_through_the_filter_restores_intact(host: tuple[Runc, Path, str]) -> None:
    runc, tmp, cgroup = host
    rootfs = tmp / "image" / "rootfs"
    make_rootfs(rootfs)
    src = tmp / "src"
    bundle(src, NAME, cgroup, rootfs)
    subprocess.run(
        ["runc", "--root", str(runc.root), "run", "-d", "--bundle", str(src), NAME],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    async with asyncio.timeout(30):
        while not (src / "rootfs/state/status.json").exists():
            await asyncio.sleep(0.05)

    m = StubMigration()
    pc = ContentRounds(m.ctx, parse_policy("phaul"))
    store = PageStore(tmp / "store")
    first = await record_round(runc, pc, store)
    await asyncio.sleep(0.3)  # the workload dirties pages meanwhile
    await record_round(runc, pc, store)
    await asyncio.sleep(0.3)

    images_dir = tmp / "images"
    await pc.prepare_final(images_dir)
    await runc.pause(NAME)

    async def dump(page_server: str | None) -> None:
        await runc.checkpoint_frozen(
            NAME, image_dir=images_dir, work_dir=tmp / "criu", tcp_established=True, page_server=page_server, timeout=60
        )

    await pc.final_dump(dump, None)
    pc.close()
    assert (await runc.require(NAME)).status == "paused", "the source stays frozen after its dump"
    ((kind, meta, stream),) = m.streams
    assert (kind, meta["round"]) == ("pages", "final")
    assert stream.closed is not None and (stream.closed["round"], stream.closed["bytes"]) == ("final", pc.final_delta_bytes)
    dec = RunDecoder()
    for pid, vaddr, piece in dec.feed(bytes(stream.data)):
        store.write(pid, vaddr, piece)
    dec.close(stream.closed)  # every run's digest verified, and as many runs and bytes as were sent
    assert 0 < pc.final_delta_bytes < first * 4096 // 4, "only the pages dirtied since the last round"
    assert not [p for p in images_dir.glob("pages-*.img")], "no process pages written on the source"
    assert pc.rebuilt_pages() and (images_dir / "pagemap-1.img").exists() and (images_dir / "descriptors.json").exists()
    assert not any("stayed corked" in n for n in m.notes), m.notes

    stats = store.rebuild(images_dir)
    store.close()
    assert stats["renamed_files"] + stats["chained_processes"] + stats["empty_files"] == len(pc.rebuilt_pages())
    copy = tmp / "copy"
    bundle(copy, COPY, cgroup, None)
    shutil.copytree(src / "rootfs", copy / "rootfs", symlinks=True)
    await runc.restore_detached(COPY, bundle=copy, image_dir=images_dir, work_dir=tmp / "criu-restore", tcp_established=True)
    state = copy / "rootfs" / "state"
    before = verify_seq(state)
    await runc.kill(COPY, signal.SIGUSR1)
    async with asyncio.timeout(20):
        while (verify := read_verify(state)) is None or int(verify.get("seq", 0)) <= before:
            await asyncio.sleep(0.05)
    assert verify["ok"] and verify["bad_pages"] == 0, verify
