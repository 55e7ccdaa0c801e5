"""A worker that registers a host name gets IP endpoints at the edge (real Redis, a real
router build, and Envoy's own check of the endpoints)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.launcher.mesh import envoy_binary
from services.router.addresses import HostResolver
from services.router.catalog import Catalog
from services.router.registry import WorkerEntry, WorkerRegistry
from services.router.service import RouterService, RouterSettings
from services.router.snapshot import EdgeFlags
from tests import mtls

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
MODEL = ("m", "1")


def _endpoints(assignment: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        endpoint["endpoint"]["address"]["socket_address"]
        for group in assignment.get("endpoints", [])
        for endpoint in group["lb_endpoints"]
    ]


def _envoy_accepts(
    assignments: list[dict[str, Any]], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Runs Envoy's config check on static clusters holding these endpoints."""
    clusters = [
        {"name": a["cluster_name"], "type": "STATIC", "load_assignment": a} for a in assignments
    ]
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps({"static_resources": {"clusters": clusters}}))
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_worker_host_name_becomes_an_ip_endpoint_and_an_unknown_one_is_left_out(
    registry_url: str, tmp_path: Path
):
    # Every edge rejected the whole endpoint update: "malformed IP address: localhost".
    client = aioredis.from_url(registry_url)
    registry = WorkerRegistry(client, lease_s=30)
    router = RouterService(
        RouterSettings(pki_dir=mtls.pki_dir(), metrics_port=-1, redis_url=registry_url)
    )
    try:
        for worker, address in (
            ("named", "localhost:1001"),
            ("unknown", "no-such-host.invalid:1002"),
            ("literal", "10.0.0.3:1003"),
        ):
            await registry.register(worker, address, [MODEL], time.time())
        await Catalog(client).register([MODEL])
        (built,) = await router._build([EdgeFlags()])
    finally:
        await router.redis.aclose()
        await client.aclose()
    assignments = list(built.by_type[EDS].values())
    inference = next(a for a in assignments if a["cluster_name"] == "inference")
    hosts = sorted((e["address"], e["port_value"]) for e in _endpoints(inference))
    assert hosts == [("10.0.0.3", 1003), ("127.0.0.1", 1001)]
    for assignment in assignments:
        for endpoint in _endpoints(assignment):
            ipaddress.ip_address(endpoint["address"])  # raises for a name
    checked = _envoy_accepts(assignments, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_names_are_looked_up_together_and_a_failure_is_not_asked_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
):
    # Builds run every poll under one lock: one lookup after the other, and each
    # failed name asked again at every build, held them all up while DNS was down.
    loop = asyncio.get_running_loop()
    real, asked, concurrent, peak = loop.getaddrinfo, [], [0], [0]

    async def counted(host: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        concurrent[0] += 1
        peak[0] = max(peak[0], concurrent[0])
        try:
            await asyncio.sleep(0.05)
            return await real(host, *args, **kwargs)
        finally:
            concurrent[0] -= 1

    monkeypatch.setattr(loop, "getaddrinfo", counted)
    resolver = HostResolver()
    workers = [
        WorkerEntry("a", "localhost", 1, (MODEL,)),
        WorkerEntry("b", "no-such-host.invalid", 2, (MODEL,)),
    ]
    first = await resolver.with_ip_hosts(workers)
    assert [(w.worker_id, w.host) for w in first] == [("a", "127.0.0.1")]
    assert peak[0] == 2  # both at once
    await resolver.with_ip_hosts(workers)
    assert sorted(asked) == ["localhost", "no-such-host.invalid"]  # neither asked again
