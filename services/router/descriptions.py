"""A worker's stored model descriptions (RenewLeaseRequest.served_models), decoded.

The registry keeps each description as base64 of a serialized
tokenmesh.inference.v2.Model (services/router/registry.py `WorkerEntry.served`);
the heartbeat's answer merges them (services/router/served_models.py), and the
registry keeps only those a worker's pool may serve (by their model's name).
"""

from __future__ import annotations

import base64
import binascii
import functools

from google.protobuf.message import DecodeError

from tokenmesh.inference.v2 import inference_pb2

# Kept: parsed descriptions (a model's versions on one worker), for meshes of
# hundreds of workers.
DECODED_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=DECODED_CACHE_SIZE)
def decoded(stored: str) -> inference_pb2.Model | None:
    """Returns a stored description parsed (None: unreadable)."""
    try:
        return inference_pb2.Model.FromString(base64.b64decode(stored))
    except (binascii.Error, DecodeError):
        return None


def model_of(stored: str) -> str:
    """Returns the name of the model a stored description describes ("": unreadable)."""
    model = decoded(stored)
    return model.name if model is not None else ""
