"""Merges workers' descriptions of their models into one per name (no engine imports:
the router merges them too, services.router.served_models)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenmesh.inference.v2 import inference_pb2

_STATE = inference_pb2.ModelVersionState
# Which description of a version wins when workers disagree: the one that can serve.
_RANK = {
    _STATE.MODEL_VERSION_STATE_READY: 4,
    _STATE.MODEL_VERSION_STATE_LOADING: 3,
    _STATE.MODEL_VERSION_STATE_UNLOADING: 2,
    _STATE.MODEL_VERSION_STATE_FAILED: 1,
}


def version_key(version: str) -> tuple[int, int | str]:
    """Orders version labels: numbers by value, before other labels."""
    return (0, int(version)) if version.isdigit() else (1, version)


def merge(models: Iterable[inference_pb2.Model]) -> dict[str, inference_pb2.Model]:
    """Merges descriptions of models (several per name: one per worker) into one per name.

    A version described more than once keeps the description in the best
    state (READY, then LOADING, UNLOADING, FAILED; the first of equals). The
    default version is the newest READY one (else the newest), as a worker's
    own registry resolves it; the model's kind and description are those of
    the description that holds it.
    """
    versions: dict[str, dict[str, inference_pb2.ModelVersion]] = {}
    holders: dict[tuple[str, str], inference_pb2.Model] = {}
    for model in models:
        known = versions.setdefault(model.name, {})
        for version in model.versions:
            current = known.get(version.version)
            if current is None or _RANK.get(version.state, 0) > _RANK.get(current.state, 0):
                known[version.version] = version
                holders[(model.name, version.version)] = model
    merged = {}
    for name, known in versions.items():
        ordered = [known[v] for v in sorted(known, key=version_key)]
        if not ordered:
            continue  # described without versions: nothing serves it
        ready = [v for v in ordered if v.state == _STATE.MODEL_VERSION_STATE_READY]
        default = (ready or ordered)[-1].version
        holder = holders[(name, default)]
        merged[name] = inference_pb2.Model(
            name=name,
            kind=holder.kind,
            default_version=default,
            description=holder.description,
            versions=ordered,
        )
    return merged
