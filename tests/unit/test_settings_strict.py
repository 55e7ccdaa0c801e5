"""Settings refuse values that load fine but quietly break a service.

`float()` reads "inf", "nan" and "1e999"; a non-finite value slips past every
declared bound (nan compares false with everything, inf passes `>= 0`), so
TOKENMESH_USAGE_CLAIM_IDLE_SECONDS=inf never claimed a dead consumer's events.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

from services.auth.service import AuthSettings
from services.core.settings import SettingsError, load
from services.inference.service import InferenceSettings, host_at_start, registered_host
from services.jobs.service import JobsSettings
from services.launcher.__main__ import LauncherSettings
from services.router.service import RouterSettings
from services.usage.service import UsageSettings

SERVICES = (AuthSettings, InferenceSettings, JobsSettings, RouterSettings, UsageSettings)


def _float_variables() -> list[tuple[type, str]]:
    """Returns (settings class, variable) for every float setting of every service."""
    found: list[tuple[type, str]] = []
    for cls in SERVICES:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            kind = hints[field.name]
            if "env" in field.metadata and float in (kind, *typing.get_args(kind)):
                found.append((cls, field.metadata["env"]))
    return found


@pytest.mark.parametrize(("cls", "variable"), _float_variables())
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_no_float_setting_takes_a_non_finite_value(cls, variable, value):
    with pytest.raises(SettingsError, match=f"{variable}.*finite"):
        load(cls, {variable: value})


def test_every_service_has_float_settings_to_check():
    # The parametrization above must not silently shrink to nothing.
    assert {cls for cls, _ in _float_variables()} == set(SERVICES)


def test_finite_floats_still_parse():
    assert load(JobsSettings, {"TOKENMESH_GRACE_SECONDS": "2.5"}).grace_s == 2.5
    assert load(JobsSettings, {"TOKENMESH_GRACE_SECONDS": "1e3"}).grace_s == 1000.0


@pytest.mark.parametrize("value", ["0", "-1", "1000"])
def test_the_usage_spool_has_a_real_limit(value):
    """0 (a common guess at "unlimited") or less loaded fine; the worker then
    reported SERVING and refused every request as USAGE_BACKLOG_FULL."""
    with pytest.raises(SettingsError, match="TOKENMESH_USAGE_SPOOL_MAX_BYTES"):
        load(InferenceSettings, {"TOKENMESH_USAGE_SPOOL_MAX_BYTES": value})


def test_the_usage_spool_limit_takes_a_sane_value():
    settings = load(InferenceSettings, {"TOKENMESH_USAGE_SPOOL_MAX_BYTES": str(8 << 20)})
    assert settings.usage_spool_max_bytes == 8 << 20


def test_engine_threads_are_not_negative():
    with pytest.raises(SettingsError, match="TOKENMESH_ENGINE_THREADS"):
        load(InferenceSettings, {"TOKENMESH_ENGINE_THREADS": "-1"})


def test_the_launcher_refuses_one_port_for_both_edge_listeners():
    with pytest.raises(SettingsError, match="TOKENMESH_EDGE_TLS_PORT.*TOKENMESH_EDGE_PORT"):
        load(LauncherSettings, {"TOKENMESH_EDGE_PORT": "9000", "TOKENMESH_EDGE_TLS_PORT": "9000"})
    # 0 turns the TLS listener off; it is no port of its own.
    settings = load(LauncherSettings, {"TOKENMESH_EDGE_TLS_PORT": "0"})
    assert settings.edge_tls_port == 0


def test_the_launcher_checks_the_redis_url_scheme():
    """A bad REDIS_URL showed up only as every service crashing inside a traceback."""
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load(LauncherSettings, {"REDIS_URL": "http://localhost:6379"})
    settings = load(LauncherSettings, {"REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    "host", ["worker.tokenmesh.local", "localhost", "10.0.0", "", "::1", "0.0.0.0"]
)
def test_a_worker_advertises_an_ip_address(host: str) -> None:
    """The router accepts only the connection's own address: a name was refused at
    every heartbeat while the worker ran, never routed to."""
    with pytest.raises(SettingsError, match="TOKENMESH_ADVERTISE_HOST"):
        load(InferenceSettings, {"TOKENMESH_ADVERTISE_HOST": host})


@pytest.mark.parametrize("host", ["auto", "127.0.0.1", "10.1.2.3"])
def test_ip_addresses_and_auto_are_advertised(host: str) -> None:
    assert load(InferenceSettings, {"TOKENMESH_ADVERTISE_HOST": host}).advertise_host == host


def test_what_auto_resolves_to_is_checked_as_the_setting_is() -> None:
    """The setting `auto` passes the check at load and resolves at start, on the route to
    the router: over IPv6 it gave an address the router refused at every heartbeat."""
    assert registered_host("auto", "127.0.0.1:50051") == "127.0.0.1"
    assert registered_host("10.1.2.3", "router:50051") == "10.1.2.3"
    with pytest.raises(SettingsError, match="TOKENMESH_ADVERTISE_HOST: auto gave '::1'"):
        registered_host("auto", "[::1]:50051")


def test_a_worker_whose_auto_address_the_router_refuses_exits_at_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It exits 2 with the setting's message, as `main` does on a setting it cannot load
    (services.core.entrypoint); InferenceService.start asks before any model loads."""
    environ = {
        "TOKENMESH_ADVERTISE_HOST": "auto",
        "TOKENMESH_ROUTER_ADDR": "[::1]:50051",
        "TOKENMESH_TEST_MODELS": "m:1",
    }
    with pytest.raises(SystemExit) as exited:
        host_at_start(load(InferenceSettings, environ))
    assert exited.value.code == 2
    assert "tokenmesh-inference: invalid configuration: TOKENMESH_ADVERTISE_HOST" in (
        capsys.readouterr().err
    )


def test_the_samples_byte_bound_is_a_setting() -> None:
    settings = load(InferenceSettings, {"TOKENMESH_SAMPLES_MAX_BYTES": str(8 << 20)})
    assert settings.samples_max_bytes == 8 << 20
    with pytest.raises(SettingsError, match="TOKENMESH_SAMPLES_MAX_BYTES"):
        load(InferenceSettings, {"TOKENMESH_SAMPLES_MAX_BYTES": "0"})
