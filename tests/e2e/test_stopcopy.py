"""Stop-copy live migration between two lab hosts, its rollback, and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from ..faults.harness import refuse_restore_on
from .conftest import TUG, Lab, migrate, on, tug


def test_migrate_there_and_back(lab: Lab, demo: str) -> None:
    lab.exec("a", demo, "sh", "-c", "echo carried-over > /root/marker")
    before = lab.check("a", demo)
    assert before["ok"], before

    res = migrate("a", demo, lab.url("b"))
    assert res.returncode == 0, res.stderr
    report = res.json()
    assert report["outcome"] == "migrated"
    assert report["strategy"] == "stop-copy"
    assert report["downtime_ms"] > 0
    # 32 MiB of touched memory crossed the wire, and all of it while frozen.
    assert report["bytes_total"] >= 32 << 20
    assert report["frozen_bytes"] >= 32 << 20
    assert set(report["phases"]) >= {"pre-checkpoint", "pre-restore", "checkpoint", "transfer", "restore", "commit"}
    # Restored lazily: the memory was filled after the downtime, before commit.
    assert report["lazy_fill_ms"] is not None and report["lazy_fill_ms"] > 0

    lab.check_moved_intact("b", demo, before, report["downtime_ms"])
    assert lab.exec("b", demo, "cat", "/root/marker").strip() == "carried-over"

    # The source is gone: no container, no bundle, no work files.
    assert lab.state("a", demo) is None
    assert lab.leftovers("a", demo) == []
    assert lab.containers("b").count(demo) == 1

    back = migrate("b", demo, lab.url("a"))
    assert back.returncode == 0, back.stderr
    assert back.json()["outcome"] == "migrated"
    final = lab.check("a", demo)
    assert final["ok"], final
    assert lab.exec("a", demo, "cat", "/root/marker").strip() == "carried-over"
    assert lab.leftovers("b", demo) == []


def test_rollback_when_restore_fails(lab: Lab, demo: str, tmp_path: Path) -> None:
    """CRIU's restore fails for real on b (its prestart hook refuses): the source runs on, b is clean."""
    refuse_restore_on(lab, "a", demo, "b", tmp_path)
    res = migrate("a", demo, lab.url("b"))
    assert res.returncode == 1
    report = res.json()
    assert report["outcome"] == "rolled-back"
    assert report["error"]["kind"] == "criu"
    assert report["error"]["phase"] == "restore"
    assert report["error"]["details"]["error_lines"], "CriuError must carry CRIU's error lines"
    assert Path(report["error"]["details"]["log_path"]).exists(), "the CRIU log must survive cleanup"
    assert "rolled back" in res.stderr

    st = lab.state("a", demo)
    assert st is not None and st["status"] == "running"
    after = lab.check("a", demo)
    assert after["ok"], after
    assert lab.leftovers("b", demo) == []


def test_destination_name_taken(lab: Lab, demo: str) -> None:
    """Refused in pre-checkpoint: neither host changes."""
    tug("lab", "demo", "b", demo, "--memory", "8", check=True)
    try:
        res = migrate("a", demo, lab.url("b"))
        assert res.returncode == 1
        assert res.json()["outcome"] == "aborted"
        assert "already runs a container" in res.stderr
        assert lab.check("a", demo)["ok"]
        assert lab.check("b", demo)["ok"]
    finally:
        subprocess.run(["runc", "--root", lab.runc_root("b"), "delete", "--force", demo], capture_output=True)


def _bad_input_cases(lab: Lab, demo: str, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    wrong_key = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong_key)], check=True)
    empty_known = tmp_path / "known_hosts"
    empty_known.write_text("")
    b = lab.url("b")
    return {
        "unknown container": (["no-such-container", "--to", b], "not found on this host"),
        "unreachable host": ([demo, "--to", f"ssh://root@{lab.subnet}.250:22", "--connect-timeout", "2"], "cannot reach"),
        "wrong key": ([demo, "--to", b, "--identity", str(wrong_key)], "refused key"),
        "unknown host key": ([demo, "--to", b, "--known-hosts", str(empty_known)], "host key"),
    }


@pytest.mark.parametrize("case", ["unknown container", "unreachable host", "wrong key", "unknown host key"])
def test_bad_input_one_line_error_nothing_changed(lab: Lab, demo: str, tmp_path: Path, case: str) -> None:
    argv, expected = _bad_input_cases(lab, demo, tmp_path)[case]
    res = on("a", "tug", "migrate", *argv, "--quiet")
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("tug: error: ") and expected in lines[0], lines[0]
    assert res.stdout == ""
    # Nothing changed on either host.
    assert lab.check("a", demo)["ok"]
    assert lab.leftovers("b", demo) == []
    assert lab.leftovers("a", demo) == [] or lab.state("a", demo) is not None


def test_sigterm_mid_migration_rolls_back(lab: Lab, demo: str) -> None:
    """SIGTERM (what a service manager sends) is handled like Ctrl-C: rolled back, source running."""
    proc = subprocess.Popen(
        [TUG, "lab", "run", "a", "--", "tug", "migrate", demo, "--to", lab.url("b"), "--strategy", "precopy",
         "--policy", "max-iter=30,min-dirty=0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # progress lines; interrupt once pre-copy rounds run
        seen.append(line)
        if "round 1:" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + err
    assert "interrupted (rolled-back: the source container is running)" in err, err
    assert json.loads(out)["outcome"] == "rolled-back"
    st = lab.state("a", demo)
    assert st is not None and st["status"] == "running"
    assert lab.check("a", demo)["ok"]
    assert lab.leftovers("b", demo) == []


def test_eager_restore_still_selectable(lab: Lab, demo: str) -> None:
    res = migrate("a", demo, lab.url("b"), "--no-lazy-restore")
    assert res.returncode == 0, res.stderr
    assert res.json()["lazy_fill_ms"] is None
    assert lab.check("b", demo)["ok"]
