"""Which lab instance a command means, and each instance's claim on a subnet.

Instances coexist on one machine; their namespaces never share a segment, so
equal subnets would not even collide, but distinct ones keep addresses,
ARP tables and captures unambiguous. A subnet is claimed at ``up``, in a
file in the instance's run dir, under one machine-wide lock so that two
instances coming up at the same moment cannot take the same one; ``down``
removes the run dir and with it the claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from tug.engine.lab.layout import DEFAULT, ENV, NAME_RE, RUN_DIR, Layout, check_name, choose_subnet, default_subnet

#: Held while an instance picks its subnet (outside every run dir, which ``down`` removes).
CLAIMS_LOCK = RUN_DIR.with_name("tug-labs.lock")


def current(name: str | None = None) -> Layout:
    """The instance named by ``--lab`` (``name``), else by TUG_LAB, else the default."""
    return Layout(check_name(name or os.environ.get(ENV) or DEFAULT))


def instance_run_dirs() -> list[tuple[str, Path]]:
    """(instance, run dir) of every non-default instance with a run dir on this machine."""
    out = []
    for d in sorted(RUN_DIR.parent.glob(f"{RUN_DIR.name}.*")):
        name = d.name[len(RUN_DIR.name) + 1 :]
        if d.is_dir() and name != DEFAULT and NAME_RE.fullmatch(name):
            out.append((name, d))
    return out


def _read_claim(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def _claims_locked() -> Iterator[None]:
    CLAIMS_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(CLAIMS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def claim_subnet(layout: Layout) -> str:
    """This instance's subnet: the one it holds, else a free one, claimed now."""
    if layout.is_default:
        return default_subnet()
    with _claims_locked():
        mine = _read_claim(layout.subnet_claim)
        if mine is not None:
            return mine
        taken = {s for name, d in instance_run_dirs() if name != layout.instance and (s := _read_claim(d / "subnet"))}
        subnet = choose_subnet(layout.instance, taken)
        layout.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = layout.subnet_claim.with_suffix(".tmp")
        tmp.write_text(subnet + "\n")
        tmp.replace(layout.subnet_claim)
        return subnet
