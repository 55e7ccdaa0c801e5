"""Every service exposes Prometheus metrics."""

from __future__ import annotations

import httpx

from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc


def test_each_service_serves_metrics(mesh):
    for name in ("auth", "router", "usage", "inference-0", "inference-1"):
        reply = httpx.get(f"http://127.0.0.1:{mesh.ports[f'{name}-metrics']}/metrics", timeout=5)
        assert reply.status_code == 200
        assert "tokenmesh_rpc_total" in reply.text


def test_rpc_counter_counts_by_method_and_code(mesh):

    with mesh.channel("inference-0", caller="edge") as channel:
        stub = rpc.InferenceServiceStub(channel)
        stub.ListModels(pb.ListModelsRequest(), timeout=5)
    text = httpx.get(
        f"http://127.0.0.1:{mesh.ports['inference-0-metrics']}/metrics", timeout=5
    ).text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith("tokenmesh_rpc_total{") and "ListModels" in line and 'code="OK"' in line
    )
    assert float(line.rsplit(" ", 1)[1]) >= 1


def _api_requests(text: str, labels: str) -> float:
    prefix = f"tokenmesh_api_requests_total{{{labels}}} "
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_requests_are_counted_by_api_version_and_rpc(mesh):
    url = f"http://127.0.0.1:{mesh.ports['inference-0-metrics']}/metrics"
    v1_labels = 'api="inference",api_version="v1",rpc="ListModels"'
    v2_labels = 'api="inference",api_version="v2",rpc="ListModels"'
    before = httpx.get(url, timeout=5).text
    with mesh.channel("inference-0", caller="edge") as channel:
        rpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
        v2_list = channel.unary_unary("/tokenmesh.inference.v2.InferenceService/ListModels")
        v2_list(b"", timeout=5)
    after = httpx.get(url, timeout=5).text
    assert _api_requests(after, v1_labels) - _api_requests(before, v1_labels) == 1
    assert _api_requests(after, v2_labels) - _api_requests(before, v2_labels) == 1
