"""A call's metadata is parsed once per call and never seen by another call."""

from __future__ import annotations

import asyncio

from services.core.interceptors import AnnouncingContext
from services.core.metadata import RequestMetadata, request_metadata


class CallContext:
    """Stands in for grpc's servicer context: only what request_metadata reads."""

    def __init__(self, *metadata: tuple[str, str | bytes]) -> None:
        self.metadata = metadata
        self.reads = 0

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        self.reads += 1
        return self.metadata


def test_names_are_lower_cased_and_binary_values_left_out_but_edge_keys_kept():
    parsed = RequestMetadata(
        [("X-Tokenmesh-Key-Id", "key_1"), ("x-tokenmesh-trace-bin", b"\x00"), ("te", "trailers")]
    )
    assert dict(parsed.headers) == {"x-tokenmesh-key-id": "key_1", "te": "trailers"}
    assert parsed.edge_keys == ("X-Tokenmesh-Key-Id", "x-tokenmesh-trace-bin")


def test_one_call_parses_once_through_its_wrappers():
    call = CallContext(("x-tokenmesh-tenant", "acme"))
    wrapped = AnnouncingContext(call, (("x-ratelimit-limit", "10"),))
    for context in (call, wrapped, call):
        assert request_metadata(context).headers["x-tokenmesh-tenant"] == "acme"
    assert call.reads == 1


def test_concurrent_calls_each_see_their_own_metadata():
    async def handle(tenant: str, started: asyncio.Event, other: asyncio.Event) -> list[str]:
        call = CallContext(("x-tokenmesh-tenant", tenant))
        seen = [request_metadata(call).headers["x-tokenmesh-tenant"]]
        started.set()
        await other.wait()  # the other call parses its own in between
        seen.append(request_metadata(call).headers["x-tokenmesh-tenant"])
        return seen

    async def main() -> list[list[str]]:
        a, b = asyncio.Event(), asyncio.Event()
        return list(await asyncio.gather(handle("a", a, b), handle("b", b, a)))

    assert asyncio.run(main()) == [["a", "a"], ["b", "b"]]


def test_another_call_in_the_same_task_is_parsed_afresh():
    first, second = (
        CallContext(("x-tokenmesh-tenant", "a")),
        CallContext(("x-tokenmesh-tenant", "b")),
    )
    assert request_metadata(first).headers["x-tokenmesh-tenant"] == "a"
    assert request_metadata(second).headers["x-tokenmesh-tenant"] == "b"
    assert request_metadata(first).headers["x-tokenmesh-tenant"] == "a"
