"""A worker's registration while the router cannot be reached (real gRPC channel)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.core import contract
from services.core.identity import ClientChannel
from services.core.tasks import Supervisor
from services.inference.registration import ROUTER_CHANNEL_OPTIONS, Registration
from services.launcher.processes import reserve_port


async def test_an_unreachable_router_is_logged_with_the_connection_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Heartbeats wait for the channel (so one is sent the moment the router is back),
    # and such a call fails with only "Deadline Exceeded": the warning an operator
    # reads lost the refused connection (or the failed TLS handshake) behind it.
    nobody = f"127.0.0.1:{reserve_port()}"
    router = ClientChannel(nobody, None, contract.ROUTER, ROUTER_CHANNEL_OPTIONS)
    registration = Registration(router, "w1", "127.0.0.1:1", lambda: [("m", "1")])
    supervisor = Supervisor("inference")
    caplog.set_level(logging.WARNING, logger="services.inference.registration")
    registration.start(supervisor)
    try:
        async with asyncio.timeout(15):
            while not any("registration failed" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.05)
    finally:
        await supervisor.stop()
        await registration.stop()
    message = next(
        r.getMessage() for r in caplog.records if "registration failed" in r.getMessage()
    )
    assert "UNAVAILABLE" in message and nobody in message, message
