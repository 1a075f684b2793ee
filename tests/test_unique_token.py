"""The agent's unique token file: generated once (0600), kept, never leaked in errors."""

from __future__ import annotations

import logging
import stat
import threading
from pathlib import Path

import pytest

from gatekeeper.agent.unique_token import UniqueTokenError, UniqueTokenStore, load_or_create


def test_first_start_creates_a_private_token_that_later_starts_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "unique-token"
    token = load_or_create(path)
    assert len(token) >= 32 and token.isascii() and token.isprintable()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create(path) == token
    assert load_or_create(tmp_path / "other") != token  # another machine, another token


def test_agents_starting_at_once_agree_on_one_token(tmp_path: Path) -> None:
    path = tmp_path / "unique-token"
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_or_create(path))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and path.read_text().strip() == results[0]
    assert [p.name for p in tmp_path.iterdir()] == ["unique-token"]  # no temporary files left


def test_a_damaged_file_is_one_line_naming_the_file_not_its_content(tmp_path: Path) -> None:
    path = tmp_path / "unique-token"
    path.write_text("SECRET\x00garbage\n")
    with pytest.raises(UniqueTokenError) as err:
        load_or_create(path)
    assert str(path) in str(err.value) and "SECRET" not in str(err.value)
    assert "\n" not in str(err.value)


def test_an_unwritable_state_dir_is_reported_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = UniqueTokenStore(blocker / "unique-token")
    with caplog.at_level(logging.ERROR):
        assert store.token() is None
        assert store.token() is None
    assert len([r for r in caplog.records if "unique token" in r.getMessage()]) == 1
    blocker.unlink()
    blocker.mkdir()
    token = store.token()
    assert token is not None and store.token() == token
    assert token not in caplog.text
