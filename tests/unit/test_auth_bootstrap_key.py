"""The production bootstrap admin key (TOKENMESH_AUTH_BOOTSTRAP_KEY) must look random:
one an operator typed (`tm_` and a repeated letter, a word to length) was an admin
key anyone could guess, accepted because it had the shape."""

from __future__ import annotations

import secrets

import pytest

from services.auth.crypto import new_api_key
from services.auth.service import AuthSettings
from services.core.settings import SettingsError, load


def _settings(key: str) -> AuthSettings:
    return load(
        AuthSettings, {"TOKENMESH_AUTH_BOOTSTRAP_KEY": key, "TOKENMESH_AUTH_SECRET": "s" * 32}
    )


@pytest.mark.parametrize(
    "key",
    [
        "tm_" + "a" * 43,
        "tm_" + "password" * 6,
        "tm_" + "0123456789" * 5,  # ten different characters, repeated
        "tm_" + "abc123" * 8,
        "tm_" + "x" * 20 + "!" + secrets.token_hex(12),  # not URL-safe base64
        "tm_short",
    ],
)
def test_a_chosen_bootstrap_key_is_refused_at_start(key: str) -> None:
    with pytest.raises(SettingsError, match="TOKENMESH_AUTH_BOOTSTRAP_KEY"):
        _settings(key)


def test_generated_bootstrap_keys_are_accepted() -> None:
    # What the docs say to use (compose: 48 hex digits) and what the CLI makes.
    for _ in range(500):
        assert _settings("tm_" + secrets.token_hex(24)).bootstrap_key
        assert _settings(new_api_key()).bootstrap_key
