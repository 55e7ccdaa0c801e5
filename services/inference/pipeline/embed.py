"""The Embed path: validate -> content policy -> per-input cache / coalesce -> embed -> record.

Every input is tokenized first (errors name the input exactly as before);
with the cache on, each input is then looked up on its own under a key of
the scope (tenant, or "shared"), the model version and its token ids (which
include truncation): an input embedded by an earlier request of the tenant is
reused, one being embedded right now for a concurrent request is awaited
(not computed twice), an input repeated within a request is computed once,
and only the rest reaches the engine. A computation runs in a task of its
own: a request that leaves does not fail the others waiting for its inputs.

Usage: `prompt_tokens` counts every input; inputs not computed for this
request are billed as TOKENMESH_CACHE_BILLING says (`cached: true` and
`served_usage` in the usage event when any was), and reserved so: the cache
is read before the budget is reserved. A request whose caller leaves is
billed the inputs it set computing. The event is recorded by
`Admission.record`, as a generation's: a job item's attempt that ends cut
(`cancelled`: its call timed out or its caller left; `error`) is set apart
under an id of its own, billed nothing, and the run that answers is billed
under the item's id; so is an embed cut by the worker's shutdown (the edge
tries it again elsewhere: Admission.note_cancelled). The response header says
`hit` (nothing computed), `coalesced` (nothing computed, something awaited),
`miss` (something computed) or `bypass` (`no-store`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.core.errors import FieldViolation, InvalidArgument, Unavailable
from services.core.interceptors import Context, request_headers
from services.inference import genai_spans, quality
from services.inference.admission import Admission, Request, Target, token_usage
from services.inference.embedder import Embedder
from services.inference.pipeline import cache as cache_stage
from services.inference.pipeline.cache import (
    BYPASS,
    CACHE_REQUESTS,
    COALESCED,
    EMBEDDING_INPUTS,
    HIT,
    MISS,
    CacheStage,
)
from services.inference.pipeline.coalesce import EmbeddingInputs
from services.inference.pipeline.content import RequestContent
from services.inference.surface import ApiSurface
from services.inference.v2 import validation
from tokenmesh.inference.v1 import inference_pb2 as v1_pb
from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.type.v1 import types_pb2

_DTYPE = "<f4"
# Cache reads of one request (_read_cache): again only while other computations stored.
READ_ATTEMPTS = 3


@dataclass
class Embedded:
    """Embedded is what the embedding stage produced for a request's inputs."""

    vectors: list[np.ndarray]
    computed_tokens: int  # tokens of the inputs embedded for this request
    served_tokens: int  # tokens of the inputs taken from the cache or another request
    status: str  # x-tokenmesh-cache


@dataclass
class _Lookup:
    """What the cache and requests in flight held of a request's inputs when it was
    admitted (read before its budget is reserved).

    Attributes:
        keys: each input's cache key, in input order.
        found: the vectors read from the cache.
        awaited: the inputs another request is computing now.
        read: whether the request may read the cache (not `no-cache`).
        computing_tokens: the tokens of the inputs it set computing (once it did).
    """

    keys: list[str]
    found: dict[str, np.ndarray]
    awaited: dict[str, asyncio.Future[np.ndarray]]
    read: bool
    computing_tokens: int = 0

    def served_tokens(self, encoded: Sequence[Sequence[int]]) -> int:
        """Returns the tokens of the inputs it holds (as often as the request repeats them)."""
        held = self.found.keys() | self.awaited.keys()
        return sum(len(ids) for key, ids in zip(self.keys, encoded, strict=True) if key in held)


def input_key(config: cache_stage.CacheConfig, call: Request, token_ids: Sequence[int]) -> str:
    """Returns the cache key of one embedding input."""
    return cache_stage.make_key(
        "emb",
        [
            cache_stage.scope(config, call.tenant, call.model.name, call.fallback_from),
            call.model.name,
            call.model.version,
            list(token_ids),
        ],
    )


class EmbeddingPipeline:
    """EmbeddingPipeline runs Embed requests through the stages (module docstring).

    Args:
        admission: routing, usage, content policy and the cache stage (`admission.cache`).
        surface: the API version the requests come through.
    """

    def __init__(self, admission: Admission, surface: ApiSurface) -> None:
        self.admission = admission
        self.surface = surface

    async def embed(self, context: Context, request: pb.EmbedRequest) -> pb.EmbedResponse:
        """Returns the embeddings of `request`."""
        validation.validate_embed(request)
        target = self.admission.resolve(context, request.model, request.version, generative=False)
        embedder = target.model.embedder
        assert embedder is not None  # resolve() checked the kind
        _check_dimensions(request, target.model.embedding_dimensions)
        rpc, api_version = self.surface.rpc("Embed"), self.surface.api_version
        call = Request(context, target, request.request_id, rpc, api_version, request.metadata)
        inputs, content = await self.admission.content.check_texts(
            context, target, request.inputs, field_name="inputs",
            request_id=call.request_id, rpc=rpc, api_version=api_version,
        )  # fmt: skip
        truncate = request.truncate == inference_pb2.TRUNCATION_END
        if truncate:
            encoded, cut = await asyncio.to_thread(embedder.tokenize_truncated, inputs)
        else:
            encoded = await asyncio.to_thread(embedder.tokenize, inputs)
            cut = [False] * len(encoded)
        prompt_tokens = sum(len(ids) for ids in encoded)
        # The cache is read before the budget is reserved: inputs it (or another
        # request) holds are billed as TOKENMESH_CACHE_BILLING says, and reserving
        # them whole refused a fully cached embed to a spent budget under "none",
        # where a cached Complete is served.
        lookup = await self._lookup(context, call, encoded, request.cache)
        # Embeddings spend the caller's token budgets too (they skipped them: a key
        # whose month was spent embedded on, uncounted).
        call.needed_tokens = self._needed(lookup, encoded)
        if call.needed_tokens:  # served whole, billed nothing: no budget can refuse it
            await self.admission.reserve(call)
        finish_reason = "error"
        embedded: Embedded | None = None
        refused = False
        try:
            embedded = await self._vectors(target, embedder, encoded, lookup)
            call.cache_status = embedded.status
            await call.send_headers(context)
            finish_reason = "stop"
            vectors = np.stack(embedded.vectors) if embedded.vectors else np.empty((0, 0))
            quality.observe_embeddings(target.model, vectors)
            genai_spans.annotate_embedding(call, request.model, prompt_tokens)
        except asyncio.CancelledError:
            finish_reason = "cancelled"  # the caller left, or its deadline passed
            # Or the worker's shutdown cut it (its headers held: trailers-only, which
            # the edge tries again elsewhere): recorded apart, billed nothing there.
            self.admission.note_cancelled(call)
            raise
        except Unavailable as exc:
            # Refused before any work (its version unloads; the edge tries another
            # worker): nothing is billed, as for a generation refused so. It was billed
            # every input here, and again where the retry ran.
            refused = exc.reason == "MODEL_UNLOADING"
            if exc.reason == "MODEL_UNLOADED":
                # Cut by the unload while computing, its headers held (they leave with
                # its vectors): trailers-only, which the edge tries again elsewhere.
                # Recorded apart, billed nothing, as a cut by the shutdown is; billed,
                # the retry paid twice.
                self.admission.note_retried(call)
            raise
        finally:
            if refused:
                self.admission.release(call)
            else:
                billed = self._billed(embedded, lookup, prompt_tokens, finish_reason)
                self._record(call, embedded, billed, prompt_tokens, finish_reason, content)
        base64_encoded = request.encoding == inference_pb2.EMBEDDING_ENCODING_BASE64
        return pb.EmbedResponse(
            embeddings=[
                embedding_pb(i, vector, len(encoded[i]), cut[i], base64_encoded)
                for i, vector in enumerate(embedded.vectors)
            ],
            model=call.model_ref(),
            usage=inference_pb2.Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
            request_id=call.request_id,
        )

    def _record(
        self,
        call: Request,
        embedded: Embedded | None,
        billed: types_pb2.TokenUsage,
        prompt_tokens: int,
        finish_reason: str,
        content: RequestContent,
    ) -> None:
        """Records an embed that ran (or failed, or whose caller left) and settles it."""
        timing = v1_pb.Timing(total_ms=(time.monotonic() - call.started) * 1000)
        event = call.usage_event(billed, finish_reason, timing)
        if embedded is not None and embedded.served_tokens:
            event.cached = True
            event.served_usage.CopyFrom(token_usage(prompt_tokens, 0))
        content.record(event)
        # As every other RPC (Admission.record): a job item's cut attempt is recorded
        # apart, billed nothing. Appended and settled here directly, it took the
        # item's id: the meter kept the cut run and dropped the retry that answered.
        computed = embedded is None or embedded.computed_tokens > 0
        self.admission.record(call, event, computed=computed)

    def _served_billed(self, served_tokens: int) -> int:
        """Returns what inputs served without computing (cache, another request) bill."""
        stage = self.admission.cache
        if stage is None:
            return served_tokens
        return cache_stage.billed(served_tokens, 0, stage.config.billing)[0]

    def _needed(self, lookup: _Lookup | None, encoded: list[list[int]]) -> int:
        """Returns the tokens to reserve: what is computed here, and what the inputs the
        cache or another request holds bill."""
        total = sum(len(ids) for ids in encoded)
        if lookup is None:
            return total
        served = lookup.served_tokens(encoded)
        return total - served + self._served_billed(served)

    def _billed(
        self,
        embedded: Embedded | None,
        lookup: _Lookup | None,
        prompt_tokens: int,
        finish_reason: str,
    ) -> types_pb2.TokenUsage:
        if embedded is None:
            if finish_reason == "cancelled" and lookup is not None:
                # Its caller left: billed the inputs it set computing (they run on and
                # are stored), not the ones it waited for and never received.
                return token_usage(lookup.computing_tokens, 0)
            return token_usage(prompt_tokens, 0)
        served = self._served_billed(embedded.served_tokens)
        return token_usage(embedded.computed_tokens + served, 0)

    async def _lookup(
        self, context: Context, call: Request, encoded: list[list[int]], field: int
    ) -> _Lookup | None:
        """Reads what the cache and requests in flight hold of the inputs (None: the
        cache is off, or the request asked `no-store`)."""
        stage = self.admission.cache
        if stage is None:
            return None
        mode = cache_stage.client_mode(request_headers(context), field)
        if not mode.write:
            return None
        keys = [input_key(stage.config, call, ids) for ids in encoded]
        if not mode.read:
            return _Lookup(keys, {}, {}, read=False)
        unique = list(dict.fromkeys(keys))
        found = await _read_cache(stage, unique)
        pending = stage.embedding_inputs.pending
        awaited = {k: pending[k] for k in unique if k not in found and k in pending}
        return _Lookup(keys, found, awaited, read=True)

    async def _vectors(
        self,
        target: Target,
        embedder: Embedder,
        encoded: list[list[int]],
        lookup: _Lookup | None,
    ) -> Embedded:
        stage = self.admission.cache
        total = sum(len(ids) for ids in encoded)
        if stage is None:
            return Embedded(list(await embedder.embed(encoded)), total, 0, "")
        model = target.model.name
        if lookup is None:
            CACHE_REQUESTS.labels(model, BYPASS).inc()
            EMBEDDING_INPUTS.labels(model, "computed").inc(len(encoded))
            return Embedded(list(await embedder.embed(encoded)), total, 0, BYPASS)
        return await self._through_cache(stage, embedder, model, lookup, encoded)

    async def _through_cache(
        self,
        stage: CacheStage,
        embedder: Embedder,
        model: str,
        lookup: _Lookup,
        encoded: list[list[int]],
    ) -> Embedded:
        inputs = stage.embedding_inputs
        keys = lookup.keys
        found = dict(lookup.found)
        hits = set(found)
        awaited = dict(lookup.awaited)
        unique = list(dict.fromkeys(keys))
        if lookup.read:  # started by another request while this one reserved its budget
            awaited.update(
                (k, inputs.pending[k])
                for k in unique
                if k not in found and k not in awaited and k in inputs.pending
            )
        mine = [k for k in unique if k not in found and k not in awaited]
        if mine:
            lookup.computing_tokens = sum(len(encoded[keys.index(k)]) for k in mine)
            awaited.update(
                self._start(stage, embedder, mine, {k: encoded[keys.index(k)] for k in mine})
            )
        for key, future in awaited.items():
            found[key] = await asyncio.shield(future)
        counts = {"hit": 0, "coalesced": 0, "computed": 0}
        computed_tokens = served_tokens = 0
        for key, ids in zip(keys, encoded, strict=True):
            result = "hit" if key in hits else "computed" if key in mine else "coalesced"
            counts[result] += 1
            if result == "computed":
                computed_tokens += len(ids)
            else:
                served_tokens += len(ids)
        for result, count in counts.items():
            if count:
                EMBEDDING_INPUTS.labels(model, result).inc(count)
        status = MISS if mine else COALESCED if counts["coalesced"] else HIT
        CACHE_REQUESTS.labels(model, status).inc()
        return Embedded([found[k] for k in keys], computed_tokens, served_tokens, status)

    def _start(
        self,
        stage: CacheStage,
        embedder: Embedder,
        keys: list[str],
        encoded: dict[str, list[int]],
    ) -> dict[str, asyncio.Future[np.ndarray]]:
        """Embeds `keys`' inputs in a task of their own; returns their futures."""
        inputs = stage.embedding_inputs
        loop = asyncio.get_running_loop()
        futures = {k: loop.create_future() for k in keys}
        inputs.pending.update(futures)

        async def compute() -> None:
            try:
                vectors = await embedder.embed([encoded[k] for k in keys])
            except BaseException as exc:
                for future in futures.values():
                    if not future.done():
                        future.set_exception(exc)
                    future.exception()  # retrieved: a request that left is no warning
                _forget_pending(inputs, futures)
                if not isinstance(exc, Exception):
                    raise
                return
            values = {k: np.asarray(v, dtype=_DTYPE) for k, v in zip(keys, vectors, strict=True)}
            for key, future in futures.items():
                future.set_result(values[key])
            try:  # pending until stored: a request arriving meanwhile still finds them
                await stage.store.put_many({k: v.tobytes() for k, v in values.items()})
            finally:
                _forget_pending(inputs, futures)
                inputs.stored += 1

        inputs.keep(asyncio.create_task(compute()))
        return futures


def _forget_pending(
    inputs: EmbeddingInputs, futures: dict[str, asyncio.Future[np.ndarray]]
) -> None:
    """Drops the pending entries these futures still hold (another computation of an input,
    a `no-cache` request's, may have taken its entry since: left, it stays findable)."""
    for key, future in futures.items():
        if inputs.pending.get(key) is future:
            del inputs.pending[key]


async def _read_cache(stage: CacheStage, keys: list[str]) -> dict[str, np.ndarray]:
    """Returns the cached vectors of `keys` (those found).

    Read again (at most READ_ATTEMPTS times) while computations stored inputs during
    the read: a read sent before another request's store landed, and back after that
    request stopped listing its inputs as pending, found them in neither place, and
    the inputs were computed twice.
    """
    inputs = stage.embedding_inputs
    found: dict[str, np.ndarray] = {}
    missing = keys
    for _ in range(READ_ATTEMPTS):
        stored = inputs.stored
        entries = await stage.store.get_many(missing)
        found.update(
            (k, np.frombuffer(e, _DTYPE))
            for k, e in zip(missing, entries, strict=True)
            if e is not None
        )
        missing = [k for k in missing if k not in found]
        if not missing or inputs.stored == stored:
            break
    return found


def embedding_pb(
    index: int, vector: np.ndarray, tokens: int, truncated: bool, as_bytes: bool
) -> inference_pb2.Embedding:
    """Returns one embedding: float values, or little-endian float32 bytes."""
    embedding = inference_pb2.Embedding(index=index, prompt_tokens=tokens, truncated=truncated)
    if as_bytes:
        embedding.base64 = np.asarray(vector, dtype="<f4").tobytes()
    else:
        embedding.values.extend(vector.tolist())
    return embedding


def _check_dimensions(request: pb.EmbedRequest, size: int) -> None:
    """Refuses a request for vectors of another size than the model's, before any work
    (an OpenAI batch line asking for them was computed and billed, then failed)."""
    if request.HasField("dimensions") and request.dimensions != size:
        raise InvalidArgument(
            [FieldViolation("dimensions", f"must be {size} for this model (or left out)")]
        )
