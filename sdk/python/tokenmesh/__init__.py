"""tokenmesh: generated gRPC stubs (tokenmesh.<service>.v<N>) and a thin client.

The stubs mirror the proto packages; `tokenmesh.client` wraps the inference
API with timeouts, credentials and decoded error details.
"""

from tokenmesh.client import (
    CLIENT_DEFAULT,
    Client,
    DeadlineExceeded,
    Stream,
    TokenmeshRpcError,
    V1Client,
)

__all__ = [
    "CLIENT_DEFAULT",
    "Client",
    "DeadlineExceeded",
    "Stream",
    "TokenmeshRpcError",
    "V1Client",
]
