"""Stop-copy with the dump streamed to a CRIU page server on the destination.

Real CRIU (dumper on the source, ``criu page-server`` on the destination),
real runc, real sshd: the pages cross through tug's own SSH port forward
while CRIU dumps. Also the page server's own lifecycle, a sshd that refuses
TCP forwarding, and the soft-dirty pre-copy, which only runs where the
kernel has soft-dirty tracking (this one may not).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tug.engine.criu.pageserver import PageServer
from tug.engine.errors import CriuError
from tug.engine.lab import hosts as labhosts
from tug.engine.lab.instance import current

from ..faults.harness import kill_page_server_after, refuse_restore_on
from .conftest import Lab, demo_container, migrate, tug
from .test_network import Client, assert_clean_run

pytestmark = pytest.mark.e2e


def _cmdline(pid: str) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _works_for(args: list[str], name: str) -> bool:
    """A CRIU page server with a dir of container ``name``, or a tug migrating it."""
    if len(args) > 1 and os.path.basename(args[0]) == "criu" and "page-server" in args:
        return any(f"/{name}/" in a for a in args)
    return "migrate" in args and name in args


def page_servers(where: str) -> list[str]:
    """Running ``criu page-server`` processes whose arguments mention ``where``."""
    found = []
    for d in Path("/proc").iterdir():
        args = _cmdline(d.name) if d.name.isdigit() else []
        if len(args) > 1 and os.path.basename(args[0]) == "criu" and "page-server" in args and any(where in a for a in args):
            found.append(f"pid {d.name}: {' '.join(args)}")
    return found


def listeners(host: str, name: str) -> list[str]:
    """TCP listeners in lab host ``host`` owned by a page server or a tug of ``name``'s migration."""
    ns = labhosts.require(current()).host(host).netns
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [
        line.strip()
        for line in out.splitlines()
        if any(_works_for(_cmdline(pid), name) for pid in re.findall(r"pid=(\d+)", line))
    ]


@pytest.fixture
def demo(lab: Lab) -> Iterator[str]:
    """A fresh demo container on host a, named with this file's prefix."""
    yield from demo_container(lab, "tps")


def nothing_left(lab: Lab, name: str) -> None:
    for host in ("a", "b"):
        assert listeners(host, name) == [], f"listening port left on {host}"
    assert page_servers(f"/{name}/") == [], "a CRIU page server was left running"


def test_streamed_dump_there_and_back(lab: Lab, demo: str) -> None:
    lab.exec("a", demo, "sh", "-c", "echo streamed > /root/marker")
    before = lab.check("a", demo)
    assert before["ok"], before

    res = migrate("a", demo, lab.url("b"), "--stream-dump")
    assert res.returncode == 0, res.stderr
    report = res.json()
    assert report["outcome"] == "migrated"
    assert report["dump_streamed"] is True
    # All 32 MiB of the workload's memory went through the page server, while frozen;
    # the image files that still cross as files are tiny next to it.
    assert report["page_server_bytes"] >= 32 << 20
    assert report["frozen_bytes"] >= report["page_server_bytes"]
    assert report["bytes_total"] >= report["page_server_bytes"] + report["image_bytes"]
    assert report["image_bytes"] < report["page_server_bytes"] // 32
    assert any("page server" in n for n in report["notes"])

    lab.check_moved_intact("b", demo, before, report["downtime_ms"])
    assert lab.exec("b", demo, "cat", "/root/marker").strip() == "streamed"
    assert lab.state("a", demo) is None
    assert lab.leftovers("a", demo) == []
    nothing_left(lab, demo)

    back = migrate("b", demo, lab.url("a"), "--stream-dump")
    assert back.returncode == 0, back.stderr
    assert back.json()["dump_streamed"] is True
    final = lab.check("a", demo)
    assert final["ok"], final
    assert final["heartbeat"]["resets"] == 0 and final["heartbeat"]["skipped"] == 0
    assert lab.exec("a", demo, "cat", "/root/marker").strip() == "streamed"
    assert lab.leftovers("b", demo) == []
    nothing_left(lab, demo)


def test_dump_to_files_still_selectable(lab: Lab, demo: str) -> None:
    res = migrate("a", demo, lab.url("b"), "--no-stream-dump")
    assert res.returncode == 0, res.stderr
    report = res.json()
    assert report["dump_streamed"] is False and report["page_server_bytes"] == 0
    assert report["image_bytes"] >= 32 << 20
    assert lab.check("b", demo)["ok"]
    nothing_left(lab, demo)


def test_streamed_rollback_when_restore_fails(lab: Lab, demo: str, tmp_path: Path) -> None:
    """The pages streamed into b's page server, then CRIU's restore fails for real there."""
    refuse_restore_on(lab, "a", demo, "b", tmp_path)
    res = migrate("a", demo, lab.url("b"), "--stream-dump")
    assert res.returncode == 1
    report = res.json()
    assert report["outcome"] == "rolled-back", report
    assert report["error"]["kind"] == "criu" and report["error"]["phase"] == "restore", report["error"]
    assert report["error"]["details"]["error_lines"]
    assert Path(report["error"]["details"]["log_path"]).exists()
    assert "rolled back" in res.stderr

    st = lab.state("a", demo)
    assert st is not None and st["status"] == "running"
    assert lab.check("a", demo)["ok"]
    assert lab.leftovers("b", demo) == []
    assert lab.leftovers("a", demo) == [] or lab.state("a", demo) is not None
    nothing_left(lab, demo)


def test_page_server_killed_mid_dump_rolls_back(lab: Lab, demo: str) -> None:
    """b's CRIU page server is SIGKILLed once 1 MiB of pages arrived, the source frozen."""
    with kill_page_server_after("b", 1 << 20) as killer:
        res = migrate("a", demo, lab.url("b"), "--stream-dump")
    assert killer.killed, "b's page server was never seen"
    assert res.returncode == 1, res.stderr
    report = res.json()
    assert report["outcome"] == "rolled-back"
    assert report["error"]["phase"] == "checkpoint" and report["error"]["kind"] == "criu"
    assert report["frozen_ms"] > 0, "the source was frozen when the server died"
    # The dumper's error is the migration's error; the server's death is explained in a note
    # that cites its kept log.
    killed = [n for n in report["notes"] if "page server was killed by SIGKILL" in n]
    assert killed, report["notes"]
    log = re.search(r"\(log: ([^)]+)\)", killed[0])
    assert log and Path(log.group(1)).exists()
    assert "rolled back" in res.stderr

    st = lab.state("a", demo)
    assert st is not None and st["status"] == "running"
    after = lab.check("a", demo)
    assert after["ok"], after
    assert lab.leftovers("b", demo) == []
    nothing_left(lab, demo)

    # And the container still migrates afterwards.
    again = migrate("a", demo, lab.url("b"), "--stream-dump")
    assert again.returncode == 0, again.stderr
    assert lab.check("b", demo)["ok"]


@pytest.fixture
def sshd_without_forwarding(lab: Lab, tmp_path: Path) -> Iterator[str]:
    """A second, real OpenSSH sshd for lab host b on another port, with AllowTcpForwarding no."""
    h = labhosts.require(current()).host("b")
    base = Path(h.data_dir) / "sshd_config"
    key = tmp_path / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    port = 20000 + os.getpid() % 20000
    lines = [ln for ln in base.read_text().splitlines() if not ln.startswith(("Port ", "HostKey ", "PidFile "))]
    cfg = tmp_path / "sshd_config"
    cfg.write_text("\n".join([*lines, f"Port {port}", f"HostKey {key}", f"PidFile {tmp_path / 'sshd.pid'}", "AllowTcpForwarding no", ""]))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", h.netns, "/usr/sbin/sshd", "-D", "-f", str(cfg), "-E", str(tmp_path / "sshd.log")],
        stdin=subprocess.DEVNULL,
    )
    try:
        known = tmp_path / "known_hosts"
        known.write_text(f"[{h.address}]:{port} {' '.join(Path(f'{key}.pub').read_text().split()[:2])}\n")
        deadline = time.monotonic() + 10
        while not subprocess.run(
            ["ip", "netns", "exec", h.netns, "ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True
        ).stdout.strip():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "sshd.log").read_text()
            time.sleep(0.05)
        yield f"ssh://root@{h.address}:{port}|{known}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_sshd_refusing_forwarding_fails_before_the_freeze(lab: Lab, demo: str, sshd_without_forwarding: str) -> None:
    url, known = sshd_without_forwarding.split("|")
    res = migrate("a", demo, url, "--stream-dump", "--known-hosts", known, "--quiet")
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "refuses TCP forwarding" in lines[0] and "--no-stream-dump" in lines[0], lines[0]
    report = res.json()
    assert report["frozen_ms"] == 0, "refused before the freeze"
    assert report["error"]["kind"] == "transport"
    assert lab.check("a", demo)["ok"]
    assert lab.leftovers("b", demo) == []
    nothing_left(lab, demo)


def test_doctor_reports_refused_forwarding(lab: Lab, sshd_without_forwarding: str) -> None:
    url, known = sshd_without_forwarding.split("|")
    res = tug("lab", "run", "a", "--", "tug", "doctor", "--to", url, "--known-hosts", known, "--json")
    rows = {r["name"]: r for r in res.json()["checks"]}
    assert rows["ssh TCP forwarding"]["status"] == "warn", rows
    assert "--no-stream-dump" in rows["ssh TCP forwarding"]["detail"]
    good = tug("lab", "run", "a", "--", "tug", "doctor", "--to", lab.url("b"), "--json")
    assert {r["name"]: r for r in good.json()["checks"]}["ssh TCP forwarding"]["status"] == "ok"


def test_tcp_connections_survive_the_streamed_dump(lab: Lab, demo: str) -> None:
    """TCP repair and the page server together: a client's connections and a bulk
    download stay intact a -> b -> a."""
    client = Client(lab, demo, "--bulk", str(4 << 20), connections=2)
    try:
        there = migrate("a", demo, lab.url("b"), "--stream-dump")
        assert there.returncode == 0, there.stderr
        back = migrate("b", demo, lab.url("a"), "--stream-dump")
        assert back.returncode == 0, back.stderr
        assert there.json()["dump_streamed"] and back.json()["dump_streamed"]
    finally:
        result = client.stop()
    assert_clean_run(result)
    assert lab.check("a", demo)["ok"]


async def test_page_server_lifecycle(tmp_path: Path) -> None:
    """PageServer against real CRIU (no lab): ready with a port, killed and reaped, no port left."""
    images = tmp_path / "img"
    images.mkdir()
    ps = PageServer(1, images, tmp_path / "ps.log")
    port = await ps.start()
    assert port > 0 and ps.returncode is None
    assert page_servers(str(images)) != []
    await ps.kill()
    assert ps.returncode is not None and ps.killed
    assert page_servers(str(images)) == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the port is closed with its server"

    # With a previous round: CRIU links images/parent -> ../prev (relative, verbatim),
    # which is how it finds the parent's pagemaps when a pre-dump sends holes.
    (tmp_path / "prev").mkdir()
    chained = PageServer(3, tmp_path / "next", tmp_path / "next.log", parent="../prev")
    chained.images_dir.mkdir()
    assert await chained.start() > 0
    assert os.readlink(chained.images_dir / "parent") == "../prev"
    await chained.kill()

    # A parent that does not exist: CRIU refuses before listening (and before its log
    # exists); the error carries CRIU's own words from stderr.
    bad = PageServer(2, images, tmp_path / "bad.log", parent="../nope")
    with pytest.raises(CriuError) as info:
        await bad.start()
    assert "parent image directory" in str(info.value), str(info.value)
    assert bad.returncode not in (None, 0)


def test_soft_dirty_precopy_streams_rounds_to_the_page_server(lab: Lab) -> None:
    """Runs only where the kernel has soft-dirty (the real CRIU pre-dump path)."""
    has = subprocess.run(["criu", "check", "--feature", "mem_dirty_track"], capture_output=True).returncode == 0
    if not has:
        pytest.skip("kernel lacks soft-dirty (see tug doctor)")
    name = f"tsd{os.getpid()}"
    lab.remove(name)
    tug("lab", "demo", "a", name, "--memory", "64", "--dirty-rate", "500", "--hot-set", "0.05", check=True)
    try:
        before = lab.check("a", name)
        res = migrate("a", name, lab.url("b"), "--strategy", "precopy", "--tracker", "soft-dirty", "--policy", "max-iter=3")
        assert res.returncode == 0, res.stderr
        report = res.json()
        assert report["tracker"] == "soft-dirty" and report["dump_streamed"] is True
        rounds = report["rounds"]
        assert len(rounds) == 3
        assert rounds[0]["dirty_pages"] >= (60 << 20) // 4096
        assert rounds[1]["dirty_pages"] < rounds[0]["dirty_pages"] // 4
        assert all(r["bytes"] > 0 and r["pages_scanned"] >= r["dirty_pages"] for r in rounds)
        # The final dump only carried what changed since the last round.
        assert report["page_server_bytes"] < rounds[0]["bytes"] // 4
        after = lab.check("b", name)
        assert after["ok"], after
        assert after["verify"]["bad_pages"] == 0
        assert after["heartbeat"]["last_counter"] > before["heartbeat"]["last_counter"]
        assert lab.leftovers("a", name) == [] and lab.leftovers("b", name) == []
        nothing_left(lab, name)
    finally:
        lab.remove(name)
