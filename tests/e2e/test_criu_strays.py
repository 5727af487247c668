"""CRIU processes that outlive their daemon are found by the paths they name, and only those.

A CRIU daemon killed while it probes the kernel leaves a forked, traced child
asleep for good (seen in the fault matrix); the agent's cleanup kills what
still names the migration's work dir once its daemons are stopped. Real CRIU
processes play the strays: ``criu page-server`` waits for a dump that never
comes, with a path in its work dir on the command line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tug.engine.criu.daemon import kill_strays
from tug.engine.criu.tool import criu_binary

from .test_images_criu import require_tools

pytestmark = pytest.mark.e2e


def page_server(work: Path) -> subprocess.Popen[bytes]:
    """A real ``criu page-server`` of ``work``: it waits for a dump that never comes."""
    images = work / "images"
    images.mkdir(parents=True)
    with socket.socket() as probe:  # a free port (CRIU takes no 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [criu_binary(), "page-server", "--images-dir", str(images), "--address", "127.0.0.1",
            "--port", str(port), "-o", "ps.log", "-v4"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = images / "ps.log", time.monotonic() + 10
    while not (log.exists() and "Running status-ready" in log.read_text(errors="replace")):
        assert proc.poll() is None, f"criu page-server exited with {proc.returncode}: {log.read_text() if log.exists() else ''}"
        assert time.monotonic() < deadline, "criu page-server never listened"
        time.sleep(0.01)
    return proc


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], Path]]:
    require_tools()
    mine, other = tmp_path / "mine", tmp_path / "other"
    procs = page_server(mine), page_server(other)
    yield procs[0], procs[1], mine
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_a_criu_naming_the_work_dir_is_killed_and_no_other(two: tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], Path]) -> None:
    stray, bystander, work = two
    assert kill_strays(work) == 1
    assert stray.wait(timeout=10) == -9
    assert bystander.poll() is None, "a CRIU of another work dir was hit"
    assert kill_strays(work) == 0


def test_a_prefix_of_another_path_is_not_a_match(tmp_path: Path) -> None:
    require_tools()
    proc = page_server(tmp_path / "work-2")
    try:
        assert kill_strays(tmp_path / "work") == 0
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert os.path.exists(criu_binary())
