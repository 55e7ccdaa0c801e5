"""Streaming load clients, spread over processes (one Python client process
reads only a few thousand stream messages per second)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from bench.peers import Peer
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc


@dataclass
class StreamRecord:
    """StreamRecord is what one client saw of one Generate call."""

    start: float
    end: float = 0.0
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # between consecutive messages
    tokens: int = 0
    messages: int = 0
    ok: bool = True
    opening: bool = False  # a stream's first call: with several streams, part of a burst


# Concurrent streams of identical requests stay in lockstep (same length, same
# finishing step), so every round would arrive as one burst. Real traffic
# varies: each call gets its own seed and a length within +-SPREAD of the
# request's max_tokens (same mean), which staggers the closed loop after the
# opening round, as a benchmark over a dataset of varied requests does.
SPREAD = 16


def variant(request: pb.GenerateRequest, stream: int, repeat: int) -> pb.GenerateRequest:
    varied = pb.GenerateRequest()
    varied.CopyFrom(request)
    varied.seed = request.seed + 1000 * stream + repeat
    offset = (7 * stream + 11 * repeat) % (2 * SPREAD + 1) - SPREAD
    varied.max_tokens = max(1, request.max_tokens + offset)
    return varied


Metadata = tuple[tuple[str, str], ...]


async def _one_stream(
    stub: Any,
    request: pb.GenerateRequest,
    repeats: int,
    deadline: float,
    stream: int,
    cut: bool,
    metadata: Metadata = (),
) -> list[StreamRecord]:
    """Calls Generate back to back until `repeats` calls or the deadline.

    cut: the deadline also ends the call in flight (its tokens up to then
    count), so a run measures a window of sustained load, not the drain of
    the last calls.
    """
    records = []
    for repeat in range(repeats):
        if time.monotonic() > deadline:
            break
        record = StreamRecord(start=time.monotonic(), opening=repeat == 0)
        last = record.start
        call = stub.Generate(variant(request, stream, repeat), timeout=120, metadata=metadata)
        try:
            async for message in call:
                now = time.monotonic()
                if cut and now > deadline:
                    call.cancel()
                    break
                if record.messages == 0:
                    record.ttft = now - record.start
                else:
                    record.gaps.append(now - last)
                last = now
                record.messages += 1
                record.tokens += len(message.token_ids)
        except grpc.aio.AioRpcError:
            record.ok = False
        record.end = min(time.monotonic(), deadline) if cut else time.monotonic()
        if record.messages or not cut:
            records.append(record)
    return records


async def _client(
    target: Peer,
    streams: range,
    repeats: int,
    request: pb.GenerateRequest,
    budget_s: float,
    cut: bool,
    metadata: Metadata = (),
) -> list[StreamRecord]:
    deadline = time.monotonic() + budget_s
    async with target.aio_channel() as channel:
        stub = rpc.InferenceServiceStub(channel)
        results = await asyncio.gather(
            *(
                _one_stream(stub, request, repeats, deadline, stream, cut, metadata)
                for stream in streams
            )
        )
    return [r for records in results for r in records]


def _process_main(
    args: tuple[Peer, range, int, bytes, float, float, bool, Metadata, frozenset[int] | None],
) -> tuple[list[StreamRecord], float]:
    """One client process: returns its records and the CPU seconds its load took."""
    target, streams, repeats, raw_request, start_at, budget_s, cut, metadata, cores = args
    if cores:  # before gRPC starts its threads: they inherit it
        os.sched_setaffinity(0, cores)
    request = pb.GenerateRequest.FromString(raw_request)
    time.sleep(max(0.0, start_at - time.monotonic()))  # all processes start together
    cpu = time.process_time()
    records = asyncio.run(_client(target, streams, repeats, request, budget_s, cut, metadata))
    return records, time.process_time() - cpu


def run_streams(
    target: Peer,
    concurrency: int,
    repeats: int,
    request: pb.GenerateRequest,
    processes: int = 2,
    budget_s: float = 60.0,
    window: bool = False,
) -> list[StreamRecord]:
    """Runs `concurrency` streams (each `repeats` calls, bounded by `budget_s`) over processes.

    Each client process opens one channel to `target` (mTLS as the edge when
    the peer has a PKI) and runs its share of the streams on it.

    window: measure exactly `budget_s` of sustained load (calls in flight at
    the end are cut there; the tokens they got count).
    """
    return run_streams_measured(target, concurrency, repeats, request, processes, budget_s, window)[
        0
    ]


def run_streams_measured(
    target: Peer,
    concurrency: int,
    repeats: int,
    request: pb.GenerateRequest,
    processes: int = 2,
    budget_s: float = 60.0,
    window: bool = False,
    metadata: Metadata = (),
    cores: frozenset[int] | None = None,
) -> tuple[list[StreamRecord], float]:
    """Runs the streams as `run_streams` does; returns the records and the client
    processes' CPU seconds during the load.

    metadata: sent with every call. cores: where the client processes run
    (bench.pinning); None: where this process runs.
    """
    processes = max(1, min(processes, concurrency))
    shares = [
        concurrency // processes + (1 if i < concurrency % processes else 0)
        for i in range(processes)
    ]
    firsts = [sum(shares[:i]) for i in range(processes)]
    start_at = time.monotonic() + 1.0
    raw = request.SerializeToString()
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        parts = pool.map(
            _process_main,
            [
                (
                    target,
                    range(first, first + n),
                    repeats,
                    raw,
                    start_at,
                    budget_s,
                    window,
                    metadata,
                    cores,
                )
                for first, n in zip(firsts, shares, strict=True)
            ],
        )
    records = [record for part, _ in parts for record in part]
    return records, sum(cpu for _, cpu in parts)
