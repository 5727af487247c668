"""A pod's loopback is held while its members are restored one by one.

Members of a pod talk over the loopback of the network namespace they share,
and CRIU restores each container on its own. When a restored socket leaves
TCP repair mode the kernel sends a window probe to its peer; if that peer is a
member not restored yet, its port is closed and the answer is a reset: the
member's loopback connection is lost. So from the first member's restore until
the last one's, TCP segments arriving on the pod's loopback are dropped (a
drop, not a reject: the probes are lost, the connections are not), and TCP's
own retransmission carries on once the rule is gone. The outside world is
held by the network lock on the pod's outer link (runtime/netlock.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tug.engine.errors import NetworkError

#: The rule, in the pod's namespace: every TCP segment looped back is dropped.
RULE = ("INPUT", "-i", "lo", "-p", "tcp", "-j", "DROP")


async def _iptables(netns: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={netns}", "--", "iptables", "-w", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode(errors="replace").strip()


async def hold(netns: Path) -> None:
    """Drop TCP on the pod's loopback (idempotent)."""
    if (await _iptables(netns, "-C", *RULE))[0] == 0:
        return
    rc, err = await _iptables(netns, "-I", *RULE)
    if rc != 0:
        raise NetworkError(f"cannot hold the loopback of {netns}: {err or f'iptables exit {rc}'}")


async def release(netns: Path) -> None:
    """Let TCP on the pod's loopback through again (a missing rule is fine)."""
    while (await _iptables(netns, "-C", *RULE))[0] == 0:
        rc, err = await _iptables(netns, "-D", *RULE)
        if rc != 0:
            raise NetworkError(f"cannot release the loopback of {netns}: {err or f'iptables exit {rc}'}")
