"""Router replicas start each control-plane build from the prefix pins any of them stored
last (Redis): a replica that restarted, or built from other reports, pins a hot prompt
head where the others did instead of sending it to another worker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.router.catalog import Catalog
from services.router.pin_store import PinStore
from services.router.registry import HotPrefix, VersionCounts, WorkerRegistry
from services.router.service import RouterService, RouterSettings
from services.router.snapshot import EdgeFlags
from tests import mtls
from tests.conftest import private_db_url

PINS_DB = 12  # this test's workers, catalogue and pins only
MODEL = ("m", "1")
A, B = "10.0.0.1:1001", "10.0.0.2:1002"
HEADS = [f"{i:02x}" * 8 for i in range(4)]


@pytest.fixture
async def url(redis_url: str) -> AsyncIterator[str]:
    url = private_db_url(redis_url, PINS_DB)
    client = aioredis.from_url(url)
    await client.flushdb()
    yield url
    await client.flushdb()
    await client.aclose()


async def _report(
    registry: WorkerRegistry, heat: dict[str, dict[str, tuple[float, float]]]
) -> None:
    """Each worker's heartbeat with its hot heads: head -> (decayed requests, seconds ago)."""
    now = time.time()
    for worker, heads in heat.items():
        hot = tuple(HotPrefix(head, n, now - ago) for head, (n, ago) in heads.items())
        await registry.renew(worker, [MODEL], now, None, [VersionCounts(*MODEL, hot_prefixes=hot)])


async def _pins(replica: RouterService) -> dict[str, str]:
    (built,) = await replica._build([EdgeFlags()])
    return dict(built.pins[MODEL])


def _replica(url: str) -> RouterService:
    return RouterService(RouterSettings(pki_dir=mtls.pki_dir(), metrics_port=-1, redis_url=url))


async def test_a_fresh_replica_starts_from_the_pins_another_stored(url: str):
    client = aioredis.from_url(url)
    registry, first, restarted = WorkerRegistry(client, lease_s=30), _replica(url), None
    try:
        for worker, address in (("w-a", A), ("w-b", B)):
            await registry.register(worker, address, [MODEL], time.time())
        await Catalog(client).register([MODEL])
        # HEADS[0]'s requests arrived at b: pinned there (the split is within the balance's gain).
        await _report(
            registry,
            {
                "w-a": {HEADS[1]: (50, 0.1)},
                "w-b": {HEADS[0]: (10, 0.1), HEADS[2]: (30, 0.1), HEADS[3]: (20, 0.1)},
            },
        )
        pinned = await _pins(first)
        assert pinned == {HEADS[0]: B, HEADS[1]: A, HEADS[2]: B, HEADS[3]: B}
        # Now a reports more of HEADS[0]'s recent heat (say the hash spilled it there).
        # From the reports alone it would go to a; from the last pins it stays on b.
        await _report(
            registry,
            {
                "w-a": {HEADS[0]: (9, 0.3), HEADS[1]: (50, 0.1)},
                "w-b": {HEADS[0]: (1, 0.1), HEADS[2]: (30, 0.1), HEADS[3]: (20, 0.1)},
            },
        )
        assert await _pins(first) == pinned
        # Another replica (or this one after a restart) pins it alike.
        restarted = _replica(url)
        assert await _pins(restarted) == pinned
        assert (await PinStore(client).load())[MODEL] == pinned
    finally:
        for replica in (first, restarted):
            if replica is not None:
                await replica.redis.aclose()
        await client.aclose()


@pytest.mark.parametrize(
    "stored",
    [
        b"{not json",
        b'{"m": 1}',
        b'[["m", "1"]]',
        b'[["m", "1", {"head": 7}]]',
        b"\xff\xfe",
        b"[" * 100_000,  # json.loads raises RecursionError, not a ValueError
    ],
    ids=["not-json", "not-a-list", "short-entry", "non-string-address", "not-utf8", "too-deep"],
)
async def test_unreadable_stored_pins_read_as_none_and_builds_go_on(
    url: str, stored: bytes, caplog: pytest.LogCaptureFixture
):
    """A value that does not parse must not stop the builds (and every edge's updates):
    it reads as no pins, logged, and the build's own pins replace it."""
    client = aioredis.from_url(url)
    registry, replica = WorkerRegistry(client, lease_s=30), _replica(url)
    try:
        for worker, address in (("w-a", A), ("w-b", B)):
            await registry.register(worker, address, [MODEL], time.time())
        await Catalog(client).register([MODEL])
        await _report(registry, {"w-a": {HEADS[0]: (10, 0.1)}, "w-b": {HEADS[1]: (10, 0.1)}})
        await client.set("tokenmesh:router:prefix-pins", stored)
        assert await PinStore(client).load() == {}
        assert "unreadable prefix pins" in caplog.text
        pinned = {HEADS[0]: A, HEADS[1]: B}
        assert await _pins(replica) == pinned
        assert (await PinStore(client).load())[MODEL] == pinned
    finally:
        await replica.redis.aclose()
        await client.aclose()
