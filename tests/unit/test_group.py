"""The group a migration moves: its members and the one-copy rule over them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tug.engine.errors import ConfigError
from tug.engine.hostcfg import HostConfig
from tug.engine.options import MigrationOptions
from tug.engine.source.member import MAX_MEMBERS, Member, check_group, group_destination
from tug.engine.source.migration import Migration
from tug.engine.source.rollback import Destination, frozen_message
from tug.engine.source.strategies import create


def test_check_group() -> None:
    assert check_group(["a", "b"]) == ["a", "b"]
    with pytest.raises(ConfigError, match="no container"):
        check_group([])
    with pytest.raises(ConfigError, match="named twice"):
        check_group(["a", "b", "a"])
    with pytest.raises(ConfigError, match="at most"):
        check_group([f"c{i}" for i in range(MAX_MEMBERS + 1)])
    with pytest.raises(ConfigError, match="invalid"):
        check_group(["a", ""])


def members(*dests: Destination) -> list[Member]:
    out = []
    for i, d in enumerate(dests):
        m = Member(name=f"m{i}", strategy=create(MigrationOptions()), work=Path("/nonexistent"))
        m.dest = d
        out.append(m)
    return out


@pytest.mark.parametrize(
    ("dests", "expected"),
    [
        ((Destination.UNTOUCHED,), Destination.UNTOUCHED),
        ((Destination.UNTOUCHED, Destination.UNTOUCHED), Destination.UNTOUCHED),
        ((Destination.RAN, Destination.UNTOUCHED), Destination.RAN),
        ((Destination.UNTOUCHED, Destination.UNKNOWN), Destination.UNKNOWN),
        ((Destination.UNKNOWN, Destination.RAN), Destination.RAN),
    ],
)
def test_one_member_that_ran_is_the_group_having_run(dests: tuple[Destination, ...], expected: Destination) -> None:
    assert group_destination(members(*dests)) is expected


def test_member_held_by_its_group_says_so() -> None:
    msg = frozen_message(Destination.RAN, "gb", "b", "ssh://root@b", held_by_group=True)
    assert "did not run on b" in msg and "another container of its group did" in msg
    assert "tug recover gb --to ssh://root@b" in msg


def host(tmp_path: Path) -> HostConfig:
    return HostConfig(
        name="t", runc_root=tmp_path / "runc", data_dir=tmp_path / "data", work_dir=tmp_path / "work",
        cgroup_parent=None, ssh_identity=None, ssh_known_hosts=None,
    )


def test_every_member_gets_its_own_strategy(tmp_path: Path) -> None:
    single = Migration("a", "ssh://root@b", MigrationOptions(strategy="precopy", host=host(tmp_path)), None)
    assert [m.name for m in single.members] == ["a"]
    group = Migration(["a", "b"], "ssh://root@b", MigrationOptions(strategy="postcopy", host=host(tmp_path)), None)
    assert [m.name for m in group.members] == ["a", "b"]
    assert group.members[0].strategy is not group.members[1].strategy


def test_a_group_round_is_its_members_rounds_summed() -> None:
    from tug.engine.source.trackers.base import combine
    from tug.policies import RoundStats

    def part(n: int, secs: float) -> RoundStats:
        return RoundStats(index=3, duration_s=secs, pages_scanned=10 * n, dirty_pages=n, pages_sent=n, pages_skipped=9 * n,
                          bytes_sent=4096 * n, bandwidth_bps=1000.0 * n, dirty_rate_pps=2.0 * n)

    one = part(1, 0.5)
    assert combine(3, [one]) is one
    both = combine(3, [part(1, 0.5), part(2, 0.2)])
    assert (both.index, both.duration_s, both.pages_scanned, both.dirty_pages, both.pages_sent, both.pages_skipped) == (3, 0.5, 30, 3, 3, 27)
    assert (both.bytes_sent, both.bandwidth_bps, both.dirty_rate_pps) == (3 * 4096, 3000.0, 6.0)


@pytest.mark.parametrize("strategy", ["stop-copy", "precopy", "postcopy", "hybrid"])
def test_every_strategy_moves_a_group(tmp_path: Path, strategy: str) -> None:
    """Each member gets a strategy of its own (hybrid's and the pushed eager
    step's channels, frozen-memory servers and lazy dumps are per member)."""
    opts = MigrationOptions(strategy=strategy, host=host(tmp_path))
    mig = Migration(["a", "b"], "ssh://root@b", opts, None)
    assert [m.name for m in mig.members] == ["a", "b"]
    assert mig.members[0].strategy is not mig.members[1].strategy
