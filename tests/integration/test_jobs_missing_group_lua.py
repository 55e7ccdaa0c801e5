"""A job lane's stream expired after it was retired: the runner's heartbeat script
then meets a missing consumer group. Redis before 7 (the bundled 6.2) wraps that
NOGROUP in a generic "Error running script" reply, which `is_missing_group` did not
recognise: the heartbeat raised, its maintain task failed and restarted every round,
and the lost items were never cancelled."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.jobs import runner
from services.jobs import store as jobstore


async def test_the_heartbeat_script_on_a_missing_group_reads_as_missing(redis_url):
    client = aioredis.from_url(redis_url)
    try:
        keep_owned = client.register_script(runner._KEEP_OWNED)
        stream = f"tm:jobs:work:gone-{uuid.uuid4().hex}"
        with pytest.raises(ResponseError) as caught:
            await keep_owned(keys=[stream], args=[jobstore.GROUP, "consumer-1", "1-0"])
        assert jobstore.is_missing_group(caught.value), str(caught.value)
    finally:
        await client.aclose()
