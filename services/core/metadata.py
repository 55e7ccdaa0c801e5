"""A call's request metadata, read once per RPC.

grpc.aio's `invocation_metadata()` builds new tuples of new strings from
the C-core's metadata on every call, and an inference RPC from the edge read
it five or six times (caller rules, rate limit, allowed models, routing):
~11% of a worker's GIL time per call in py-spy (`--gil`, ListModels with the
edge's headers). The first read keeps it in a context variable of the RPC's
task (each RPC runs in a task of its own), keyed by the call's context
object, so a later read in the same call is a lookup and a read for another
call never sees it. A task started during a call inherits the entry (and
keeps that call's context alive until it ends); it matches only that call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from services.core import contract


class RequestMetadata:
    """RequestMetadata is one call's request metadata, read once; each view of it is
    built on first use (a rate-limit call needs only `edge_keys`).

    Attributes:
        headers: lower-case names to text values (binary `-bin` values left
            out; a repeated name keeps its last value). Shared by every reader
            of the call: never modify it.
        edge_keys: the names (as sent) that carry the edge's prefix, binary
            ones included (only the edge may send any).
    """

    __slots__ = ("_edge_keys", "_headers", "_pairs")

    def __init__(self, pairs: Sequence[tuple[str, str | bytes]]) -> None:
        self._pairs = pairs
        self._headers: dict[str, str] | None = None
        self._edge_keys: tuple[str, ...] | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        if self._headers is None:
            self._headers = {k.lower(): v for k, v in self._pairs if isinstance(v, str)}
        return self._headers

    @property
    def edge_keys(self) -> tuple[str, ...]:
        if self._edge_keys is None:
            prefix = contract.EDGE_HEADER_PREFIX
            self._edge_keys = tuple(k for k, _ in self._pairs if k.lower().startswith(prefix))
        return self._edge_keys


_CURRENT: ContextVar[tuple[object, RequestMetadata] | None] = ContextVar(
    "tokenmesh_request_metadata", default=None
)


def request_metadata(context: Any) -> RequestMetadata:
    """Returns the call's metadata (read from grpc on the first use in the call)."""
    call = _underlying(context)
    cached = _CURRENT.get()
    if cached is not None and cached[0] is call:
        return cached[1]
    parsed = RequestMetadata(call.invocation_metadata() or ())
    _CURRENT.set((call, parsed))
    return parsed


def _underlying(context: Any) -> Any:
    """Returns grpc's context under the wrappers that add behaviour to it (each keeps
    the one it wraps as `_context`), so every layer of one call shares one entry."""
    while True:
        inner = getattr(context, "__dict__", {}).get("_context")
        if inner is None:
            return context
        context = inner
