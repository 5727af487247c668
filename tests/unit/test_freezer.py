"""Finding a container's freezer from runc's state file (runtime/freezer.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tug.engine.runtime import freezer as fz
from tug.engine.runtime.freezer import Freezer


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(fz, "CGROUP_ROOT", tmp_path / "cg")
    return tmp_path / "cg"


def state(tmp_path: Path, paths: object) -> Path:
    f = tmp_path / "state.json"
    f.write_text(json.dumps({"cgroup_paths": paths}))
    return f


def cgroup(root: Path, rel: str, *files: str) -> Path:
    d = root / rel
    d.mkdir(parents=True)
    for name in files:
        (d / name).write_text("")
    return d


def test_v1_freezer_first_on_a_hybrid_host(tmp_path: Path, root: Path) -> None:
    v1 = cgroup(root, "freezer/lab/c", "freezer.state")
    v2 = cgroup(root, "unified/lab/c", "cgroup.freeze")
    assert Freezer.locate(state(tmp_path, {"": str(v2), "freezer": str(v1)})) == Freezer(v1, 1)


def test_v2_alone(tmp_path: Path, root: Path) -> None:
    v2 = cgroup(root, "lab/c", "cgroup.freeze", "cgroup.events")
    assert Freezer.locate(state(tmp_path, {"": str(v2)})) == Freezer(v2, 2)


@pytest.mark.parametrize("rel", ["../outside/c", "freezer/../../c"])
def test_a_path_outside_the_cgroup_root_is_not_used(tmp_path: Path, root: Path, rel: str) -> None:
    assert Freezer.locate(state(tmp_path, {"freezer": str(root / rel)})) is None


def test_a_freezer_without_its_state_file_is_not_used(tmp_path: Path, root: Path) -> None:
    d = cgroup(root, "freezer/lab/c")
    assert Freezer.locate(state(tmp_path, {"freezer": str(d)})) is None


@pytest.mark.parametrize("content", ["", "not json", json.dumps({"cgroup_paths": ["x"]})])
def test_an_unreadable_state_file_means_runc(tmp_path: Path, root: Path, content: str) -> None:
    f = tmp_path / "state.json"
    f.write_text(content)
    assert Freezer.locate(f) is None
    assert Freezer.locate(tmp_path / "missing.json") is None


def test_pids_cover_nested_cgroups(tmp_path: Path, root: Path) -> None:
    d = cgroup(root, "freezer/lab/c", "freezer.state")
    (d / "cgroup.procs").write_text("10\n11\n")
    (d / "inner").mkdir()
    (d / "inner" / "cgroup.procs").write_text("12\n")
    assert sorted(Freezer(d, 1).pids()) == [10, 11, 12]


def test_freeze_writes_and_waits_for_frozen(tmp_path: Path, root: Path) -> None:
    d = cgroup(root, "freezer/lab/c", "freezer.state")
    f = Freezer(d, 1)
    assert f.freeze(timeout=1)  # a plain file reads back what was written
    assert (d / "freezer.state").read_text() == "FROZEN"
