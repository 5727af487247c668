"""Volumes: the --volume options, which mounts need one, and how the destination stages a copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tug.engine import rootfs
from tug.engine.destination.volumes import CREATED_FILE, remove_created, stage_volumes
from tug.engine.errors import ConfigError, PreconditionError, ProtocolError
from tug.engine.volumes import (
    COPY,
    SHARED,
    VolumeChoice,
    classify,
    file_digest,
    parse_volume_options,
    plant_nonce,
    read_nonce,
    remove_nonce,
)


def test_parse_volume_options() -> None:
    assert parse_volume_options(["/data=shared", "/cache/=copy", "/db=copy:/srv/db"]) == {
        "/data": VolumeChoice(mode=SHARED),
        "/cache": VolumeChoice(mode=COPY),
        "/db": VolumeChoice(mode=COPY, dest_dir="/srv/db"),
    }
    for bad in ("data=shared", "/data", "/data=move", "/data=shared:/x", "/data=copy:rel", "/data=copy:/a/../b"):
        with pytest.raises(ConfigError):
            parse_volume_options([bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_volume_options(["/data=shared", "/data/=copy"])


def spec_with(tmp_path: Path) -> dict:  # type: ignore[type-arg]
    (tmp_path / "data").mkdir()
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    return {"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": str(tmp_path / "data"), "options": ["rbind", "rw"]},
        {"destination": "/etc/hosts", "source": str(tmp_path / "hosts"), "options": ["bind", "ro"]},
    ]}  # fmt: skip


def test_every_host_mount_needs_a_mode(tmp_path: Path) -> None:
    spec = spec_with(tmp_path)
    with pytest.raises(PreconditionError) as err:
        classify("web", spec, parse_volume_options(["/data=copy"]))
    msg = str(err.value)
    assert f"{tmp_path / 'hosts'} -> /etc/hosts" in msg and "--volume /etc/hosts=shared" in msg and "nothing was changed" in msg
    vols = classify("web", spec, parse_volume_options(["/data=copy", "/etc/hosts=shared"]))
    assert [(v.index, v.destination, v.mode, v.is_file) for v in vols] == [(1, "/data", COPY, False), (2, "/etc/hosts", SHARED, True)]
    assert vols[1].tree == (tmp_path, "hosts") and vols[0].tree == (tmp_path / "data", None)


def test_a_mode_for_what_is_not_mounted_or_not_a_bind_is_refused(tmp_path: Path) -> None:
    spec = spec_with(tmp_path)
    with pytest.raises(ConfigError, match="/nothere"):
        classify("web", spec, parse_volume_options(["/data=copy", "/etc/hosts=shared", "/nothere=copy"]))
    nfs = {"mounts": [{"destination": "/mnt", "type": "nfs", "source": "server:/export"}]}
    with pytest.raises(PreconditionError, match="bind-mounted volumes only"):
        classify("web", nfs, parse_volume_options(["/mnt=shared"]))
    gone = {"mounts": [{"destination": "/x", "type": "bind", "source": str(tmp_path / "missing")}]}
    with pytest.raises(PreconditionError, match="does not exist"):
        classify("web", gone, parse_volume_options(["/x=copy"]))


def test_nonce_round_trip_and_hostile_names(tmp_path: Path) -> None:
    spec = spec_with(tmp_path)
    vol = classify("web", spec, parse_volume_options(["/data=shared", "/etc/hosts=shared"]))[0]
    name, nonce = plant_nonce(vol)
    assert read_nonce(tmp_path / "data", name) == nonce
    assert read_nonce(tmp_path / "other", name) is None
    assert read_nonce(tmp_path / "data", "../hosts") is None and read_nonce(tmp_path / "data", "hosts") is None
    remove_nonce(vol, name)
    assert list((tmp_path / "data").iterdir()) == []
    # A symlink planted where the nonce is read is not followed.
    (tmp_path / "data" / ".tug-volume-check-x").symlink_to(tmp_path / "hosts")
    assert read_nonce(tmp_path / "data", ".tug-volume-check-x") is None
    assert file_digest(tmp_path / "hosts") == file_digest(tmp_path / "hosts") is not None
    assert file_digest(tmp_path / "nope") is None


def test_scan_only_one_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    (tmp_path / "b").write_text("y")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("z")
    assert [e.path for e in rootfs.scan(tmp_path, "a")] == ["a"]
    assert [e.path for e in rootfs.scan(tmp_path)] == ["a", "b", "d", "d/a"]


def wire(spec: dict, tmp_path: Path, **over: object) -> list[dict]:  # type: ignore[type-arg]
    vols = classify("web", spec, parse_volume_options(["/data=copy", "/etc/hosts=copy"]))
    out = [v.to_wire() for v in vols]
    out[0].update(over)
    return out


def test_destination_stages_copies_and_rewrites_the_mounts(tmp_path: Path) -> None:
    spec = spec_with(tmp_path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    dest = tmp_path / "elsewhere" / "data"
    staged = stage_volumes(bundle, spec, wire(spec, tmp_path, dest_dir=str(dest)))
    assert [(v.index, v.root, v.file) for v in staged] == [(1, dest, None), (2, bundle / "volumes" / "2", "hosts")]
    assert spec["mounts"][1]["source"] == str(dest)
    assert spec["mounts"][2]["source"] == str(bundle / "volumes" / "2" / "hosts")
    assert json.loads((bundle / CREATED_FILE).read_text()) == [str(dest)]
    (dest / "file").write_text("copied")
    assert remove_created(bundle) == [str(dest)] and not dest.exists()


def test_destination_refuses_what_it_must_not_touch(tmp_path: Path) -> None:
    spec = spec_with(tmp_path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "precious").write_text("user data")
    with pytest.raises(PreconditionError, match="not an empty directory"):
        stage_volumes(bundle, spec_with_copy(spec), wire(spec, tmp_path, dest_dir=str(full)))
    assert (full / "precious").exists()
    for bad in ({"index": 0}, {"index": 9}, {"destination": "/other"}, {"file": "../x"}, {"mode": "move"}):
        with pytest.raises(ProtocolError):
            stage_volumes(bundle, spec, wire(spec, tmp_path, **bad))


def spec_with_copy(spec: dict) -> dict:  # type: ignore[type-arg]
    return json.loads(json.dumps(spec))
