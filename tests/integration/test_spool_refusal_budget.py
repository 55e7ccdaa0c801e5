"""A usage event the worker's spool refuses (a full disk) still settles its reservation.

The spool's append raising (ENOSPC, EMFILE on a segment's roll) skipped the
reconcile that follows it: the request's reservation (prompt + max_tokens)
stayed charged to the key's month and listed under a live holder, which no
reaper takes back while the worker lives. A real worker and Redis; the disk's
refusal is the one thing made up (the spool's file write raises ENOSPC).
"""

from __future__ import annotations

import asyncio
import errno
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.inference.budget import TokenBudgets
from tests.integration.conftest import inference_settings, start_inference
from tests.integration.test_grace_cut_billing import _identity, _month_used
from tokenmesh.inference.v1 import inference_service_pb2 as v1_pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc


class _FullDisk:
    """A spool segment's file whose writes fail as on a full disk."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


async def _open_reservations(client: Any) -> int:
    """How many reservations the holders list as open (reconciling one unlists it)."""
    return sum([await client.hlen(k) async for k in client.scan_iter(match="tm:budget:open:*")])


async def test_a_request_whose_usage_event_the_spool_refused_is_reconciled(
    tmp_path: Path, redis_url: str
) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    settings = inference_settings(tmp_path, redis_url, test_engine_step_ms=1.0)
    async with await start_inference(settings) as (service, channel):
        budgets = TokenBudgets(service.redis)
        service.usage_log._log = _FullDisk(service.usage_log._log)  # noqa: SLF001
        request = v1_pb.CompleteRequest(model="deterministic-test", prompt="a b c", max_tokens=50)
        with pytest.raises(grpc.aio.AioRpcError):
            await v1_rpc.InferenceServiceStub(channel).Complete(request, metadata=_identity(key))
        async with asyncio.timeout(10):  # reconciled in the background
            while await _open_reservations(service.redis):
                await asyncio.sleep(0.02)
        # Charged what it used (its tokens were computed), not left at its reservation.
        assert await _month_used(budgets, key) > 0
