"""Job items for sunset model versions: refused at once as the edge refuses them.

Items never pass the edge's model routes (CreateJob, OpenAI batches and
respond-async Completes reach the jobs service), so its sunset routes never
answered them: an item naming a sunset version ran on a worker still loading
it, and one naming no version of a fully retired model waited out its job's
window and ended EXPIRED. A real worker (still loading every version) and a
real Redis (the catalogue and registry) here; the edge's answer is the
router's own route for the same catalogue.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from gateway.model_routing import MODEL_HEADER, VERSION_HEADER
from services.core import contract
from services.core.pki import IdentityFiles
from services.core.server import serving
from services.inference.service import InferenceService
from services.jobs.execution import Backoff, ItemExecutor
from services.jobs.workers import WorkerDirectory
from services.router import snapshot
from services.router.catalog import CATALOG_KEY, ModelEntry, VersionEntry
from services.router.registry import WORKERS_KEY, WorkerEntry
from tests import mtls
from tests.integration.conftest import inference_settings
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2

MODEL = "deterministic-test"  # version 1 sunset, version 2 serving
RETIRED = "retired-test"  # its only version sunset
SUNSET_AT = float(int(time.time()) - 3600)
CATALOGUE = {
    MODEL: ModelEntry(
        MODEL,
        versions=(
            VersionEntry("1", 100, deprecated_at=SUNSET_AT - 60, sunset_at=SUNSET_AT),
            VersionEntry("2", 0),
        ),
        aliases={"old": "1"},
    ),
    RETIRED: ModelEntry(
        RETIRED,
        versions=(VersionEntry("1", 100, deprecated_at=SUNSET_AT - 60, sunset_at=SUNSET_AT),),
    ),
}


@pytest.fixture
async def executor(tmp_path: Path, own_redis: str) -> AsyncIterator[ItemExecutor]:
    """An executor and a worker loading every version of both models (as one still does
    after their sunsets), registered and catalogued in a Redis of their own."""
    client = aioredis.from_url(own_redis)
    served = ((MODEL, "1"), (MODEL, "2"), (RETIRED, "1"))
    models = tuple(f"{name}:{version}" for name, version in served)
    settings = inference_settings(tmp_path, own_redis, test_models=models)
    running = ItemExecutor(
        WorkerDirectory(client),
        IdentityFiles.of(mtls.pki_dir(), contract.JOBS),
        Backoff(0.05, 0.2),
        call_timeout_s=30,
    )
    try:
        async with serving(InferenceService(settings), settings) as server:
            worker = WorkerEntry(
                "w0", "127.0.0.1", server.port, served, lease_expires_at=time.time() + 600
            )
            await client.hset(WORKERS_KEY, "w0", worker.to_json())
            for name, entry in CATALOGUE.items():
                await client.hset(CATALOG_KEY, name, entry.to_json())
            yield running
    finally:
        await running.close()
        await client.aclose()


def edge_reply(model: str, label: str) -> str:
    """The edge's 404 text for a request naming `label` ("" for none) of `model`: the
    body of the route the router builds for it from the same catalogue."""
    routes = snapshot.model_routes(CATALOGUE[model], CATALOGUE, time.time())
    for route in (r for r in routes if "direct_response" in r):
        matched = route["match"]["headers"]
        headers = {h["name"]: h.get("string_match", {}).get("exact") for h in matched}
        if headers.get(MODEL_HEADER) == model and headers.get(VERSION_HEADER) == (label or None):
            body: str = route["direct_response"]["body"]["inline_string"]
            return body
    raise AssertionError(f"no route for {model}@{label!r}")


def item(model: str, version: str) -> jobs_pb2.JobItem:
    request = v2.CompleteRequest(model=model, version=version, prompt="a b", max_output_tokens=1)
    return jobs_pb2.JobItem(complete=request)


async def run(executor: ItemExecutor, model: str, version: str) -> jobs_pb2.JobResult:
    # A short deadline: an item that waited for a worker instead raises DeadlinePassed.
    outcome = await executor.run(
        item(model, version),
        0,
        f"job-{uuid.uuid4().hex}:0",
        {contract.KEY_ID_HEADER: "k", contract.SCOPES_HEADER: "inference:generate"},
        deadline_s=time.time() + 3,
    )
    return outcome.result


@pytest.mark.parametrize(
    ("model", "version"),
    [(MODEL, "1"), (MODEL, "old"), (RETIRED, "1"), (RETIRED, ""), (RETIRED, "latest")],
)
async def test_an_item_for_a_sunset_version_fails_not_found_with_the_edges_text(
    executor: ItemExecutor, model: str, version: str
) -> None:
    result = await run(executor, model, version)
    assert result.WhichOneof("outcome") == "error", result
    assert result.error.code == grpc.StatusCode.NOT_FOUND.name
    assert result.error.grpc_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert result.error.message == edge_reply(model, version)
    assert executor.waiting == 0


@pytest.mark.parametrize("version", ["", "2", "latest"])
async def test_an_item_for_a_serving_version_runs_there(
    executor: ItemExecutor, version: str
) -> None:
    # "latest" is the newest version serving, as at the edge (it went to a worker
    # as the version "latest", which chose for itself).
    result = await run(executor, MODEL, version)
    assert result.WhichOneof("outcome") == "complete", result
    assert result.complete.model.version == "2"
