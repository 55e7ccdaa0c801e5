"""Shadow pairs: what two model versions did with the same live request, and the comparison.

Workers write one compact record per request of a shadowed model (the live
request's and its shadow copy's, services.inference.shadow), keyed by the
request id the two share (a legacy completion's later prompts: `<id>:<n>`);
`tokenmesh models compare` (RouterService CompareModelVersions) reads the
pairs of a window and summarises each version. Only computed answers are
recorded: a side served from the response cache or by another request's
computation (a replay's timing, no text to compare), or by a fallback model,
writes none, and a copy never uses the cache. Latencies leave out the time a
request waited for a slot (`queue_ms`): a copy waits at batch priority behind
the live requests, its live side does not, and that is the scheduler's policy,
not the model's speed (shown apart, as the queue time). So the figures are the
models'.

Redis layout, per model (one hash slot: the model is the key's hash tag):

- `tokenmesh:shadow:{MODEL}:index`: sorted set of complete pairs' request ids by
  the time (unix ms) of their first record;
- `tokenmesh:shadow:{MODEL}:pending`: sorted set of request ids with one record
  so far, by the time of that record;
- `tokenmesh:shadow:{MODEL}:records`: hash `REQUEST_ID|live` / `REQUEST_ID|shadow`
  -> the record's JSON.

Every live request of a shadowed model writes a record (the edge marks them
all: it cannot know which ones Envoy mirrors), so at a 1% shadow 99 of 100
live records never get a partner. Counted with the pairs, they pushed the
pairs out: 10,000 ids at 1,000 requests a second held 10 s of pairs. A record
therefore waits in `pending` until its partner comes (then the id moves to
`index`), at most PENDING_S and among the newest MAX_PENDING; only complete
pairs count towards MAX_PAIRS and RETENTION_S.

Bounded: one Lua script writes a record and drops unpaired records past
PENDING_S or beyond MAX_PENDING, and pairs older than RETENTION_S or beyond
MAX_PAIRS, so the keys stay small whatever the traffic; they expire
RETENTION_S after the last write.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import redis.asyncio as aioredis

from services.core.redis_service import known_fields, text

LIVE = "live"
SHADOW = "shadow"
ROLES = (LIVE, SHADOW)
MAX_PAIRS = 10_000
RETENTION_S = 7 * 24 * 3600
# Unpaired records: how many wait for their partner, and for how long (a copy
# finishes about when its live request does: both start together at the edge).
MAX_PENDING = 20_000
PENDING_S = 600
READ_BATCH = 500  # request ids per HMGET when reading a window

# KEYS: index, pending, records. ARGV: request id, role, record JSON, now (ms), max
# pairs, retention (ms), max pending, pending time (ms). Drops at most 64 aged-out
# pairs and 64 aged-out unpaired records a call (the rest next time).
WRITE_SCRIPT = """
local id, role = ARGV[1], ARGV[2]
local other = role == 'live' and 'shadow' or 'live'
local now = tonumber(ARGV[4])
redis.call('HSET', KEYS[3], id .. '|' .. role, ARGV[3])
if not redis.call('ZSCORE', KEYS[1], id) then
  local first = redis.call('ZSCORE', KEYS[2], id)
  if first and redis.call('HEXISTS', KEYS[3], id .. '|' .. other) == 1 then
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[1], first, id)
  else
    redis.call('ZADD', KEYS[2], 'NX', now, id)
  end
end
local function drop(set, ids)
  for _, dropped in ipairs(ids) do
    redis.call('HDEL', KEYS[3], dropped .. '|live', dropped .. '|shadow')
    redis.call('ZREM', set, dropped)
  end
end
local function trim(set, max, age)
  drop(set, redis.call('ZRANGEBYSCORE', set, '-inf', now - age, 'LIMIT', 0, 64))
  local extra = redis.call('ZCARD', set) - max
  if extra > 0 then drop(set, redis.call('ZRANGE', set, 0, extra - 1)) end
end
trim(KEYS[2], tonumber(ARGV[7]), tonumber(ARGV[8]))
trim(KEYS[1], tonumber(ARGV[5]), tonumber(ARGV[6]))
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ARGV[6]) end
return 1
"""


def index_key(model: str) -> str:
    """Returns the sorted set of a model's pair ids."""
    return f"tokenmesh:shadow:{{{model}}}:index"


def pending_key(model: str) -> str:
    """Returns the sorted set of a model's unpaired request ids."""
    return f"tokenmesh:shadow:{{{model}}}:pending"


def records_key(model: str) -> str:
    """Returns the hash of a model's records."""
    return f"tokenmesh:shadow:{{{model}}}:records"


@dataclass(frozen=True)
class Record:
    """Record is what one version did with one request (latencies in milliseconds).

    Attributes:
        version: the model version that served it.
        finish_reason: "stop", "length", "error", ... (the request's).
        ttft_ms: time to the first token (0: none came).
        itl_ms: mean time between tokens (0: fewer than two tokens).
        total_ms: submission to the last token.
        output_tokens: completion tokens its caller received (served_usage when set).
        mean_logprob: mean token log-probability (None: not computed).
        confidence: the choice's confidence 0-1 (None: not computed).
        reproducible: seeded or greedy: the same input must give the same text.
        text_hash: a hash of the output texts (compared between the pair's two).
        queue_ms: submission to the start of its prefill (0 from workers before it
            was recorded).
    """

    version: str
    finish_reason: str
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    total_ms: float = 0.0
    output_tokens: int = 0
    mean_logprob: float | None = None
    confidence: float | None = None
    reproducible: bool = False
    text_hash: str = ""
    queue_ms: float = 0.0

    def to_json(self) -> str:
        """Serialises the record compactly."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Record:
        """Parses a record written by `to_json` (unknown fields are ignored)."""
        return cls(**known_fields(cls, json.loads(raw)))


@dataclass(frozen=True)
class Pair:
    """Pair is one request answered by the live version and its shadow."""

    request_id: str
    live: Record
    shadow: Record


class PairStore:
    """PairStore writes and reads shadow records in Redis (see the module)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        max_pairs: int = MAX_PAIRS,
        retention_s: float = RETENTION_S,
        max_pending: int = MAX_PENDING,
        pending_s: float = PENDING_S,
    ) -> None:
        self.redis = redis
        self.max_pairs = max_pairs
        self.retention_ms = int(retention_s * 1000)
        self.max_pending = max_pending
        self.pending_ms = int(pending_s * 1000)
        self._write = redis.register_script(WRITE_SCRIPT)

    async def write(
        self, model: str, request_id: str, role: str, record: Record, now_ms: int
    ) -> None:
        """Writes one side of a pair (and trims the model's pairs)."""
        await self._write(
            keys=[index_key(model), pending_key(model), records_key(model)],
            args=[
                request_id,
                role,
                record.to_json(),
                now_ms,
                self.max_pairs,
                self.retention_ms,
                self.max_pending,
                self.pending_ms,
            ],
        )

    async def pairs(self, model: str, since_ms: int) -> list[Pair]:
        """Returns the model's complete pairs whose first record came at or after `since_ms`."""
        members = await self.redis.zrangebyscore(index_key(model), since_ms, "+inf")
        ids = [text(cast(bytes, i)) for i in members]
        found: list[Pair] = []
        for start in range(0, len(ids), READ_BATCH):
            batch = ids[start : start + READ_BATCH]
            fields = [f"{i}|{role}" for i in batch for role in ROLES]
            values = await self.redis.hmget(records_key(model), fields)
            for n, request_id in enumerate(batch):
                live, shadow = values[2 * n], values[2 * n + 1]
                if live is not None and shadow is not None:
                    found.append(Pair(request_id, Record.from_json(live), Record.from_json(shadow)))
        return found


# ---------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Returns the nearest-rank `q`-th percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class Latency:
    """Latency summarises one latency's distribution (milliseconds)."""

    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    samples: int = 0

    @classmethod
    def of(cls, values: Sequence[float]) -> Latency:
        """Summarises `values`."""
        return cls(percentile(values, 50), percentile(values, 99), _mean(values), len(values))


@dataclass(frozen=True)
class VersionFigures:
    """VersionFigures is one version's side of a comparison."""

    version: str
    requests: int = 0
    ttft: Latency = field(default_factory=Latency)
    itl: Latency = field(default_factory=Latency)
    total: Latency = field(default_factory=Latency)
    queue: Latency = field(default_factory=Latency)
    error_rate: float = 0.0
    finish_reasons: Mapping[str, int] = field(default_factory=dict)
    output_tokens: tuple[float, int, int, int, int] = (0.0, 0, 0, 0, 0)  # mean p50 p90 p99 max
    mean_logprob: float = 0.0
    mean_confidence: float = 0.0

    @classmethod
    def of(cls, version: str, records: Sequence[Record]) -> VersionFigures:
        """Summarises one version's records."""
        ok = [r for r in records if r.finish_reason != "error"]
        lengths = [float(r.output_tokens) for r in records]
        reasons: dict[str, int] = {}
        for record in records:
            reasons[record.finish_reason] = reasons.get(record.finish_reason, 0) + 1
        logprobs = [r.mean_logprob for r in ok if r.mean_logprob is not None]
        confidences = [r.confidence for r in ok if r.confidence is not None]
        return cls(
            version=version,
            requests=len(records),
            ttft=Latency.of([_unqueued(r.ttft_ms, r) for r in ok if r.ttft_ms > 0]),
            itl=Latency.of([r.itl_ms for r in ok if r.itl_ms > 0]),
            total=Latency.of([_unqueued(r.total_ms, r) for r in ok]),
            queue=Latency.of([r.queue_ms for r in ok]),
            error_rate=(len(records) - len(ok)) / len(records) if records else 0.0,
            finish_reasons=reasons,
            output_tokens=(
                _mean(lengths),
                int(percentile(lengths, 50)),
                int(percentile(lengths, 90)),
                int(percentile(lengths, 99)),
                int(max(lengths, default=0)),
            ),
            mean_logprob=_mean(logprobs),
            mean_confidence=_mean(confidences),
        )


def _unqueued(ms: float, record: Record) -> float:
    """Returns a latency of the record without its wait for a slot."""
    return max(ms - record.queue_ms, 0.0)


@dataclass(frozen=True)
class Comparison:
    """Comparison is two versions' figures over the same requests, and their agreement."""

    baseline: VersionFigures
    candidate: VersionFigures
    pairs: int
    reproducible_pairs: int
    agreeing_pairs: int
    reversed_pairs: int = 0

    @property
    def agreement_rate(self) -> float:
        """Returns the share of reproducible pairs whose texts agreed (0 with none)."""
        return self.agreeing_pairs / self.reproducible_pairs if self.reproducible_pairs else 0.0


def compare(pairs: Iterable[Pair], baseline: str, candidate: str) -> Comparison:
    """Compares `baseline` and `candidate` over the pairs where the baseline served and
    the candidate shadowed; the pairs the other way round are only counted
    (`reversed_pairs`), other pairs are left out.

    Each side is one role: taken either way round, a window spanning a promotion
    (v1 shadowing v2 after v2 shadowed v1) mixed each version's live requests
    with its copies, under headers that named one role each.

    Texts are compared only where both sides finished without an error and the
    request was reproducible (a seed or greedy sampling).
    """
    sides: dict[str, list[Record]] = {baseline: [], candidate: []}
    matched = reproducible = agreeing = reversed_pairs = 0
    for pair in pairs:
        if (pair.live.version, pair.shadow.version) == (candidate, baseline):
            reversed_pairs += 1
        if (pair.live.version, pair.shadow.version) != (baseline, candidate):
            continue
        matched += 1
        for record in (pair.live, pair.shadow):
            sides[record.version].append(record)
        if _comparable(pair):
            reproducible += 1
            agreeing += pair.live.text_hash == pair.shadow.text_hash
    return Comparison(
        VersionFigures.of(baseline, sides[baseline]),
        VersionFigures.of(candidate, sides[candidate]),
        matched,
        reproducible,
        agreeing,
        reversed_pairs,
    )


def _comparable(pair: Pair) -> bool:
    both = (pair.live, pair.shadow)
    return all(r.reproducible and r.finish_reason != "error" and r.text_hash for r in both)
