"""The worker's registry lease token file (services/inference/registration.py)."""

from __future__ import annotations

import re
from pathlib import Path

from services.inference.registration import lease_token, read_lease_token
from services.router.registry import check_lease_token


def test_the_first_start_creates_a_token_only_its_user_can_read(tmp_path: Path) -> None:
    path = tmp_path / "tokens" / "w0"
    token = lease_token(path)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert path.stat().st_mode & 0o777 == 0o600
    check_lease_token(token)  # the router accepts what the worker makes


def test_a_restart_reads_the_same_token(tmp_path: Path) -> None:
    path = tmp_path / "w0"
    assert lease_token(path) == lease_token(path) == read_lease_token(path)
    assert lease_token(tmp_path / "w1") != lease_token(path)


def test_no_file_reads_as_no_token(tmp_path: Path) -> None:
    assert read_lease_token(tmp_path / "absent") == ""


def test_a_file_without_a_well_formed_token_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "w0"
    for broken in ("", "short\n", "x" * 200):
        path.write_text(broken)
        token = lease_token(path)
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
        assert read_lease_token(path) == token
        assert path.stat().st_mode & 0o777 == 0o600
    assert list(tmp_path.iterdir()) == [path]  # no staged file left behind
