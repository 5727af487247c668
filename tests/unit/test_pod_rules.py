"""Pods: which containers must move together (pure rules of source/pod.py)."""

from __future__ import annotations

import pytest

from tug.engine.errors import PreconditionError
from tug.engine.source.pod import (
    Sharing,
    check_pods,
    expand_pods,
    ipc_sets,
    restore_order,
    shared_namespaces,
)

NS_P = "/run/netns/tug-a-p"
SHARING = Sharing(
    holds={"p": NS_P, "solo": "/run/netns/tug-a-solo"},
    joins={"p-m1": NS_P, "p-m2": NS_P, "stray": "/run/netns/other"},
    # p and its members share one IPC namespace; solo and stray share another.
    ipc={"p": 7, "p-m1": 7, "p-m2": 7, "solo": 9, "stray": 9},
)


def test_pod_expands_to_every_joiner() -> None:
    assert expand_pods(["p"], SHARING) == ["p", "p-m1", "p-m2"]
    assert expand_pods(["solo"], SHARING) == ["solo", "stray"]  # their IPC namespace
    assert SHARING.holder_of("p-m2") == "p" and SHARING.holder_of("stray") is None


def test_a_pod_is_never_split() -> None:
    with pytest.raises(PreconditionError, match="'p-m1', 'p-m2' join the network namespace of 'p'"):
        check_pods(["p"], SHARING)
    with pytest.raises(PreconditionError, match="joins the network namespace of 'p'"):
        check_pods(["p-m1"], SHARING)
    with pytest.raises(PreconditionError, match="'p-m2'"):
        check_pods(["p", "p-m1"], SHARING)
    assert check_pods(["p-m2", "p", "p-m1", "solo", "stray"], SHARING) == {"p-m2": "p", "p-m1": "p"}
    # A namespace tug does not manage is inspect_container's to refuse, in its own words.
    assert check_pods(["stray", "solo"], SHARING) == {}


def test_an_ipc_namespace_moves_whole() -> None:
    with pytest.raises(PreconditionError, match="'solo' shares its IPC namespace with 'stray'"):
        check_pods(["solo"], SHARING)
    # Named after the first member restored into it, which makes its objects there.
    assert ipc_sets(["p-m1", "p-m2", "p", "solo"], Sharing(holds={}, joins={}, ipc={"p": 7, "p-m1": 7, "p-m2": 7})) == {
        "p-m1": "p-m1", "p-m2": "p-m1", "p": "p-m1",
    }
    assert ipc_sets(["solo"], SHARING) == {}  # its peer is not in this group: check_pods refuses it


def test_holders_restore_first() -> None:
    assert restore_order(["p-m2", "p", "p-m1", "solo"], {"p-m2": "p", "p-m1": "p"}) == ["p", "solo", "p-m2", "p-m1"]


def test_other_shared_namespaces_are_named() -> None:
    spec = {"linux": {"namespaces": [
        {"type": "network", "path": NS_P}, {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "uts"}, {"type": "pid"},
    ]}}  # fmt: skip
    assert shared_namespaces("m", spec) == []  # IPC: by identity (ipc_sets), not refused by path
    spec["linux"]["namespaces"].append({"type": "uts", "path": "/proc/42/ns/uts"})
    assert shared_namespaces("m", spec) == ["uts (/proc/42/ns/uts)"]
    assert shared_namespaces("m", {}) == []
