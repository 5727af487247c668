"""CRIU's own network lock, skipped where tug already holds the container's network.

With ``--tcp-established`` CRIU locks the container's network itself: it
installs iptables rules inside the container's namespace before it dumps or
restores sockets, and removes them at the end. Each step is one or more
``iptables-restore`` runs (IPv4 and IPv6, plus a check that spawns a shell),
measured here at 50-70 ms per dump and 45 ms per restore, all of it inside the
frozen window.

For a container whose network is a tug endpoint that work is redundant: tug's
lock (runtime/netlock.py) redirects every frame to and from the frozen source
at the outer end of its veth from the freeze on, and the destination holds
every frame for the restored namespace until its restore has finished. A pod's
loopback, the one path that never crosses the veth, has its own hold while
members are restored one by one (runtime/podloop.py). So those dumps and
restores run with ``network-lock skip``.

runc has no option for it; CRIU reads the config file named by
``CRIU_CONFIG_FILE`` at start-up, and runc hands its environment to the CRIU
it runs. A user's own ``CRIU_CONFIG_FILE`` is kept (its lines first), and the
container's ``org.criu.config`` file, which runc passes with each request, is
read after both and still wins.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("tug.criu")

SKIP_LINE = "network-lock skip"
#: The config file written beside CRIU's log in the dump's or restore's work dir.
CONF_NAME = "tug-netlock.conf"


def skip_env(work_dir: Path) -> dict[str, str]:
    """The environment for a runc dump or restore whose network tug holds."""
    own = os.environ.get("CRIU_CONFIG_FILE")
    lines: list[str] = []
    if own:
        try:
            lines = [ln for ln in Path(own).read_text().splitlines() if ln.strip()]
        except OSError as exc:
            log.warning("CRIU_CONFIG_FILE %s is not readable (%s): only tug's network-lock line applies",
                        own, exc.strerror)
    conf = work_dir / CONF_NAME
    work_dir.mkdir(parents=True, exist_ok=True)
    conf.write_text("".join(f"{ln}\n" for ln in [*lines, SKIP_LINE]))
    return {"CRIU_CONFIG_FILE": str(conf)}
