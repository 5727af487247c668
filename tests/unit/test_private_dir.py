"""Work and bundle directories: created root-only, and never a planted symlink."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tug.engine.errors import PreconditionError
from tug.engine.fsutil import private_dir


def test_created_0700(tmp_path: Path) -> None:
    d = private_dir(tmp_path / "a" / "work")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_existing_loose_mode_is_tightened(tmp_path: Path) -> None:
    d = tmp_path / "w"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_planted_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    os.chmod(target, 0o755)
    os.symlink(target, tmp_path / "tug-host")
    with pytest.raises(PreconditionError, match="not a directory owned"):
        private_dir(tmp_path / "tug-host")
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "w"
    d.mkdir()
    os.chown(d, 65534, 65534)
    with pytest.raises(PreconditionError):
        private_dir(d)
