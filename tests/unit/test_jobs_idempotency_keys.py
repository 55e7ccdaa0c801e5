"""CreateJob refuses the idempotency keys OpenAI batch creations use.

Both APIs key one namespace of a key's jobs (`tm:jobs:idem:<key>:<key>`): a job
created with `openai-batch:nightly-1` made `POST /openai/v1/batches` with
`Idempotency-Key: nightly-1` answer 404 "No such batch" for its create, every try.
"""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.jobs.validation import BATCH_IDEMPOTENCY_PREFIX, validate_create
from tokenmesh.inference.v2 import inference_service_pb2 as v2
from tokenmesh.jobs.v1 import jobs_pb2
from tokenmesh.jobs.v1 import jobs_service_pb2 as pb


def _create(idempotency_key: str) -> pb.CreateJobRequest:
    item = jobs_pb2.JobItem(complete=v2.CompleteRequest(model="m", prompt="a"))
    return pb.CreateJobRequest(items=[item], idempotency_key=idempotency_key)


def test_a_batch_creations_idempotency_key_is_refused():
    with pytest.raises(InvalidArgument) as refused:
        validate_create(_create(f"{BATCH_IDEMPOTENCY_PREFIX}nightly-1"), 10)
    assert [v.field for v in refused.value.violations] == ["idempotency_key"]


@pytest.mark.parametrize("key", ["", "nightly-1", "batch-2024-06-01", "openai-batches:1"])
def test_other_idempotency_keys_are_accepted(key):
    validate_create(_create(key), 10)
