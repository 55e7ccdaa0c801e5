"""The content-policy catalogue: versioned policies, their attachments, sample settings.

This module owns the Redis layout; the router writes through it and the
workers' cache (services.inference.policy_cache) reads through it, as for
prompt templates (services.router.prompts). One hash tag, so a MULTI may
write every key::

    tokenmesh:router:{policies}:heads        hash name -> {"latest", "updated_at"}
    tokenmesh:router:{policies}:versions     hash "name@N" -> the version (never changed)
    tokenmesh:router:{policies}:attachments  hash "tenant:T" | "key:K" -> "name" | "name@N"
    tokenmesh:router:{policies}:samples      hash tenant -> {"rate", "consented_by", ...}

Creating a version and attaching are transactions under WATCH of the heads
hash: two admins creating versions at once get two numbers, and an
attachment never names a policy or version that does not exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from services.core import contract
from services.core.errors import FieldViolation, InvalidArgument, NotFound
from services.core.redis_service import text
from services.inference.pipeline.policy import Policy

HEADS_KEY = "tokenmesh:router:{policies}:heads"
VERSIONS_KEY = "tokenmesh:router:{policies}:versions"
ATTACHMENTS_KEY = "tokenmesh:router:{policies}:attachments"
SAMPLES_KEY = "tokenmesh:router:{policies}:samples"
SEPARATOR = "@"
TENANT = "tenant"
KEY = "key"
MAX_CONSENT_NOTE_CHARS = 512
_SUBJECT_ID_CHARS = 128


def _violation(field_name: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field_name, description)])


def check_name(name: str, field_name: str = "name") -> None:
    """Raises InvalidArgument unless `name` is a well-formed policy name (the model rule)."""
    if not contract.is_model_name(name):
        raise _violation(field_name, f"must be {contract.MODEL_NAME_RULE}")


def parse_reference(reference: str, field_name: str = "policy") -> tuple[str, int]:
    """Splits "name" (0: the newest) or "name@N" into (name, version)."""
    name, separator, version = reference.partition(SEPARATOR)
    check_name(name, field_name)
    if separator and not (contract.is_version_number(version) and int(version) >= 1):
        raise _violation(field_name, "must be NAME or NAME@VERSION (a version number)")
    return name, int(version or 0)


def subject_field(kind: str, subject: str) -> str:
    """Returns the attachments hash field of a tenant or a key."""
    return f"{kind}:{subject}"


def subject_of(tenant: str, key_id: str) -> tuple[str, str]:
    """Returns (kind, id) of the one subject a request names; raises InvalidArgument."""
    if bool(tenant) == bool(key_id):
        raise _violation("tenant", "name exactly one of tenant and key_id")
    kind, subject = (TENANT, tenant) if tenant else (KEY, key_id)
    if len(subject) > _SUBJECT_ID_CHARS or any(c.isspace() for c in subject):
        field_name = "tenant" if tenant else "key_id"
        raise _violation(field_name, f"must be 1-{_SUBJECT_ID_CHARS} non-space characters")
    return kind, subject


@dataclass(frozen=True)
class PolicyHead:
    """PolicyHead is a policy's mutable part: its newest version."""

    name: str
    latest: int = 0
    updated_at: float = 0.0

    def to_json(self) -> str:
        """Serialises the head for Redis."""
        return json.dumps({"latest": self.latest, "updated_at": self.updated_at})

    @classmethod
    def from_json(cls, name: str, raw: str | bytes) -> PolicyHead:
        """Parses a head stored by `to_json`."""
        data: dict[str, Any] = json.loads(raw)
        return cls(name, int(data["latest"]), float(data.get("updated_at", 0.0)))


@dataclass(frozen=True)
class SampleSettings:
    """SampleSettings is a tenant's opt-in to sample logging (rate 0: off)."""

    tenant: str
    rate: float = 0.0
    consented_by: str = ""
    consented_at: float = 0.0
    consent_note: str = ""

    def to_json(self) -> str:
        """Serialises the settings for Redis."""
        data = {k: v for k, v in self.__dict__.items() if k != "tenant"}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, tenant: str, raw: str | bytes) -> SampleSettings:
        """Parses settings stored by `to_json`."""
        data: dict[str, Any] = json.loads(raw)
        return cls(
            tenant,
            float(data.get("rate", 0.0)),
            str(data.get("consented_by", "")),
            float(data.get("consented_at", 0.0)),
            str(data.get("consent_note", "")),
        )


@dataclass(frozen=True)
class Attachment:
    """Attachment is one subject's policy reference ("name" or "name@N")."""

    kind: str  # tenant or key
    subject: str
    policy: str


def _version_field(name: str, version: int) -> str:
    return f"{name}{SEPARATOR}{version}"


def _not_found(name: str) -> NotFound:
    return NotFound(f"content policy {name!r} does not exist", reason="POLICY_NOT_FOUND")


class PolicyCatalog:
    """PolicyCatalog reads and changes the content policies in Redis."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def heads(self) -> dict[str, PolicyHead]:
        """Returns every policy's head, by name."""
        raw = await self.redis.hgetall(HEADS_KEY)
        return {text(k): PolicyHead.from_json(text(k), v) for k, v in raw.items()}

    async def heads_of(self, names: Sequence[str]) -> dict[str, PolicyHead | None]:
        """Returns the heads of `names` in one round trip (None: no such policy)."""
        if not names:
            return {}
        raw = await self.redis.hmget(HEADS_KEY, list(names))
        return {
            name: PolicyHead.from_json(name, value) if value is not None else None
            for name, value in zip(names, raw, strict=True)
        }

    async def version(self, name: str, version: int) -> Policy:
        """Returns one version (immutable: callers may cache it forever); raises NotFound."""
        check_name(name)
        raw = await self.redis.hget(VERSIONS_KEY, _version_field(name, version))
        if raw is None:
            raise NotFound(
                f"content policy {name!r} has no version {version}",
                reason="POLICY_VERSION_NOT_FOUND",
            )
        return Policy.from_json(name, version, raw)

    async def get(self, name: str, version: int = 0) -> Policy:
        """Returns version `version` of a policy (0: the newest)."""
        check_name(name)
        if not version:
            raw = await self.redis.hget(HEADS_KEY, name)
            if raw is None:
                raise _not_found(name)
            version = PolicyHead.from_json(name, raw).latest
        return await self.version(name, version)

    async def create(self, draft: Policy, now: float) -> Policy:
        """Adds `draft` as the policy's next version (validated) atomically; returns it."""
        check_name(draft.name)
        draft.check()
        created: list[Policy] = []

        def add(head: PolicyHead | None) -> PolicyHead:
            latest = head.latest if head else 0
            created[:] = [replace(draft, version=latest + 1, created_at=now)]
            return PolicyHead(draft.name, latest + 1, now)

        def write(pipe: Any) -> None:
            policy = created[0]
            pipe.hset(VERSIONS_KEY, _version_field(policy.name, policy.version), policy.to_json())

        await self._change(draft.name, add, write)
        return created[0]

    async def attach(self, kind: str, subject: str, reference: str) -> Attachment:
        """Attaches the policy `reference` names to a subject (replacing any); returns it."""
        name, version = parse_reference(reference)

        def check(head: PolicyHead | None) -> PolicyHead:
            if head is None:
                raise _not_found(name)
            if version > head.latest:
                raise NotFound(
                    f"content policy {name!r} has no version {version}",
                    reason="POLICY_VERSION_NOT_FOUND",
                )
            return head

        def write(pipe: Any) -> None:
            pipe.hset(ATTACHMENTS_KEY, subject_field(kind, subject), reference)

        await self._change(name, check, write)
        return Attachment(kind, subject, reference)

    async def detach(self, kind: str, subject: str) -> Attachment:
        """Removes a subject's attachment; raises NotFound when it has none."""
        field_name = subject_field(kind, subject)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(ATTACHMENTS_KEY, field_name)
            pipe.hdel(ATTACHMENTS_KEY, field_name)
            previous, _ = await pipe.execute()
        if previous is None:
            raise NotFound(f"no content policy is attached to {kind} {subject!r}")
        return Attachment(kind, subject, text(previous))

    async def attachments(self) -> dict[str, str]:
        """Returns every attachment: "tenant:T" / "key:K" -> policy reference."""
        raw = await self.redis.hgetall(ATTACHMENTS_KEY)
        return {text(k): text(v) for k, v in raw.items()}

    async def set_samples(self, settings: SampleSettings) -> SampleSettings:
        """Stores a tenant's sample settings (rate 0 removes them: off)."""
        if not 0.0 <= settings.rate <= 1.0:
            raise _violation("rate", "must be between 0 and 1")
        if len(settings.consent_note) > MAX_CONSENT_NOTE_CHARS:
            raise _violation("consent_note", f"at most {MAX_CONSENT_NOTE_CHARS} characters")
        subject_of(settings.tenant, "")
        if settings.rate == 0.0:
            await self.redis.hdel(SAMPLES_KEY, settings.tenant)
        else:
            await self.redis.hset(SAMPLES_KEY, settings.tenant, settings.to_json())
        return settings

    async def samples(self) -> dict[str, SampleSettings]:
        """Returns every tenant's sample settings (only tenants that opted in)."""
        raw = await self.redis.hgetall(SAMPLES_KEY)
        return {text(k): SampleSettings.from_json(text(k), v) for k, v in raw.items()}

    async def _change(
        self,
        name: str,
        apply: Callable[[PolicyHead | None], PolicyHead],
        write: Callable[[Any], None],
    ) -> PolicyHead:
        """Applies `apply` to one head under WATCH, then `write`s in the same MULTI."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(HEADS_KEY)
                    raw = await pipe.hget(HEADS_KEY, name)
                    current = PolicyHead.from_json(name, raw) if raw is not None else None
                    updated = apply(current)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(HEADS_KEY, name, updated.to_json())
                    write(pipe)
                    await pipe.execute()
                    return updated
                except WatchError:
                    continue  # another change landed between our read and write: redo


def attachments_by_subject(raw: Mapping[str, str]) -> list[Attachment]:
    """Returns attachments from the hash's fields, tenants first, sorted."""
    out = []
    for field_name, reference in raw.items():
        kind, _, subject = field_name.partition(":")
        out.append(Attachment(kind, subject, reference))
    return sorted(out, key=lambda a: (a.kind != TENANT, a.subject))
