"""A dump that times out or is cancelled leaves the source as it was: frozen, clean, resumable.

A runc container (busybox + tug-workload, private runc root, no lab) is
paused and dumped the way the engine dumps it (``Runc.checkpoint_frozen``:
``runc checkpoint --leave-running --page-server``) into a page server that
accepts the connection and never answers, as a stuck destination would: CRIU
then sits in the middle of the memory dump, its parasite inside the
container's process and the freezer thawed (CRIU thaws it once the tasks are
seized). Then the dump is cancelled (as Ctrl-C or a phase deadline does) or
runs into its own timeout, and:

* the cancellation (or the timeout error) reaches the caller;
* no CRIU or runc of this dump is left, and no child of ours is a zombie;
* the container's processes carry no parasite (no ``/memfd:CRIUMFD``
  mapping) and are neither traced nor stopped;
* the container is paused again (freezer FROZEN), as the engine's rollback
  expects, and after ``runc resume`` it runs on with its memory intact.

Killing CRIU's process group outright (what tug did before) fails every one
of the container checks: the parasite stays mapped and the "paused"
container runs. Needs root, runc, criu, gcc and busybox; fails when missing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tug.engine.criu.tool import runs_criu
from tug.engine.errors import CriuError
from tug.engine.lab.workload import read_verify, verify_seq
from tug.engine.runtime.runc import Runc

from .conftest import remove_cgroups
from .test_images_criu import require_tools
from .test_psfilter_runc import bundle, make_rootfs

pytestmark = pytest.mark.e2e

NAME = "criu-stop"
#: CRIU maps its parasite from a memfd of this name (compel/include/infect-priv.h).
PARASITE = "CRIUMFD"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[Runc, Path]]:
    require_tools()
    root = tmp_path / "runc-root"
    cgroup = f"/tug-criu-stop-test-{os.getpid()}"
    rootfs = tmp_path / "image" / "rootfs"
    make_rootfs(rootfs)
    src = tmp_path / "src"
    bundle(src, NAME, cgroup, rootfs)
    try:
        subprocess.run(
            ["runc", "--root", str(root), "run", "-d", "--bundle", str(src), NAME],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        yield Runc(root, log_dir=tmp_path / "logs"), src
    finally:
        subprocess.run(["runc", "--root", str(root), "delete", "--force", NAME], capture_output=True)
        remove_cgroups(cgroup)


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


def has_parasite(pid: int) -> bool:
    return PARASITE in Path(f"/proc/{pid}/maps").read_text()


def leftovers(container_pid: int, runc_root: Path) -> list[str]:
    """CRIU processes dumping ``container_pid``, runc processes of ``runc_root``, zombie children of ours."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = status_of(pid)
        except OSError:
            continue
        if runs_criu(pid) and f"-t {container_pid}" in cmdline:
            found.append(f"criu {pid}: {cmdline}")
        elif str(runc_root) in cmdline:
            found.append(f"runc {pid}: {cmdline}")
        elif status.get("PPid") == str(os.getpid()) and status.get("State", "").startswith("Z"):
            found.append(f"zombie child {pid} ({status.get('Name')})")
    return found


async def start_dump_into_a_stuck_page_server(
    runc: Runc, work: Path, listener: socket.socket, timeout: float
) -> tuple[asyncio.Task[None], int]:
    """Pause the container and start its frozen dump; return once CRIU's parasite is inside."""
    await runc.pause(NAME)
    (pid,) = await runc.pids(NAME)
    host, port = listener.getsockname()
    dump = asyncio.create_task(
        runc.checkpoint_frozen(
            NAME, image_dir=work / "images", work_dir=work / "criu", page_server=f"{host}:{port}", timeout=timeout
        )
    )
    async with asyncio.timeout(30):
        while not has_parasite(pid):
            assert not dump.done(), "the dump ended before CRIU infected the container"
            await asyncio.sleep(0.01)
    assert status_of(pid)["TracerPid"] != "0", "CRIU has seized the container's process"
    return dump, pid


async def assert_source_intact(runc: Runc, bundle_dir: Path, pid: int) -> None:
    assert not leftovers(pid, runc.root), leftovers(pid, runc.root)
    for p in await runc.pids(NAME):
        st = status_of(p)
        assert not has_parasite(p), f"CRIU's parasite is still mapped in {p}"
        assert st["TracerPid"] == "0", f"{p} is still traced by {st['TracerPid']}"
        assert not st["State"].startswith(("t", "T")), f"{p} is stopped: {st['State']}"
    state = await runc.require(NAME)
    assert state.status == "paused", f"the source must stay frozen until the rollback resumes it, is {state.status}"

    await runc.resume(NAME)
    state_dir = bundle_dir / "rootfs" / "state"
    beats = len((state_dir / "heartbeat.log").read_text().splitlines())
    before = verify_seq(state_dir)
    await runc.kill(NAME, signal.SIGUSR1)  # the workload checks every page of its memory
    async with asyncio.timeout(20):
        while (verify := read_verify(state_dir)) is None or int(verify.get("seq", 0)) <= before:
            await asyncio.sleep(0.05)
    assert verify["ok"] and verify["bad_pages"] == 0, verify
    async with asyncio.timeout(10):
        while len((state_dir / "heartbeat.log").read_text().splitlines()) <= beats + 5:
            await asyncio.sleep(0.05)
    assert (await runc.require(NAME)).status == "running"


async def wait_running(bundle_dir: Path) -> None:
    async with asyncio.timeout(30):
        while not (bundle_dir / "rootfs/state/status.json").exists():
            await asyncio.sleep(0.05)


async def test_a_cancelled_dump_leaves_the_source_frozen_and_clean(host: tuple[Runc, Path], tmp_path: Path) -> None:
    runc, bundle_dir = host
    await wait_running(bundle_dir)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        dump, pid = await start_dump_into_a_stuck_page_server(runc, tmp_path / "work", listener, timeout=300)
        conn, _ = listener.accept()  # accepted, never answered: CRIU waits in mid-dump
        with conn:
            dump.cancel()
            with pytest.raises(asyncio.CancelledError):
                await dump
            await assert_source_intact(runc, bundle_dir, pid)


async def test_a_timed_out_dump_leaves_the_source_frozen_and_clean(host: tuple[Runc, Path], tmp_path: Path) -> None:
    runc, bundle_dir = host
    await wait_running(bundle_dir)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        dump, pid = await start_dump_into_a_stuck_page_server(runc, tmp_path / "work", listener, timeout=3)
        conn, _ = listener.accept()
        with conn:
            with pytest.raises(CriuError) as failed:
                await dump
            assert failed.value.returncode is None, "it timed out, it did not fail on its own"
            await assert_source_intact(runc, bundle_dir, pid)


async def test_pids_come_from_the_cgroup_runc_ps_reads(host: tuple[Runc, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Runc.pids reads the container's cgroup, no runc process per call (the
    pre-copy rounds ask every round): the same pids ``runc ps`` lists. Where
    runc's state names no usable cgroup, it is ``runc ps`` after all."""
    runc, bundle_dir = host
    await wait_running(bundle_dir)
    listed = await runc._ps(NAME)
    assert listed

    async def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a process was started: {args}")

    with monkeypatch.context() as m:
        m.setattr("tug.engine.runtime.runc.proc.run", no_process)
        assert sorted(await runc.pids(NAME)) == sorted(listed)
    monkeypatch.setattr(runc, "freezer", lambda name: None)
    assert sorted(await runc.pids(NAME)) == sorted(listed)
