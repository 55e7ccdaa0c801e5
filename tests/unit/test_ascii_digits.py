"""Numbers in client input are ASCII digits: str.isdigit() also takes "²", "٣", "１",
which int() and float() refuse (an INTERNAL error with a traceback) or read as another
number, and 5,000 digits, which int() refuses (Python's 4,300-digit limit)."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.core.settings import SettingsError, load
from services.jobs import servicer as jobs_servicer
from services.jobs.handover import wait_seconds
from services.router import policy_servicer
from services.router.policies import parse_reference
from services.usage.limit_settings import RequestLimitSettings

NOT_NUMBERS = ["²", "٣", "１", "3²", "9" * 5000]


@pytest.mark.parametrize("version", NOT_NUMBERS)
def test_a_policy_reference_needs_an_ascii_version(version: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse_reference(f"policy@{version}")
    assert [v.field for v in refused.value.violations] == ["policy"]


@pytest.mark.parametrize("part", NOT_NUMBERS)
def test_a_policy_page_token_needs_ascii_digits(part: str) -> None:
    with pytest.raises(InvalidArgument):
        policy_servicer._page_token(f"{part}-1")


@pytest.mark.parametrize("part", NOT_NUMBERS)
def test_a_jobs_page_token_needs_ascii_digits(part: str) -> None:
    """ListJobs' and ListJobItems' page tokens ("²" was INTERNAL, "٣" read as 3)."""
    with pytest.raises(InvalidArgument):
        jobs_servicer._page_token(part, default=0)
    with pytest.raises(InvalidArgument):
        jobs_servicer._list_token(f"{part}:job_1")


@pytest.mark.parametrize("wait", ["²", "٣", "１"])
def test_a_prefer_wait_of_other_digits_is_ignored(wait: str) -> None:
    assert wait_seconds(f"wait={wait}; respond-async") == 0.0  # RFC 7240: ignored
    assert wait_seconds("wait=3; respond-async") == 3.0


def test_a_model_rpm_of_other_digits_is_refused_at_start() -> None:
    with pytest.raises(SettingsError, match="TOKENMESH_RATELIMIT_MODEL_RPM"):
        load(RequestLimitSettings, {"TOKENMESH_RATELIMIT_MODEL_RPM": "demo-lm=²"})
