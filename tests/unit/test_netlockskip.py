"""The CRIU config that skips CRIU's own network lock (criu/netlockskip.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tug.engine.criu.netlockskip import SKIP_LINE, skip_env
from tug.engine.runtime.runc import Runc


def test_skip_env_names_a_file_with_the_skip_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRIU_CONFIG_FILE", raising=False)
    env = skip_env(tmp_path / "work")
    assert Path(env["CRIU_CONFIG_FILE"]).read_text() == f"{SKIP_LINE}\n"


def test_a_users_criu_config_file_is_kept_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "mine.conf"
    own.write_text("tcp-established\n\nlog-file /x.log\n")
    monkeypatch.setenv("CRIU_CONFIG_FILE", str(own))
    env = skip_env(tmp_path / "work")
    assert Path(env["CRIU_CONFIG_FILE"]).read_text().splitlines() == ["tcp-established", "log-file /x.log", SKIP_LINE]


def test_an_unreadable_users_file_leaves_only_the_skip_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRIU_CONFIG_FILE", str(tmp_path / "missing.conf"))
    env = skip_env(tmp_path / "work")
    assert Path(env["CRIU_CONFIG_FILE"]).read_text() == f"{SKIP_LINE}\n"


def test_only_a_container_whose_network_tug_holds_skips_criu_s_lock(tmp_path: Path) -> None:
    runc = Runc(tmp_path / "root")
    assert runc.dump_env("c", tmp_path / "w") is None
    runc.net_held.add("c")
    env = runc.dump_env("c", tmp_path / "w")
    assert env is not None and Path(env["CRIU_CONFIG_FILE"]).read_text().endswith(f"{SKIP_LINE}\n")
    assert runc.dump_env("other", tmp_path / "w") is None
