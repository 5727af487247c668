"""CRIU as a tool: version, feature probes, CPU compatibility, log triage.

runc drives CRIU for dump and restore; this module covers what runc does not
expose, and turns CRIU's logs into :class:`CriuError` with the lines that
matter (CRIU writes hundreds of lines; the first ``Error`` is usually the cause).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tug.engine import proc
from tug.engine.errors import CriuError, PreconditionError, RuntimeToolError

MIN_VERSION = (4, 2)

#: Errors CRIU logs on every run here and that do not affect the result
#: (no CAP_SYS_RESOURCE: see shared/platform.md).
_HARMLESS = (re.compile(r"rlimit: Can't setup RLIMIT_NOFILE"),)
_ERROR_LINE = re.compile(r"\b(Error|BUG)\b.*?:")


def criu_binary() -> str:
    found = shutil.which("criu") or shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin")
    if not found:
        raise PreconditionError("criu: not installed (run scripts/setup.sh, or see 'tug doctor')")
    return found


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
