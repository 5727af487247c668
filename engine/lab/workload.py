"""Build and read the ``tug-workload`` demo process (``workload.c``).

The lab migrates a busybox container running ``tug-workload`` and then asks
three questions, each answered by a file the workload keeps in its state
directory:

* Did memory survive? ``SIGUSR1`` makes the workload re-derive every page from
  its version table and write ``verify.json`` (:func:`read_verify`).
* Did the process *continue* rather than restart, and for how long was it
  frozen? ``heartbeat.log`` has one ``"<counter> <realtime_ns> <monotonic_ns>"``
  line per tick; counter steps show continuity and the largest CLOCK_REALTIME
  gap bounds the downtime (:func:`analyze_heartbeat`). Realtime, not monotonic,
  because CLOCK_MONOTONIC is per host and jumps when the process lands on
  another one.
* What is it doing right now? ``status.json`` (:func:`read_status`).

The binary is static so it runs unchanged inside busybox (no libc there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tug.engine.errors import PreconditionError

__all__ = [
    "WORKLOAD_SOURCE",
    "HeartbeatAnalysis",
    "analyze_heartbeat",
    "build_workload",
    "read_status",
    "read_verify",
    "verify_seq",
]

#: The C source, shipped as package data next to this module.
WORKLOAD_SOURCE: Path = Path(__file__).with_name("workload.c")

#: Flags are part of the build identity: they go into the sidecar hash too.
_CFLAGS: tuple[str, ...] = ("-O2", "-Wall", "-Wextra", "-static")

_INSTALL_HINT = "install gcc and a static C library (Debian/Ubuntu: apt-get install gcc libc6-dev; Fedora/RHEL: dnf install gcc glibc-static)"


def _sidecar(dest: Path) -> Path:
    """Where the source hash of a built binary is kept.

    Appends rather than replaces a suffix so ``tug-workload`` and
    ``tug-workload.bin`` never share a sidecar.
    """
    return dest.with_name(dest.name + ".sha256")


def _source_digest(source: Path) -> str:
    """Hash of the source and flags; a binary is reused only for the same one.

    mtime alone is not enough: a checkout can make the source older than a
    binary built from a different revision.
    """
    h = hashlib.sha256()
    h.update(source.read_bytes())
    h.update(b"\0" + " ".join(_CFLAGS).encode())
    return h.hexdigest()


def build_workload(dest: Path) -> Path:
    """Compile ``workload.c`` into ``dest`` (static) unless it is up to date.

    The compile goes to a temporary file in ``dest``'s directory that is then
    renamed over ``dest``, so a concurrent reader or builder never sees a
    half-written binary. Returns ``dest``.

    Raises :class:`PreconditionError` when gcc or the static C library is
    missing, or when the compile fails for another reason.
    """
    dest = Path(dest)
    source = WORKLOAD_SOURCE
    digest = _source_digest(source)
    sidecar = _sidecar(dest)
    try:
        if (
            dest.stat().st_mtime >= source.stat().st_mtime
            and sidecar.read_text(encoding="ascii").strip() == digest
        ):
            return dest
    except (OSError, UnicodeDecodeError):
        pass  # missing or unreadable: build

    gcc = shutil.which("gcc")
    if gcc is None:
        raise PreconditionError(f"cannot build tug-workload: gcc not found; {_INSTALL_HINT}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        proc = subprocess.run(
            [gcc, *_CFLAGS, "-o", str(tmp), str(source)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise PreconditionError(_compile_error_message(proc.stderr))
        tmp.chmod(0o755)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar.write_text(digest + "\n", encoding="ascii")
    return dest


def _compile_error_message(stderr: str) -> str:
    """One line for a failed gcc run, naming the package when libc.a is missing."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if any("cannot find -lc" in line or "cannot find -lgcc" in line for line in lines):
        return f"cannot build tug-workload: no static C library; {_INSTALL_HINT}"
    errors = [line for line in lines if "error" in line] or lines or ["gcc failed without output"]
    return f"cannot build tug-workload: {errors[0]}"


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatAnalysis:
    """What ``heartbeat.log`` says about continuity and downtime.

    Counters start at 1, so ``0`` in a counter field means "no such line".
    """

    #: Complete, well-formed lines analysed.
    lines: int
    first_counter: int
    last_counter: int
    #: Steps where the counter went down or restarted at 1: the process was
    #: restarted or restored from an older image, not migrated live.
    resets: int
    #: Steps where the counter decreased.
    backwards: int
    #: Steps that were not exactly +1 (includes backwards steps and repeats).
    skipped: int
    #: Largest CLOCK_REALTIME difference between consecutive lines, in ms.
    max_gap_ms: float
    #: Counter of the line that ends the largest gap (first line after it).
    max_gap_at_counter: int
    #: Complete lines that did not parse as three integers (not analysed).
    malformed: int = 0
    #: Records whose checksum does not match their fields: torn or altered
    #: (not analysed; a record without a checksum, as older workloads wrote, is taken as is).
    torn: int = 0


def analyze_heartbeat(path: Path, *, since_counter: int = 0) -> HeartbeatAnalysis:
    """Summarise ``heartbeat.log`` for continuity and the longest freeze.

    Analysis starts at the first line whose counter is ``>= since_counter``
    and from there takes every line, so a reset after that point is still
    seen (filtering each line by counter would hide it). The workload writes
    each line with one ``write()``, yet the file may end mid-line (copy taken
    while it was writing, full disk): text after the last newline is ignored.
    """
    lines = resets = backwards = skipped = malformed = torn = 0
    first = last = 0
    prev_rt = 0
    max_gap_ns = 0
    max_gap_at = 0
    started = since_counter <= 0
    with Path(path).open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # truncated last line
            fields = raw.split()
            try:
                if len(fields) not in (3, 4):
                    raise ValueError
                counter, rt, _mono = (int(x) for x in fields[:3])
                sum_ = int(fields[3], 16) if len(fields) == 4 else None
            except ValueError:
                malformed += 1
                continue
            if sum_ is not None and sum_ != fnv1a64(b" ".join(fields[:3])):
                torn += 1
                continue
            if not started:
                if counter < since_counter:
                    continue
                started = True
            if lines == 0:
                first = counter
            else:
                if counter < last or counter == 1:
                    resets += 1
                if counter < last:
                    backwards += 1
                if counter != last + 1:
                    skipped += 1
                gap = rt - prev_rt
                if gap > max_gap_ns:
                    max_gap_ns = gap
                    max_gap_at = counter
            lines += 1
            last = counter
            prev_rt = rt
    return HeartbeatAnalysis(
        lines=lines,
        first_counter=first,
        last_counter=last,
        resets=resets,
        backwards=backwards,
        skipped=skipped,
        max_gap_ms=max_gap_ns / 1e6,
        max_gap_at_counter=max_gap_at,
        malformed=malformed,
        torn=torn,
    )


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits: the workload's checksum of a heartbeat record."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _read_json(path: Path) -> dict[str, Any]:
    """Parse one of the workload's JSON files (always replaced atomically)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PreconditionError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PreconditionError(f"{path} does not hold a JSON object")
    return data


def read_status(state_dir: Path) -> dict[str, Any]:
    """The workload's latest ``status.json``.

    Raises :class:`PreconditionError` if it does not exist yet, which means the
    workload never started (it writes status before its first poll).
    """
    path = Path(state_dir) / "status.json"
    try:
        return _read_json(path)
    except FileNotFoundError:
        raise PreconditionError(f"no {path}: is tug-workload running with --state {state_dir}?") from None


def read_verify(state_dir: Path) -> dict[str, Any] | None:
    """The latest ``verify.json``, or ``None`` before the first SIGUSR1."""
    try:
        return _read_json(Path(state_dir) / "verify.json")
    except FileNotFoundError:
        return None


def verify_seq(state_dir: Path) -> int:
    """Sequence number of the latest verification, ``0`` if none yet.

    Read it before sending SIGUSR1, then wait for a larger value: verify.json
    is only trusted when it was written after the signal.
    """
    result = read_verify(state_dir)
    if result is None:
        return 0
    return int(result.get("seq", 0))
