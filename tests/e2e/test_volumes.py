"""A container whose config mounts host storage is refused before anything changes (volumes do not move yet)."""

from __future__ import annotations

import json

from .conftest import Lab, migrate

BIND = {"destination": "/data", "type": "bind", "source": "/srv/tug-data", "options": ["rbind", "rw"]}


def test_a_bind_mounted_volume_is_refused_before_anything_changes(lab: Lab, demo: str) -> None:
    cfg_path = lab.bundle("a", demo) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mounts"].append(BIND)  # as the container's admin would have started it
    cfg_path.write_text(json.dumps(cfg, indent=2))

    res = migrate("a", demo, lab.url("b"))
    assert res.returncode == 1
    report = res.json()
    assert report["outcome"] == "aborted", report
    assert report["error"]["kind"] == "precondition", report["error"]
    assert "/srv/tug-data -> /data" in report["error"]["message"]
    assert "nothing was changed" in res.stderr
    st = lab.state("a", demo)
    assert st is not None and st["status"] == "running"
    assert lab.state("b", demo) is None and lab.leftovers("b", demo) == []
