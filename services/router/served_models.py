"""What each worker serves, as it describes it, and the mesh's models a heartbeat answers.

A worker's heartbeat describes its models (RenewLeaseRequest.served_models);
the registry keeps them in the worker's entry, and the answer carries every
other routable worker's, merged (services.inference.mesh_models), so any
worker can answer ListModels and GetModel for the whole mesh.
"""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import Mapping, Sequence

from services.core.errors import FieldViolation, InvalidArgument
from services.inference.model_merge import merge
from services.router.catalog import check_name, check_version, pools_admit
from services.router.descriptions import decoded, model_of
from services.router.registry import WorkerEntry
from tokenmesh.inference.v2 import inference_pb2

logger = logging.getLogger(__name__)

# The most a heartbeat's descriptions may take (every entry is read at every
# heartbeat): hundreds of versions' worth.
MAX_BYTES = 64 * 1024
_READY = inference_pb2.ModelVersionState.MODEL_VERSION_STATE_READY
# Kept: merges (one per worker: each merges the others'), for meshes of hundreds of
# workers (parsed descriptions are kept by services.router.descriptions).
MERGED_CACHE_SIZE = 1024


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


def mesh_models(
    workers: Sequence[WorkerEntry], placements: Mapping[str, frozenset[str]] | None = None
) -> list[inference_pb2.Model]:
    """Returns the models of `workers`, merged, by name. A worker that described none
    (one from before descriptions) counts with its model versions, READY.

    placements: the worker pools of each placed model; a worker's description of a
    placed model counts only from a worker of one of its pools (another pool's
    worker described phantom versions and a made-up description of it to every
    worker's ListModels and GetModel).
    """
    # Every heartbeat merges every other worker's: N x N a heartbeat period in a
    # large mesh (~3 ms a heartbeat at 100 workers). What they describe rarely
    # changes, so the merge of each set of descriptions is kept.
    placed = placements or {}
    return list(_merged(tuple(_described(worker, placed) for worker in workers)))


# What a worker says it serves: ("served", its descriptions) or ("models", its versions).
Described = tuple[str, tuple[str, ...] | tuple[tuple[str, str], ...]]


def _described(worker: WorkerEntry, placements: Mapping[str, frozenset[str]]) -> Described:
    if worker.served:
        served = worker.served
        if placements:  # what nothing is placed on needs no look at the names
            served = tuple(
                item for item in served if pools_admit(placements.get(model_of(item)), worker.pool)
            )
        return ("served", served)
    models = worker.models
    if placements:
        models = tuple(m for m in models if pools_admit(placements.get(m[0]), worker.pool))
    return ("models", models)


@functools.lru_cache(maxsize=MERGED_CACHE_SIZE)
def _merged(workers: tuple[Described, ...]) -> tuple[inference_pb2.Model, ...]:
    described: list[inference_pb2.Model] = []
    for kind, items in workers:
        for item in items:
            if isinstance(item, tuple):  # a version of a worker that described none
                name, version = item
                ready = inference_pb2.ModelVersion(version=version, state=_READY)
                described.append(
                    inference_pb2.Model(name=name, default_version=version, versions=[ready])
                )
            elif (model := decoded(item)) is not None:
                described.append(model)
            else:
                logger.warning("a stored model description (%s) is unreadable", kind)
    merged = merge(described)
    return tuple(merged[name] for name in sorted(merged))
