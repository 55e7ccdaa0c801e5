"""The named services a public Health/Check may still ask the workers about
(gateway/edge_health.py) are the workers' public services, and never a model's."""

from __future__ import annotations

from gateway import edge_health
from gateway.model_routing import model_health_name
from services.inference import service


def test_the_public_health_names_are_the_workers_public_services():
    # A service the workers add must be added here too (or stay NOT_FOUND at the
    # edge); the admin service is no public caller's business.
    public = {service.SERVICE_NAME, service.v2.SERVICE_NAME, service.openai.SERVICE_NAME}
    assert set(edge_health.WORKER_SERVICES) == public
    assert service.ADMIN_SERVICE_NAME not in edge_health.WORKER_SERVICES


def test_no_public_health_name_is_a_model_versions():
    per_version = model_health_name("m", "1")
    assert all("/" not in name for name in edge_health.WORKER_SERVICES)
    assert per_version.rsplit("/", 2)[0] in edge_health.WORKER_SERVICES  # its prefix is
    for name in edge_health.WORKER_SERVICES:
        assert f'["{name}"] = true' in edge_health.LUA_FUNCTION
