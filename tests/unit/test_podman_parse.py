"""Pure logic of the podman adapter: what tug reads from podman inspect and conmon."""

from __future__ import annotations

from pathlib import Path

from tug.engine.runtime.podman import DEFAULT_RUNC_ROOT, parse_inspect, runc_root_from_cmdline


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
