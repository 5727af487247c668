"""Sizes are never padded or cut: a file that differs from its scan is dropped or an error.

Real files under ``tmp_path`` and tug's own sender (:func:`send_entries`)
and agent-side writer: a file that shrinks, grows, is rewritten or vanishes
after the scan of a frozen container is an IntegrityError on the source
(the old sender padded it with zeros or cut it, silently); while the
container runs it is sent marked CHANGED and the agent drops it, keeping
what it had; and the agent commits a file only with exactly its announced
size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tug.engine import records, rootfs
from tug.engine.errors import IntegrityError
from tug.engine.progress import Meter
from tug.engine.source.transfer import send_entries

NAME = "c"


def tree(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


class Capture:
    """A session stand-in that keeps one stream's bytes (the source side on its own)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.meta: dict[str, Any] | None = None

    async def open_stream(self, kind: str, meta: dict[str, Any]) -> Capture:
        return self

    async def write(self, data: bytes | memoryview) -> None:
        self.data += data

    async def close(self, meta: dict[str, Any] | None = None) -> None:
        self.meta = dict(meta or {})


async def send_after_scan(root: Path, change: Any, *, frozen: bool, kind: str = "rootfs") -> Capture:
    """Scan ``root``, let ``change`` alter it, then send what the scan saw, as tug does."""
    entries = [e for e in rootfs.scan(root) if e.kind == rootfs.FILE]
    change()
    cap = Capture()
    meter = Meter("t", kind, None, None)
    await send_entries(cap, kind=kind, container=NAME, root=root, entries=entries, meter=meter, frozen=frozen)  # type: ignore[arg-type]
    return cap


@pytest.mark.parametrize("kind", ["rootfs", "images"])
async def test_a_file_that_shrinks_while_frozen_is_an_error_not_padding(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "log").write_bytes(b"a" * 8192)
    with pytest.raises(IntegrityError) as info:
        await send_after_scan(root, lambda: os.truncate(root / "log", 1000), frozen=True, kind=kind)
    what = "image file" if kind == "images" else "rootfs file"
    err = info.value
    assert (err.subject, err.check, err.expected, err.got) == (f"{what} 'log'", "size", 8192, 1000)
    assert "size expected 8192 bytes, got 1000" in str(err)


async def test_a_file_that_grows_while_frozen_is_an_error_not_cut(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "log").write_bytes(b"a" * 8192)

    def grow() -> None:
        with open(root / "log", "ab") as f:
            f.write(b"b" * 100)

    with pytest.raises(IntegrityError, match="size expected 8192 bytes, got 8292"):
        await send_after_scan(root, grow, frozen=True)


async def test_a_file_rewritten_in_place_while_frozen_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"a" * 100)
    st = os.stat(root / "f")

    def rewrite() -> None:
        (root / "f").write_bytes(b"b" * 100)
        os.utime(root / "f", ns=(st.st_atime_ns, st.st_mtime_ns + 1))

    with pytest.raises(IntegrityError) as info:
        await send_after_scan(root, rewrite, frozen=True)
    assert info.value.check == "mtime_ns"


async def test_a_file_that_vanishes_while_frozen_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"a" * 100)
    with pytest.raises(IntegrityError, match="size expected 100 bytes, got 0 .it vanished"):
        await send_after_scan(root, lambda: os.unlink(root / "f"), frozen=True)


async def test_a_file_that_shrinks_while_running_is_dropped_not_committed_padded(tmp_path: Path) -> None:
    """The live pass may meet a changing file: the agent drops it, and keeps what it had."""
    root, dst = tmp_path / "root", tmp_path / "dst"
    root.mkdir()
    dst.mkdir()
    (root / "log").write_bytes(b"a" * 8192)
    (root / "other").write_bytes(b"steady")
    (dst / "log").write_bytes(b"old version")
    cap = await send_after_scan(root, lambda: os.truncate(root / "log", 1000), frozen=False)
    assert cap.meta == {"files": 2, "bytes": 8192 + 6}
    dec, writer = records.RecordDecoder("rootfs file"), rootfs.FileWriter(dst, "rootfs file")
    for entry, chunk, end in dec.feed(bytes(cap.data)):
        if end is None:
            writer.write(entry, chunk)
        else:
            writer.end(entry, keep=end is records.End.INTACT)
    dec.close(cap.meta)
    writer.close()
    assert tree(dst) == {"log": b"old version", "other": b"steady"}
    assert writer.changed == 1 and writer.files == 1


def test_the_agent_commits_a_file_only_with_its_announced_size(tmp_path: Path) -> None:
    writer = rootfs.FileWriter(tmp_path, "rootfs file")
    e = rootfs.Entry("f", rootfs.FILE, 0o644, 0, 0, 10, 1, "")
    writer.write(e, b"12345")
    with pytest.raises(IntegrityError, match="rootfs file 'f': size expected 10 bytes, got 5"):
        writer.end(e, keep=True)
    writer.write(e, b"1234567890")
    writer.write(e, b"!")
    with pytest.raises(IntegrityError, match="got 11"):
        writer.end(e, keep=True)
    writer.close()
    assert list(tmp_path.iterdir()) == []  # neither short nor long file committed, no temporary left
