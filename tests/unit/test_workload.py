"""tug-workload as a plain local process: memory check, heartbeat, TCP protocol.

These prove the instruments the lab relies on work before any migration is
involved: the verifier notices a damaged page, a freeze shows up as a
heartbeat gap, and the TCP streams match independent Python implementations.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tug.engine.errors import PreconditionError
from tug.engine.lab import workload as wl
from tug.engine.lab.workload import (
    analyze_heartbeat,
    build_workload,
    read_status,
    read_verify,
    verify_seq,
)

MASK64 = (1 << 64) - 1
PAGE = 4096


# ---- Python reference implementations ------------------------------------


def xorshift64s_stream(nbytes: int, seed: int) -> bytes:
    """The BULK stream: xorshift64*, each output word little endian."""
    x = seed or 0x9E3779B97F4A7C15
    out = bytearray()
    while len(out) < nbytes:
        x ^= x >> 12
        x ^= (x << 25) & MASK64
        x ^= x >> 27
        out += ((x * 0x2545F4914F6CDD1D) & MASK64).to_bytes(8, "little")
    return bytes(out[:nbytes])


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return h


# ---- fixtures -------------------------------------------------------------


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workload(tmp_path_factory.mktemp("bin") / "tug-workload")


@dataclass
class Workload:
    proc: subprocess.Popen[bytes]
    state: Path
    port: int

    @property
    def hb(self) -> Path:
        return self.state / "heartbeat.log"

    def status(self) -> dict[str, Any]:
        return read_status(self.state)

    def verify(self) -> dict[str, Any]:
        """SIGUSR1, then wait for a verify.json newer than the signal."""
        before = verify_seq(self.state)
        self.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: verify_seq(self.state) > before, what="verify.json")
        result = read_verify(self.state)
        assert result is not None
        return result

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return s


def _start(binary: Path, tmp_path: Path, *args: str, port: int | None = None) -> Workload:
    state = tmp_path / "state"
    port = free_port() if port is None else port
    proc = subprocess.Popen(
        [str(binary), "--memory", "8", "--dirty-rate", "3000", "--hot-set", "0.5",
         "--state", str(state), "--port", str(port), *args],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    w = Workload(proc, state, port)
    wait_for(lambda: (state / "status.json").exists() or proc.poll() is not None, what="status.json")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
    return w


@pytest.fixture
def workload(binary: Path, tmp_path: Path) -> Iterator[Workload]:
    w = _start(binary, tmp_path)
    try:
        # wait until the server is accepting (it starts right after the fill)
        wait_for(lambda: _can_connect(w.port), what="TCP server")
        yield w
    finally:
        _kill(w.proc)


def _can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.wait(timeout=5)
    if proc.stderr:
        proc.stderr.close()


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_line(s: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            raise AssertionError(f"EOF after {bytes(buf)!r}")
        buf += chunk
    return bytes(buf)


# ---- the running workload -------------------------------------------------


def test_status_and_heartbeat(workload: Workload) -> None:
    wait_for(lambda: analyze_heartbeat(workload.hb).lines >= 20, what="20 heartbeats")
    st = workload.status()
    assert st["pid"] == workload.proc.pid
    assert st["pages"] == 2048 and st["memory_mib"] == 8
    assert st["hot_pages"] == 1024 and st["dirty_rate"] == 3000
    assert st["block_addr"].startswith("0x")
    wait_for(lambda: workload.status()["dirtied_total"] > 0, what="dirtying")

    a = analyze_heartbeat(workload.hb)
    assert a.first_counter == 1
    assert a.last_counter == a.lines
    assert a.resets == 0 and a.backwards == 0 and a.skipped == 0 and a.malformed == 0
    assert 0 < a.max_gap_ms < 300


def test_verify_ok_then_catches_corrupted_page(workload: Workload) -> None:
    first = workload.verify()
    assert first["seq"] == 1
    assert first["ok"] is True and first["bad_pages"] == 0 and first["first_bad_page"] == -1
    assert first["pages"] == 2048

    # A cold page (hot set is the first half) is never rewritten, so the damage stays.
    st = workload.status()
    page = st["hot_pages"] + 77
    addr = int(st["block_addr"], 16) + page * PAGE + 123
    with open(f"/proc/{workload.proc.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(addr)
        old = mem.read(1)
        mem.seek(addr)
        mem.write(bytes([old[0] ^ 0xFF]))

    second = workload.verify()
    assert second["seq"] == 2
    assert second["ok"] is False
    assert second["bad_pages"] >= 1
    assert second["first_bad_page"] == page
    # status.json is rewritten with the heartbeat: it catches up (late under load).
    wait_for(lambda: workload.status()["verify_seq"] == 2, what="status.json with the second verify")


def test_freeze_shows_as_heartbeat_gap(workload: Workload) -> None:
    wait_for(lambda: analyze_heartbeat(workload.hb).lines >= 5, what="heartbeats")
    before = analyze_heartbeat(workload.hb).last_counter
    workload.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.3)
    finally:
        workload.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: analyze_heartbeat(workload.hb).last_counter >= before + 10, what="heartbeats after SIGCONT")

    a = analyze_heartbeat(workload.hb, since_counter=before)
    assert a.first_counter == before
    assert a.max_gap_ms >= 300
    assert a.max_gap_at_counter > before
    assert a.resets == 0 and a.backwards == 0 and a.skipped == 0
    # memory still consistent after a freeze with dirtying backlog
    assert workload.verify()["ok"] is True


def test_tcp_get_in_order(workload: Workload) -> None:
    with workload.connect() as s:
        s.sendall(b"".join(f"GET req{i}\n".encode() for i in range(50)))
        counters = []
        for i in range(50):
            ident, counter = recv_line(s).split()
            assert ident == f"req{i}".encode()
            counters.append(int(counter))
        # and one at a time, spaced out, so the counter visibly moves
        for i in range(3):
            time.sleep(0.03)
            s.sendall(f"GET x{i}\r\n".encode())
            ident, counter = recv_line(s).split()
            assert ident == f"x{i}".encode()
            counters.append(int(counter))
    assert counters == sorted(counters)
    assert counters[-1] > counters[0] >= 1


def test_tcp_bulk_matches_reference(workload: Workload) -> None:
    n = 1 << 20
    with workload.connect() as s:
        s.sendall(b"BULK %d 12345\nBULK 13 0\nGET after\n" % n)
        assert recv_exact(s, n) == xorshift64s_stream(n, 12345)
        assert recv_exact(s, 13) == xorshift64s_stream(13, 0)
        assert recv_line(s).split()[0] == b"after"


def test_tcp_sum_matches_reference(workload: Workload) -> None:
    data = os.urandom(1 << 20)
    with workload.connect() as s:
        s.sendall(b"SUM %d\n" % len(data))
        s.sendall(data)
        assert recv_line(s) == b"%016x\n" % fnv1a64(data)
        s.sendall(b"SUM 0\nFOO\nGET\nBULK 1\nGET ok\n")
        assert recv_line(s) == b"%016x\n" % fnv1a64(b"")
        assert recv_line(s) == b"ERR\n"
        assert recv_line(s) == b"ERR\n"
        assert recv_line(s) == b"ERR\n"
        assert recv_line(s).split()[0] == b"ok"


def test_tcp_slow_reader_does_not_stall_others(workload: Workload) -> None:
    with workload.connect() as slow, workload.connect() as fast:
        slow.sendall(b"BULK 100000000 1\n")  # never read: server must not block on it
        time.sleep(0.1)
        before = analyze_heartbeat(workload.hb).last_counter
        fast.sendall(b"GET f\n")
        assert recv_line(fast).startswith(b"f ")
        wait_for(lambda: analyze_heartbeat(workload.hb).last_counter > before + 5, what="heartbeats")


def test_sigterm_exits_zero(workload: Workload) -> None:
    workload.proc.send_signal(signal.SIGTERM)
    assert workload.proc.wait(timeout=5) == 0


def test_port_in_use_is_not_fatal(binary: Path, tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", 0))
        blocker.listen()
        port = int(blocker.getsockname()[1])
        w = _start(binary, tmp_path, port=port)
        try:
            wait_for(lambda: analyze_heartbeat(w.hb).lines >= 5, what="heartbeats")
            assert w.proc.poll() is None
            w.proc.send_signal(signal.SIGTERM)
            assert w.proc.wait(timeout=5) == 0
            assert w.proc.stderr is not None
            assert b"cannot listen" in w.proc.stderr.read()
        finally:
            _kill(w.proc)


def test_bad_arguments_exit_2(binary: Path, tmp_path: Path) -> None:
    for args in (["--hot-set", "0"], ["--hot-set", "1.5"], ["--memory", "0"], ["--bogus"], ["extra"]):
        proc = subprocess.run([str(binary), "--state", str(tmp_path), *args], capture_output=True, timeout=5)
        assert proc.returncode == 2, args


# ---- build ----------------------------------------------------------------


def test_build_is_skipped_when_up_to_date(binary: Path) -> None:
    mtime = binary.stat().st_mtime_ns
    assert build_workload(binary) == binary
    assert binary.stat().st_mtime_ns == mtime
    assert (binary.parent / (binary.name + ".sha256")).read_text().strip()


def test_build_redone_when_hash_differs(tmp_path: Path, binary: Path) -> None:
    dest = tmp_path / "tug-workload"
    dest.write_bytes(binary.read_bytes())
    (tmp_path / "tug-workload.sha256").write_text("0" * 64 + "\n")
    build_workload(dest)
    assert (tmp_path / "tug-workload.sha256").read_text() == (binary.parent / "tug-workload.sha256").read_text()


def test_build_without_gcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc here
    with pytest.raises(PreconditionError, match="gcc") as exc:
        build_workload(tmp_path / "tug-workload")
    assert "\n" not in str(exc.value)
    assert "install" in str(exc.value)


def test_missing_static_libc_message() -> None:
    msg = wl._compile_error_message("/usr/bin/ld: cannot find -lc: No such file or directory\ncollect2: error: ld returned 1\n")
    assert "static C library" in msg and "libc6-dev" in msg and "\n" not in msg


# ---- heartbeat analysis on synthetic logs ----------------------------------


def _log(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "heartbeat.log"
    p.write_text(text)
    return p


def test_analyze_truncated_last_line(tmp_path: Path) -> None:
    p = _log(tmp_path, "1 1000000000 5\n2 1010000000 6\n3 1020000000 7\n4 10300")
    a = analyze_heartbeat(p)
    assert (a.lines, a.first_counter, a.last_counter) == (3, 1, 3)
    assert a.resets == a.backwards == a.skipped == a.malformed == 0
    assert a.max_gap_ms == pytest.approx(10.0)


def test_analyze_counts_resets_backwards_skips_and_gap(tmp_path: Path) -> None:
    ms = 1_000_000
    rows = [(1, 0), (2, 10), (3, 20), (5, 30), (4, 40), (1, 540), (2, 550)]
    p = _log(tmp_path, "".join(f"{c} {t * ms} 0\n" for c, t in rows) + "garbage line\n")
    a = analyze_heartbeat(p)
    assert a.lines == 7
    assert a.skipped == 3  # 3->5, 5->4, 4->1
    assert a.backwards == 2  # 5->4, 4->1
    assert a.resets == 2  # 5->4 (down), 4->1 (down and restart)
    assert a.max_gap_ms == pytest.approx(500.0)
    assert a.max_gap_at_counter == 1
    assert a.malformed == 1


def test_analyze_since_counter_keeps_later_reset(tmp_path: Path) -> None:
    p = _log(tmp_path, "".join(f"{c} {i * 10_000_000} 0\n" for i, c in enumerate([1, 2, 3, 4, 5, 1, 2])))
    a = analyze_heartbeat(p, since_counter=4)
    assert (a.lines, a.first_counter, a.last_counter, a.resets) == (4, 4, 2, 1)
    empty = analyze_heartbeat(p, since_counter=99)
    assert (empty.lines, empty.first_counter, empty.max_gap_ms, empty.max_gap_at_counter) == (0, 0, 0.0, 0)


def test_analyze_catches_a_torn_record_by_its_checksum(tmp_path: Path) -> None:
    """Records carry an FNV-1a checksum of their fields: one altered in place
    (same shape, a digit changed) is torn, not read as a heartbeat."""
    def rec(c: int, t: int) -> str:
        body = f"{c} {t * 10_000_000} {c}"
        return f"{body} {wl.fnv1a64(body.encode()):016x}\n"
    good = [rec(c, c) for c in range(1, 6)]
    altered = good[2].replace(" 3 ", " 8 ", 1)  # the mono field of record 3
    a = analyze_heartbeat(_log(tmp_path, "".join(good[:2] + [altered] + good[3:])))
    assert a.torn == 1 and a.lines == 4 and a.skipped == 1  # 2 -> 4: the torn record is missing
    assert analyze_heartbeat(_log(tmp_path, "".join(good))).torn == 0


def test_read_helpers_before_start(tmp_path: Path) -> None:
    assert read_verify(tmp_path) is None
    assert verify_seq(tmp_path) == 0
    with pytest.raises(PreconditionError):
        read_status(tmp_path)
    (tmp_path / "verify.json").write_text(json.dumps({"seq": 7, "ok": True}))
    assert verify_seq(tmp_path) == 7


def test_pod_members_share_semaphores_and_a_segment(binary: Path, tmp_path: Path) -> None:
    """Two pod members by one key (here in the host's IPC namespace, with a
    key of this test's own): each sees the other move in both objects; a
    member started with --pod-no-shm uses the semaphores only."""
    key = str(0x7400_0000 + os.getpid() % 0x0100_0000)
    members = []
    try:
        for slot, extra in ((0, ()), (1, ()), (2, ("--pod-no-shm",))):
            d = tmp_path / f"m{slot}"
            d.mkdir()
            members.append(_start(binary, d, "--pod-ipc", key, "--pod-slot", str(slot), *extra))
        time.sleep(0.5)  # a few heartbeats each
        pods = [m.verify()["pod"] for m in members]
        assert pods[0]["shm_id"] >= 0 and pods[0]["shm_id"] == pods[1]["shm_id"], pods
        for pod in pods[:2]:
            assert pod["shm_same"] and pod["shm_attached"] == 2 and pod["shm_peers"] == 1, pod
        assert pods[2]["shm_id"] == -1, pods[2]
        for pod in pods:
            assert pod["ipc_same"] and pod["ipc_peers"] == 2, pod
    finally:
        for m in members:
            _kill(m.proc)
        subprocess.run(["ipcrm", "-M", key], capture_output=True)
        subprocess.run(["ipcrm", "-S", key], capture_output=True)
