"""No usage record lost when Redis loses writes it had acknowledged.

The worker's spool used to forget an event as soon as Redis acknowledged its
XADD: a Redis restarted empty, or a failover to a replica that had not received
the writes yet, lost the event for good (5 served, 0 metered; 10 served, 5
metered). Now the spool keeps each event until the meter's applied mark (written
in Redis by the script that applies the event) has covered it for a grace
period, and ships again what Redis lost. Real redis-server processes (the
bundled one), a real worker or UsageLog, the real Meter.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from services.core.tasks import Supervisor
from services.inference import usage_log
from services.inference.usage_log import UsageLog, spool_mark_key
from services.launcher.mesh import redis_server_binary
from services.launcher.processes import reserve_port
from services.usage.meter import (
    Meter,
    Retention,
    bucket_key,
    bucket_start,
    entry_mark,
    next_bucket,
)
from tests.integration.conftest import inference_settings, start_inference
from tokenmesh.inference.v1 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.inference.v2 import inference_service_pb2_grpc as rpc

STREAM = "tokenmesh:usage"
GROUP = "usage-meter"
MODEL = "deterministic-test"
FINISHED_MS = int(time.time() * 1000)  # every event of a test in one month bucket


class RedisServer:
    """A bundled redis-server on a fixed port, killed (-9) and started again at will."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.directory, self.options = directory, options
        self.port = reserve_port()
        self.child: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [str(redis_server_binary()), "--bind", "127.0.0.1", "--port", str(self.port)]
        argv += ["--dir", str(self.directory), "--save", "", "--daemonize", "no", *self.options]
        with open(self.directory / "log", "ab") as log:
            self.child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert self.child.poll() is None, (self.directory / "log").read_text()
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.02)  # noqa: TID251 - polling a child process's start
        client.close()

    def kill(self) -> None:
        """kill -9: what it had not written to its AOF (or anything, without one) is gone."""
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGKILL)
            self.child.wait(10)

    def restart_empty(self) -> None:
        self.kill()
        shutil.rmtree(self.directory)
        self.start()

    def sync(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


@pytest.fixture
def servers() -> Iterator[list[RedisServer]]:
    """The Redis servers a test starts (all killed at its end)."""
    started: list[RedisServer] = []
    yield started
    for server in started:
        server.kill()


def _server(servers: list[RedisServer], directory: Path, *options: str) -> RedisServer:
    server = RedisServer(directory, *options)
    servers.append(server)
    server.start()
    return server


class Forwarder:
    """A TCP forwarder: a Redis endpoint that fails over (`switch`), or a replication
    link that can stop passing the master's writes (`hold`: a lagging replica)."""

    def __init__(self, target: int) -> None:
        self.target, self.hold = target, False
        self.port = reserve_port()
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Forwarder:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        self._drop()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def switch(self, target: int) -> None:
        """Points new connections at `target` and cuts the open ones (as a failover does)."""
        self.target = target
        self._drop()

    def _drop(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        for pump in (self._pump(reader, up_writer, False), self._pump(up_reader, writer, True)):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, holdable: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await source.read(65536):
                while holdable and self.hold:
                    await asyncio.sleep(0.01)
                sink.write(data)
                await sink.drain()
        sink.close()


def _event(i: int) -> inference_pb2.UsageEvent:
    event = inference_pb2.UsageEvent(
        request_id=f"req-{i}",
        event_id=f"req-{i}",
        key_id="k1",
        tenant="t1",
        finish_reason="stop",
        rpc="Generate",
        finish_unix_ms=FINISHED_MS,
    )
    event.model.name, event.model.version = MODEL, "1"
    event.usage.prompt_tokens, event.usage.completion_tokens = 10, 20
    return event


async def _metered(client: aioredis.Redis) -> int:
    """Returns the requests the mesh-wide month buckets count (all models), from
    FINISHED_MS's month to this one. A real worker stamps its events when they
    finish, not at FINISHED_MS (taken when the module was collected): a run that
    crosses a month's end (a suite started late on the 31st) metered them in the
    next month, and FINISHED_MS's month alone read 0. Each test has a Redis of its
    own, so nothing else is in these buckets."""
    total, start = 0, bucket_start(FINISHED_MS / 1000, "month")
    while start <= time.time():
        totals: Any = await client.hgetall(bucket_key("all", "month", start))  # loosely typed
        total += sum(int(v) for k, v in totals.items() if k.endswith(b"|requests"))
        start = next_bucket(start, "month")
    return total


async def _meter_everything(url: str) -> int:
    """Runs a usage replica's meter (as the service starts it) until the stream holds
    nothing new; returns what the aggregates count then."""
    client = aioredis.from_url(url)
    try:
        meter = Meter(client, STREAM, GROUP, "usage-0", Retention(), claim_idle_s=0.1)
        await meter.ensure_group()
        await meter.recover_own()
        await meter.claim_stale()
        while await meter.run_once(block_ms=100):
            pass
        return await _metered(client)
    finally:
        await client.aclose()


async def _until(
    condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


async def _stream_holds(url: str, count: int) -> None:
    """Waits until the usage stream of the Redis at `url` holds `count` entries."""
    client = aioredis.from_url(url, socket_timeout=2)

    async def holds() -> bool:
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            return int(await client.xlen(STREAM)) >= count
        return False

    try:
        await _until(holds, f"the usage stream holds {count} entries")
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _spool(directory: Path, url: str) -> AsyncIterator[UsageLog]:
    """A worker's UsageLog, shipping (as the worker runs it)."""
    client = aioredis.from_url(url, socket_timeout=2)
    log = UsageLog(directory, client, STREAM, 1 << 20, lock_wait_s=5)
    log.start(Supervisor("inference-test"))
    try:
        yield log
    finally:
        await log.stop(timeout_s=1)
        await client.aclose()


async def _shipped(log: UsageLog) -> None:
    async def done() -> bool:
        return log.backlog_bytes() == 0

    await _until(done, "the spool shipped everything")


# ------------------------------------------------------------ (a) Redis comes back empty


@pytest.mark.parametrize(
    "worker_restarts", [False, True], ids=["worker-runs-on", "worker-restarts"]
)
async def test_redis_restarted_empty_before_metering_loses_no_request(
    tmp_path: Path, servers: list[RedisServer], worker_restarts: bool
) -> None:
    # No persistence: what a lost volume, or compose's `down`/`up`, gives.
    store = _server(servers, tmp_path / "redis", "--appendonly", "no")
    await _meter_everything(store.url)  # the usage service made its group at start
    settings = inference_settings(tmp_path, store.url, usage_stream=STREAM)
    async with await start_inference(settings) as (service, channel):
        stub = rpc.InferenceServiceStub(channel)
        for i in range(5):
            await stub.Complete(
                pb.CompleteRequest(model=MODEL, prompt=f"p{i}", max_output_tokens=3)
            )
        await _shipped(service.usage_log)
        await _stream_holds(store.url, 5)  # acknowledged by Redis ...
        store.restart_empty()  # ... which comes back with nothing
        if not worker_restarts:
            await _stream_holds(store.url, 5)  # shipped again by the running worker
    if worker_restarts:
        async with await start_inference(settings):
            await _stream_holds(store.url, 5)  # shipped again from the spool at start
    assert await _meter_everything(store.url) == 5


# ------------------------------------ (b) the totals lost too; nothing lost: nothing again


async def test_lost_totals_are_restored_and_nothing_is_shipped_again_when_nothing_was_lost(
    tmp_path: Path, servers: list[RedisServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_log, "MARKS_INTERVAL_S", 0.05)
    # The launcher's persistence: an acknowledged write survives a kill -9.
    store = _server(servers, tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    async with _spool(tmp_path / "spool" / "w0", store.url) as log:
        log.applied_grace_s = 30.0
        # Redis loses everything, its totals included, right after the meter applied
        # the events: the spool still holds them (within the grace) and ships them
        # again, and the meter (its seen-markers gone too) counts them once.
        for i in range(5):
            log.append(_event(i))
        await _shipped(log)
        assert await _meter_everything(store.url) == 5
        store.restart_empty()
        await _stream_holds(store.url, 5)
        assert await _meter_everything(store.url) == 5

        # A Redis that loses nothing (restarted from its AOF) gets nothing again;
        # the spool forgets what the meter applied once the grace is over.
        log.applied_grace_s = 0.3
        for i in range(5, 10):
            log.append(_event(i))
        await _shipped(log)
        assert await _meter_everything(store.url) == 10
        store.kill()
        store.start()
        await _until(lambda: _async(log.kept_bytes() == 0), "the spool forgot what was applied")
        assert store.sync().xlen(STREAM) == 10  # the 5 shipped again, the 5 new: no more
        assert log.reshipped_total == 5
        assert await _meter_everything(store.url) == 10  # nothing counted twice


# -------------------------------------------------- (c) failover to a replica that lagged


@pytest.mark.parametrize("detected_by", ["marks", "next-batch"])
async def test_a_failover_to_a_lagging_replica_loses_no_request(
    tmp_path: Path,
    servers: list[RedisServer],
    monkeypatch: pytest.MonkeyPatch,
    detected_by: str,
) -> None:
    if detected_by == "next-batch":
        # The worker finds the loss when it ships its next batch (the ship script's
        # check), not by its periodic read of the marks.
        monkeypatch.setattr(usage_log, "MARKS_INTERVAL_S", 3600.0)
    durable = ("--appendonly", "yes", "--appendfsync", "always")
    master = _server(servers, tmp_path / "master", *durable)
    async with Forwarder(master.port) as link, Forwarder(master.port) as endpoint:
        replica = _server(
            servers, tmp_path / "replica", *durable, "--replicaof", "127.0.0.1", str(link.port)
        )
        await _until(
            lambda: _async(replica.sync().info("replication")["master_link_status"] == "up"),
            "the replica is in sync",
        )
        async with _spool(tmp_path / "spool" / "w0", f"redis://127.0.0.1:{endpoint.port}/0") as log:
            for i in range(5):
                log.append(_event(i))
            await _shipped(log)
            assert await _meter_everything(master.url) == 5
            await _until(
                lambda: _async(_replicated(master.sync(), replica.sync())),
                "the replica has every write",
            )
            link.hold = True  # the replica falls behind
            for i in range(5, 10):
                log.append(_event(i))
            await _shipped(log)  # acknowledged by the master
            assert await _meter_everything(master.url) == 10  # and even metered there
            master.kill()
            replica.sync().execute_command("REPLICAOF", "NO", "ONE")  # what Sentinel does
            endpoint.switch(replica.port)
            expected = 10
            if detected_by == "next-batch":
                log.append(_event(10))
                expected = 11
            await _stream_holds(replica.url, expected)
            assert await _meter_everything(replica.url) == expected
            assert log.reshipped_total == 5


def _replicated(master: redis.Redis, replica: redis.Redis) -> bool:
    offset = master.info("replication")["master_repl_offset"]
    return bool(replica.info("replication")["master_repl_offset"] == offset)


async def _async(value: bool) -> bool:
    return value


# ------------------------------------------------------------- what the spool keeps


async def test_the_spool_keeps_what_the_meter_has_not_applied(
    tmp_path: Path, servers: list[RedisServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_log, "_SEGMENT_BYTES", 200)  # a new segment every few events
    monkeypatch.setattr(usage_log, "MARKS_INTERVAL_S", 0.05)
    store = _server(servers, tmp_path / "redis", "--appendonly", "no")
    directory = tmp_path / "spool" / "w0"
    async with _spool(directory, store.url) as log:
        log.applied_grace_s = 0.3
        for i in range(30):
            log.append(_event(i))
        await _shipped(log)
        segments = sorted(directory.glob("events.*.log"))
        assert len(segments) >= 5  # shipped, none applied: all kept
        assert await _meter_everything(store.url) == 30
        await _until(
            lambda: _async(len(list(directory.glob("events.*.log"))) == 1),
            "the applied segments were forgotten",
        )
        assert log.reshipped_total == 0


async def test_a_meter_down_for_long_does_not_fill_the_disk_or_refuse_work(
    tmp_path: Path, servers: list[RedisServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_log, "_SEGMENT_BYTES", 1024)
    store = _server(servers, tmp_path / "redis", "--appendonly", "no")
    directory = tmp_path / "spool" / "w0"
    bound = 8 * 1024
    client = aioredis.from_url(store.url)
    log = UsageLog(directory, client, STREAM, bound, lock_wait_s=5)
    log.start(Supervisor("inference-test"))
    try:
        for i in range(400):  # ~20 KiB: over twice the bound, all shipped, none applied
            log.check_capacity()  # never refused: everything reaches the stream
            log.append(_event(i))
            if i % 20 == 0:
                await _shipped(log)
        await _shipped(log)
        on_disk = sum(p.stat().st_size for p in directory.glob("events.*.log"))
        assert bound - 2048 <= on_disk <= bound + 2048  # keeps up to the bound, no more
        assert await _meter_everything(store.url) == 400  # all in the stream
    finally:
        await log.stop()
        await client.aclose()


# ------------------------------------------------------------------ the meter's marks


async def test_the_meter_raises_each_spools_applied_mark_and_never_lowers_it(
    tmp_path: Path, servers: list[RedisServer]
) -> None:
    store = _server(servers, tmp_path / "redis", "--appendonly", "no")
    client = aioredis.from_url(store.url)
    try:
        for spool, position, i in [("a.1", 100, 0), ("b.1", 40, 1), ("a.1", 150, 2)]:
            event = _event(i).SerializeToString()
            fields = {"request_id": f"req-{i}", "event": event, "spool": spool, "pos": position}
            await client.xadd(STREAM, fields)  # type: ignore[arg-type]
        await client.xadd(STREAM, {"request_id": "old", "event": _event(3).SerializeToString()})
        assert await _meter_everything(store.url) == 4  # one batch, an unmarked entry included
        marks = [spool_mark_key(STREAM, spool, "applied") for spool in ("a.1", "b.1")]
        assert await client.mget(marks) == [b"150", b"40"]
        # A replay of an older entry (applied one by one) counts once and lowers nothing.
        meter = Meter(client, STREAM, GROUP, "usage-1", Retention())
        mark = entry_mark(STREAM, {b"spool": b"a.1", b"pos": b"100"})
        assert mark == (marks[0], 100)
        assert not await meter.apply("0-1", _event(0), None, mark)
        assert await client.mget(marks) == [b"150", b"40"]
        assert await _metered(client) == 4
    finally:
        await client.aclose()
