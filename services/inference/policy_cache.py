"""The worker's content-policy cache: no Redis read on a request's path.

A supervised background task re-reads, every `refresh_s` (0.5 s), the
attachments and sample settings (two HGETALLs) and the heads of the policies
attached by name (one HMGET), fetches the versions it does not hold yet
(immutable: kept while attached), and swaps in a new resolved map
`"tenant:T" | "key:K" -> Policy` at once. A request reads that map: an
attachment, detachment or new version is in force on every worker within
`refresh_s` plus a Redis round trip (~1 s at most).

The worker's start waits for the first load (`loaded`), so it turns SERVING
and registers only once it can check requests; a worker that has never read
the policies would refuse them (UNAVAILABLE, `ready`) rather than serve them
unchecked. After that, a Redis outage leaves the last map in force (logged).
Like the template cache (services.inference.template_cache), it reads the
router's keys through the one module that owns their layout
(services.router.policies).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.core.errors import NotFound, Unavailable
from services.core.tasks import SupervisedTask, Supervisor
from services.inference.pipeline.policy import Policy
from services.router.policies import KEY, TENANT, PolicyCatalog, parse_reference, subject_field

logger = logging.getLogger(__name__)
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


@dataclass(frozen=True)
class PolicyView:
    """PolicyView is one consistent snapshot: resolved attachments and sample rates."""

    by_subject: Mapping[str, Policy] = field(default_factory=dict)
    sample_rates: Mapping[str, float] = field(default_factory=dict)


class PolicyCache:
    """PolicyCache keeps every attached policy in memory (see the module docstring).

    Args:
        catalog: the catalogue's reader (the worker's Redis).
        refresh_s: how often the background task re-reads attachments.
    """

    def __init__(self, catalog: PolicyCatalog, *, refresh_s: float = 0.5) -> None:
        self.catalog = catalog
        self.refresh_s = refresh_s
        self.view = PolicyView()
        self.refreshes = 0
        self._versions: dict[tuple[str, int], Policy] = {}
        self._loaded = asyncio.Event()
        self._first: asyncio.Task[None] | None = None
        self._task: SupervisedTask | None = None

    def start(self, supervisor: Supervisor) -> None:
        """Starts refreshing in the background, under `supervisor`."""
        self._task = supervisor.spawn("policy-cache-refresh", self._refresh_loop)

    async def stop(self) -> None:
        """Stops the background refresh."""
        if self._task is not None:
            await self._task.stop(timeout_s=2)
            self._task = None

    async def loaded(self) -> None:
        """Returns once the policies were read at least once (the refresh task retries)."""
        await self._loaded.wait()

    async def ready(self) -> None:
        """Returns once the policies were read at least once.

        Raises:
            Unavailable: they never were and Redis cannot be reached now.
        """
        if self._loaded.is_set():
            return
        try:
            await self.refresh()
        except _REDIS_DOWN:
            raise Unavailable("content policies are unavailable; retry shortly") from None

    def policies(self, tenant: str, key_id: str) -> list[Policy]:
        """Returns the policies for a caller: the tenant's, then the key's (memory only)."""
        view = self.view.by_subject
        if not view:
            return []
        found = []
        for kind, subject in ((TENANT, tenant), (KEY, key_id)):
            policy = view.get(subject_field(kind, subject)) if subject else None
            if policy is not None and policy not in found:
                found.append(policy)
        return found

    def sample_rate(self, tenant: str) -> float:
        """Returns the share of the tenant's requests to sample (0: none)."""
        return self.view.sample_rates.get(tenant, 0.0) if tenant else 0.0

    async def refresh(self) -> None:
        """Re-reads attachments, heads and sample settings; swaps in the new view."""
        attachments = await self.catalog.attachments()
        settings = await self.catalog.samples()
        references = {subject: parse_reference(ref) for subject, ref in attachments.items()}
        by_name = sorted({name for name, version in references.values() if not version})
        heads = await self.catalog.heads_of(by_name)
        resolved: dict[str, Policy] = {}
        for subject, (name, version) in references.items():
            head = heads.get(name)
            number = version or (head.latest if head is not None else 0)
            policy = await self._version(name, number) if number else None
            if policy is not None:
                resolved[subject] = policy
        self._forget_unused(resolved.values())
        self.view = PolicyView(resolved, {t: s.rate for t, s in settings.items()})
        self.refreshes += 1
        self._loaded.set()

    async def _version(self, name: str, version: int) -> Policy | None:
        key = (name, version)
        cached = self._versions.get(key)
        if cached is not None:
            return cached
        try:
            policy = await self.catalog.version(name, version)
        except NotFound:
            logger.warning("content policy %s@%d is attached but missing", name, version)
            return None
        # Compile now, in the refresh, not on the first request that needs it.
        policy.input_rules  # noqa: B018
        policy.folded_input_rules  # noqa: B018
        policy.output_rules  # noqa: B018
        self._versions[key] = policy
        return policy

    def _forget_unused(self, used: Iterable[Policy]) -> None:
        keep = {(p.name, p.version) for p in used}
        for key in [k for k in self._versions if k not in keep]:
            del self._versions[key]

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except _REDIS_DOWN as error:
                logger.warning("content policies: cannot refresh (%s); keeping the last", error)
            await asyncio.sleep(self.refresh_s)
