"""A streamed dump's pages, digested as they pass the forward and checked where the page server wrote them.

The stream is CRIU's page-server protocol (built by psclient); the "page
server's" output is what CRIU's page server writes: per pagemap, a pagemap
image and a pages image holding the entries' data in the order sent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tug.engine.criu import images
from tug.engine.criu.dumpdigest import StreamDigest, verify_pages_images
from tug.engine.errors import IntegrityError
from tug.transports.criu_pageserver import Kind

from .psclient import Session, page

P, S = Kind.PROCESS, Kind.SHMEM


def dump() -> Session:
    s = Session()
    s.open(P, 1).add(P, 1, 0x400000, page(1, 0) + page(1, 1)).add(P, 1, 0x7F0000001000, page(1, 2))
    s.open(P, 2).hole(P, 2, 0x500000, 3, images.PE_PARENT)
    s.open(S, 4242).add(S, 4242, 0, page(3, 0))
    return s.close()


def write_like_the_page_server(d: Path) -> None:
    """The images CRIU's page server writes for dump() (pages_id = pid, shm 9)."""
    layout = {
        images.pagemap_file_name(1): (1, [(0x400000, 2), (0x7F0000001000, 1)], page(1, 0) + page(1, 1) + page(1, 2)),
        images.pagemap_file_name(2): (2, [], b""),
        "pagemap-shmem-4242.img": (9, [(0, 1)], page(3, 0)),
    }
    for name, (pages_id, runs, data) in layout.items():
        entries = tuple(images.PagemapEntry(vaddr=v, nr_pages=n, flags=images.PE_PRESENT) for v, n in runs)
        (d / name).write_bytes(images.write_pagemap(images.Pagemap(pages_id=pages_id, entries=entries)))
        (d / images.pages_file_name(pages_id)).write_bytes(data)


def digest_of(wire: bytes, chunk: int) -> StreamDigest:
    sd = StreamDigest()
    for i in range(0, len(wire), chunk):
        sd.feed(wire[i : i + chunk])
    return sd


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 9000))
def test_the_pages_written_match_the_pages_sent_in_any_chunking(chunk: int) -> None:
    sd = digest_of(bytes(dump().wire), chunk)
    assert sd.error is None
    assert sorted(sd.digests) == ["process:1", "shmem:4242"]
    assert sd.digests["process:1"][1] == 3


def test_verify_accepts_what_was_sent(tmp_path: Path) -> None:
    write_like_the_page_server(tmp_path)
    sd = digest_of(bytes(dump().wire), 4096)
    assert verify_pages_images(tmp_path, sd.digests) == 4 * 4096


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda d: _flip(d / images.pages_file_name(1), 5000), "crc32 expected"),
        (lambda d: _flip(d / images.pages_file_name(9), 0), "crc32 expected"),
        (lambda d: (d / images.pages_file_name(1)).write_bytes((d / images.pages_file_name(1)).read_bytes()[:-1]), "size"),
        (lambda d: (d / images.pages_file_name(2)).write_bytes(page(7, 7)), "sent no pages"),
        (lambda d: (d / images.pagemap_file_name(1)).unlink(), "never written"),
    ],
)
def test_verify_catches_damage(tmp_path: Path, damage, why: str) -> None:  # type: ignore[no-untyped-def]
    write_like_the_page_server(tmp_path)
    sd = digest_of(bytes(dump().wire), 65536)
    damage(tmp_path)
    with pytest.raises(IntegrityError, match=why):
        verify_pages_images(tmp_path, sd.digests)


def test_a_stream_that_cannot_be_followed_says_so() -> None:
    sd = digest_of(b"\xff" * 64, 64)
    assert sd.error is not None


def test_bad_digests_from_the_source_are_refused(tmp_path: Path) -> None:
    write_like_the_page_server(tmp_path)
    for bad in ({"process:x": [0, 0]}, {"disk:1": [0, 0]}, {"process:1": ["a", 1]}):
        with pytest.raises(IntegrityError):
            verify_pages_images(tmp_path, bad)  # type: ignore[arg-type]


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_sysv_segment_with_shmid_0_is_verified_like_any_other(tmp_path: Path) -> None:
    """The first SysV segment of an IPC namespace has shmid 0; a task's pid never is 0."""
    from tug.engine.criu.dumpdigest import _pagemap_path
    from tug.engine.errors import IntegrityError

    assert _pagemap_path(tmp_path, "shmem:0").name == "pagemap-shmem-0.img"
    for bad in ("process:0", "shmem:-1", "shmem:x", "shmem:" + "9" * 21, "other:1"):
        with pytest.raises(IntegrityError):
            _pagemap_path(tmp_path, bad)
