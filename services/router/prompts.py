"""The prompt-template catalogue: immutable numbered versions and aliases, in Redis.

This module owns the templates' names, references ("support@3",
"support@stable") and Redis layout; the router writes through it and the
inference workers' cache reads through it (`PromptCatalog.head` and
`PromptCatalog.version`), so the two can never disagree on the format.

Layout (one hash tag, so both keys live in one Redis Cluster slot and a
MULTI may write both)::

    tokenmesh:router:{prompts}:heads     hash  name -> {"latest", "aliases", "updated_at"}
    tokenmesh:router:{prompts}:versions  hash  "name@N" -> the version (never changed)

Creating a version and moving an alias are read-validate-write transactions
under WATCH of the heads hash (like `services.router.catalog`): two admins
creating versions at once get two different numbers, and an alias never
points at a version that does not exist.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from services.core import contract
from services.core.errors import FieldViolation, InvalidArgument, NotFound
from services.core.redis_service import text
from services.inference import templates
from services.inference.templates import Message, Prompt, Variable

HEADS_KEY = "tokenmesh:router:{prompts}:heads"
VERSIONS_KEY = "tokenmesh:router:{prompts}:versions"
#: The reference separator: "support@3", "support@stable".
SEPARATOR = "@"
#: A reserved alias: the newest version (also what an empty version means).
LATEST = "latest"


@dataclass(frozen=True)
class PromptTemplate:
    """PromptTemplate is one immutable version of a prompt template.

    `render` compiles it on first use (once per object; the workers' cache
    keeps the object for as long as it keeps the version).
    """

    name: str
    version: int
    source: str
    system: str = ""
    variables: tuple[Variable, ...] = ()
    created_at: float = 0.0  # unix seconds

    @property
    def label(self) -> str:
        """Returns "name@version", as errors and responses name it."""
        return f"{self.name}{SEPARATOR}{self.version}"

    @functools.cached_property
    def prompt(self) -> Prompt:
        """The compiled template (compiled on first use)."""
        return Prompt(self.label, self.source, self.system, self.variables)

    def render(
        self, variables: Mapping[str, str] | None = None, messages: Sequence[Message] = ()
    ) -> str:
        """Renders this version (see `services.inference.templates.Prompt.render`)."""
        return self.prompt.render(variables, messages)

    def to_json(self) -> str:
        """Serialises the version for Redis."""
        return json.dumps(
            {
                "source": self.source,
                "system": self.system,
                "variables": [v.__dict__ for v in self.variables],
                "created_at": self.created_at,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, name: str, version: int, raw: str | bytes) -> PromptTemplate:
        """Parses a version stored by `to_json`."""
        data: dict[str, Any] = json.loads(raw)
        return cls(
            name=name,
            version=version,
            source=str(data["source"]),
            system=str(data.get("system", "")),
            variables=tuple(Variable(**v) for v in data.get("variables", [])),
            created_at=float(data.get("created_at", 0.0)),
        )


@dataclass(frozen=True)
class PromptHead:
    """PromptHead is a template's mutable part: its newest version and its aliases."""

    name: str
    latest: int = 0
    aliases: Mapping[str, int] = field(default_factory=dict)
    updated_at: float = 0.0  # unix seconds

    def resolve(self, selector: str) -> int:
        """Returns the version `selector` (a number, an alias, "latest" or "") names.

        Raises:
            NotFound: no such version or alias.
            InvalidArgument: `selector` is neither a number nor an alias.
        """
        if selector in ("", LATEST):
            return self.latest
        number = version_number(selector)
        if number is not None:
            if not 1 <= number <= self.latest:
                raise NotFound(
                    f"prompt template {self.name!r} has no version {number} "
                    f"(versions 1-{self.latest})",
                    reason="PROMPT_TEMPLATE_VERSION_NOT_FOUND",
                )
            return number
        check_selector(selector)
        if selector not in self.aliases:
            known = ", ".join(sorted(self.aliases)) or "none"
            raise NotFound(
                f"prompt template {self.name!r} has no alias {selector!r} (aliases: {known})",
                reason="PROMPT_TEMPLATE_ALIAS_NOT_FOUND",
            )
        return self.aliases[selector]

    def to_json(self) -> str:
        """Serialises the head for Redis."""
        return json.dumps(
            {"latest": self.latest, "aliases": dict(self.aliases), "updated_at": self.updated_at},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, name: str, raw: str | bytes) -> PromptHead:
        """Parses a head stored by `to_json`."""
        data: dict[str, Any] = json.loads(raw)
        return cls(
            name=name,
            latest=int(data["latest"]),
            aliases={str(k): int(v) for k, v in data.get("aliases", {}).items()},
            updated_at=float(data.get("updated_at", 0.0)),
        )


def _violation(field_name: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field_name, description)])


def check_name(name: str) -> None:
    """Raises InvalidArgument unless `name` is a well-formed template name (the model rule)."""
    if not contract.is_model_name(name):
        raise _violation("name", f"must be {contract.MODEL_NAME_RULE}")


def check_selector(selector: str, field_name: str = "version") -> None:
    """Raises InvalidArgument unless `selector` is a version number, an alias or empty.

    The one selector rule: every place that checks or parses a selector goes
    through this and `version_number` (a number is ASCII digits, see
    contract.VERSION_NUMBER; an all-digit alias is refused by `set_alias`).
    """
    if selector and not contract.is_version_number(selector):
        if not contract.is_model_alias(selector):
            raise _violation(
                field_name,
                f"must be a version number ({contract.VERSION_NUMBER_RULE}) "
                f"or an alias ({contract.MODEL_ALIAS_RULE})",
            )


def version_number(selector: str) -> int | None:
    """Returns the version number `selector` names, or None for an alias, "latest" or ""."""
    return int(selector) if contract.is_version_number(selector) else None


def parse_reference(reference: str, field_name: str = "template") -> tuple[str, str]:
    """Splits "name@version" or "name@alias" (or "name", the newest) into (name, selector).

    Raises:
        InvalidArgument: naming `field_name`, when the reference is malformed.
    """
    name, _, selector = reference.partition(SEPARATOR)
    if not contract.is_model_name(name):
        raise _violation(
            field_name, f"must be NAME[@VERSION|@ALIAS], NAME {contract.MODEL_NAME_RULE}"
        )
    check_selector(selector, field_name)
    return name, selector


def _version_field(name: str, version: int) -> str:
    return f"{name}{SEPARATOR}{version}"


def _not_found(name: str) -> NotFound:
    return NotFound(f"prompt template {name!r} does not exist", reason="PROMPT_TEMPLATE_NOT_FOUND")


def new_version(
    head: PromptHead | None,
    name: str,
    source: str,
    system: str,
    variables: Sequence[Variable],
    now: float,
) -> tuple[PromptHead, PromptTemplate]:
    """Returns the head and version after adding one version (validated and compiled).

    Raises:
        InvalidArgument: a bad name, source, system prompt or declaration.
    """
    check_name(name)
    declared = templates.declare(source, system, variables)
    head = head or PromptHead(name=name)
    template = PromptTemplate(name, head.latest + 1, source, system, declared, now)
    template.prompt  # noqa: B018 -- compiles: a template that cannot render is refused now
    return replace(head, latest=template.version, updated_at=now), template


def set_alias(head: PromptHead, alias: str, version: int, now: float) -> PromptHead:
    """Returns `head` with `alias` pointing at `version` (0 removes the alias)."""
    if not contract.is_model_alias(alias) or contract.is_version_number(alias):
        raise _violation("alias", f"must be {contract.MODEL_ALIAS_RULE}, not all digits")
    if alias == LATEST:
        raise _violation("alias", f"{LATEST!r} is reserved: it always names the newest version")
    aliases = dict(head.aliases)
    if version:
        if not 1 <= version <= head.latest:
            raise _violation(
                "version", f"{head.name!r} has no version {version} (versions 1-{head.latest})"
            )
        aliases[alias] = version
    else:
        aliases.pop(alias, None)
    return replace(head, aliases=aliases, updated_at=now)


class PromptCatalog:
    """PromptCatalog reads and changes the prompt templates in Redis."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def heads(self) -> dict[str, PromptHead]:
        """Returns every template's head, by name."""
        raw = await self.redis.hgetall(HEADS_KEY)
        return {text(k): PromptHead.from_json(text(k), v) for k, v in raw.items()}

    async def head(self, name: str) -> PromptHead:
        """Returns one template's head; raises NotFound."""
        check_name(name)
        raw = await self.redis.hget(HEADS_KEY, name)
        if raw is None:
            raise _not_found(name)
        return PromptHead.from_json(name, raw)

    async def heads_of(self, names: Sequence[str]) -> dict[str, PromptHead | None]:
        """Returns the heads of `names` in one round trip (None: no such template)."""
        if not names:
            return {}
        raw = await self.redis.hmget(HEADS_KEY, list(names))
        return {
            name: PromptHead.from_json(name, value) if value is not None else None
            for name, value in zip(names, raw, strict=True)
        }

    async def version(self, name: str, version: int) -> PromptTemplate:
        """Returns one version (immutable: callers may cache it forever); raises NotFound."""
        check_name(name)
        raw = await self.redis.hget(VERSIONS_KEY, _version_field(name, version))
        if raw is None:
            raise NotFound(
                f"prompt template {name!r} has no version {version}",
                reason="PROMPT_TEMPLATE_VERSION_NOT_FOUND",
            )
        return PromptTemplate.from_json(name, version, raw)

    async def get(self, name: str, selector: str) -> PromptTemplate:
        """Returns the version `selector` names (a number, an alias, "latest" or "")."""
        check_selector(selector)
        number = version_number(selector)
        if number is not None:
            return await self.version(name, number)
        return await self.version(name, (await self.head(name)).resolve(selector))

    async def create(
        self,
        name: str,
        source: str,
        system: str,
        variables: Sequence[Variable],
        now: float,
    ) -> PromptTemplate:
        """Adds a new version (numbered one past the newest) atomically; returns it."""
        check_name(name)
        # Compiling a large template takes milliseconds: off the event loop, and
        # once, before the transaction (only the version number depends on Redis).
        _, draft = await asyncio.to_thread(new_version, None, name, source, system, variables, now)
        created: list[PromptTemplate] = []

        def add(head: PromptHead | None) -> PromptHead:
            latest = head.latest if head else 0
            version = replace(draft, version=latest + 1)
            created[:] = [version]
            return replace(head or PromptHead(name=name), latest=version.version, updated_at=now)

        await self._change(name, add, lambda: created[0])
        return created[0]

    async def set_alias(self, name: str, alias: str, version: int, now: float) -> PromptHead:
        """Points `alias` at `version` (0 removes it) atomically; returns the head."""

        def apply(head: PromptHead | None) -> PromptHead:
            if head is None:
                raise _not_found(name)
            return set_alias(head, alias, version, now)

        return await self._change(name, apply, None)

    async def _change(
        self,
        name: str,
        apply: Callable[[PromptHead | None], PromptHead],
        written: Callable[[], PromptTemplate] | None,
    ) -> PromptHead:
        """Applies `apply` to one head under WATCH (and writes `written()`, if given)."""
        check_name(name)
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(HEADS_KEY)
                    raw = await pipe.hget(HEADS_KEY, name)
                    current = PromptHead.from_json(name, raw) if raw is not None else None
                    updated = apply(current)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(HEADS_KEY, name, updated.to_json())
                    if written is not None:
                        version = written()
                        pipe.hset(
                            VERSIONS_KEY, _version_field(name, version.version), version.to_json()
                        )
                    await pipe.execute()
                    return updated
                except WatchError:
                    continue  # another change landed between our read and write: redo
