"""What each worker serves, as it describes it, and the mesh's models a heartbeat answers.

A worker's heartbeat describes its models (RenewLeaseRequest.served_models);
the registry keeps them in the worker's entry, and the answer carries every
other routable worker's, merged (services.inference.mesh_models), so any
worker can answer ListModels and GetModel for the whole mesh.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from services.core.errors import FieldViolation, InvalidArgument
from services.inference.model_merge import merge
from services.router.catalog import check_name, check_version
from services.router.registry import WorkerEntry
from tokenmesh.inference.v2 import inference_pb2

logger = logging.getLogger(__name__)

# The most a heartbeat's descriptions may take (every entry is read at every
# heartbeat): hundreds of versions' worth.
MAX_BYTES = 64 * 1024
_READY = inference_pb2.ModelVersionState.MODEL_VERSION_STATE_READY


def served_from_pb(worker_id: str, models: Sequence[inference_pb2.Model]) -> tuple[str, ...]:
    """Returns a heartbeat's descriptions as the registry stores them; none (the last
    ones stay) when a name or version is malformed or they take over MAX_BYTES.

    Never a refusal: a worker whose heartbeat is refused stops heartbeating and
    leaves the mesh, and its descriptions only serve other workers' lookups.
    """
    encoded = tuple(m.SerializeToString() for m in models)
    try:
        if sum(len(m) for m in encoded) > MAX_BYTES:
            raise InvalidArgument(
                [FieldViolation("served_models", f"must take at most {MAX_BYTES} bytes")]
            )
        for model in models:
            check_name(model.name)
            for version in model.versions:
                check_version(version.version, "served_models.versions.version")
    except InvalidArgument as exc:
        logger.warning("worker %s: its model descriptions are left out: %s", worker_id, exc)
        return ()
    return tuple(base64.b64encode(m).decode("ascii") for m in encoded)


def mesh_models(workers: Sequence[WorkerEntry]) -> list[inference_pb2.Model]:
    """Returns the models of `workers`, merged, by name. A worker that described none
    (one from before descriptions) counts with its model versions, READY."""
    described: list[inference_pb2.Model] = []
    for worker in workers:
        if not worker.served:
            described += [
                inference_pb2.Model(
                    name=name,
                    default_version=version,
                    versions=[inference_pb2.ModelVersion(version=version, state=_READY)],
                )
                for name, version in worker.models
            ]
            continue
        for stored in worker.served:
            try:
                described.append(inference_pb2.Model.FromString(base64.b64decode(stored)))
            except (binascii.Error, DecodeError):
                logger.warning(
                    "worker %s: a stored model description is unreadable", worker.worker_id
                )
    merged = merge(described)
    return [merged[name] for name in sorted(merged)]
