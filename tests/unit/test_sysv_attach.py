"""A pod member's SysV attachments: cut out of its mm image (pure), attached
again inside a real stopped process (engine/destination/sysvattach.py)."""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tug.engine.criu import mmimage
from tug.engine.criu.mmimage import VMA_AREA_SYSVIPC, Attach, SysvVma, chains, strip_sysv
from tug.engine.criu.protobuf import encode_varint
from tug.engine.destination import sysvattach
from tug.engine.errors import ImageFormatError
from tug.engine.procfs import thread_state
from tug.engine.ptrace import InjectError

PAGE = 4096
RW = mmap.PROT_READ | mmap.PROT_WRITE


def _field(number: int, value: int) -> bytes:
    return encode_varint(number << 3) + encode_varint(value)


def _msg(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def _vma(start: int, end: int, *, pgoff: int = 0, shmid: int = 0, prot: int = RW, status: int = 1,
         fdflags: int | None = None) -> bytes:
    body = b"".join(_field(n, v) for n, v in ((1, start), (2, end), (3, pgoff), (4, shmid), (5, prot), (6, 1), (7, status)))
    body += encode_varint(8 << 3) + encode_varint(1)  # fd: sint64 -1, zigzag
    if fdflags is not None:
        body += _field(10, fdflags)
    return _msg(14, body)


def _mm(*vmas: bytes) -> bytes:
    head = b"".join(_field(n, 0x400000 + n) for n in range(1, 13)) + _field(13, 33) + _field(13, 7)
    body = head + b"".join(vmas) + _field(15, 1)
    return struct.pack("<III", mmimage.IMG_COMMON_MAGIC, mmimage.MM_MAGIC, len(body)) + body


SYSV = VMA_AREA_SYSVIPC | 1


def test_sysv_vmas_are_cut_out_and_everything_else_is_kept() -> None:
    regular = [_vma(0x1000, 0x3000), _vma(0x9000, 0xA000, prot=mmap.PROT_READ)]
    seg = [_vma(0x5000, 0x6000, shmid=7, status=SYSV, fdflags=os.O_RDWR),
           _vma(0x6000, 0x8000, pgoff=0x1000, shmid=7, prot=mmap.PROT_READ, status=SYSV, fdflags=os.O_RDWR)]
    image = _mm(regular[0], *seg, regular[1])
    stripped, attaches = strip_sysv(image)
    assert stripped == _mm(*regular)
    assert attaches == [Attach(shmid=7, start=0x5000, end=0x8000, readonly=False, vmas=(
        SysvVma(start=0x5000, end=0x6000, pgoff=0, shmid=7, prot=RW, fdflags=os.O_RDWR, madv=0),
        SysvVma(start=0x6000, end=0x8000, pgoff=0x1000, shmid=7, prot=mmap.PROT_READ, fdflags=os.O_RDWR, madv=0),
    ))]


def test_an_image_without_sysv_vmas_is_returned_as_is() -> None:
    image = _mm(_vma(0x1000, 0x3000))
    stripped, attaches = strip_sysv(image)
    assert stripped is image and attaches == []


def test_read_only_attachments_and_segment_id_zero() -> None:
    (a,) = strip_sysv(_mm(_vma(0x5000, 0x6000, shmid=0, prot=mmap.PROT_READ, status=SYSV, fdflags=os.O_RDONLY)))[1]
    assert a.readonly and a.shmid == 0
    # Old images carry no fdflags: attached writable, as CRIU does.
    (b,) = strip_sysv(_mm(_vma(0x5000, 0x6000, shmid=3, status=SYSV)))[1]
    assert not b.readonly


def test_two_attachments_of_one_segment_are_two_shmats() -> None:
    got = chains([SysvVma(start=0x9000, end=0xA000, pgoff=0, shmid=4, prot=RW, fdflags=2, madv=0),
                  SysvVma(start=0x1000, end=0x2000, pgoff=0, shmid=4, prot=RW, fdflags=2, madv=0)])
    assert [a.start for a in got] == [0x1000, 0x9000]


@pytest.mark.parametrize("second", [
    SysvVma(start=0x7000, end=0x8000, pgoff=0x2000, shmid=4, prot=RW, fdflags=2, madv=0),  # a hole
    SysvVma(start=0x6000, end=0x7000, pgoff=0x3000, shmid=4, prot=RW, fdflags=2, madv=0),  # misordered
    SysvVma(start=0x6000, end=0x7000, pgoff=0x1000, shmid=5, prot=RW, fdflags=2, madv=0),  # another segment
])
def test_chains_crius_restore_refuses_are_refused(second: SysvVma) -> None:
    first = SysvVma(start=0x5000, end=0x6000, pgoff=0, shmid=4, prot=RW, fdflags=2, madv=0)
    with pytest.raises(ImageFormatError, match="does not continue an attachment"):
        chains([first, second])


def test_other_images_are_refused() -> None:
    with pytest.raises(ImageFormatError, match="not an mm image"):
        strip_sysv(b"\x19\x43\x56\x54\x25\x40\x08\x56" + b"\0" * 8)
    with pytest.raises(ImageFormatError, match="one record"):
        strip_sysv(_mm(_vma(0x1000, 0x2000)) + b"\0")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_an_image_error_never_anything_else(tail: bytes) -> None:
    data = struct.pack("<III", mmimage.IMG_COMMON_MAGIC, mmimage.MM_MAGIC, len(tail)) + tail
    try:
        strip_sysv(data)
    except ImageFormatError:
        pass


# --- attaching inside a real stopped process --------------------------------------------------------

_CHILD = textwrap.dedent("""
    import ctypes, mmap, os, signal, sys
    libc = ctypes.CDLL(None, use_errno=True)
    m = mmap.mmap(-1, 3 * 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    del m  # unmapped again: a free range, as CRIU leaves a cut-out VMA's
    print(addr, flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # as CRIU's leave-stopped leaves a restored process
    # Continued: the segment must be there, and this process's own state intact.
    data = ctypes.string_at(addr, 16)
    maps = open("/proc/self/maps").read()
    line = next(l for l in maps.splitlines() if l.startswith(f"{addr:x}-"))
    print(data.hex(), line.split()[1], flush=True)
    sys.stdout.flush()
""")


@pytest.fixture
def segment() -> Iterator[tuple[int, int]]:
    """A 3-page SysV segment (id, address in this process) whose first bytes are known."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    shmid = libc.shmget(0, 3 * PAGE, 0o1600)
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    addr = libc.shmat(shmid, None, 0)
    ctypes.memmove(addr, b"tug-sysv-attach!", 16)
    try:
        yield shmid, addr
    finally:
        libc.shmdt(ctypes.c_void_p(addr))
        libc.shmctl(shmid, 0, None)


def _stopped_child() -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    addr = int(child.stdout.readline())
    return child, addr


def _stops_again(pid: int) -> bool:
    """Detached, the thread re-enters its group-stop from inside the kernel
    (briefly "R" there, never back in user code): it shows "T" again."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if thread_state(pid, pid) == "T":
            return True
        time.sleep(0.001)
    return False


def test_a_stopped_process_gets_its_segment_and_runs_on_unharmed(segment: tuple[int, int]) -> None:
    shmid, _ = segment
    child, addr = _stopped_child()
    try:
        attach = Attach(shmid=shmid, start=addr, end=addr + 3 * PAGE, readonly=False, vmas=(
            SysvVma(start=addr, end=addr + PAGE, pgoff=0, shmid=shmid, prot=RW, fdflags=2, madv=0),
            SysvVma(start=addr + PAGE, end=addr + 3 * PAGE, pgoff=PAGE, shmid=shmid, prot=mmap.PROT_READ, fdflags=2,
                    madv=0),
        ))
        sysvattach.attach_process(child.pid, [attach])
        assert _stops_again(child.pid), "it must stay stopped until let go"
        assert select.select([child.stdout], [], [], 0.3)[0] == [], "it ran before its SIGCONT"
        maps = open(f"/proc/{child.pid}/maps").read()
        assert f"{addr + PAGE:x}-{addr + 3 * PAGE:x} r--s" in maps, maps
        os.kill(child.pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=30)
        assert child.returncode == 0
        data, perms = out.split()
        assert bytes.fromhex(data) == b"tug-sysv-attach!" and perms == "rw-s"
    finally:
        child.kill()
        child.wait()


def test_read_only_attach(segment: tuple[int, int]) -> None:
    shmid, _ = segment
    child, addr = _stopped_child()
    try:
        vma = SysvVma(start=addr, end=addr + 3 * PAGE, pgoff=0, shmid=shmid, prot=mmap.PROT_READ, fdflags=0, madv=0)
        sysvattach.attach_process(child.pid, [Attach(shmid=shmid, start=addr, end=vma.end, readonly=True, vmas=(vma,))])
        os.kill(child.pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=30)
        assert out.split()[1] == "r--s"
    finally:
        child.kill()
        child.wait()


def test_a_failed_attach_leaves_the_process_stopped_and_whole(segment: tuple[int, int]) -> None:
    """No such segment: the injected shmat fails, registers go back, the process stays stopped."""
    shmid, _ = segment
    child, addr = _stopped_child()
    try:
        vma = SysvVma(start=addr, end=addr + PAGE, pgoff=0, shmid=shmid + 999_999, prot=RW, fdflags=2, madv=0)
        with pytest.raises(InjectError, match="failed in the target"):
            sysvattach.attach_process(child.pid, [Attach(shmid=vma.shmid, start=addr, end=vma.end, readonly=False,
                                                         vmas=(vma,))])
        assert _stops_again(child.pid)
        os.kill(child.pid, signal.SIGCONT)
        child.communicate(timeout=30)
        assert child.returncode != 0  # it reads the range it was promised: nothing there (a restore would roll back)
    finally:
        child.kill()
        child.wait()


def test_a_running_process_is_not_injected(segment: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    shmid, _ = segment
    monkeypatch.setattr(sysvattach, "STOP_WAIT_S", 0.2)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        vma = SysvVma(start=0x10000000, end=0x10001000, pgoff=0, shmid=shmid, prot=RW, fdflags=2, madv=0)
        with pytest.raises(InjectError, match="never stopped"):
            sysvattach.attach_process(child.pid, [Attach(shmid=shmid, start=vma.start, end=vma.end, readonly=False,
                                                         vmas=(vma,))])
        assert "/SYSV" not in open(f"/proc/{child.pid}/maps").read()
    finally:
        child.kill()
        child.wait()


def test_take_attachments_rewrites_only_images_with_sysv_vmas(tmp_path: object) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    plain = _mm(_vma(0x1000, 0x2000))
    (d / "mm-1.img").write_bytes(plain)
    (d / "mm-7.img").write_bytes(_mm(_vma(0x1000, 0x2000), _vma(0x5000, 0x6000, shmid=2, status=SYSV)))
    (d / "mm-9.img").symlink_to(d / "mm-7.img")  # never followed
    plan = sysvattach.take_attachments(d)
    assert list(plan) == [7] and plan[7][0].shmid == 2
    assert (d / "mm-7.img").read_bytes() == plain and (d / "mm-1.img").read_bytes() == plain
