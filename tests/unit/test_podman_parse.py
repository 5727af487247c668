"""Pure logic of the podman adapter: what tug reads from podman inspect and conmon."""

from __future__ import annotations

from pathlib import Path

import pytest

from tug.engine.runtime.podman import DEFAULT_RUNC_ROOT, PodmanContainer, parse_inspect, runc_root_from_cmdline


def test_runc_root_from_conmon_runtime_args() -> None:
    base = ["/usr/bin/conmon", "-r", "/usr/bin/runc", "--runtime-arg", "--log-format=json"]
    assert runc_root_from_cmdline(base) == DEFAULT_RUNC_ROOT
    assert runc_root_from_cmdline([*base, "--runtime-arg", "--root=/run/x"]) == Path("/run/x")
    assert runc_root_from_cmdline([*base, "--runtime-arg", "--root", "--runtime-arg", "/run/y"]) == Path("/run/y")
    # An exit-command argument that looks like --root is podman's, not runc's.
    assert runc_root_from_cmdline([*base, "--exit-command-arg", "--root", "--exit-command-arg", "/var/lib/s"]) == DEFAULT_RUNC_ROOT


def test_parse_inspect() -> None:
    data = {
        "Id": "abc", "Name": "web", "Image": "sha256img", "ImageName": "localhost/demo:latest",
        "State": {"Status": "running", "Pid": 42, "ConmonPid": 41},
        "Config": {"Entrypoint": "", "Cmd": ["/usr/bin/w", "--port", "7000"]},
        "HostConfig": {"NetworkMode": "ns:/run/netns/tug-a-web", "CgroupParent": "/lab-a",
                       "Ulimits": [{"Name": "RLIMIT_NOFILE", "Soft": 1024, "Hard": 2048}]},
        "GraphDriver": {"Data": {"MergedDir": "/m"}}, "StaticDir": "/s/userdata",
    }
    c = parse_inspect(data, Path("/run/runc"))
    assert (c.id, c.name, c.status, c.pid, c.image_id) == ("abc", "web", "running", 42, "sha256img")
    assert c.argv == ("/usr/bin/w", "--port", "7000")
    assert c.netns_path == "/run/netns/tug-a-web"
    assert c.ulimits == ("nofile=1024:2048",)
    assert c.checkpoint_dir == Path("/s/userdata/checkpoint")
    assert c.rootfs == Path("/m")
    data["HostConfig"]["NetworkMode"] = "bridge"  # type: ignore[index]
    assert parse_inspect(data, Path("/r")).netns_path == ""


def _container(**kw: object) -> PodmanContainer:
    base: dict[str, object] = dict(
        id="f" * 64, name="web", status="running", pid=1, conmon_pid=2, image_id="a" * 64, image_name="img",
        bundle=Path("/s/overlay-containers/" + "f" * 64 + "/userdata"), rootfs=Path("/m"), argv=("/w", "x"),
        runc_root=Path("/run/runc"), cgroup_parent="", netns_path="/run/netns/tug-a-web",
    )
    base.update(kw)
    return PodmanContainer(**base)  # type: ignore[arg-type]


def test_podman_runc_names_the_container_by_its_id() -> None:
    from tug.engine.runtime.podman import Podman
    from tug.engine.runtime.podmanrunc import PodmanRunc

    r = PodmanRunc(_container(), Podman())
    assert r._argv("kill", "web", "10") == ["runc", "--root", "/run/runc", "kill", "f" * 64, "10"]
    argv = r.checkpoint_argv("web", image_dir=Path("/i"), work_dir=Path("/w"), tcp_established=True)
    assert argv[-1] == "f" * 64 and "web" not in argv


def test_podmans_own_mounts_are_not_volumes() -> None:
    import json

    from tug.engine.runtime.podman import Podman
    from tug.engine.runtime.podmanrunc import PodmanRunc

    own = "/run/x/overlay-containers/" + "f" * 64 + "/userdata"
    other = "/run/x/overlay-containers/" + "e" * 64 + "/userdata"
    spec = {"mounts": [{"destination": "/etc/hosts", "type": "bind", "source": f"{own}/hosts"},
                       {"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/data", "type": "bind", "source": f"{other}/hosts"}]}
    out = json.loads(PodmanRunc(_container(), Podman()).visible_spec(json.dumps(spec).encode()))
    assert [m["destination"] for m in out["mounts"]] == ["/proc", "/data"]


@pytest.mark.parametrize(("change", "words"), [
    (dict(status="paused"), "only a running container"),
    (dict(netns_path=""), "podman network"),
])
def test_what_the_podman_route_refuses(change: dict[str, object], words: str) -> None:
    from tug.engine.errors import ConfigError
    from tug.engine.options import MigrationOptions
    from tug.engine.source.podmansrc import check_options

    check_options(MigrationOptions(), _container())
    with pytest.raises(ConfigError, match=words):
        check_options(MigrationOptions(), _container(**change))
    with pytest.raises(ConfigError, match="--tcp-close"):
        check_options(MigrationOptions(tcp_close=True), _container())


@pytest.mark.parametrize("bad", [
    None, {"image_id": "../x", "argv": ["/w"]}, {"image_id": "ab", "argv": []}, {"image_id": "ab", "argv": [1]},
    {"image_id": "ab", "argv": ["/w"], "ulimits": ["nofile"]},
])
def test_the_destination_checks_the_sources_description(bad: object) -> None:
    from tug.engine.destination.podmanstage import parse
    from tug.engine.errors import ProtocolError

    with pytest.raises(ProtocolError):
        parse(bad)
    assert parse({"image_id": "ab", "argv": ["/w"], "ulimits": ["nofile=1:2"]})["argv"] == ["/w"]
