"""Opt-in redacted sample logging: which requests are sampled, and the Redis Stream they go to.

A tenant that opted in (services.router.policies.SampleSettings, with who
consented and when) has `rate` of its requests written, after PII
redaction, to its own Redis Stream::

    tokenmesh:samples:{tenant}   stream  "sample" -> tokenmesh.router.v1.Sample (protobuf)

Retention: every XADD trims entries older than `RETENTION_S` (MINID) and,
approximately, beyond `MAX_ENTRIES` per tenant, so a stream is bounded in
both time and size. A sample holds the key id, model, RPC, the redacted
input and outputs, finish reason and policy hits; never a credential (the
request's headers are not read, and every PII detector, `secret` included,
runs on the texts whatever the tenant's policy says).

Writes are fire-and-forget from the worker's point of view: a failed write
is logged and counted, never an error to the client (sampling is
best-effort; usage events are the record).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from services.inference.pipeline import pii
from tokenmesh.router.v1 import policy_pb2

logger = logging.getLogger(__name__)
STREAM_PREFIX = "tokenmesh:samples:"
#: Samples older than this are trimmed (seconds; 7 days).
RETENTION_S = 7 * 86400
#: At most about this many samples are kept per tenant.
MAX_ENTRIES = 100_000
#: Each text in a sample is cut to this many characters.
MAX_TEXT_CHARS = 64 * 1024
# Text past the cut that detection still reads: longer than any match the detectors
# make (a PEM key block is ~1.7-3.2 KB).
PII_CONTEXT_CHARS = 8 * 1024

SAMPLES_WRITTEN = Counter(
    "tokenmesh_samples_written_total", "Redacted samples written, by outcome.", ("outcome",)
)


def stream_key(tenant: str) -> str:
    """Returns the Redis Stream of a tenant's samples."""
    return f"{STREAM_PREFIX}{tenant}"


def redact_all(text: str) -> str:
    """Returns `text` cut to MAX_TEXT_CHARS, with every detector's matches replaced.

    Detected on the text past the cut too (PII_CONTEXT_CHARS): cut first, a card
    number across the cut was no longer one, and its digits were kept.
    """
    spans = pii.find(text[: MAX_TEXT_CHARS + PII_CONTEXT_CHARS])
    kept = [
        pii.Span(s.start, min(s.end, MAX_TEXT_CHARS), s.detector)
        for s in spans
        if s.start < MAX_TEXT_CHARS
    ]
    return pii.redact(text[:MAX_TEXT_CHARS], kept)


def sampled(rate: float, draw: Callable[[], float] = random.random) -> bool:
    """Tells whether one request is sampled at `rate` (0-1)."""
    return rate > 0 and (rate >= 1 or draw() < rate)


def build(
    *,
    request_id: str,
    tenant: str,
    key_id: str,
    model: tuple[str, str],
    rpc: str,
    input_text: str,
    outputs: Sequence[str],
    finish_reason: str,
    policy_hits: Sequence[str],
    now: float | None = None,
) -> policy_pb2.Sample:
    """Returns one sample, with every text redacted by every detector."""
    sample = policy_pb2.Sample(
        request_id=request_id,
        tenant=tenant,
        key_id=key_id,
        rpc=rpc,
        input=redact_all(input_text),
        outputs=[redact_all(o) for o in outputs],
        finish_reason=finish_reason,
        policy_hits=list(policy_hits),
    )
    sample.model.name, sample.model.version = model
    sample.time.FromMilliseconds(int((now if now is not None else time.time()) * 1000))
    return sample


async def write(redis: aioredis.Redis, sample: policy_pb2.Sample) -> None:
    """Appends a sample to its tenant's stream, trimming by age and size (best-effort)."""
    min_id = f"{int((time.time() - RETENTION_S) * 1000)}-0"
    try:
        async with redis.pipeline(transaction=False) as pipe:
            key = stream_key(sample.tenant)
            pipe.xadd(key, {"sample": sample.SerializeToString()}, maxlen=MAX_ENTRIES)
            pipe.xtrim(key, minid=min_id)
            await pipe.execute()
    except RedisError as error:
        SAMPLES_WRITTEN.labels("error").inc()
        logger.warning("sample of request %s not written (%s)", sample.request_id, error)
        return
    SAMPLES_WRITTEN.labels("written").inc()


async def read(
    redis: aioredis.Redis, tenant: str, since_ms: int, after: str, count: int
) -> tuple[list[policy_pb2.Sample], str]:
    """Returns up to `count` samples of a tenant, oldest first, and the next page token.

    Args:
        since_ms: skip samples written before this (Unix ms).
        after: a previous page's token (the last entry id), or "".
    """
    start = f"({after}" if after else (f"{since_ms}-0" if since_ms else "-")
    entries: Any = await redis.xrange(stream_key(tenant), min=start, max="+", count=count + 1)
    samples = [policy_pb2.Sample.FromString(fields[b"sample"]) for _, fields in entries[:count]]
    if len(entries) <= count:
        return samples, ""
    last = entries[count - 1][0]
    return samples, last.decode() if isinstance(last, bytes) else str(last)
