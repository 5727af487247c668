"""Pods: which containers must move together (pure rules of source/pod.py)."""

from __future__ import annotations

import pytest

from tug.engine.errors import PreconditionError
from tug.engine.source.pod import Sharing, check_pods, expand_pods, restore_order, shared_namespaces

NS_P = "/run/netns/tug-a-p"
SHARING = Sharing(
    holds={"p": NS_P, "solo": "/run/netns/tug-a-solo"},
    joins={"p-m1": NS_P, "p-m2": NS_P, "stray": "/run/netns/other"},
)


def test_pod_expands_to_every_joiner() -> None:
    assert expand_pods(["p"], SHARING) == ["p", "p-m1", "p-m2"]
    assert expand_pods(["solo"], SHARING) == ["solo"]
    assert SHARING.holder_of("p-m2") == "p" and SHARING.holder_of("stray") is None


def test_a_pod_is_never_split() -> None:
    with pytest.raises(PreconditionError, match="'p-m1', 'p-m2' join the network namespace of 'p'"):
        check_pods(["p"], SHARING)
    with pytest.raises(PreconditionError, match="joins the network namespace of 'p'"):
        check_pods(["p-m1"], SHARING)
    with pytest.raises(PreconditionError, match="'p-m2'"):
        check_pods(["p", "p-m1"], SHARING)
    assert check_pods(["p-m2", "p", "p-m1", "solo"], SHARING) == {"p-m2": "p", "p-m1": "p"}
    # A namespace tug does not manage is inspect_container's to refuse, in its own words.
    assert check_pods(["stray"], SHARING) == {}


def test_holders_restore_first() -> None:
    assert restore_order(["p-m2", "p", "p-m1", "solo"], {"p-m2": "p", "p-m1": "p"}) == ["p", "solo", "p-m2", "p-m1"]


def test_other_shared_namespaces_are_named() -> None:
    spec = {"linux": {"namespaces": [
        {"type": "network", "path": NS_P}, {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "uts"}, {"type": "pid"},
    ]}}  # fmt: skip
    assert shared_namespaces("m", spec) == ["ipc (/proc/42/ns/ipc)"]
    assert shared_namespaces("m", {}) == []
