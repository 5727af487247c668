"""The benchmark harness end to end, on the smallest case it can run.

One tiny case (16 MiB, no dirtying, unshaped link, one rep) through the real
``python -m bench`` with the anchor (naive) and stop-copy. It proves the
harness can start, migrate, measure, verify and clean up, and that it writes
its three kinds of output. It asserts nothing about speed: figures depend on
the machine, and the lab may be shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import Lab

REPO = Path(__file__).resolve().parents[2]


def test_bench_one_tiny_case(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, "-m", "bench", "quick", "--sizes", "16", "--rates", "0", "--links", "unlimited",
         "--reps", "1", "--strategies", "naive,stop-copy", "--settle", "1", "--warm-mib", "0",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert res.stdout.strip().splitlines()[-1] == str(out / "summary.md")

    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is True
    assert data["conditions"]["criu"] and data["conditions"]["kernel"]
    runs = {r["strategy"]: r for r in data["runs"]}
    assert set(runs) == {"naive", "stop-copy"}
    for name, run in runs.items():
        assert run["status"] == "ok", (name, run.get("excluded_reason"))
        assert run["outcome"] == "migrated", name
        assert run["check_ok"] is True and run["check"]["ok"] is True, name
        assert run["ended_on"] == "b", name
        # Measured, not assumed: present and positive, nothing about how fast.
        assert run["client_downtime_ms"] > 0 and run["wall_s"] > 0 and run["bytes_total"] > 0, name
        assert run["workload"] == {"memory_mib": 16, "dirty_rate": 0, "hot_set": 0.1}
        assert run["link"]["name"] == "unlimited"

    summary = (out / "summary.md").read_text()
    assert "| naive |" in summary and "| stop-copy |" in summary
    for png in ("downtime_vs_size.png", "downtime_vs_rate.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    # Every container the harness made is gone from both hosts (by name: other
    # benchmark sessions may be running in the same lab).
    made = {r["container"] for r in data["runs"]}
    for host in ("a", "b"):
        assert not made & set(lab.containers(host)), host
        assert not [n for n in made if lab.bundle(host, n).exists()], host
