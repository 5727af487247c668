"""Rootfs sync logic: the plan, the record framing (engine/records.py), and applying both to a tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tug.engine import records, rootfs
from tug.engine.errors import ProtocolError
from tug.engine.rootfs import DIR, FILE, LINK, Entry


def E(path: str, kind: str = FILE, size: int = 0, mtime: int = 1, mode: int = 0o644, link: str = "") -> Entry:
    return Entry(path, kind, mode, 0, 0, size, mtime, link)


def test_plan_from_empty_sends_everything_parents_first() -> None:
    src = [E("bin", DIR, mode=0o755), E("bin/sh", LINK, link="busybox"), E("bin/busybox", size=10), E("etc", DIR)]
    p = rootfs.plan(src, [])
    assert [e.path for e in p.mkdirs] == ["bin", "etc"]
    assert [e.path for e in p.links] == ["bin/sh"]
    assert [e.path for e in p.send] == ["bin/busybox"]
    assert p.delete == [] and p.bytes_to_send == 10


def test_plan_sends_only_changes_and_deletes_extras_deepest_first() -> None:
    dest = [E("a", DIR), E("a/b", DIR), E("a/b/old", size=1), E("same", size=5), E("changed", size=5, mtime=1), E("x", FILE)]
    src = [E("a", DIR), E("same", size=5), E("changed", size=5, mtime=2), E("x", DIR)]
    p = rootfs.plan(src, dest)
    assert [e.path for e in p.send] == ["changed"]
    assert p.delete.index("a/b/old") < p.delete.index("a/b")
    assert "x" in p.delete and [e.path for e in p.mkdirs] == ["x"]  # a file turned into a directory


def test_plan_skips_special_files() -> None:
    assert rootfs.plan([E("dev/fifo", "o")], []).skipped == ["dev/fifo"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", "a//b", ""])
def test_unsafe_paths_are_refused(bad: str) -> None:
    with pytest.raises(ProtocolError):
        Entry.from_wire([bad, FILE, 0o644, 0, 0, 0, 0, ""])


def _records(files: dict[str, bytes]) -> bytes:
    out = b""
    for path, data in files.items():
        out += records.encode_record(E(path, size=len(data)), data)
    return out


def _decode(stream: bytes, chunks: list[int]) -> dict[str, bytes]:
    dec = records.RecordDecoder()
    got: dict[str, bytes] = {}
    pos = 0
    for n in chunks + [len(stream)]:
        for entry, chunk, _end in dec.feed(stream[pos : pos + n]):
            got[entry.path] = got.get(entry.path, b"") + bytes(chunk)
        pos += n
        if pos >= len(stream):
            break
    dec.finish()
    return got


FILES = {"a": b"hello", "empty": b"", "big": bytes(range(256)) * 80, "z/y": b"x"}


def test_records_whole_and_byte_by_byte() -> None:
    stream = _records(FILES)
    assert _decode(stream, [len(stream)]) == FILES
    assert _decode(stream, [1] * len(stream)) == FILES


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5000), max_size=50))
def test_records_any_chunking(chunks: list[int]) -> None:
    stream = _records(FILES)
    assert _decode(stream, chunks) == FILES


def test_truncated_stream_is_an_error() -> None:
    stream = _records({"a": b"hello"})
    dec = records.RecordDecoder()
    list(dec.feed(stream[:-2]))
    with pytest.raises(ProtocolError):
        dec.finish()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_records_raise_only_protocol_errors(data: bytes) -> None:
    dec = records.RecordDecoder()
    try:
        list(dec.feed(data))
        dec.finish()
    except ProtocolError:
        pass


def test_scan_apply_roundtrip(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d/e").mkdir(parents=True)
    (src / "d/e/f.txt").write_bytes(b"content")
    (src / "top").write_bytes(b"1234")
    os.symlink("d/e/f.txt", src / "ln")
    (dst / "stale").mkdir(parents=True)
    (dst / "stale/file").write_text("x")

    entries = rootfs.scan(src)
    p = rootfs.plan(entries, rootfs.scan(dst))
    rootfs.apply_structure(dst, p)
    writer = rootfs.FileWriter(dst)
    dec = records.RecordDecoder()
    for e in p.send:
        for entry, chunk, end in dec.feed(records.encode_record(e, (src / e.path).read_bytes())):
            if end is None:
                writer.write(entry, chunk)
            else:
                writer.end(entry, keep=end is records.End.INTACT)
    dec.finish()
    writer.close()

    assert rootfs.plan(rootfs.scan(src), rootfs.scan(dst)) == rootfs.Plan()
    assert (dst / "d/e/f.txt").read_bytes() == b"content"
    assert os.readlink(dst / "ln") == "d/e/f.txt"
    assert not (dst / "stale").exists()
    assert (dst / "top").stat().st_mtime_ns == (src / "top").stat().st_mtime_ns
