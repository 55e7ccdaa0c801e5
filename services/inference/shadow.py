"""Shadow traffic on the worker: serving the edge's mirrored copies, and comparison records.

The edge mirrors a share of a shadowed model's live requests to the shadow
version (services.router.shadow). A copy carries contract.SHADOW_HEADER (the
version to serve); the live request carries contract.SHADOWED_HEADER. Both are
edge-only headers: clients' copies are removed on arrival, and any other peer
sending one is refused, so a worker can trust them.

A copy:
- serves the version SHADOW_HEADER names, never a fallback (`routed_version`);
- is metered to the shadow account (tenant contract.SHADOW_TENANT, no key):
  never to the caller's key, budgets or rate limits (services.inference.admission,
  services.inference.request_limits). The edge decided the live request's
  limits before Envoy made the copy;
- is never sampled (services.inference.pipeline.content, by `is_copy`): its
  live request was sampled, or not, under the caller's tenant;
- answers into nothing: Envoy discards it, and the caller never waits for it.

Both sides write a compact record keyed by the request id they share (the
edge's x-request-id) to services.router.shadow_pairs, off the request path
(`ShadowRecorder`); a model without a shadow writes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import Counter
from redis.exceptions import RedisError

from gateway import model_routing
from services.core import contract
from services.core.errors import FailedPrecondition
from services.router.shadow_pairs import LIVE, SHADOW, PairStore, Record
from tokenmesh.inference.v1 import inference_pb2

if TYPE_CHECKING:
    from services.inference.logprobs import Confidence
    from services.inference.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"  # Envoy's, shared by a live request and its copy
MAX_PENDING_WRITES = 256

SHADOW_RECORDS = Counter(
    "tokenmesh_shadow_records_total",
    "Shadow comparison records by role (live, shadow) and outcome (written, dropped, failed).",
    ("model", "version", "role", "outcome"),
)


@dataclass(frozen=True)
class ShadowMark:
    """ShadowMark says a request takes part in shadow traffic.

    Attributes:
        role: LIVE (the caller's request of a shadowed model) or SHADOW (the copy).
        shadow_version: the version the copies go to.
        pair_id: the id both sides of the pair record under.
    """

    role: str
    shadow_version: str
    pair_id: str

    @property
    def is_copy(self) -> bool:
        """Tells whether this is the mirrored copy (not the caller's request)."""
        return self.role == SHADOW


def mark(headers: Mapping[str, str], request_id: str) -> ShadowMark | None:
    """Returns the request's part in shadow traffic, from the edge's headers (None: none)."""
    copy_of = headers.get(contract.SHADOW_HEADER, "")
    shadowed = headers.get(contract.SHADOWED_HEADER, "")
    if not (copy_of or shadowed):
        return None
    edge_id = headers.get(REQUEST_ID_HEADER, "")
    pair_id = edge_id if contract.is_request_id(edge_id) else request_id
    return ShadowMark(SHADOW if copy_of else LIVE, copy_of or shadowed, pair_id)


def is_copy(headers: Mapping[str, str]) -> bool:
    """Tells whether a request is a mirrored copy (its caller's limits were decided already)."""
    return bool(headers.get(contract.SHADOW_HEADER))


def routed_version(headers: Mapping[str, str]) -> str:
    """Returns the version the edge routed a request to: a copy's shadow version, else the
    route's.

    Raises:
        FailedPrecondition: a copy of a request the shadow version itself served (the
            version also takes live traffic): nothing to compare, so nothing is computed.
    """
    route = headers.get(model_routing.ROUTE_VERSION_HEADER, "")
    copy_of = headers.get(contract.SHADOW_HEADER, "")
    if not copy_of:
        return route
    if copy_of == route:
        raise FailedPrecondition(
            f"version {copy_of!r} served this request itself", reason="SHADOW_OF_ITSELF"
        )
    return copy_of


class _Sequence(Protocol):
    generated: list[int]


class _Choice(Protocol):
    tokens: int
    seq: _Sequence
    confidence: Confidence

    def timing(self) -> Any: ...


def _choices(request: object) -> Sequence[_Choice]:
    """A generation's choices (a request served without computing has none)."""
    choices: Sequence[_Choice] = getattr(request, "choices", ())
    return choices


def _reproducible(request: object) -> bool:
    """Seeded or greedy: the same input must give the same text on every version."""
    spec = getattr(request, "spec", None)
    params = getattr(request, "params", ())
    if spec is not None and getattr(spec, "seed", None) is not None:
        return True
    return bool(params) and all(p.temperature == 0 for p in params)


def _text_hash(choices: Sequence[_Choice], tokenizer: Tokenizer | None) -> str:
    if tokenizer is None or not choices:
        return ""
    texts = [tokenizer.decode(c.seq.generated[: c.tokens]) for c in choices]
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def record_of(request: object, version: str, event: inference_pb2.UsageEvent) -> Record:
    """Builds the comparison record of a finished generation (see shadow_pairs.Record)."""
    choices = _choices(request)
    timings = [(c.tokens, c.timing().decode_ms) for c in choices]
    itls = [decode_ms / (tokens - 1) for tokens, decode_ms in timings if tokens >= 2 and decode_ms]
    scored = [c.confidence for c in choices if c.confidence.logprobs]
    reproducible = _reproducible(request)
    return Record(
        version=version,
        finish_reason=event.finish_reason or "unknown",
        ttft_ms=round(event.timing.time_to_first_token_ms, 3),
        itl_ms=round(_mean(itls) or 0.0, 3),
        total_ms=round(event.timing.total_ms, 3),
        output_tokens=event.usage.completion_tokens,
        mean_logprob=_mean([c.mean_logprob for c in scored]),
        confidence=_mean([c.score for c in scored]),
        reproducible=reproducible,
        text_hash=_text_hash(choices, getattr(request, "tokenizer", None)) if reproducible else "",
    )


class ShadowRecorder:
    """ShadowRecorder writes comparison records in the background (bounded, never blocking).

    At most MAX_PENDING_WRITES writes are in flight; beyond that, and when Redis
    fails, a record is dropped and counted (tokenmesh_shadow_records_total): a
    comparison loses a pair, a caller loses nothing.
    """

    def __init__(self, store: PairStore, max_pending: int = MAX_PENDING_WRITES) -> None:
        self.store = store
        self.max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()

    def observe(self, request: object, shadow: ShadowMark, event: inference_pb2.UsageEvent) -> None:
        """Records one side of a pair (a finished generation's usage event)."""
        model, version = event.model.name, event.model.version
        if len(self._pending) >= self.max_pending:
            SHADOW_RECORDS.labels(model, version, shadow.role, "dropped").inc()
            return
        record = record_of(request, version, event)
        task = asyncio.create_task(self._write(model, shadow, record))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, model: str, shadow: ShadowMark, record: Record) -> None:
        labels = (model, record.version, shadow.role)
        try:
            now_ms = int(time.time() * 1000)
            await self.store.write(model, shadow.pair_id, shadow.role, record, now_ms)
        except RedisError as exc:
            logger.warning("shadow record not written (%s)", type(exc).__name__)
            SHADOW_RECORDS.labels(*labels, "failed").inc()
            return
        SHADOW_RECORDS.labels(*labels, "written").inc()

    async def stop(self) -> None:
        """Waits for the writes in flight (each bounded by Redis's socket timeout)."""
        await asyncio.gather(*self._pending, return_exceptions=True)
