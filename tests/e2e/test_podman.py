"""Podman: tug doctor's rows and podman's checkpoint/restore probe, for real.

Needs Debian's podman (scripts/setup.sh installs it) with runc as its OCI runtime.
"""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.conftest import tug


@pytest.fixture(scope="module", autouse=True)
def _podman_installed() -> None:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run scripts/setup.sh (apt-get install podman)")


def test_doctor_reports_podman_and_docker() -> None:
    res = tug("doctor", "--json", timeout=240)
    rows = {r["name"]: r for r in res.json()["checks"]}
    assert rows["podman"]["status"] == "ok", rows["podman"]
    assert rows["podman OCI runtime"]["detail"].startswith("runc"), rows["podman OCI runtime"]
    assert "driver overlay" in rows["podman storage"]["detail"]
    # The probe checkpointed and restored a container in a podman of its own.
    assert rows["podman checkpoint/restore"]["status"] == "ok", rows["podman checkpoint/restore"]
    assert "refuses docker containers" in rows["docker"]["detail"]
