"""The edge's JWT checks agree with what the auth service may issue."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import edge_auth
from gateway.edge_auth import EdgeAuth
from services.auth.service import AuthSettings
from services.core.settings import SettingsError, load

SECRET = {"TOKENMESH_AUTH_SECRET": "s" * 32}


def _provider() -> dict[str, Any]:
    config = edge_auth.jwt_filter(EdgeAuth(), 8080)["typed_config"]
    provider: dict[str, Any] = config["providers"]["tokenmesh"]
    return provider


def _ttl_setting(seconds: int) -> int:
    env = {**SECRET, "TOKENMESH_AUTH_TOKEN_TTL_SECONDS": str(seconds)}
    return load(AuthSettings, env).token_ttl_s


def test_the_longest_token_ttl_is_the_auth_services_bound() -> None:
    # max_lifetime at the edge must never refuse a token the auth service issues.
    assert _ttl_setting(edge_auth.LONGEST_TOKEN_TTL_S) == edge_auth.LONGEST_TOKEN_TTL_S
    with pytest.raises(SettingsError, match="TOKENMESH_AUTH_TOKEN_TTL_SECONDS"):
        _ttl_setting(edge_auth.LONGEST_TOKEN_TTL_S + 1)


def test_the_edge_requires_exp_and_bounds_the_remaining_lifetime() -> None:
    provider = _provider()
    assert provider["require_expiration"] is True
    # The auth service's default TTL, not the longest it can be set to (a day): a
    # token minted with a leaked key kept working that long after the key left.
    default = edge_auth.DEFAULT_TOKEN_TTL_S + edge_auth.JWT_CLOCK_SKEW_S
    assert provider["max_lifetime"] == f"{default}s"
    assert provider["clock_skew_seconds"] == edge_auth.JWT_CLOCK_SKEW_S
    assert load(AuthSettings, SECRET).token_ttl_s == edge_auth.DEFAULT_TOKEN_TTL_S
    longer = edge_auth.jwt_filter(EdgeAuth(token_ttl_s=3600), 8080)["typed_config"]
    assert longer["providers"]["tokenmesh"]["max_lifetime"] == "3610s"
