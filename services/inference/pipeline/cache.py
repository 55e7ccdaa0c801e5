"""The response-cache stage: which requests may be cached, under which key, and the store.

Only deterministic requests are cacheable: a seed is set, or the (effective)
temperature is 0; embeddings always are. A key is a SHA-256 of

- the scope: the caller's tenant (two keys of one tenant share entries, two
  tenants never do), or "shared" for a model the operator listed in
  TOKENMESH_CACHE_SHARED_MODELS (public data only: see the side channel below);
- the RPC and API surface, the model name and *resolved* version, the template
  version that rendered the prompt, the content policies that applied
  (name@version: a key with an output rule never gets another key's answer);
- the normalised request: its texts (after redaction), n, the effective
  sampling parameters (model defaults filled in), stops and logprobs options.
  Request ids, metadata and priority are not part of it.

Side channel of a `shared` model: a hit answers much faster than a miss, so a
caller can tell whether anybody (of any tenant) asked the same deterministic
request within the TTL. Share only models whose prompts are public.

Entries live in Redis (the volatile instance, TOKENMESH_CACHE_REDIS_URL; the
launcher points it at the rate limiter's) under ``tokenmesh:cache:v1:...``
with a TTL (TOKENMESH_CACHE_TTL_SECONDS); an answer larger than
TOKENMESH_CACHE_MAX_ENTRY_BYTES is never stored. The cache fails open: a
Redis error is a miss (counted), never an error to the client.

A client chooses per request (`Cache-Control` request header, or the v2
field `cache`): `no-cache` recomputes and refreshes the entry, `no-store`
neither reads nor writes (a shadow copy is always `no-store`:
services.inference.shadow). Billing of answers served without their own
computation (hits, coalesced) is the operator's: TOKENMESH_CACHE_BILLING.
Their completion tokens are those their caller received (the token ids of
the messages or choices sent: pipeline.generate.delivered_tokens), not the
computation's `usage`, which counts the tokens an output rule held back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from services.core import contract
from services.core.settings import env, require
from services.inference import shadow
from services.inference.pipeline.coalesce import EmbeddingInputs, Flights
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as pb

logger = logging.getLogger(__name__)

CACHE_HEADER = contract.CACHE_HEADER
HIT, MISS, COALESCED, BYPASS = "hit", "miss", "coalesced", "bypass"
KEY_PREFIX = "tokenmesh:cache:v1:"
SHARED_SCOPE = "shared"
BILLING_MODES = ("full", "prompt_only", "none")
CACHE_CONTROL_HEADER = "cache-control"
# Redis unreachable, or refusing: the cache fails open.
_REDIS_DOWN = (RedisError, ConnectionError, TimeoutError, OSError)

#: Cache outcomes per request, by model (names of loaded models only: bounded).
CACHE_REQUESTS = Counter(
    "tokenmesh_cache_requests_total",
    "Inference requests by how the response cache served them (hit, miss, coalesced, bypass).",
    ("model", "result"),
)
#: What the scheduler was asked to compute: one per choice of a request that computed.
COMPUTED_SEQUENCES = Counter(
    "tokenmesh_computed_sequences_total",
    "Sequences submitted to the scheduler (coalesced and cached answers add none), by model.",
    ("model",),
)
EMBEDDING_INPUTS = Counter(
    "tokenmesh_embedding_inputs_total",
    "Embedding inputs by model and how they were served (computed, hit, coalesced).",
    ("model", "result"),
)
CACHE_STORE = Counter(
    "tokenmesh_cache_store_total",
    "Response-cache reads and writes by outcome (stored, too_large, error).",
    ("outcome",),
)


@dataclass(frozen=True)
class CacheConfig:
    """CacheConfig is the operator's cache settings (services.inference.service)."""

    enabled: bool = False
    ttl_s: int = 3600
    max_entry_bytes: int = 1 << 20
    billing: str = "prompt_only"
    shared_models: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ClientMode:
    """ClientMode is what the client allowed: read (serve/join) and write (store)."""

    read: bool = True
    write: bool = True


DEFAULT_MODE = ClientMode()
NO_CACHE = ClientMode(read=False, write=True)
NO_STORE = ClientMode(read=False, write=False)


def client_mode(headers: Mapping[str, str], field: int) -> ClientMode:
    """Returns the request's cache mode: its `cache` field, else its Cache-Control header;
    a shadow copy's is always `no-store`."""
    if field == inference_pb2.CACHE_MODE_NO_STORE or shadow.is_copy(headers):
        # A copy measures the shadow version: answered from the cache (one scope for
        # every caller's copies), its comparison record measured the cache.
        return NO_STORE
    if field == inference_pb2.CACHE_MODE_NO_CACHE:
        return NO_CACHE
    directives = {
        d.strip().split("=", 1)[0].lower() for d in headers.get(CACHE_CONTROL_HEADER, "").split(",")
    }
    if "no-store" in directives:
        return NO_STORE
    if "no-cache" in directives:
        return NO_CACHE
    return DEFAULT_MODE


def scope(config: CacheConfig, tenant: str, model: str, asked: str = "") -> str:
    """Returns whose entries a request may share: its tenant's, or everyone's for a shared
    model, when the model it asked for (`asked`: a fallback serves another) is shared
    too. Decided by the serving model alone, a private model's prompts that its shared
    fallback answered went into everyone's scope: another tenant asking the shared
    model the same prompt read `hit`, learning what the private model was asked."""
    shared = config.shared_models
    if model in shared and (asked or model) in shared:
        return SHARED_SCOPE
    return f"tenant:{tenant}"


def make_key(kind: str, parts: Sequence[Any]) -> str:
    """Returns the Redis key of a cache entry: `kind` and a digest of `parts` (JSON)."""
    canonical = json.dumps(list(parts), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return f"{KEY_PREFIX}{kind}:{hashlib.sha256(canonical.encode()).hexdigest()}"


def billed(prompt_tokens: int, completion_tokens: int, billing: str) -> tuple[int, int]:
    """Returns the (prompt, completion) tokens billed for an answer served without computing."""
    if billing == "full":
        return prompt_tokens, completion_tokens
    if billing == "prompt_only":
        return prompt_tokens, 0
    return 0, 0


def _as_bytes(value: bytes | str | None) -> bytes | None:
    """Returns a Redis reply as bytes (the client is not decoding: str never comes)."""
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else bytes(value)


class ResponseCache:
    """ResponseCache stores answers in Redis, bounded in time and size; fails open.

    Args:
        redis: the (volatile) Redis the entries live in.
        config: TTL, maximum entry size and the rest of the operator's settings.
    """

    def __init__(self, redis: aioredis.Redis, config: CacheConfig) -> None:
        self.redis = redis
        self.config = config

    async def get(self, key: str) -> bytes | None:
        """Returns the entry under `key` (None: none, or Redis unreachable)."""
        try:
            value = await self.redis.get(key)
        except _REDIS_DOWN as exc:
            CACHE_STORE.labels("error").inc()
            logger.warning("response cache unreachable (%s): a miss", type(exc).__name__)
            return None
        return _as_bytes(value)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Returns the entries under `keys`, in order (None where there is none)."""
        if not keys:
            return []
        try:
            values = await self.redis.mget(list(keys))
        except _REDIS_DOWN as exc:
            CACHE_STORE.labels("error").inc()
            logger.warning("response cache unreachable (%s): misses", type(exc).__name__)
            return [None] * len(keys)
        return [_as_bytes(v) for v in values]

    async def put(self, key: str, value: bytes) -> bool:
        """Stores `value` for the TTL; False when it is too large or Redis refused."""
        return await self.put_many({key: value})

    async def put_many(self, entries: Mapping[str, bytes]) -> bool:
        """Stores every entry that fits the size bound, each for the TTL."""
        fitting = {k: v for k, v in entries.items() if len(v) <= self.config.max_entry_bytes}
        if len(fitting) < len(entries):
            CACHE_STORE.labels("too_large").inc(len(entries) - len(fitting))
        if not fitting:
            return False
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, value in fitting.items():
                    pipe.set(key, value, ex=self.config.ttl_s)
                await pipe.execute()
        except _REDIS_DOWN as exc:
            CACHE_STORE.labels("error").inc()
            logger.warning("response cache unreachable (%s): not stored", type(exc).__name__)
            return False
        CACHE_STORE.labels("stored").inc(len(fitting))
        return True


class CacheStage:
    """CacheStage is the worker's response cache and its computations in flight.

    Args:
        store: the Redis-backed entries.
        config: the operator's settings.
    """

    def __init__(self, store: ResponseCache, config: CacheConfig) -> None:
        self.store = store
        self.config = config
        self.streams: Flights[pb.GenerateResponse] = Flights()
        self.completions: Flights[pb.CompleteResponse] = Flights()
        self.embedding_inputs = EmbeddingInputs()


@dataclass(frozen=True)
class CacheSettings:
    """CacheSettings are a worker's response-cache settings (loaded apart from the rest)."""

    enabled: bool = env(
        "TOKENMESH_CACHE",
        False,
        "Response cache and request coalescing for deterministic requests (seeded, or "
        "temperature 0) and embedding inputs; off: not on the request path at all. "
        "The launcher (make run) and the deploy manifests turn it on.",
    )
    ttl_s: int = env("TOKENMESH_CACHE_TTL_SECONDS", 3600, "How long a cached answer is kept.")
    max_entry_bytes: int = env(
        "TOKENMESH_CACHE_MAX_ENTRY_BYTES", 1 << 20, "Larger answers are never cached."
    )
    billing: str = env(
        "TOKENMESH_CACHE_BILLING",
        "prompt_only",
        "What an answer served from the cache (or coalesced) is billed: full, prompt_only "
        "(its prompt tokens, no completion tokens) or none.",
    )
    shared_models: tuple[str, ...] = env(
        "TOKENMESH_CACHE_SHARED_MODELS",
        (),
        "Models whose cache is shared by all tenants (public prompts only: a hit's speed "
        "tells a caller that someone asked the same before).",
    )
    redis_url: str = env(
        "TOKENMESH_CACHE_REDIS_URL",
        "",
        "Redis of the cache entries; empty: TOKENMESH_RATELIMIT_REDIS_URL (the volatile "
        "instance), else REDIS_URL.",
    )

    def __post_init__(self) -> None:
        require(1 <= self.ttl_s <= 30 * 86400, "TOKENMESH_CACHE_TTL_SECONDS", "must be 1-2592000")
        require(
            1024 <= self.max_entry_bytes <= 64 << 20,
            "TOKENMESH_CACHE_MAX_ENTRY_BYTES",
            "must be 1 KiB-64 MiB",
        )
        require(
            self.billing in BILLING_MODES,
            "TOKENMESH_CACHE_BILLING",
            f"must be one of {', '.join(BILLING_MODES)}",
        )
        require(
            not self.redis_url or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "TOKENMESH_CACHE_REDIS_URL",
            "must be a redis:// URL",
        )

    def config(self) -> CacheConfig:
        """Returns the settings the request path reads."""
        return CacheConfig(
            enabled=self.enabled,
            ttl_s=self.ttl_s,
            max_entry_bytes=self.max_entry_bytes,
            billing=self.billing,
            shared_models=frozenset(self.shared_models),
        )
