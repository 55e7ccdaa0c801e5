"""Secret files are created 0600 (never wider, whatever the umask) and appear whole."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.core import secret_files
from tests import audit


@pytest.fixture
def umask_0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_a_secret_is_0600_from_creation_even_with_umask_0(tmp_path, umask_0):
    path = tmp_path / "state" / "admin.key"
    with audit.modes_under(path.parent) as modes:
        secret_files.replace_secret(path, b"one")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        secret_files.replace_secret(path, b"two")
    assert path.read_bytes() == b"two"
    assert modes and all(seen == {0o600} for seen in modes.values()), modes
    assert os.listdir(path.parent) == ["admin.key"]
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_create_keeps_an_existing_secret(tmp_path, umask_0):
    path = tmp_path / "auth.secret"
    assert secret_files.create_secret(path, b"first")
    assert not secret_files.create_secret(path, b"second")
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_concurrent_creators_agree_on_one_secret(tmp_path):
    path = tmp_path / "auth.secret"
    values = [f"secret-{i}".encode() for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda v: secret_files.create_secret(path, v), values))
    assert created.count(True) == 1
    assert path.read_bytes() == values[created.index(True)]
    assert os.listdir(tmp_path) == ["auth.secret"]
