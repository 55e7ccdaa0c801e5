"""Mid-upgrade: a jobs service of this release calling a worker of the one before.

This release's jobs service sends each item's deadline (x-tokenmesh-replay-until)
and a v1 hand-over's API version (x-tokenmesh-api-version); a
worker of the release before refuses any header of a delegated call but the
identity ones (PERMISSION_DENIED, DELEGATED_HEADER_NOT_ALLOWED), and that refusal
was final: every item picked for an old worker failed while a rollout ran. The item
is tried again at once without the header. A real worker (made to check delegated
headers as the release before did), real Redis, real mTLS.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis.asyncio as aioredis

from services.core import contract
from services.core.pki import IdentityFiles
from services.core.server import serving
from services.inference.service import InferenceService
from services.jobs.execution import Backoff, ItemExecutor
from services.jobs.workers import WorkerDirectory
from services.router.registry import WORKERS_KEY, WorkerEntry
from tests import mtls
from tests.conftest import private_db_url
from tests.integration.conftest import inference_settings
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2

PRIVATE_DB = 13  # no jobs service of the session mesh reads it


async def test_an_item_picked_for_a_worker_of_the_release_before_still_runs(
    tmp_path, redis_url, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(contract, "DELEGATED_HEADERS", contract.IDENTITY_HEADERS)
    url = private_db_url(redis_url, PRIVATE_DB)
    client = aioredis.from_url(url)
    settings = inference_settings(tmp_path, url, test_models=("deterministic-test:1",))
    executor = ItemExecutor(
        WorkerDirectory(client), IdentityFiles.of(mtls.pki_dir(), contract.JOBS), Backoff(), 30
    )
    key = f"key_{uuid.uuid4().hex[:8]}"
    identity = {
        contract.KEY_ID_HEADER: key,
        contract.SCOPES_HEADER: "inference:generate",
        contract.API_VERSION_HEADER: "v1",  # a v1 hand-over's: not for the release before
    }
    item = jobs_pb2.JobItem(
        complete=v2.CompleteRequest(model="deterministic-test", prompt="hi", max_output_tokens=3)
    )
    worker_id = f"w-old-{uuid.uuid4().hex[:6]}"
    try:
        async with serving(InferenceService(settings), settings) as server:
            models = (("deterministic-test", "1"),)
            entry = WorkerEntry(
                worker_id, "127.0.0.1", server.port, models, lease_expires_at=time.time() + 600
            )
            await client.hset(WORKERS_KEY, worker_id, entry.to_json())
            outcome = await executor.run(item, 0, "job-mixed:0", identity, time.time() + 30)
    finally:
        await client.hdel(WORKERS_KEY, worker_id)
        await executor.close()
        await client.aclose()
    assert outcome.result.WhichOneof("outcome") == "complete", outcome.result
    assert outcome.usage[1] == 3
