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
from pathlib import Path

import pytest

from services.core import contract
from tests.integration.conftest import jobs_worker
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2

PRIVATE_DB = 13  # no jobs service of the session mesh reads it


async def test_an_item_picked_for_a_worker_of_the_release_before_still_runs(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(contract, "DELEGATED_HEADERS", contract.IDENTITY_HEADERS)
    key = f"key_{uuid.uuid4().hex[:8]}"
    identity = {
        contract.KEY_ID_HEADER: key,
        contract.SCOPES_HEADER: "inference:generate",
        contract.API_VERSION_HEADER: "v1",  # a v1 hand-over's: not for the release before
    }
    item = jobs_pb2.JobItem(
        complete=v2.CompleteRequest(model="deterministic-test", prompt="hi", max_output_tokens=3)
    )
    async with jobs_worker(tmp_path, redis_url, PRIVATE_DB) as worker:
        outcome = await worker.executor.run(item, 0, "job-mixed:0", identity, time.time() + 30)
    assert outcome.result.WhichOneof("outcome") == "complete", outcome.result
    assert outcome.usage[1] == 3
