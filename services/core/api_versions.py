"""API versions: which one an RPC belongs to, and the operator's deprecation schedule.

Every public service lives in a package `tokenmesh.<api>.v<N>`. When a newer
major version of a service exists (`SUCCESSORS`), the operator may deprecate
the old one with `TOKENMESH_API_DEPRECATIONS=v1=2027-06-30` (configuration,
not code): until that sunset date every response of the old service carries

- `Deprecation: @<unix seconds>` (RFC 9745): since when it is deprecated, the
  day its successor became public unless the entry names a day
  (`v1=2026-12-03/2027-06-30`, an ISO 8601 interval);
- `Sunset: <HTTP-date>` (RFC 8594): 00:00 UTC of the sunset date, the first
  instant at which the version no longer answers;
- `Link: <docs>/migration/v1-to-v2.md; rel="deprecation"`;

and from the sunset date on it answers UNIMPLEMENTED with an ErrorInfo
(`API_VERSION_SUNSET`) naming the successor, which the edge turns into
HTTP 410 for REST clients. Extending a sunset is changing the date.

Only services with a successor are covered: `v1=...` retires inference v1's
InferenceService (v2 exists), never auth, usage or router v1, nor inference
v1's admin service, which have no newer version to move to.

An RPC that stands in for another (`STAND_INS`: the jobs service's hand-over
of a REST Complete sent with `Prefer: respond-async`) answers under the
policy of the RPC it stands in for, so a retired version is not reachable
through the side door and its callers see the same headers.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import format_datetime

from services.core.errors import Unimplemented

#: The REST status a sunset version answers (the transcoder would say 501).
GONE = 410
API_PACKAGE_ROOT = "tokenmesh"


@dataclass(frozen=True)
class Successor:
    """Successor is the newer major version of a public service.

    Attributes:
        service: its full gRPC service name.
        released: the day it became public; the default `Deprecation` date of
            its predecessor (a version is deprecated once a successor exists).
        rest_prefix: the REST path prefix of the successor, for error messages.
    """

    service: str
    released: datetime.date
    rest_prefix: str

    @property
    def package(self) -> str:
        """Returns the successor's package, e.g. "tokenmesh.inference.v2"."""
        return self.service.rsplit(".", 1)[0]

    @property
    def version(self) -> str:
        """Returns the successor's version, e.g. "v2"."""
        return self.package.rsplit(".", 1)[1]


#: Each public service that has a newer major version -> that version.
SUCCESSORS: Mapping[str, Successor] = {
    "tokenmesh.inference.v1.InferenceService": Successor(
        "tokenmesh.inference.v2.InferenceService", datetime.date(2026, 12, 3), "/v2/models"
    ),
}


#: Each RPC that answers for another one -> the full method path of that one.
#: HandoverService (services/jobs/handover.py) runs a REST Complete as a job on
#: inference v2 whichever version the client called: without this, `Prefer:
#: respond-async` on a retired v1 path was answered (202, or the v1 answer).
STAND_INS: Mapping[str, str] = {
    "/tokenmesh.jobs.v1.HandoverService/CompleteV1": (
        "/tokenmesh.inference.v1.InferenceService/Complete"
    ),
    "/tokenmesh.jobs.v1.HandoverService/CompleteV2": (
        "/tokenmesh.inference.v2.InferenceService/Complete"
    ),
}


@dataclass(frozen=True)
class RpcName:
    """RpcName is a tokenmesh RPC's full method path, split into its parts."""

    api: str  # "inference"
    version: str  # "v1"
    service: str  # "tokenmesh.inference.v1.InferenceService"
    rpc: str  # "Generate"


def is_api_version(value: str) -> bool:
    """Tells whether `value` is a major API version: "v" and a number ("v1")."""
    return len(value) > 1 and value[0] == "v" and value[1:].isascii() and value[1:].isdigit()


def parse_rpc(method: str) -> RpcName | None:
    """Splits "/tokenmesh.<api>.v<N>.<Service>/<Rpc>"; None for anything else (health)."""
    service, _, rpc = method.lstrip("/").partition("/")
    parts = service.split(".")
    if len(parts) != 4 or parts[0] != API_PACKAGE_ROOT or not rpc or not is_api_version(parts[2]):
        return None
    return RpcName(api=parts[1], version=parts[2], service=service, rpc=rpc)


def versions_with_successor() -> list[str]:
    """Returns the versions that have a service with a successor (what may be deprecated)."""
    return sorted({name.split(".")[2] for name in SUCCESSORS})


@dataclass(frozen=True)
class ScheduledVersion:
    """ScheduledVersion is one `version=[deprecated/]sunset` entry of the setting."""

    version: str
    sunset: datetime.date
    deprecated: datetime.date | None = None


def _date(text: str, entry: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{entry!r}: {text.strip()!r} is not a date (YYYY-MM-DD)") from None


def parse_entry(entry: str) -> ScheduledVersion:
    """Parses "v1=2027-06-30" or "v1=2026-12-03/2027-06-30" (deprecated since / sunset).

    Raises:
        ValueError: the entry is malformed, names a version without a
            successor, or its deprecation date is after its sunset.
    """
    version, equals, dates = (part.strip() for part in entry.partition("="))
    if not equals or not dates:
        raise ValueError(f"{entry!r} is not version=YYYY-MM-DD (e.g. v1=2027-06-30)")
    if version not in versions_with_successor():
        allowed = ", ".join(versions_with_successor()) or "none"
        raise ValueError(
            f"{entry!r}: only a version with a newer one to move to can be deprecated ({allowed})"
        )
    deprecated_text, slash, sunset_text = dates.rpartition("/")
    sunset = _date(sunset_text, entry)
    deprecated = _date(deprecated_text, entry) if slash else None
    if deprecated is not None and deprecated > sunset:
        raise ValueError(f"{entry!r}: the deprecation date is after the sunset date")
    return ScheduledVersion(version, sunset, deprecated)


def parse_schedule(entries: Sequence[str]) -> dict[str, ScheduledVersion]:
    """Parses the setting's entries by version; a version may appear once."""
    schedule: dict[str, ScheduledVersion] = {}
    for entry in entries:
        scheduled = parse_entry(entry)
        if scheduled.version in schedule:
            raise ValueError(f"{scheduled.version} is scheduled twice")
        schedule[scheduled.version] = scheduled
    return schedule


def _midnight_utc(day: datetime.date) -> datetime.datetime:
    return datetime.datetime.combine(day, datetime.time(), tzinfo=datetime.UTC)


class ApiVersionSunset(Unimplemented):
    """ApiVersionSunset answers an RPC of an API version past its sunset date.

    gRPC clients get UNIMPLEMENTED; `http_status` asks the edge to answer REST
    clients 410 Gone instead of the transcoder's 501.
    """

    reason = "API_VERSION_SUNSET"
    http_status = GONE


@dataclass(frozen=True)
class VersionPolicy:
    """VersionPolicy is what a deprecated service's RPCs answer.

    Attributes:
        service: the deprecated service's full name.
        successor: the service to move to.
        deprecated: since when it is deprecated (UTC).
        sunset: when it stops answering (UTC).
        link: the migration guide.
    """

    service: str
    successor: Successor
    deprecated: datetime.datetime
    sunset: datetime.datetime
    link: str

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Returns the Deprecation, Sunset and Link headers (gRPC metadata, REST headers)."""
        return (
            ("deprecation", f"@{int(self.deprecated.timestamp())}"),
            ("sunset", format_datetime(self.sunset, usegmt=True)),
            ("link", f'<{self.link}>; rel="deprecation"'),
        )

    def is_sunset(self, now_s: float) -> bool:
        """Tells whether the service no longer answers at Unix time `now_s`."""
        return now_s >= self.sunset.timestamp()

    def sunset_error(self) -> ApiVersionSunset:
        """Returns the error every RPC of the service answers after its sunset."""
        successor = self.successor
        return ApiVersionSunset(
            f"{self.service} was retired on {self.sunset.date().isoformat()}: use "
            f"{successor.service} (REST {successor.rest_prefix}); migration guide: {self.link}",
            metadata={
                "service": self.service,
                "successor": successor.package,
                "successor_service": successor.service,
                "sunset": self.sunset.date().isoformat(),
                "migration_guide": self.link,
            },
        )


@dataclass(frozen=True)
class DeprecationSchedule:
    """DeprecationSchedule maps RPCs to their deprecation policy (most have none).

    Attributes:
        versions: the scheduled versions, by version ("v1").
        docs_url: where the docs/ folder is published (the Link's base).
    """

    versions: Mapping[str, ScheduledVersion]
    docs_url: str

    @classmethod
    def parse(cls, entries: Sequence[str], docs_url: str) -> DeprecationSchedule:
        """Builds the schedule from the setting's entries; raises ValueError when invalid."""
        return cls(parse_schedule(entries), docs_url.rstrip("/"))

    def policy(self, method: str) -> VersionPolicy | None:
        """Returns the policy of a full method path (a stand-in's: that of the RPC it
        stands in for), or None when it is not deprecated."""
        name = parse_rpc(STAND_INS.get(method, method))
        if name is None:
            return None
        successor = SUCCESSORS.get(name.service)
        scheduled = self.versions.get(name.version)
        if successor is None or scheduled is None:
            return None
        deprecated = scheduled.deprecated or min(successor.released, scheduled.sunset)
        return VersionPolicy(
            service=name.service,
            successor=successor,
            deprecated=_midnight_utc(deprecated),
            sunset=_midnight_utc(scheduled.sunset),
            link=f"{self.docs_url}/migration/{name.version}-to-{successor.version}.md",
        )
