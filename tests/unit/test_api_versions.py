"""API versions: method names, the deprecation setting and the headers it makes."""

from __future__ import annotations

import datetime
from email.utils import parsedate_to_datetime

import pytest

from services.core.api_versions import (
    SUCCESSORS,
    ApiVersionSunset,
    DeprecationSchedule,
    RpcName,
    parse_entry,
    parse_rpc,
)
from services.core.settings import ServerSettings, SettingsError, load

V1_GENERATE = "/tokenmesh.inference.v1.InferenceService/Generate"
V2_GENERATE = "/tokenmesh.inference.v2.InferenceService/Generate"
DOCS = "https://docs.example.com/tokenmesh/docs"


def _utc(year: int, month: int, day: int) -> datetime.datetime:
    return datetime.datetime(year, month, day, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (V1_GENERATE, RpcName("inference", "v1", V1_GENERATE[1:].split("/")[0], "Generate")),
        (
            "/tokenmesh.auth.v1.AuthService/CreateApiKey",
            RpcName("auth", "v1", "tokenmesh.auth.v1.AuthService", "CreateApiKey"),
        ),
        ("/tokenmesh.inference.v2.InferenceService/Embed", ("inference", "v2", "Embed")),
        ("/grpc.health.v1.Health/Check", None),
        ("/envoy.service.auth.v3.Authorization/Check", None),
        ("/tokenmesh.inference.beta.InferenceService/Generate", None),
        ("/tokenmesh.inference.v1.InferenceService/", None),
        ("not a method", None),
    ],
)
def test_methods_are_split_into_api_version_and_rpc(method, expected):
    name = parse_rpc(method)
    if isinstance(expected, tuple):
        assert name is not None and (name.api, name.version, name.rpc) == expected
    else:
        assert name == expected


def test_an_entry_is_a_sunset_date_or_a_deprecation_interval():
    assert parse_entry("v1=2027-06-30").sunset == datetime.date(2027, 6, 30)
    assert parse_entry("v1=2027-06-30").deprecated is None
    interval = parse_entry(" v1 = 2027-01-15/2027-06-30 ")
    assert (interval.deprecated, interval.sunset) == (
        datetime.date(2027, 1, 15),
        datetime.date(2027, 6, 30),
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("v1", "is not version=YYYY-MM-DD"),
        ("v1=", "is not version=YYYY-MM-DD"),
        ("v1=2027-13-01", "'2027-13-01' is not a date"),
        ("v1=June 30th", "is not a date"),
        ("v1=2027-06-30/", "'' is not a date"),
        ("v1=2028-01-01/2027-06-30", "the deprecation date is after the sunset date"),
        # v2 has no successor; auth, usage and router v1 are no inference versions.
        ("v2=2027-06-30", "only a version with a newer one to move to can be deprecated (v1)"),
        ("auth.v1=2027-06-30", "only a version with a newer one"),
        ("v1=2027-06-30,v1=2028-01-01", "v1 is scheduled twice"),
    ],
)
def test_a_bad_setting_is_a_startup_error_naming_the_variable(value, problem):
    with pytest.raises(SettingsError) as failed:
        load(ServerSettings, {"TOKENMESH_API_DEPRECATIONS": value})
    assert str(failed.value).startswith("TOKENMESH_API_DEPRECATIONS: ")
    assert problem in str(failed.value)


def test_the_docs_url_must_be_a_url():
    with pytest.raises(SettingsError, match="TOKENMESH_API_DOCS_URL"):
        load(ServerSettings, {"TOKENMESH_API_DOCS_URL": "docs/"})


def test_nothing_is_deprecated_by_default():
    schedule = load(ServerSettings, {}).deprecation_schedule()
    assert schedule.policy(V1_GENERATE) is None


def test_only_inference_v1_is_covered_by_a_v1_deprecation():
    schedule = DeprecationSchedule.parse(["v1=2027-06-30"], DOCS)
    for rpc in ("Generate", "Complete", "Embed", "ListModels", "GetModel"):
        assert schedule.policy(f"/tokenmesh.inference.v1.InferenceService/{rpc}") is not None
    for method in (
        V2_GENERATE,
        "/tokenmesh.inference.v1.InferenceAdminService/LoadModel",  # no v2 to move to
        "/tokenmesh.auth.v1.AuthService/CreateApiKey",
        "/tokenmesh.usage.v1.UsageService/GetUsage",
        "/tokenmesh.router.v1.RouterService/ListModels",
        "/grpc.health.v1.Health/Check",
    ):
        assert schedule.policy(method) is None, method


def test_headers_follow_rfc_9745_and_rfc_8594():
    schedule = DeprecationSchedule.parse(["v1=2027-01-15/2027-06-30"], DOCS + "/")
    policy = schedule.policy(V1_GENERATE)
    assert policy is not None
    headers = dict(policy.headers)
    # RFC 9745: a structured-field Date, "@" and Unix seconds.
    assert headers["deprecation"] == f"@{int(_utc(2027, 1, 15).timestamp())}"
    # RFC 8594: an HTTP-date, the first instant the version no longer answers.
    assert headers["sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
    assert parsedate_to_datetime(headers["sunset"]) == _utc(2027, 6, 30)
    assert headers["link"] == f'<{DOCS}/migration/v1-to-v2.md>; rel="deprecation"'


def test_deprecated_since_defaults_to_the_day_the_successor_became_public():
    released = SUCCESSORS["tokenmesh.inference.v1.InferenceService"].released
    policy = DeprecationSchedule.parse(["v1=2030-01-01"], DOCS).policy(V1_GENERATE)
    assert policy is not None
    assert dict(policy.headers)["deprecation"] == (
        f"@{int(datetime.datetime.combine(released, datetime.time(), datetime.UTC).timestamp())}"
    )
    # A sunset before that day is also the deprecation (never after the sunset).
    early = DeprecationSchedule.parse(["v1=2020-01-01"], DOCS).policy(V1_GENERATE)
    assert early is not None and early.deprecated == early.sunset == _utc(2020, 1, 1)


def test_the_version_is_retired_from_midnight_utc_of_the_sunset_date():
    policy = DeprecationSchedule.parse(["v1=2027-06-30"], DOCS).policy(V1_GENERATE)
    assert policy is not None
    midnight = _utc(2027, 6, 30).timestamp()
    assert not policy.is_sunset(midnight - 1)
    assert policy.is_sunset(midnight)


def test_the_sunset_error_names_the_successor():
    policy = DeprecationSchedule.parse(["v1=2027-06-30"], DOCS).policy(V1_GENERATE)
    assert policy is not None
    error = policy.sunset_error()
    assert isinstance(error, ApiVersionSunset)
    assert error.code.name == "UNIMPLEMENTED" and error.http_status == 410
    assert error.reason == "API_VERSION_SUNSET"
    assert error.metadata["successor"] == "tokenmesh.inference.v2"
    assert error.metadata["successor_service"] == "tokenmesh.inference.v2.InferenceService"
    assert error.metadata["sunset"] == "2027-06-30"
    assert error.metadata["migration_guide"] == f"{DOCS}/migration/v1-to-v2.md"
    assert "tokenmesh.inference.v2" in error.message and "/v2/models" in error.message
