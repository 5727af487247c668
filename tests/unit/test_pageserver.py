"""The pure parts of streaming a dump to CRIU's page server: command lines,
the port lookup, the pre-copy directory layout and the agent's path checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tug.engine.criu.pageserver import listening_ports, page_server_argv
from tug.engine.destination.incoming import check_parent as _check_parent
from tug.engine.destination.incoming import work_subdir as _work_subdir
from tug.engine.errors import ConfigError, ProtocolError
from tug.engine.runtime.runc import Runc
from tug.engine.source.trackers.softdirty import final_parent, round_dir, round_parent

# /proc/net/tcp as the kernel formats it: a listener on 127.0.0.1:42469
# (inode 5001), one on 10.231.77.12:22 (inode 5002), an established socket.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A5E5 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5001 1 0000000000000000 100 0 0 10 0
   1: 0C4DE70A:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5002 1 0000000000000000 100 0 0 10 0
   2: 0100007F:A5E5 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 5003 1 0000000000000000 20 4 30 10 -1
"""


def test_listening_ports_only_of_our_sockets_in_listen_state() -> None:
    assert listening_ports(TCP, {5001}) == [42469]
    assert listening_ports(TCP, {5003}) == []  # established, not listening
    assert listening_ports(TCP, {4242}) == []
    assert listening_ports("header only\n", {5001}) == []
    assert listening_ports(TCP + "   3: garbage\n", {5001, 5002}) == [42469, 22]


def test_page_server_argv() -> None:
    argv = page_server_argv("/usr/local/sbin/criu", Path("/w/rounds/2"), Path("/w/criu/ps-3.log"), 7, "../1")
    assert argv[:2] == ["/usr/local/sbin/criu", "page-server"]
    assert "--port" not in argv  # CRIU refuses --port 0; without it the kernel picks a port
    joined = " ".join(argv)
    assert "--images-dir /w/rounds/2" in joined and "--address 127.0.0.1" in joined
    assert "--status-fd 7" in joined and "--log-file /w/criu/ps-3.log" in joined
    assert argv[-2:] == ["--prev-images-dir", "../1"]
    assert "--prev-images-dir" not in page_server_argv("criu", Path("/w/images"), Path("/l"), 3)


def test_checkpoint_argv() -> None:
    runc = Runc(Path("/run/r"))
    final = runc.checkpoint_argv(
        "web", image_dir=Path("/w/images"), work_dir=Path("/w/criu"), tcp_established=True,
        page_server="127.0.0.1:4000", parent_path="../rounds/3",
    )
    assert final[:4] == ["runc", "--root", "/run/r", "checkpoint"]
    assert "--leave-running" in final and "--tcp-established" in final and "--pre-dump" not in final
    assert final[final.index("--page-server") + 1] == "127.0.0.1:4000"
    assert final[final.index("--parent-path") + 1] == "../rounds/3"
    assert final[-1] == "web"

    pre = runc.checkpoint_argv(
        "web", image_dir=Path("/w/rounds/0"), work_dir=Path("/w/c/0"), pre_dump=True,
        tcp_established=True, page_server="127.0.0.1:4000",
    )
    # A pre-dump never stops the container and dumps no sockets.
    assert "--pre-dump" in pre and "--leave-running" not in pre and "--tcp-established" not in pre
    assert "--parent-path" not in pre

    plain = runc.checkpoint_argv("web", image_dir=Path("/i"), work_dir=Path("/c"))
    assert "--page-server" not in plain and "--parent-path" not in plain
    with pytest.raises(ConfigError, match="relative"):
        runc.checkpoint_argv("web", image_dir=Path("/i"), work_dir=Path("/c"), parent_path="/abs")


def test_round_layout_is_a_relative_chain() -> None:
    assert [round_dir(i) for i in range(3)] == ["rounds/0", "rounds/1", "rounds/2"]
    assert [round_parent(i) for i in range(3)] == [None, "../0", "../1"]
    assert final_parent(0) is None
    assert final_parent(3) == "../rounds/2"
    # Relative to WORK/images, the final parent is the last round's dir.
    work = Path("/w")
    assert ((work / "images" / (final_parent(3) or "")).resolve()) == work / round_dir(2)
    assert ((work / round_dir(2) / (round_parent(2) or "")).resolve()) == work / round_dir(1)


def test_agent_accepts_only_dump_dirs_under_its_work_dir(tmp_path: Path) -> None:
    assert _work_subdir(tmp_path, "images") == tmp_path / "images"
    assert _work_subdir(tmp_path, "rounds/12") == tmp_path / "rounds" / "12"
    for bad in ("../images", "/etc", "rounds/../../x", "rounds/1/..", "", "rounds/x"):
        with pytest.raises(ProtocolError):
            _work_subdir(tmp_path, bad)


def test_agent_parent_must_exist_inside_the_work_dir(tmp_path: Path) -> None:
    (tmp_path / "rounds" / "0").mkdir(parents=True)
    _check_parent(tmp_path, tmp_path / "rounds" / "1", "../0")
    _check_parent(tmp_path, tmp_path / "images", "../rounds/0")
    with pytest.raises(ProtocolError, match="does not exist"):
        _check_parent(tmp_path, tmp_path / "rounds" / "2", "../1")
    for bad in ("../../etc", "/tmp", "../0/..", "parent"):
        with pytest.raises(ProtocolError):
            _check_parent(tmp_path, tmp_path / "rounds" / "1", bad)


def test_primary_error_of_a_task_group() -> None:
    """A step failing inside a phase's TaskGroup is reported as itself."""
    from tug.engine.errors import CriuError, TransportError
    from tug.engine.source.migration import primary_error

    criu = CriuError("CRIU page server was killed by SIGKILL")
    plain = ValueError("boom")
    assert primary_error(criu) is criu
    assert primary_error(BaseExceptionGroup("tg", [plain, ExceptionGroup("inner", [criu])])) is criu
    transport = TransportError("link lost")
    assert primary_error(ExceptionGroup("tg", [transport, criu])) is transport  # the first one wins
    assert primary_error(ExceptionGroup("tg", [plain])) is plain
