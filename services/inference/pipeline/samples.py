"""Opt-in redacted sample logging: which requests are sampled, and the Redis Stream they go to.

A tenant that opted in (services.router.policies.SampleSettings, with who
consented and when) has `rate` of its requests written, after PII
redaction, to its own Redis Stream::

    tokenmesh:samples:{tenant}   stream  "sample" -> tokenmesh.router.v1.Sample (protobuf)

Retention: every write trims entries older than `RETENTION_S` (MINID),
approximately beyond `MAX_ENTRIES`, and the oldest beyond `MAX_STREAM_BYTES`
of samples per tenant, so a stream is bounded in time, entries and bytes.
One sample is at most `MAX_SAMPLE_BYTES` serialized: its texts are redacted
first, then cut (each to a fair share of the room, UTF-8 bytes). Counted in
entries alone, 100 k samples of a 64 K-character input and 8 long outputs
were ~59 GB of the primary Redis per tenant. Each entry carries its size
and the stream's running total, so a Lua script trims by bytes atomically
(no counter to drift when entries age out).

A sample holds the key id, model, RPC, the redacted input and outputs,
finish reason and policy hits; never a credential (the request's headers
are not read, and every PII detector, `secret` included, runs on the texts
whatever the tenant's policy says).

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
#: At most this many bytes of samples are kept per tenant (the default of
#: ContentStage's `sample_stream_max_bytes`; the oldest samples go).
MAX_STREAM_BYTES = 64 * 1024 * 1024
#: One sample, serialized, is at most this many bytes (its texts are cut to fit).
MAX_SAMPLE_BYTES = 32 * 1024
#: Each text in a sample is redacted within this many characters (then cut to fit).
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


def _cut(text: str, max_bytes: int) -> str:
    """Returns `text` cut to at most `max_bytes` of UTF-8, on a character boundary."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode(errors="ignore")


def _shares(sizes: Sequence[int], room: int) -> list[int]:
    """Returns each text's byte allowance: `room` shared fairly (a short text keeps
    all of it, the rest is split evenly among the longer ones)."""
    shares = [0] * len(sizes)
    left = room
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for position, index in enumerate(order):
        shares[index] = min(sizes[index], left // (len(sizes) - position))
        left -= shares[index]
    return shares


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
    """Returns one sample, with every text redacted by every detector, at most
    MAX_SAMPLE_BYTES serialized (the texts cut after redaction: no cut can leave
    a part of a card number that redaction would have caught whole)."""
    sample = policy_pb2.Sample(
        request_id=request_id,
        tenant=tenant,
        key_id=key_id,
        rpc=rpc,
        finish_reason=finish_reason,
        policy_hits=list(policy_hits),
    )
    sample.model.name, sample.model.version = model
    sample.time.FromMilliseconds(int((now if now is not None else time.time()) * 1000))
    texts = [redact_all(input_text)] + [redact_all(o) for o in outputs]
    # Each text field costs its tag and length prefix (at most 4 bytes) besides its own.
    room = max(0, MAX_SAMPLE_BYTES - sample.ByteSize() - 4 * len(texts))
    cut = [
        _cut(t, share)
        for t, share in zip(texts, _shares([len(t.encode()) for t in texts], room), strict=True)
    ]
    sample.input = cut[0]
    sample.outputs.extend(cut[1:])
    return sample


# Appends a sample and trims the stream, atomically (one key: fine in a cluster).
# KEYS[1] the stream; ARGV: the sample, its size, MAX_ENTRIES, the MINID of the
# retention, the byte budget. Each entry holds "bytes" (its sample's size), "total"
# (the sizes of every sample the stream was given, up to it) and "since" (the first
# entry that holds them): the stream holds total(newest) - total(oldest) +
# bytes(oldest). The oldest entries beyond the budget are trimmed (XTRIM MINID of
# the oldest one kept), at most _TRIM_ENTRIES a write (a write frees about its own
# size: usually one or two). Entries from before sizes were kept count as given
# before any: they go, all at once ("since"), once the newer ones fill the budget.
_APPEND = """
local key, size = KEYS[1], tonumber(ARGV[2])
local function field(entry, name)
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
-- "since" is the id of the first entry with sizes ("": that entry itself).
local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
local total, since = size, ''
if #newest > 0 and field(newest[1], 'total') then
  total = total + tonumber(field(newest[1], 'total'))
  since = field(newest[1], 'since')
  if since == '' then since = newest[1][1] end
end
local id = redis.call('XADD', key, 'MAXLEN', '~', ARGV[3], '*',
  'sample', ARGV[1], 'bytes', size, 'total', total, 'since', since)
if since == '' then since = id end
redis.call('XTRIM', key, 'MINID', ARGV[4])
local floor = total - tonumber(ARGV[5])  -- samples given up to here no longer fit
if floor <= 0 then return 0 end
local oldest = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
if #oldest > 0 and field(oldest[1], 'total') == nil then
  redis.call('XTRIM', key, 'MINID', since)  -- from before sizes were kept
end
local start, read = '-', 0
while read < tonumber(ARGV[6]) do
  local batch = redis.call('XRANGE', key, start, '+', 'COUNT', 8)
  if #batch == 0 then
    return redis.call('XTRIM', key, 'MAXLEN', 0)  -- not even the newest fits
  end
  for _, entry in ipairs(batch) do
    local ends = field(entry, 'total')
    if tonumber(ends) - tonumber(field(entry, 'bytes')) >= floor then
      return redis.call('XTRIM', key, 'MINID', entry[1])
    end
  end
  read = read + #batch
  start = '(' .. batch[#batch][1]
end
-- Every entry read is beyond the budget: they go, the rest on later writes.
local next_one = redis.call('XRANGE', key, start, '+', 'COUNT', 1)
if #next_one == 0 then return redis.call('XTRIM', key, 'MAXLEN', 0) end
return redis.call('XTRIM', key, 'MINID', next_one[1][1])
"""
_TRIM_ENTRIES = 64


async def write(
    redis: aioredis.Redis, sample: policy_pb2.Sample, max_bytes: int = MAX_STREAM_BYTES
) -> None:
    """Appends a sample to its tenant's stream, trimming by age, count and bytes
    (best-effort)."""
    min_id = f"{int((time.time() - RETENTION_S) * 1000)}-0"
    data = sample.SerializeToString()
    try:
        append = redis.register_script(_APPEND)  # EVALSHA, the script sent once per server
        await append(
            keys=[stream_key(sample.tenant)],
            args=[data, len(data), MAX_ENTRIES, min_id, max_bytes, _TRIM_ENTRIES],
        )
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
