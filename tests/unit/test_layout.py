"""The tree keeps its shape: no import cycle, no oversized engine module,
and each side's modules import nothing of the other side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_import_cycle_and_no_engine_module_over_400_lines() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_destination_imports_nothing_of_the_source_and_back() -> None:
    for side, other in (("destination", "source"), ("source", "destination")):
        for f in (ROOT / "engine" / side).rglob("*.py"):
            text = f.read_text()
            assert f"tug.engine.{other}" not in text, f"{f.relative_to(ROOT)} imports the {other} side"
