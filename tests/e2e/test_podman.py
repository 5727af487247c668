"""Podman: tug doctor's rows and podman's checkpoint/restore probe, for real.

Needs Debian's podman (scripts/setup.sh installs it) with runc as its OCI runtime.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Lab, demo_container, on, tug


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


@pytest.fixture
def podman_demo(lab: Lab) -> Iterator[str]:
    yield from demo_container(lab, "pm", "--runtime", "podman", "--memory", "32", "--dirty-rate", "200")


def podman_names(host: str, *flags: str) -> list[str]:
    res = on(host, "podman", "ps", *flags, "--format", "{{.Names}}", check=True)
    return res.stdout.split()


def test_lab_hosts_have_their_own_podman(lab: Lab, podman_demo: str) -> None:
    """The demo runs under host a's podman; host b's podman (own storage, run root) knows nothing of it."""
    assert podman_demo in podman_names("a")
    assert podman_demo not in podman_names("b", "--all")
    roots = {h: on(h, "podman", "info", "--format", "{{.Store.GraphRoot}} {{.Store.RunRoot}}", check=True).stdout for h in "ab"}
    assert roots["a"] != roots["b"] and str(lab.layout.podman_dir("a")) in roots["a"]
    # Every host holds the demo image, by the same id: a migration pulls nothing.
    ids = {h: on(h, "podman", "image", "inspect", "--format", "{{.Id}}", "localhost/tug-demo:latest", check=True).stdout
           for h in "ab"}
    assert ids["a"] == ids["b"]
    check = tug("lab", "check", "a", podman_demo, check=True).json()
    assert check["ok"] and check["runtime"] == "podman", check
    tug("lab", "rm", "a", podman_demo, check=True)
    assert podman_demo not in podman_names("a", "--all")


def test_migrating_a_podman_container_is_refused_before_anything_changes(lab: Lab, podman_demo: str) -> None:
    """Until the podman runtime layer lands, tug names the podman container and touches nothing."""
    res = on("a", "tug", "migrate", podman_demo, "--to", lab.url("b"))
    assert res.returncode == 1
    assert "it is a podman container" in res.stderr and "nothing was touched" in res.stderr, res.stderr
    assert podman_demo in podman_names("a")
    assert podman_demo not in podman_names("b", "--all")
    assert tug("lab", "check", "a", podman_demo, check=True).json()["ok"]
