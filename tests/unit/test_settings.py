"""Settings parse from the environment and name the variable when invalid."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.settings import RedisSettings, ServerSettings, SettingsError, describe, load
from services.inference.service import InferenceSettings
from services.usage.service import UsageSettings


def test_defaults_apply_when_nothing_is_set():
    settings = load(ServerSettings, {})
    assert settings.host == "127.0.0.1" and settings.port == 0
    assert settings.otlp_endpoint is None and settings.ready_file is None


def test_values_are_parsed_by_type():
    settings = load(
        InferenceSettings,
        {
            "TOKENMESH_GRPC_PORT": "50051",
            "TOKENMESH_GRACE_SECONDS": "2.5",
            "TOKENMESH_READY_FILE": "/tmp/ready.json",
            "TOKENMESH_TEST_MODELS": "a:1, b:2",
        },
    )
    assert settings.port == 50051 and settings.grace_s == 2.5
    assert settings.ready_file == Path("/tmp/ready.json")
    assert settings.test_models == ("a:1", "b:2")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TOKENMESH_GRPC_PORT", "eighty"),
        ("TOKENMESH_GRPC_PORT", "70000"),
        ("TOKENMESH_LOG_FORMAT", "xml"),
        ("TOKENMESH_LOG_LEVEL", "LOUD"),
        ("TOKENMESH_TEST_MODELS", "no-version"),
        ("TOKENMESH_MESSAGES_PER_STEP", "-1"),
        ("TOKENMESH_PREFIX_CACHE_TOKENS", "-1"),
        ("TOKENMESH_ENGINE_DECODE", "fast"),
    ],
)
def test_invalid_values_name_the_variable(variable, value):
    with pytest.raises(SettingsError, match=variable):
        load(InferenceSettings, {variable: value})


def test_redis_url_scheme_is_checked():
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load(RedisSettings, {"REDIS_URL": "http://localhost"})


def test_the_limits_redis_url_is_checked_and_defaults_to_redis_url():
    with pytest.raises(SettingsError, match="TOKENMESH_RATELIMIT_REDIS_URL"):
        load(UsageSettings, {"TOKENMESH_RATELIMIT_REDIS_URL": "localhost:6379"})
    assert load(UsageSettings, {}).ratelimit_redis_url == ""  # empty: REDIS_URL serves both


def test_describe_lists_every_variable():
    names = [row[0] for row in describe(RedisSettings)]
    assert "REDIS_URL" in names and "TOKENMESH_GRPC_PORT" in names


def test_json_logs_are_one_object_per_line(capsys):
    import json
    import logging

    from services.core import logs

    logs.configure("INFO", "json", "test")
    try:
        logging.getLogger("tokenmesh.test").info("hello %s", "world")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        entry = json.loads(line)
        assert entry["msg"] == "hello world" and entry["level"] == "INFO"
    finally:
        logging.getLogger().handlers.clear()


def test_opentelemetry_proto_is_the_real_one():
    # xds-protos overwrites opentelemetry-proto's modules with an old copy;
    # `make setup` restores them. Exporters and collectors need the new API.
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    assert InstrumentationScope.DESCRIPTOR.fields_by_name["name"]


def test_the_lease_size_is_bounded_and_zero_turns_leases_off():
    for bad in ("-1", "1025", "many"):
        with pytest.raises(SettingsError, match="TOKENMESH_RATELIMIT_LEASE_SIZE"):
            load(UsageSettings, {"TOKENMESH_RATELIMIT_LEASE_SIZE": bad})
    assert load(UsageSettings, {"TOKENMESH_RATELIMIT_LEASE_SIZE": "0"}).lease_size == 0
    assert load(UsageSettings, {}).lease_size == 32


def test_the_meter_linger_is_bounded_and_zero_applies_every_read_at_once():
    assert load(UsageSettings, {}).meter_linger_ms == 200
    assert load(UsageSettings, {"TOKENMESH_USAGE_METER_LINGER_MS": "0"}).meter_linger_ms == 0
    for bad in ("-1", "5001", "soon"):
        with pytest.raises(SettingsError, match="TOKENMESH_USAGE_METER_LINGER_MS"):
            load(UsageSettings, {"TOKENMESH_USAGE_METER_LINGER_MS": bad})
