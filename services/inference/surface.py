"""The API version a request came through, as the one inference implementation sees it.

tokenmesh.inference.v2's servicer implements both inference API versions: the
v1 servicer translates its requests and responses onto it
(services.inference.v1_translation). Besides the messages, what differs per
version is small and lives here: what the usage event records (API version
and RPC name) and whether every token's log-probability is worth computing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ApiSurface:
    """ApiSurface is one API version of an inference service.

    Args:
        api_version: "v1" or "v2", recorded in usage events (and reports grouped by it).
        service: the full gRPC service name; usage events record `/{service}/{method}`.
        token_logprobs: whether each generated token's log-probability is computed
            when the request did not ask for logprobs (v2 reports a per-choice
            confidence from them; v1 has no field to show one, so it skips that
            softmax per token).
    """

    api_version: str
    service: str
    token_logprobs: bool = True

    def rpc(self, method: str) -> str:
        """Returns the full RPC name of `method`, as usage events record it."""
        return f"/{self.service}/{method}"
