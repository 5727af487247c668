"""The gate between runc and CRIU (criu/gate.py), with a stand-in for CRIU.

The script is run as runc runs CRIU (``PATH swrk FD``, a request waiting on a
seqpacket socket); the stand-in records that it ran and what it could read.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from tug.engine.criu import gate as gate_mod
from tug.engine.criu.gate import REQ_DUMP, REQ_VERSION, CriuGate
from tug.engine.errors import MigrationError
from tug.engine.runtime.gateddumps import GatedDumps

FAKE_CRIU = """\
import os, socket, sys
sk = socket.socket(fileno=int(sys.argv[2]))
open(os.environ["RAN"], "w").write(sk.recv(64).hex())
"""


@pytest.fixture
def fake_criu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    fake = tmp_path / "fake-criu"
    fake.write_text(f"#!{sys.executable}\n{FAKE_CRIU}")
    fake.chmod(0o700)
    monkeypatch.setattr(gate_mod, "criu_binary", lambda: str(fake))
    return tmp_path / "ran"


def launch(gate: CriuGate, kind: int, ran: Path) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """The gate's script as runc starts CRIU, a request of ``kind`` waiting on fd 5."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.send(bytes([0x08, kind, 0x12, 0x00]))
    fd = theirs.fileno()
    proc = subprocess.Popen(
        [str(gate.shim), "swrk", str(fd)], pass_fds=(fd,), env={**os.environ, **gate.env, "RAN": str(ran)},
        stderr=subprocess.PIPE,
    )
    theirs.close()
    return proc, ours


async def test_runc_s_version_check_passes_at_once(tmp_path: Path, fake_criu: Path) -> None:
    gate = CriuGate(tmp_path / "gate")
    gate.make()
    proc, _sk = launch(gate, REQ_VERSION, fake_criu)
    assert proc.wait(timeout=20) == 0
    assert fake_criu.read_text() == bytes([0x08, REQ_VERSION, 0x12, 0x00]).hex(), "CRIU reads the request whole"
    gate.close()


async def test_a_dump_waits_at_the_gate_until_it_opens(tmp_path: Path, fake_criu: Path) -> None:
    gate = CriuGate(tmp_path / "gate")
    gate.make()
    proc, _sk = launch(gate, REQ_DUMP, fake_criu)
    pid = await asyncio.wait_for(gate.held(), 20)
    assert pid == proc.pid
    await asyncio.sleep(0.2)
    assert proc.poll() is None and not fake_criu.exists(), "CRIU must not run before the gate opens"
    gate.open()
    gate.close()  # what was written stays readable
    assert proc.wait(timeout=20) == 0
    assert fake_criu.read_text().startswith("0801")


async def test_a_gate_closed_before_it_opened_fails_the_dump(tmp_path: Path, fake_criu: Path) -> None:
    gate = CriuGate(tmp_path / "gate")
    gate.make()
    proc, _sk = launch(gate, REQ_DUMP, fake_criu)
    await asyncio.wait_for(gate.held(), 20)
    gate.close()
    assert proc.wait(timeout=20) != 0
    assert b"closed before the freeze" in proc.stderr.read() if proc.stderr else False
    assert not fake_criu.exists()


async def test_a_dump_after_the_gate_was_closed_never_waits(tmp_path: Path, fake_criu: Path) -> None:
    gate = CriuGate(tmp_path / "gate")
    gate.make()
    gate.close()
    proc, _sk = launch(gate, REQ_DUMP, fake_criu)
    assert proc.wait(timeout=20) != 0 and not fake_criu.exists()


@pytest.mark.parametrize("head", [bytes([0x08, 2]), bytes([0x10, 1]), b"\x08", bytes([0x08, 0x81, 0x01])])
async def test_any_other_request_fails_without_running_criu(tmp_path: Path, fake_criu: Path, head: bytes) -> None:
    """A restore, a pre-dump's unknown shape, a cut or multi-byte type: never run, never wait."""
    gate = CriuGate(tmp_path / "gate")
    gate.make()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.send(head)
    fd = theirs.fileno()
    proc = subprocess.Popen([str(gate.shim), "swrk", str(fd)], pass_fds=(fd,), env={**os.environ, **gate.env},
                            stderr=subprocess.DEVNULL)
    theirs.close()
    assert proc.wait(timeout=20) != 0 and not fake_criu.exists()
    gate.close()


def _dump_through(gate: CriuGate, ran: Path) -> Coroutine[Any, Any, None]:
    """What runc does with a gate: run its script with a dump request, wait for it to end."""
    async def run() -> None:
        proc, _sk = launch(gate, REQ_DUMP, ran)
        code = await asyncio.to_thread(proc.wait, 30)
        if code != 0:
            raise MigrationError(f"runc: criu exited {code}")
    return run()


async def test_a_gated_dump_asked_for_as_started_runs(tmp_path: Path, fake_criu: Path) -> None:
    dumps = GatedDumps()
    key = (tmp_path / "img", tmp_path / "work", "127.0.0.1:1", None)
    assert await dumps.start("c", key, tmp_path / "gate", lambda gate: _dump_through(gate, fake_criu))
    assert not fake_criu.exists()
    assert await dumps.run("c", key)
    assert fake_criu.read_text().startswith("0801")


async def test_a_gated_dump_asked_for_differently_is_abandoned_unrun(tmp_path: Path, fake_criu: Path) -> None:
    dumps = GatedDumps()
    key = (tmp_path / "img", tmp_path / "work", "127.0.0.1:1", None)
    assert await dumps.start("c", key, tmp_path / "gate", lambda gate: _dump_through(gate, fake_criu))
    assert not await dumps.run("c", (*key[:3], "parent"))
    assert not await dumps.run("c", key), "abandoned: nothing left to run"
    assert not fake_criu.exists()


async def test_abandon_ends_every_waiting_dump_unrun(tmp_path: Path, fake_criu: Path) -> None:
    dumps = GatedDumps()
    for name in ("a", "b"):
        key = (tmp_path / name, tmp_path / "work", None, None)
        assert await dumps.start(name, key, tmp_path / f"gate-{name}", lambda gate: _dump_through(gate, fake_criu))
    await dumps.abandon()
    assert not fake_criu.exists()
