"""The source's file sender reads only what the scan saw as regular files
below the root: a container that swaps a file for a symlink (or a FIFO)
between the scan and the send gets zeros in a record marked CHANGED (which
the agent drops), never a host file.

The swap is made by the harness at the exact moment the sender has announced
the file and is about to open it (when its record header is written).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tug.engine import records, rootfs
from tug.engine.progress import Meter
from tug.engine.source.transfer import send_entries

SECRET = b"host secret: must never reach a container\n"


class Capture:
    """Collects a stream's bytes; calls ``on_header`` after each record header."""

    def __init__(self, on_header: Any) -> None:
        self.data = bytearray()
        self.on_header = on_header

    async def open_stream(self, kind: str, meta: dict[str, Any]) -> Capture:
        return self

    async def write(self, data: bytes | memoryview) -> None:
        self.data += data
        if len(data) < 200:  # a record header (file data comes in larger writes here)
            self.on_header()

    async def close(self, meta: dict[str, Any] | None = None) -> None:
        pass


def _payload(stream: bytes) -> dict[str, bytes]:
    """What each record carried; every one must be marked CHANGED (the agent drops it)."""
    dec, out = records.RecordDecoder(), {}
    for e, chunk, end in dec.feed(stream):
        out[e.path] = out.get(e.path, b"") + bytes(chunk)
        assert end in (None, records.End.CHANGED)
    dec.finish()
    return out


async def _send(root: Path, swap: Any) -> dict[str, bytes]:
    entries = [e for e in rootfs.scan(root) if e.kind == rootfs.FILE]
    cap = Capture(swap)
    meter = Meter("t", "rootfs", None, None)
    await send_entries(cap, kind="rootfs", container="c", root=root, entries=entries, meter=meter, frozen=False)  # type: ignore[arg-type]
    return _payload(bytes(cap.data))


async def test_file_swapped_for_a_symlink_at_send_time_sends_zeros(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    root = tmp_path / "root"
    root.mkdir()
    (root / "data").write_bytes(b"x" * len(SECRET))

    def swap() -> None:
        if not os.path.islink(root / "data"):
            os.unlink(root / "data")
            os.symlink(secret, root / "data")

    got = await _send(root, swap)
    assert got == {"data": bytes(len(SECRET))}


async def test_directory_swapped_for_a_symlink_at_send_time_sends_zeros(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "data").write_bytes(SECRET)
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d/data").write_bytes(b"y" * len(SECRET))

    def swap() -> None:
        if not os.path.islink(root / "d"):
            (root / "d/data").unlink()
            (root / "d").rmdir()
            os.symlink(host, root / "d")

    got = await _send(root, swap)
    assert got == {"d/data": bytes(len(SECRET))}


async def test_file_swapped_for_a_fifo_does_not_block_the_sender(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"z" * 10)

    def swap() -> None:
        if os.path.isfile(root / "f"):
            os.unlink(root / "f")
            os.mkfifo(root / "f")

    got = await _send(root, swap)
    assert got == {"f": bytes(10)}
