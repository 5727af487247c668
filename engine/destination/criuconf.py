"""The CRIU config file of a restore with options of its own (``org.criu.config``).

runc hands CRIU one config file, named by the container's ``org.criu.config``
annotation, for its restore and for every later dump alike. tug writes the
restore's options there (``--criu-opt``, ``tcp-close``, a held member's
``leave-stopped``) after the lines of the container's own file, and puts the
container's own lines back once the restore is over, so that no option of one
migration's restore applies to the container's next dump.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("tug.agent")

#: The CRIU config file a restore with extra options uses, in the bundle.
CRIU_CONF = "criu.conf"


def write_restore_config(bundle: Path, name: str, options: list[str]) -> list[str]:
    """Point runc at a CRIU config file for this restore; returns the
    container's own lines, which stay once the restore is over.

    The container's own annotation, if its file exists here, is kept: its
    lines come first, tug's options after. The file lives in the bundle,
    since runc keeps the annotation for the container's life.
    """
    cfg_path = bundle / "config.json"
    spec = json.loads(cfg_path.read_text())
    annotations = spec.setdefault("annotations", {})
    conf = bundle / CRIU_CONF
    lines: list[str] = []
    own = annotations.get("org.criu.config")
    if isinstance(own, str) and own and own != str(conf):
        try:
            lines = [ln for ln in Path(own).read_text().splitlines() if ln.strip()]
        except OSError as exc:
            log.warning("%s: the container's CRIU config %s is not readable here (%s): only tug's options apply",
                        name, own, exc.strerror)
    conf.write_text("\n".join(lines + options) + "\n")
    annotations["org.criu.config"] = str(conf)
    cfg_path.write_text(json.dumps(spec, indent=2))
    return lines


def keep_own_lines(bundle: Path, own: list[str]) -> None:
    """After the restore: the file holds the container's own lines only."""
    (bundle / CRIU_CONF).write_text("".join(f"{ln}\n" for ln in own))


def rewrite(bundle: Path, own: list[str], options: list[str]) -> None:
    """A restore started early (prestart.py): its file already named, its final lines now."""
    (bundle / CRIU_CONF).write_text("".join(f"{ln}\n" for ln in [*own, *options]))
