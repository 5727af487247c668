"""End-to-end digests on real files: damage between the source and the destination
fails the migration before the restore.

The source side is tug's own sender code (``sync_rootfs``, ``send_images_except``,
the page-run framing of the content tracker) reading real files; the
destination is tug's real agent (:class:`tug.engine.destination.agent.Agent`)
writing into real directories under ``tmp_path``; between them two real
Sessions over a unix socket pair. The only fault is the link's: it flips one
byte of the bytes in flight (:class:`FlippingLink`), as a bug in a buffer or
a decoder would. Whatever was damaged, the ``restore`` call fails with an
IntegrityError naming the file or page run before anything is restored
(the agent never marks the bundle as restoring), and nothing damaged is
committed into the destination's trees. Sizes: test_integrity_sizes.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tug.engine import pagestream
from tug.engine.destination.agent import Agent
from tug.engine.destination.incoming import INCOMING_MARKER
from tug.engine.errors import IntegrityError, ProtocolError
from tug.engine.hostcfg import HostConfig
from tug.engine.progress import Meter
from tug.engine.source.transfer import send_images_except, sync_rootfs
from tug.transports import protocol as p
from tug.transports.session import Session

BOUND = 10.0
NAME = "c"
PAGE = pagestream.PAGE
MARK = b"<<tug-integrity-marker>>"


class FlippingLink:
    """A ByteStream over a socket; once armed, flips one byte of the first write holding ``MARK``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._r, self._w = reader, writer
        self.armed = False
        self.flipped = 0

    async def read(self) -> bytes:
        return await self._r.read(1 << 16)

    async def write(self, data: bytes) -> None:
        if self.armed and MARK in data:
            buf = bytearray(data)
            buf[buf.index(MARK) + 3] ^= 0x04
            data, self.armed = bytes(buf), False
            self.flipped += 1
        self._w.write(data)
        await self._w.drain()

    async def close(self) -> None:
        self._w.close()


@dataclass
class Link:
    source: Session
    agent: Agent
    link: FlippingLink
    host: HostConfig

    @property
    def bundle(self) -> Path:
        return self.host.bundle_dir(NAME)

    @property
    def work(self) -> Path:
        return self.host.work_dir / NAME

    def not_restored(self) -> None:
        """The agent refused before its restore began: nothing ran, the source may resume."""
        inc = self.agent.incoming[NAME]
        assert not inc.restored and inc.restoring is None
        assert (self.bundle / INCOMING_MARKER).read_text() != "restoring\n"


@pytest.fixture
async def link(tmp_path: Path) -> AsyncIterator[Link]:
    host = HostConfig(
        name="dst", runc_root=tmp_path / "dst/runc", data_dir=tmp_path / "dst/data", work_dir=tmp_path / "dst/work",
        cgroup_parent=None, ssh_identity=None, ssh_known_hosts=None,
    )
    agent = Agent(host)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    (sr, sw), (ar, aw) = [await asyncio.open_unix_connection(sock=s) for s in (a, b)]
    flipping = FlippingLink(sr, sw)
    source = Session(flipping, p.Role.SOURCE)
    agent_session = Session(FlippingLink(ar, aw), p.Role.AGENT, handler=agent)
    async with asyncio.timeout(BOUND):
        await asyncio.gather(
            source.start(software="test", host="src", info={}), agent_session.start(software="test", host="dst", info={})
        )
        await source.call("prepare", container=NAME, config=b"{}")
    yield Link(source, agent, flipping, host)
    await source.close()
    await agent_session.close()


def tree(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def rootfs_tree(tmp_path: Path) -> Path:
    root = tmp_path / "src/rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_bytes(b"127.0.0.1 localhost\n")
    (root / "etc/empty").write_bytes(b"")
    # Larger than a stream chunk, with the marker past the first MiB.
    (root / "data.bin").write_bytes(os.urandom(3 << 20) + MARK + os.urandom(5000))
    return root


def images_dir(tmp_path: Path) -> Path:
    images = tmp_path / "src/images"
    images.mkdir(parents=True)
    (images / "core-1.img").write_bytes(b"\x01\x02core" * 100 + MARK + b"\x00" * 3000)
    (images / "descriptors.json").write_bytes(b'["/dev/null"]')
    return images


def page_runs() -> list[tuple[int, int, bytes]]:
    marked = bytearray(os.urandom(8 * PAGE))
    marked[5 * PAGE : 5 * PAGE + len(MARK)] = MARK
    return [(42, 0x7F0000000000, os.urandom(2 * PAGE)), (42, 0x7F0000010000, bytes(marked)), (43, 0x400000, os.urandom(PAGE))]


async def send_rootfs(link: Link, root: Path, *, frozen: bool = True) -> None:
    await sync_rootfs(
        link.source, container=NAME, root=root, phase="transfer", emit=None, note=lambda *_: None, frozen=frozen
    )


async def send_images(link: Link, images: Path) -> None:
    await send_images_except(link.source, NAME, images, set(), Meter("transfer", "images", None, None))


async def send_pages(link: Link, runs: list[tuple[int, int, bytes]]) -> None:
    """As the content tracker's rounds and its final dump send them."""
    out = await link.source.open_stream("pages", {"container": NAME, "round": 0})
    for pid, vaddr, data in runs:
        await out.write(pagestream.encode_header(pid, vaddr, data))
        await out.write(data)
    await out.close({"round": 0, "runs": len(runs), "bytes": sum(len(d) for _, _, d in runs)})


async def restore_refused(link: Link, *sends: Any) -> IntegrityError:
    """The sends, then the restore call: an IntegrityError must come, and nothing may be restored."""
    with pytest.raises(IntegrityError) as info:
        async with asyncio.timeout(BOUND):
            for send in sends:
                await send
            await link.source.call("restore", container=NAME)
    assert link.link.flipped == 1
    link.not_restored()
    return info.value


async def test_good_path_everything_arrives_verified(link: Link, tmp_path: Path) -> None:
    root, images, runs = rootfs_tree(tmp_path), images_dir(tmp_path), page_runs()
    async with asyncio.timeout(BOUND):
        await send_rootfs(link, root)
        await send_images(link, images)
        await send_pages(link, runs)
        await link.source.call("rootfs_plan", container=NAME, manifest=[], last=False)  # a call: the streams were taken
    assert tree(link.bundle / "rootfs") == tree(root)
    assert tree(link.work / "images") == tree(images)
    store = link.work / "store"
    assert (store / "42.0.pages").read_bytes() == runs[0][2] + runs[1][2]
    assert (store / "43.0.pages").read_bytes() == runs[2][2]
    inc = link.agent.incoming[NAME]
    assert inc.stream_failure is None and inc.streams_open == 0
    inc.check_received()  # what the restore checks first


async def test_flipped_byte_in_a_received_rootfs_file_fails_before_restore(link: Link, tmp_path: Path) -> None:
    root = rootfs_tree(tmp_path)
    link.link.armed = True
    err = await restore_refused(link, send_rootfs(link, root))
    assert (err.subject, err.check) == ("rootfs file 'data.bin'", "crc32") and err.expected != err.got
    assert "rootfs file 'data.bin'" in str(err) and f"expected {err.expected:#010x}, got {err.got:#010x}" in str(err)
    # Nothing damaged was committed (and no temporary is left behind).
    got = tree(link.bundle / "rootfs")
    assert "data.bin" not in got and not any(".tug-" in name for name in got)


async def test_flipped_byte_in_a_staged_image_fails_before_restore(link: Link, tmp_path: Path) -> None:
    images = images_dir(tmp_path)
    link.link.armed = True
    err = await restore_refused(link, send_images(link, images))
    assert (err.subject, err.check) == ("image file 'core-1.img'", "crc32") and err.expected != err.got
    assert "core-1.img" not in tree(link.work / "images")


async def test_flipped_byte_in_a_stored_page_run_fails_before_restore(link: Link, tmp_path: Path) -> None:
    link.link.armed = True
    err = await restore_refused(link, send_pages(link, page_runs()))
    assert (err.subject, err.check) == ("page run of pid 42 at 0x7f0000010000 (8 pages)", "crc32")
    assert err.expected != err.got


async def test_the_agent_itself_refuses_to_restore_after_a_failed_stream(link: Link, tmp_path: Path) -> None:
    """Not only the source's late failure: the agent's restore checks what arrived."""
    link.link.armed = True
    with pytest.raises(IntegrityError):
        async with asyncio.timeout(BOUND):
            await send_pages(link, page_runs())
            await link.source.call("rootfs_plan", container=NAME, manifest=[], last=False)
    assert isinstance(link.agent.incoming[NAME].stream_failure, IntegrityError)
    with pytest.raises(IntegrityError, match="refusing to restore 'c': integrity check failed for page run of pid 42"):
        await link.agent.call_restore(NAME)
    link.not_restored()


async def test_a_stream_still_open_refuses_the_restore(link: Link) -> None:
    await link.source.open_stream("images", {"container": NAME})
    async with asyncio.timeout(BOUND):
        await link.source.call("rootfs_plan", container=NAME, manifest=[], last=False)  # the open arrived
    with pytest.raises(ProtocolError, match="still open"):
        await link.agent.call_restore(NAME)
    link.not_restored()
