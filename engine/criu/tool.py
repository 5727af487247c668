"""CRIU as a tool: version, feature probes, CPU compatibility, log triage.

runc drives CRIU for dump and restore; this module covers what runc does not
expose, and turns CRIU's logs into :class:`CriuError` with the lines that
matter (CRIU writes hundreds of lines; the first ``Error`` is usually the cause).

It also says which process *is* CRIU (:func:`runs_criu`, :func:`why_not_root_criu`):
by the executable's device and inode, never by name, since any process can
call itself ``criu``. And how to stop a dump without leaving it half done
(:data:`DUMP_STOP`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tug.engine import proc
from tug.engine.errors import ConfigError, CriuError, PreconditionError, RuntimeToolError

MIN_VERSION = (4, 2)

#: How long a dump interrupted with SIGALRM may take to clean up: CRIU re-arms
#: alarm(1) after each interrupt and gives up (BUG) after five, so it has
#: either cured its parasites and exited or crashed well within this.
DUMP_STOP_GRACE_S = 8.0

#: Errors CRIU logs on every run here and that do not affect the result
#: (no CAP_SYS_RESOURCE: see shared/platform.md).
_HARMLESS = (re.compile(r"rlimit: Can't setup RLIMIT_NOFILE"),)
_ERROR_LINE = re.compile(r"\b(Error|BUG)\b.*?:")


def criu_binary() -> str:
    found = shutil.which("criu") or shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin")
    if not found:
        raise PreconditionError("criu: not installed (run scripts/setup.sh, or see 'tug doctor')")
    return found


def criu_identity() -> tuple[int, int]:
    """(st_dev, st_ino) of the CRIU binary tug runs."""
    st = os.stat(criu_binary())
    return st.st_dev, st.st_ino


def _exe_identity(proc_dir: int) -> tuple[int, int]:
    st = os.stat("exe", dir_fd=proc_dir)  # follows the magic link to the executable itself
    return st.st_dev, st.st_ino


def runs_criu(pid: int) -> bool:
    """True when process ``pid`` executes tug's CRIU binary (compared by inode, not name)."""
    try:
        criu = criu_identity()
        fd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY)
    except (OSError, PreconditionError):
        return False
    try:
        return _exe_identity(fd) == criu
    except OSError:
        return False
    finally:
        os.close(fd)


def why_not_root_criu(pid: int, criu: tuple[int, int] | None = None) -> str | None:
    """None when ``pid`` is tug's CRIU run by root, else why not (for a refusal).

    Root CRIU means: every uid of the process (real, effective, saved, fs) is
    0, and its executable is the file :func:`criu_binary` names (same device
    and inode). The name (``comm``) proves nothing: any process can set it.
    Both are read through one handle on ``/proc/PID``, so a pid reused
    between the two reads fails the check instead of mixing two processes.
    ``criu`` is :func:`criu_identity`, if the caller already has it.
    """
    try:
        criu = criu or criu_identity()
    except (OSError, PreconditionError) as exc:
        return f"cannot identify the CRIU binary: {getattr(exc, 'strerror', None) or exc}"
    try:
        fd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return f"process {pid} is gone"
    try:
        sfd = os.open("status", os.O_RDONLY, dir_fd=fd)
        with os.fdopen(sfd, "rb") as f:
            status = f.read().decode(errors="replace")
        fields = {k: v.strip() for k, _, v in (ln.partition(":") for ln in status.splitlines())}
        comm, uids = fields.get("Name", "?"), fields.get("Uid", "").split()
        if not uids or any(u != "0" for u in uids):
            return f"{comm} (pid {pid}) runs as uid {'/'.join(uids) or '?'}, not root"
        if _exe_identity(fd) != criu:
            return f"{comm} (pid {pid}) runs {os.readlink('exe', dir_fd=fd)}, not the CRIU binary"
    except OSError as exc:
        return f"cannot look at process {pid}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return None


#: How :meth:`Runc.checkpoint_frozen` and :meth:`Runc.predump` stop a dump
#: that timed out or was cancelled (see :class:`proc.GracefulStop`).
#:
#: Why SIGALRM and not SIGTERM: CRIU 4.2.1 installs no handler for SIGTERM or
#: SIGINT during a dump, so either kills it on the spot just like SIGKILL
#: (and SIGTERM kills runc, whose CRIU then dumps on as an orphan). Killed
#: mid-dump, CRIU leaves its parasite (``/memfd:CRIUMFD``) mapped in the
#: container's processes and the freezer thawed: the "paused" source runs.
#: SIGALRM is CRIU's own interrupt (criu/cr-dump.c ``alarm_handler``, set up
#: for the whole dump and pre-dump, without SA_RESTART, the mechanism of
#: ``criu --timeout``): the current syscall fails with EINTR, the dump takes
#: its error path, cures every parasite, unseizes the tasks and puts the
#: freezer back in its original state (FROZEN after ``runc pause``), then
#: exits. runc (Go) ignores SIGALRM and reports CRIU's failure. Only
#: processes running the CRIU binary get it, once each: CRIU re-arms the
#: alarm itself and aborts after its fifth.
DUMP_STOP = proc.GracefulStop(signal=signal.SIGALRM, grace=DUMP_STOP_GRACE_S, select=runs_criu)


@dataclass(frozen=True, slots=True)
class CriuVersion:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def supported(self) -> bool:
        return (self.major, self.minor) >= MIN_VERSION


def parse_version(text: str) -> CriuVersion:
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise PreconditionError(f"cannot parse 'criu --version' output: {text.strip()[:80]!r}")
    return CriuVersion(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


async def version() -> CriuVersion:
    res = await proc.run([criu_binary(), "--version"], timeout=10)
    return parse_version(res.out)


async def check() -> tuple[bool, str]:
    """``criu check``: (passed, the last meaningful line of its output)."""
    res = await proc.run([criu_binary(), "check"], timeout=30, check=False)
    text = (res.out + res.err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip() and not any(p.search(ln) for p in _HARMLESS)]
    return res.returncode == 0, (lines[-1] if lines else "")


async def has_feature(name: str) -> bool:
    res = await proc.run([criu_binary(), "check", "--feature", name], timeout=30, check=False)
    return res.returncode == 0


async def cpuinfo_dump(images_dir: Path) -> Path:
    """Write this CPU's description (cpuinfo.img) for the peer to check against."""
    images_dir.mkdir(parents=True, exist_ok=True)
    await proc.run([criu_binary(), "cpuinfo", "dump", "-D", str(images_dir)], timeout=30)
    return images_dir / "cpuinfo.img"


async def cpuinfo_check(images_dir: Path) -> str | None:
    """None when a dump from the CPU described in images_dir can run here."""
    res = await proc.run(
        [criu_binary(), "cpuinfo", "check", "-D", str(images_dir), "-v1"], timeout=30, check=False
    )
    if res.returncode == 0:
        return None
    lines = error_lines_from_text(res.out + res.err)
    return lines[-1] if lines else f"criu cpuinfo check exited {res.returncode}"


def error_lines_from_text(text: str) -> list[str]:
    return [
        ln.strip()
        for ln in text.splitlines()
        if _ERROR_LINE.search(ln) and not any(p.search(ln) for p in _HARMLESS)
    ]


def log_error_lines(log_path: Path, limit: int = 20) -> list[str]:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    return error_lines_from_text(text)[:limit]


def error_from_tool(exc: RuntimeToolError, action: str, log_path: Path) -> CriuError:
    """Wrap a failed runc checkpoint/restore with CRIU's own explanation."""
    lines = log_error_lines(log_path)
    if not lines:
        lines = error_lines_from_text(exc.stderr) or [ln for ln in exc.stderr.splitlines() if ln.strip()][-1:]
    return CriuError(
        f"{action} failed",
        argv=exc.argv,
        returncode=exc.returncode,
        stderr=exc.stderr,
        log_path=log_path if log_path.exists() else None,
        error_lines=lines,
    )


def first_error(lines: Sequence[str]) -> str:
    return lines[0] if lines else ""


#: CRIU options a user may add to a restore (``--criu-opt``): long option
#: names as a CRIU config file takes them, with an optional value.
_CRIU_OPT = re.compile(r"^[a-z][a-z0-9-]{0,40}( [^\n\x00]{1,200})?$")
#: Options tug sets or that would break what it relies on.
_RESERVED = {"images-dir", "work-dir", "root", "pidfile", "restore-detached", "lazy-pages", "page-server", "address",
             "port", "inherit-fd", "lsm-profile", "config", "exec-cmd", "action-script"}


def check_criu_opts(raw: Any) -> list[str]:
    """``--criu-opt`` values, each a config file line: ``name`` or ``name value``."""
    if not isinstance(raw, list) or len(raw) > 32:
        raise ConfigError("malformed CRIU options")
    out = []
    for item in raw:
        if not isinstance(item, str) or not _CRIU_OPT.match(item):
            raise ConfigError(
                f"--criu-opt {item!r}: expected NAME or 'NAME VALUE' as in a CRIU config file "
                "(criu(8) long options without the dashes)"
            )
        if item.split(" ", 1)[0] in _RESERVED:
            raise ConfigError(f"--criu-opt {item.split(' ', 1)[0]!r} is tug's to set")
        out.append(item)
    return out
