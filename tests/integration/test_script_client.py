"""The rate limiter's lean Redis client against a real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.launcher.mesh import spawn_redis
from services.usage.script_client import ScriptClient, ScriptUnavailable
from tests.conftest import private_db_url

ECHO_INCR = "return {ARGV[1], redis.call('INCRBY', KEYS[1], tonumber(ARGV[2]))}"


async def test_concurrent_calls_get_their_own_replies(redis_url):
    client = ScriptClient(private_db_url(redis_url, 4), ECHO_INCR)
    try:
        replies = await asyncio.gather(
            *(client(keys=["script-client:n"], args=[f"caller-{i}", 1]) for i in range(200))
        )
        assert [r[0] for r in replies] == [f"caller-{i}".encode() for i in range(200)]
        assert sorted(r[1] for r in replies)[-1] - sorted(r[1] for r in replies)[0] == 199
        check = aioredis.from_url(private_db_url(redis_url, 4))
        assert int(await check.get("script-client:n")) >= 200  # db 4, not the default db
        await check.aclose()
    finally:
        await client.close()


async def test_redis_down_is_unavailable_and_back_up_works_again(tmp_path: Path):
    child, url = spawn_redis(tmp_path / "data", tmp_path / "redis.log")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    client = ScriptClient(url, ECHO_INCR, timeout_s=0.5)
    try:
        assert await client(keys=["k"], args=["a", 2]) == [b"a", 2]
        child.terminate()
        child.wait(10)
        with pytest.raises(ScriptUnavailable):
            await client(keys=["k"], args=["b", 1])
        child, _ = spawn_redis(tmp_path / "data", tmp_path / "redis.log", port=port)
        assert await client(keys=["k"], args=["c", 1]) == [b"c", 3]  # AOF kept the 2
    finally:
        await client.close()
        child.terminate()
        child.wait(10)


async def test_a_silent_redis_times_out_every_waiting_call():
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts and reads, never answers
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ScriptClient(f"redis://127.0.0.1:{port}/0", ECHO_INCR, timeout_s=0.2)
    try:
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(
            *(client(keys=["k"], args=[f"c{i}", 1]) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, ScriptUnavailable) for r in results), results
        assert asyncio.get_running_loop().time() - started < 1.0  # one timer, not one per call
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_a_caller_that_gives_up_does_not_shift_the_others_replies(redis_url):
    client = ScriptClient(redis_url, ECHO_INCR)
    try:
        await client(keys=["script-client:m"], args=["connect", 1])
        first = asyncio.ensure_future(client(keys=["script-client:m"], args=["first", 1]))
        others = [client(keys=["script-client:m"], args=[f"o{i}", 1]) for i in range(20)]
        await asyncio.sleep(0)  # `first` is written and awaits its reply; the others are held
        first.cancel()
        replies = await asyncio.gather(*others)
        assert [r[0] for r in replies] == [f"o{i}".encode() for i in range(20)]
    finally:
        await client.close()
