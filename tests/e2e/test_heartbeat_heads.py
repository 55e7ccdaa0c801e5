"""What a worker's heartbeats tell the router about its hot prompt heads and prefix
cache: the router fits the heads it pins into the workers' caches by them
(services.router.prefix_pins)."""

from __future__ import annotations

import uuid

from tests.e2e.test_jobs import wait_until
from tests.e2e.test_routing import prefix_key
from tokenmesh.inference.v1 import inference_service_pb2 as pb
from tokenmesh.inference.v1 import inference_service_pb2_grpc as rpc
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.router.v1 import router_service_pb2_grpc as router_rpc

MODEL = "demo-lm"
DEFAULT_PREFIX_CACHE_TOKENS = 4096  # TOKENMESH_PREFIX_CACHE_TOKENS' default


def test_heartbeats_carry_each_hot_heads_prompt_length_and_the_cache_size(mesh, channel):
    head = f"{uuid.uuid4().hex}: a system prompt that many questions share, past 64 bytes."
    key = prefix_key(head)  # the edge's x-tokenmesh-prefix
    stub = rpc.InferenceServiceStub(channel)
    prompt_tokens = {
        stub.Complete(
            pb.CompleteRequest(model=MODEL, prompt=f"{head} q{i}", max_tokens=1), timeout=30
        ).usage.prompt_tokens
        for i in range(4)
    }

    def reported() -> dict[str, tuple[int, int]]:
        """head -> (its prompt tokens, the version's prefix cache size), per the router."""
        with mesh.channel("router") as router:
            listed = router_rpc.WorkerRegistryServiceStub(router).ListWorkers(
                router_pb.ListWorkersRequest(), timeout=10
            )
        return {
            h.prefix: (h.prompt_tokens, v.prefix_cache_tokens)
            for w in listed.workers
            for v in w.load.versions
            if v.model.name == MODEL
            for h in v.hot_prefixes
        }

    found = wait_until(lambda: reported().get(key), 20, "the head in a heartbeat")
    tokens, cache = found
    assert tokens in prompt_tokens and cache == DEFAULT_PREFIX_CACHE_TOKENS
