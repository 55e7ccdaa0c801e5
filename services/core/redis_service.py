"""Base for services whose state lives in Redis (auth, router, usage), and reply helpers."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from services.core.redis_health import RedisHealthMonitor
from services.core.server import RunningServer, Service
from services.core.settings import RedisSettings
from services.core.tasks import HealthGate, Supervisor


def text(reply: bytes | str) -> str:
    """Returns a Redis reply as str (clients here do not decode responses)."""
    return reply.decode() if isinstance(reply, bytes) else reply


# KEYS: stream. ARGV: group, idle ms, this consumer.
# Deletes the group's consumers that have no pending entry and have been idle at
# least `idle ms` (never this one); returns their names. Consumer names are
# replicas' (pods'): every restart left one in the group for good. One script: a
# consumer that read an entry between the look and the delete would lose it
# (XGROUP DELCONSUMER drops its pending entries, which then no claim finds). A
# stream or group that is gone has no consumer to delete. Used by the usage
# meter and the jobs runner.
FORGET_IDLE_CONSUMERS = """
local gone = {}
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers['err'] then return gone end
for _, consumer in ipairs(consumers) do
  local f = {}
  for i = 1, #consumer, 2 do f[consumer[i]] = consumer[i + 1] end
  if f['name'] ~= ARGV[3] and tonumber(f['pending']) == 0
     and tonumber(f['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    gone[#gone + 1] = f['name']
  end
end
return gone
"""

# Lua that sets `now` to Redis's clock in ms, for scripts that score shared windows:
# one clock for every replica (services.usage.ratelimit._SLIDING_WINDOWS says why).
# replicate_commands lets a Redis 6 script write after TIME; Redis 7 ignores it.
LUA_REDIS_NOW_MS = """
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""


def known_fields(record: type[Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the entries of a stored record that dataclass `record` has fields for.

    Fields a newer replica added are left out: mid-upgrade, the older replicas
    raised on them (TypeError) at every read, and every build or tick that read
    the record stopped.
    """
    known = record.__dataclass_fields__
    return {k: v for k, v in data.items() if k in known}


class RedisBackedService(Service):
    """RedisBackedService is SERVING only while its Redis answers and its tasks run.

    Subclasses start their background loops with `self.tasks.spawn(...)` and
    stop them before calling `super().stop()`.
    """

    def __init__(self, settings: RedisSettings) -> None:
        self.redis = aioredis.from_url(settings.redis_url, socket_timeout=2.0)
        self.health = HealthGate()
        self.tasks = Supervisor(self.name, self.health)
        self.monitor = RedisHealthMonitor(self.redis, self.health)

    def service_names(self) -> Sequence[str]:
        raise NotImplementedError

    async def start(self, running: RunningServer) -> None:
        self.health.attach(functools.partial(running.set_serving, self.service_names()))
        await self.monitor.start(self.tasks)

    async def report_serving(self, running: RunningServer) -> None:
        """Turns SERVING once started unless a health condition fails now: a condition
        that failed before or during start (Redis away) was overridden with SERVING."""
        await running.set_serving(self.service_names(), serving=self.health.serving)

    async def stop(self) -> None:
        await self.tasks.stop()
        await self.monitor.stop()
