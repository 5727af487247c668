"""Lab instances never share a name: with the default lab, or with each other.

Everything an instance makes that the machine shares (network namespaces in
/run/netns, directories under /run, /var/lib and /dev/shm, cgroups, its
container endpoints' namespaces, its subnet) is named by
:class:`tug.engine.lab.layout.Layout`, a pure function of the instance name.
These tests check those names, and that no ``down`` (this tug's, for any
instance, or an older tug's of the default lab) matches another instance's,
before any instance is ever brought up.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from pathlib import Path

import pytest

from tug.engine.cli import build_parser
from tug.engine.errors import ConfigError
from tug.engine.lab import instance, layout
from tug.engine.lab.layout import DEFAULT, LabHost, Layout, choose_subnet, host_names

HOSTS = host_names(30)  # a..z, then h26..h29
#: Names chosen to be awkward: prefixes of each other, the default's own words, digits.
INSTANCES = ["ta", "tb", "t", "a", "b", "h", "h2", "h26", "br", "client", "lab", "tuglab", "tug", "0", "12345678", "hosts"]


@functools.cache
def names(lay: Layout, hosts: tuple[str, ...] = tuple(HOSTS)) -> dict[str, set[str]]:
    """Every machine-wide name ``lay`` gives, by kind."""
    out: dict[str, set[str]] = {
        "netns": {lay.bridge_ns, lay.client_ns, *(lay.netns(h) for h in hosts)},
        "endpoint netns prefix": {f"tug-{lay.agent_host(h)}-" for h in hosts},
        "path": {str(p) for p in (lay.run_dir, lay.data_dir, lay.state_file, lay.subnet_claim, lay.addresses_file,
                                  lay.addresses_lock, lay.identity, lay.known_hosts, lay.authorized_keys, lay.image_dir)},
        "host path": {str(p) for h in hosts for p in (lay.runc_root(h), lay.sshd_pidfile(h), lay.host_data_dir(h), lay.work_dir(h))},
        "cgroup": {lay.cgroup_parent(h) for h in hosts},
    }
    return out


def flat(lay: Layout) -> set[str]:
    return set().union(*names(lay).values())


def under(path: str, roots: list[Path]) -> bool:
    return any(Path(path) == r or Path(path).is_relative_to(r) for r in roots)


def overlap(prefix: str, pattern: str) -> bool:
    """Could a name starting with ``prefix`` (any container name follows) start with ``pattern``?"""
    return prefix.startswith(pattern) or pattern.startswith(prefix)


def down_would_touch(down: Layout, other: Layout) -> list[str]:
    """What of ``other`` this tug's ``down`` of ``down`` would remove (see hosts.down)."""
    theirs = names(other)
    hit = [ns for ns in theirs["netns"] if ns.startswith(down.prefix + "-")]
    patterns = names(down)["endpoint netns prefix"]
    hit += [e for e in theirs["endpoint netns prefix"] for p in patterns if overlap(e, p)]
    removed = [down.run_dir, down.hosts_dir] + ([] if down.is_default else [down.data_dir])
    hit += [p for p in theirs["path"] | theirs["host path"] if under(p, removed)]
    hit += sorted(theirs["host path"] & {str(down.work_dir(h)) for h in HOSTS})
    hit += sorted(theirs["cgroup"] & names(down)["cgroup"])
    return hit


def legacy_down_would_touch(other: Layout) -> list[str]:
    """What an older tug's ``tug lab down`` (the default lab, before instances) would remove of ``other``.

    It removed: namespaces ``tuglab-*`` and, per name after that prefix, its
    runc root, sshd, work dir and cgroup; endpoints ``tug-NAME-*``; links
    ``tl-*``/``tlb-*`` in the machine's namespace; /var/lib/tug-lab/hosts
    and /run/tug-lab whole.
    """
    hit = [ns for ns in names(other)["netns"] if ns.startswith("tuglab-")]
    legacy_names = [*HOSTS, "br", "client"]
    hit += [e for e in names(other)["endpoint netns prefix"] for n in legacy_names if overlap(e, f"tug-{n}-")]
    roots = [Path("/run/tug-lab"), Path("/var/lib/tug-lab/hosts")]
    hit += [p for p in names(other)["path"] | names(other)["host path"] if under(p, roots)]
    hit += [p for p in names(other)["host path"] for n in legacy_names if p == f"/dev/shm/tuglab-{n}"]
    hit += [c for c in names(other)["cgroup"] for n in legacy_names if c == f"/tuglab-{n}"]
    return hit


def test_the_default_instance_keeps_the_names_the_lab_always_had() -> None:
    d = Layout(DEFAULT)
    assert (d.prefix, d.bridge_ns, d.client_ns) == ("tuglab", "tuglab-br", "tuglab-client")
    assert (d.run_dir, d.data_dir, d.state_file) == (Path("/run/tug-lab"), Path("/var/lib/tug-lab"), Path("/run/tug-lab/lab.json"))
    assert (d.addresses_file, d.addresses_lock) == (Path("/run/tug-lab/addresses.json"), Path("/run/tug-lab/addresses.lock"))
    assert (d.identity, d.known_hosts, d.authorized_keys, d.image_dir) == (
        Path("/var/lib/tug-lab/client_ed25519"), Path("/var/lib/tug-lab/known_hosts"),
        Path("/var/lib/tug-lab/authorized_keys"), Path("/var/lib/tug-lab/image"))
    assert d.netns("a") == "tuglab-a" and d.runc_root("a") == Path("/run/tug-lab/a/runc")
    assert d.sshd_pidfile("b") == Path("/run/tug-lab/b/sshd.pid") and d.host_data_dir("b") == Path("/var/lib/tug-lab/hosts/b")
    assert d.work_dir("a") == Path("/dev/shm/tuglab-a") and d.cgroup_parent("a") == "/tuglab-a"
    assert d.agent_host("a") == "a" and d.host_network("a").netns("demo") == "tug-a-demo"
    assert d.host_network("a").bridge_netns == "tuglab-br"
    assert choose_subnet(DEFAULT, set()) == "10.231.77"


def test_the_default_hosts_environment_is_unchanged() -> None:
    h = LabHost(name="a", index=0, netns="tuglab-a", address="10.231.77.11", port=22, runc_root="/run/tug-lab/a/runc",
                data_dir="/var/lib/tug-lab/hosts/a", work_dir="/dev/shm/tuglab-a", cgroup_parent="/tuglab-a")
    assert h.env() == {
        "TUG_HOST": "a", "TUG_RUNC_ROOT": "/run/tug-lab/a/runc", "TUG_DATA_DIR": "/var/lib/tug-lab/hosts/a",
        "TUG_WORK_DIR": "/dev/shm/tuglab-a", "TUG_CGROUP_PARENT": "/tuglab-a",
        "TUG_SSH_IDENTITY": "/var/lib/tug-lab/client_ed25519", "TUG_SSH_KNOWN_HOSTS": "/var/lib/tug-lab/known_hosts",
        "TUG_BRIDGE": "br0", "TUG_BRIDGE_NETNS": "tuglab-br",
        # The host's own podman (added with the podman runtime; older keys unchanged).
        "CONTAINERS_CONF": "/var/lib/tug-lab/hosts/a/podman/containers.conf",
        "CONTAINERS_STORAGE_CONF": "/var/lib/tug-lab/hosts/a/podman/storage.conf",
    }
    # What the state file keeps of a host is what an older tug reads back.
    assert set(h.to_dict()) == {"name", "index", "netns", "address", "port", "runc_root", "data_dir", "work_dir",
                                "cgroup_parent", "sshd_pid"}


@pytest.mark.parametrize("name", INSTANCES)
def test_an_instance_shares_no_name_with_the_default_and_no_down_touches_it(name: str) -> None:
    d, i = Layout(DEFAULT), Layout(name)
    assert not flat(i) & flat(d)
    assert not down_would_touch(d, i), "the default's down would remove these"
    assert not down_would_touch(i, d), "this instance's down would remove these of the default"
    assert not legacy_down_would_touch(i), "an older tug's down of the default lab would remove these"
    assert choose_subnet(name, set()) != choose_subnet(DEFAULT, set())


@pytest.mark.parametrize(("x", "y"), list(itertools.combinations(INSTANCES, 2)))
def test_two_instances_share_no_name_and_neither_down_touches_the_other(x: str, y: str) -> None:
    a, b = Layout(x), Layout(y)
    assert not flat(a) & flat(b)
    assert not down_would_touch(a, b) and not down_would_touch(b, a)


@pytest.mark.parametrize("name", INSTANCES)
def test_an_instances_hosts_get_its_own_environment(name: str) -> None:
    lay = Layout(name)
    h = LabHost(name="a", index=0, netns=lay.netns("a"), address="10.231.1.11", port=22, runc_root=str(lay.runc_root("a")),
                data_dir=str(lay.host_data_dir("a")), work_dir=str(lay.work_dir("a")), cgroup_parent=lay.cgroup_parent("a"),
                layout=lay)
    env = h.env()
    assert env["TUG_LAB"] == name and env["TUG_HOST"] == f"{name}.a"
    assert env["TUG_BRIDGE_NETNS"] == lay.bridge_ns and h.network().netns("demo") == f"tug-{name}.a-demo"
    default_env = LabHost(name="a", index=0, netns="tuglab-a", address="10.231.77.11", port=22, runc_root="/run/tug-lab/a/runc",
                          data_dir="/var/lib/tug-lab/hosts/a", work_dir="/dev/shm/tuglab-a", cgroup_parent="/tuglab-a").env()
    for key, value in default_env.items():
        if key != "TUG_BRIDGE":
            assert env[key] != value, key


def test_subnets_come_from_the_name_stay_in_10_231_and_skip_taken_ones_and_the_default() -> None:
    seen = {}
    for name in INSTANCES:
        s = choose_subnet(name, set())
        assert s == choose_subnet(name, set())  # deterministic
        octet = int(s.rsplit(".", 1)[1])
        assert s.startswith("10.231.") and 1 <= octet <= 254 and octet != 77
        seen[name] = s
    assert len(set(seen.values())) > len(INSTANCES) // 2  # spread, not one subnet for all
    taken = {seen["ta"]}
    assert choose_subnet("ta", taken) not in taken | {"10.231.77"}
    everything = {f"10.231.{o}" for o in range(1, 255)}
    assert choose_subnet("ta", everything - {"10.231.9"}) == "10.231.9"
    with pytest.raises(ConfigError):
        choose_subnet("ta", everything)


@pytest.mark.parametrize("bad", ["", "TA", "t-a", "t.a", "t_a", "123456789", "a/b", " a", "ä"])
def test_instance_names_are_short_and_plain(bad: str) -> None:
    with pytest.raises(ConfigError):
        Layout(bad)


def test_the_instance_comes_from_the_flag_then_tug_lab_then_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUG_LAB", raising=False)
    assert instance.current(None).is_default
    monkeypatch.setenv("TUG_LAB", "tb")
    assert instance.current(None).instance == "tb"
    assert instance.current("ta").instance == "ta"
    monkeypatch.setenv("TUG_LAB", "")
    assert instance.current(None).is_default
    monkeypatch.setenv("TUG_LAB", "Bad")
    with pytest.raises(ConfigError):
        instance.current(None)


def test_every_lab_command_takes_lab() -> None:
    ap = build_parser()
    lab_parser = next(a for a in ap._subparsers._group_actions if isinstance(a, argparse._SubParsersAction)).choices["lab"]  # type: ignore[union-attr]
    commands = next(a for a in lab_parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"up", "down", "status", "url", "run", "demo", "rm", "client", "check", "pod"} <= set(commands)
    positional = {"url": ["a"], "run": ["a"], "demo": ["a", "x"], "rm": ["a", "x"], "client": ["x"], "check": ["a", "x"], "pod": ["a", "x"]}
    for cmd in commands:
        args = ap.parse_args(["lab", cmd, "--lab", "ta", *positional.get(cmd, [])])
        assert args.lab == "ta", cmd
        assert ap.parse_args(["lab", "--lab", "tb", cmd, *positional.get(cmd, [])]).lab == "tb", cmd
        assert ap.parse_args(["lab", cmd, *positional.get(cmd, [])]).lab is None, cmd


def test_subnet_claims_probe_past_each_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two instances whose names hash to one subnet get two; a claim is kept until its run dir goes."""
    monkeypatch.setattr(layout, "RUN_DIR", tmp_path / "tug-lab")
    monkeypatch.setattr(instance, "RUN_DIR", tmp_path / "tug-lab")
    monkeypatch.setattr(instance, "CLAIMS_LOCK", tmp_path / "tug-labs.lock")
    by_subnet: dict[str, str] = {}
    for n in itertools.count():
        name = f"c{n}"
        s = choose_subnet(name, set())
        if s in by_subnet:
            first, second = by_subnet[s], name
            break
        by_subnet[s] = name
    a, b = Layout(first), Layout(second)
    assert a.run_dir == tmp_path / f"tug-lab.{first}"
    sa = instance.claim_subnet(a)
    sb = instance.claim_subnet(b)
    assert sa == choose_subnet(first, set()) and sb != sa and sb != "10.231.77"
    assert instance.claim_subnet(a) == sa and instance.claim_subnet(b) == sb  # kept
    assert [n for n, _ in instance.instance_run_dirs()] == sorted([first, second])
    assert instance.claim_subnet(Layout(DEFAULT)) == "10.231.77"
