"""Hostile rootfs trees: nothing outside the container's root is read or written.

Real file systems (tmp_path), real system calls, run as root like tug: each
case plants what a container could plant, drives tug's own scan / plan /
apply / write / read code, and checks the host file that the attack aims at.
Each test also runs with openat2 disabled, so the component walk that older
kernels use is held to the same rules.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tug.engine import records, rootfs, safefs
from tug.engine.errors import ProtocolError, UnsafePathError
from tug.engine.rootfs import DIR, FILE, LINK, Entry

SECRET = b"host secret: must never reach a container\n"
VICTIM = b"root:x:0:0:host file:/root:/bin/sh\n"


@pytest.fixture(params=["openat2", "component-walk"], autouse=True)
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(safefs, "openat2_available", None if request.param == "openat2" else False)
    yield str(request.param)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A directory standing for the host outside the container: a victim file and a secret."""
    h = tmp_path / "host"
    h.mkdir()
    (h / "passwd").write_bytes(VICTIM)
    os.chmod(h / "passwd", 0o644)
    (h / "secret").write_bytes(SECRET)
    os.chmod(h / "secret", 0o600)
    return h


def _host_unchanged(h: Path) -> None:
    assert (h / "passwd").read_bytes() == VICTIM
    assert stat.S_IMODE((h / "passwd").stat().st_mode) == 0o644
    assert (h / "passwd").stat().st_uid == 0
    assert sorted(p.name for p in h.iterdir()) == ["passwd", "secret"]


def _write(dst: Path, e: Entry, data: bytes, end: records.End = records.End.INTACT) -> None:
    w = rootfs.FileWriter(dst)
    try:
        dec = records.RecordDecoder()
        for entry, chunk, got in dec.feed(records.encode_record(e, data, end)):
            if got is None:
                w.write(entry, chunk)
            else:
                w.end(entry, keep=got is records.End.INTACT)
        dec.finish()
    finally:
        w.close()


def _sync(src: Path, dst: Path) -> rootfs.Plan:
    """One pass as the agent and the source run it, reading through safefs as the source does."""
    dst.mkdir(exist_ok=True)
    p = rootfs.plan(rootfs.scan(src), rootfs.scan(dst))
    rootfs.apply_structure(dst, p)
    with safefs.root_fd(src) as rootfd:
        for e in p.send:
            fd = safefs.open_regular_for_read(rootfd, e.path)
            data = b""
            if fd is not None:
                with os.fdopen(fd, "rb") as f:
                    data = f.read(e.size)
            end = records.End.INTACT if len(data) == e.size else records.End.CHANGED
            _write(dst, e, data.ljust(e.size, b"\0"), end)
    return p


def E(path: str, kind: str = FILE, size: int = 0, mode: int = 0o644, link: str = "") -> Entry:
    return Entry(path, kind, mode, 0, 0, size, 1_700_000_000_000_000_000, link)


# ---- writes on the destination ------------------------------------------------


def test_symlink_planted_at_the_old_temporary_name_is_not_written_through(tmp_path: Path, host: Path) -> None:
    """The reported attack: `motd` plus `.motd.tug-tmp -> /etc/passwd` in the container."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "motd").write_bytes(b"pwned::0:0::/:/bin/sh\n")
    os.chmod(src / "motd", 0o4777)
    os.symlink(host / "passwd", src / ".motd.tug-tmp")
    _sync(src, dst)
    _host_unchanged(host)
    assert (dst / "motd").read_bytes() == b"pwned::0:0::/:/bin/sh\n"
    assert os.readlink(dst / ".motd.tug-tmp") == str(host / "passwd")
    assert [p.name for p in dst.iterdir() if p.name.startswith(".tug-")] == []


def test_symlink_at_the_final_name_is_replaced_not_followed(tmp_path: Path, host: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(host / "passwd", dst / "motd")  # left by the container on an earlier pass
    _write(dst, E("motd", size=4), b"mine")
    _host_unchanged(host)
    assert not (dst / "motd").is_symlink() and (dst / "motd").read_bytes() == b"mine"


def test_symlinked_parent_directory_in_a_record_is_refused(tmp_path: Path, host: Path) -> None:
    """`etc -> /host` on the destination, then a record for etc/passwd."""
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(host, dst / "etc")
    with pytest.raises(UnsafePathError):
        _write(dst, E("etc/passwd", size=4), b"evil")
    _host_unchanged(host)


def test_directory_swapped_for_a_symlink_after_the_plan(tmp_path: Path, host: Path) -> None:
    """The plan made `etc` a directory; the tree changed before the file arrived."""
    dst = tmp_path / "dst"
    rootfs.apply_structure(dst, rootfs.plan([E("etc", DIR, mode=0o755), E("etc/passwd", size=4)], []))
    os.rmdir(dst / "etc")
    os.symlink(host, dst / "etc")
    with pytest.raises(UnsafePathError):
        _write(dst, E("etc/passwd", size=4), b"evil")
    _host_unchanged(host)


def test_manifest_that_links_a_directory_out_then_writes_below_it(tmp_path: Path, host: Path) -> None:
    """A crafted manifest: `d` is a link to the host, `d/passwd` a file, `d/sub` a directory."""
    dst = tmp_path / "dst"
    manifest = [E("d", LINK, link=str(host)), E("d/passwd", size=4), E("d/sub", DIR, mode=0o777)]
    p = rootfs.plan(manifest, [])
    with pytest.raises(UnsafePathError):
        rootfs.apply_structure(dst, p)  # directories come before links: d/sub has no parent
    rootfs.apply_structure(dst, rootfs.Plan(links=p.links))
    with pytest.raises(UnsafePathError):
        rootfs.apply_structure(dst, rootfs.Plan(mkdirs=p.mkdirs))  # now through the link: refused
    with pytest.raises(UnsafePathError):
        _write(dst, E("d/passwd", size=4), b"evil")
    _host_unchanged(host)


def test_deleting_below_a_symlinked_directory_touches_nothing_outside(tmp_path: Path, host: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(host, dst / "etc")
    # A stale plan (or a crafted one) asks to delete etc/passwd and etc/secret.
    with pytest.raises(UnsafePathError):
        rootfs.apply_structure(dst, rootfs.Plan(delete=["etc/passwd", "etc/secret"]))
    _host_unchanged(host)
    # Deleting the link itself removes the link, not its target.
    rootfs.apply_structure(dst, rootfs.Plan(delete=["etc"]))
    assert not os.path.lexists(dst / "etc")
    _host_unchanged(host)


def test_symlinked_parent_of_a_new_symlink_and_directory_is_refused(tmp_path: Path, host: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(host, dst / "etc")
    with pytest.raises(UnsafePathError):
        rootfs.apply_structure(dst, rootfs.Plan(links=[E("etc/passwd", LINK, link="/x")]))
    with pytest.raises(UnsafePathError):
        rootfs.apply_structure(dst, rootfs.Plan(mkdirs=[E("etc/new", DIR)]))
    _host_unchanged(host)


def test_metadata_of_a_new_symlink_applies_to_the_link_not_its_target(tmp_path: Path, host: Path) -> None:
    dst = tmp_path / "dst"
    link = Entry("ln", LINK, 0o777, 4242, 4242, 0, 1, str(host / "passwd"))
    rootfs.apply_structure(dst, rootfs.Plan(links=[link]))
    st = os.lstat(dst / "ln")
    assert (st.st_uid, st.st_gid) == (4242, 4242)
    _host_unchanged(host)


@pytest.mark.parametrize(
    "bad", ["..", "../x", "a/..", "a/../b", "a/../../x", ".", "./a", "a/.", "a/./b", "/abs", "a//b", "a/", "a\x00b", ""]
)
def test_dot_dot_in_every_position_is_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ProtocolError):
        Entry.from_wire([bad, FILE, 0o644, 0, 0, 0, 0, ""])
    (tmp_path / "r").mkdir()
    with safefs.root_fd(tmp_path / "r") as rootfd, pytest.raises(UnsafePathError):
        safefs.open_beneath(rootfd, bad, os.O_RDONLY)


@pytest.mark.parametrize(
    "item",
    [
        ["f", "x", 0o644, 0, 0, 0, 0, ""],  # unknown kind
        ["f", FILE, 0o100644, 0, 0, 0, 0, ""],  # file type bits in mode
        ["f", FILE, 0o644, -1, 0, 0, 0, ""],
        ["f", FILE, 0o644, 0, 2**40, 0, 0, ""],
        ["f", FILE, 0o644, 0, 0, -5, 0, ""],
        ["f", FILE, 0o644, 0, 0, 0, 2**70, ""],  # crafted mtime (crashed the agent's utime)
        ["f", FILE, 0o644, 0, 0, 0, 0, "a\x00b"],
        ["f", FILE, True, 0, 0, 0, 0, ""],
    ],
)
def test_out_of_range_metadata_is_a_protocol_error(item: list[object]) -> None:
    with pytest.raises(ProtocolError):
        Entry.from_wire(item)


def test_file_path_below_a_file_is_refused(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "a").write_bytes(b"x")
    with pytest.raises(UnsafePathError):
        _write(dst, E("a/b", size=1), b"y")


def test_setuid_file_keeps_exactly_its_mode_and_owner(tmp_path: Path) -> None:
    """chown clears setuid bits: the mode must be set after the owner, on the fd."""
    dst = tmp_path / "dst"
    dst.mkdir()
    e = Entry("su", FILE, 0o6755, 1000, 1000, 2, 5, "")
    _write(dst, e, b"#!")
    st = os.lstat(dst / "su")
    assert stat.S_IMODE(st.st_mode) == 0o6755 and (st.st_uid, st.st_gid) == (1000, 1000)


def test_a_failed_write_leaves_no_temporary(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    w = rootfs.FileWriter(dst)
    w.write(E("f", size=10), b"12345")
    w.abort()
    assert list(dst.iterdir()) == []


# ---- reads on the source ----------------------------------------------------------


def test_file_swapped_for_a_symlink_between_scan_and_send_is_not_read(tmp_path: Path, host: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "data").write_bytes(b"x" * len(SECRET))
    entries = rootfs.scan(src)
    os.unlink(src / "data")
    os.symlink(host / "secret", src / "data")  # the swap, after the scan
    with safefs.root_fd(src) as rootfd:
        assert safefs.open_regular_for_read(rootfd, "data") is None
    p = rootfs.plan(entries, rootfs.scan(dst))
    assert [e.path for e in p.send] == ["data"]
    # The full pass as tug runs it: the record completed with zeros and marked
    # CHANGED, which the agent drops; then the next pass.
    rootfs.apply_structure(dst, p)
    _write(dst, p.send[0], bytes(p.send[0].size), records.End.CHANGED)
    assert not (dst / "data").exists()
    _sync(src, dst)  # the frozen pass sees the symlink as a symlink
    assert os.readlink(dst / "data") == str(host / "secret")
    assert all(SECRET not in f.read_bytes() for f in dst.rglob("*") if f.is_file() and not f.is_symlink())


def test_directory_swapped_for_a_symlink_between_scan_and_send_is_not_read(tmp_path: Path, host: Path) -> None:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/secret").write_bytes(b"container's own")
    rootfs.scan(src)
    (src / "etc/secret").unlink()
    (src / "etc").rmdir()
    os.symlink(host, src / "etc")
    with safefs.root_fd(src) as rootfd:
        assert safefs.open_regular_for_read(rootfd, "etc/secret") is None


def test_scan_never_enters_a_symlinked_directory(tmp_path: Path, host: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(host, src / "h")
    os.symlink("/", src / "root")
    entries = rootfs.scan(src)
    assert [(e.path, e.kind) for e in entries] == [("h", LINK), ("root", LINK)]


def test_fifos_are_made_devices_only_where_the_config_allows_none_is_opened(tmp_path: Path) -> None:
    """A named pipe is made on the destination (a process may hold it open);
    a device node only if the container's config makes that device anyway;
    a socket never. None of them is ever opened for real on either side."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(src / "fifo", 0o640)
    os.chown(src / "fifo", 1234, 5678)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    sock.close()
    p = _sync(src, dst)
    assert sorted(p.skipped) == ["null", "sock"] and p.send == []
    assert [e.path for e in p.nodes] == ["fifo"]
    st = os.lstat(dst / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (1234, 5678)
    assert sorted(x.name for x in dst.iterdir()) == ["fifo"]
    allowed = rootfs.config_devices({"linux": {"devices": [{"type": "c", "major": 1, "minor": 3}, {"type": "b", "major": 8}]}})
    assert allowed == frozenset({("c", 1, 3)})
    p = rootfs.plan(rootfs.scan(src), rootfs.scan(dst), allowed)
    rootfs.apply_structure(dst, p)
    assert [e.path for e in p.nodes] == ["null"] and p.skipped == ["sock"]
    assert os.lstat(dst / "null").st_rdev == os.makedev(1, 3)
    # A regular file the container turned into a FIFO after the scan: opening it
    # for real would block the source forever; it is refused without opening.
    with safefs.root_fd(src) as rootfd:
        assert safefs.open_regular_for_read(rootfd, "fifo") is None
        assert safefs.open_regular_for_read(rootfd, "null") is None


def test_a_node_is_made_in_place_of_a_planted_symlink(tmp_path: Path, host: Path) -> None:
    """Whatever the destination's tree holds at a node's path (here a symlink
    to a host file) is removed, never followed."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    os.mkfifo(src / "fifo")
    os.symlink(host / "secret", dst / "fifo")
    _sync(src, dst)
    assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode)
    assert (host / "secret").read_bytes() == SECRET and stat.S_ISREG(os.lstat(host / "secret").st_mode)


def test_deep_tree_is_refused_clearly_not_a_crash(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY)
    try:
        for _ in range(rootfs.MAX_DEPTH + 5):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    with pytest.raises(UnsafePathError, match="deeper"):
        rootfs.scan(src)


def test_paths_longer_than_path_max_still_resolve_beneath(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    name = "n" * 200
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(25):  # ~5000 bytes of path
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"deep")
    finally:
        os.close(fd)
    rel = "/".join([name] * 25 + ["f"])
    with safefs.root_fd(root) as rootfd:
        rfd = safefs.open_regular_for_read(rootfd, rel)
        assert rfd is not None
        with os.fdopen(rfd, "rb") as f:
            assert f.read() == b"deep"


def test_openat2_refuses_symlinks_with_eloop(tmp_path: Path, host: Path, resolver: str) -> None:
    root = tmp_path / "r"
    root.mkdir()
    os.symlink(host, root / "h")
    with safefs.root_fd(root) as rootfd, pytest.raises(OSError) as info:
        safefs.open_beneath(rootfd, "h/secret", os.O_RDONLY)
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
