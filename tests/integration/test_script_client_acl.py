"""The rate limiter's lean Redis client logs in as the ACL user its URL names."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.launcher.mesh import spawn_redis
from services.usage.script_client import ScriptClient, ScriptError

INCR = "return redis.call('INCRBY', KEYS[1], tonumber(ARGV[1]))"


async def test_a_url_with_a_username_authenticates_as_that_acl_user(tmp_path: Path) -> None:
    # A Redis of its own: ACL users are server-wide state.
    child, url = spawn_redis(tmp_path / "data", tmp_path / "redis.log", durable=False)
    admin = aioredis.from_url(url)
    # The limiter's user may touch only its own keys: which user ran the script shows.
    await admin.execute_command("ACL", "SETUSER", "limiter", "on", ">s3cr&t", "~rl:*", "+@all")
    client = ScriptClient(url.replace("redis://", "redis://limiter:s3cr%26t@"), INCR)
    try:
        assert await client(keys=["rl:n"], args=[2]) == 2
        assert await admin.get("rl:n") == b"2"
        with pytest.raises(ScriptError, match="NOPERM"):
            await client(keys=["other"], args=[1])  # not "default", who may touch any key
    finally:
        await client.close()
        await admin.aclose()
        child.terminate()
        child.wait(10)
