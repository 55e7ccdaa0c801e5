"""ListApiKeys pages a tenant's keys newest first, as it does every key (real Redis)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from services.auth.crypto import ServerSecret
from services.auth.keys import ApiKeyStore
from tokenmesh.auth.v1 import auth_pb2


async def test_a_tenants_keys_are_listed_newest_first_page_after_page(own_redis: str) -> None:
    """A tenant's listing came out in the order of its keys' random ids: an admin
    looking for a tenant's latest keys got a shuffled view, and a key created while
    paging could land on a page already read."""
    client: Any = aioredis.from_url(own_redis)
    try:
        store = ApiKeyStore(client, ServerSecret(b"s" * 32))
        created = []
        for n in range(8):
            key, _ = await store.create(
                "acme", f"k{n}", ["models:read"], [], auth_pb2.KeyLimits(), None
            )
            created.append(key.id)
            # Distinct creation times (the listing's order): spread them a second apart.
            await client.zadd("tm:auth:keys", {key.id: 1_800_000_000 + n})
        await store.create("globex", "other", ["models:read"], [], auth_pb2.KeyLimits(), None)
        listed, token = [], ""
        for _ in range(5):
            page, token = await store.list("acme", 3, token)
            listed += [key.id for key in page]
            if not token:
                break
        assert listed == created[::-1]
    finally:
        await client.aclose()
