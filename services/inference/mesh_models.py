"""The models the whole mesh serves, for ListModels and GetModel on any worker.

The edge sends ListModels and GetModel to any worker (they name no model to
route by, and a route by model would hide a LOADING or FAILED version: its
clusters hold healthy workers only). A worker knows only its own models, so
in a mesh whose workers serve different models or versions (a canary on one
worker, an embedder on another) the answer depended on which worker got the
call: half the GetModel calls of a canaried model listed only one version,
and a model served elsewhere was NOT_FOUND.

Each worker describes its models in its heartbeat (every version, in any
state); the router answers with what every other serving worker described,
merged (`merge`). A worker answers from that merged with its own registry,
which it knows fresher than the router does. The view is a heartbeat old at
most; one the router has not refreshed for a lease is dropped (a worker
cut off from the router answers for itself only).

The default version is the one the edge routes a request that pins none to
(the catalogue's pin, else the largest share of the split), which the router
sends with the models: a worker's own rule (its newest READY version) named
the canary at 0% of the traffic while every unpinned request got version 1.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from services.inference.model_merge import merge
from services.inference.models import ModelRegistry, model_not_found
from services.inference.v2 import prompting
from tokenmesh.inference.v2 import inference_pb2


def local_model(registry: ModelRegistry, name: str) -> inference_pb2.Model:
    """Returns one of this worker's models with its versions in the v2 shape."""
    v1 = registry.to_pb(name)
    chat_templates = {
        m.version: prompting.template_ref(m.chat_template_id)
        for m in (registry.versions(name) if name in registry.names() else ())
        if m.scheduler is not None
    }
    return inference_pb2.Model(
        name=v1.name,
        kind=int(v1.kind),  # type: ignore[arg-type]  # same numbers in both versions
        default_version=v1.default_version,
        description=v1.description,
        versions=[
            inference_pb2.ModelVersion(
                version=v.version,
                state=int(v.state),  # type: ignore[arg-type]
                engine=v.engine,
                context_length=v.context_length,
                max_output_tokens_default=v.max_tokens_default,
                embedding_dimensions=v.embedding_dimensions,
                message=v.message,
                chat_template=chat_templates.get(v.version),
            )
            for v in v1.versions
        ],
    )


def local_models(registry: ModelRegistry) -> list[inference_pb2.Model]:
    """Returns every model of this worker, its versions loading or failed too (what
    its heartbeat describes)."""
    return [local_model(registry, name) for name in registry.described_names()]


class MeshModels:
    """MeshModels answers for the mesh's models: this worker's and the others' (see module).

    Args:
        registry: this worker's models.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._others: dict[str, inference_pb2.Model] = {}
        self._routed: dict[str, str] = {}  # model -> the version unpinned requests get
        self._others_until = 0.0  # time.monotonic()

    def update(
        self,
        others: Sequence[inference_pb2.Model],
        valid_s: float,
        routed: Mapping[str, str] | None = None,
    ) -> None:
        """Takes the other workers' models and each model's routed version (for
        requests that pin none) as the router sent them, for `valid_s` seconds."""
        self._others = merge(others)
        self._routed = dict(routed or {})
        self._others_until = time.monotonic() + valid_s

    def _fresh_others(self) -> dict[str, inference_pb2.Model]:
        return self._others if time.monotonic() < self._others_until else {}

    def names(self) -> list[str]:
        """Returns the names of every model in the mesh, sorted."""
        return sorted({*self.registry.described_names(), *self._fresh_others()})

    def describe(self, name: str) -> inference_pb2.Model:
        """Returns a model with the versions of every worker; NotFound if none serves it."""
        return self._routed_default(self._merged(name))

    def _merged(self, name: str) -> inference_pb2.Model:
        other = self._fresh_others().get(name)
        if name not in self.registry.described_names():
            if other is None:
                raise model_not_found(name)
            return other
        local = local_model(self.registry, name)
        if other is None:
            return local
        return merge([local, other])[name]  # its own first: fresher than the router's

    def _routed_default(self, model: inference_pb2.Model) -> inference_pb2.Model:
        """Names the version the edge routes unpinned requests to as the default; the
        worker's own rule stands while the router has said nothing fresh (a worker
        cut off from it), or names a version no worker describes."""
        fresh = time.monotonic() < self._others_until
        routed = self._routed.get(model.name, "") if fresh else ""
        if not routed or routed == model.default_version:
            return model
        if not any(v.version == routed for v in model.versions):
            return model
        answer = inference_pb2.Model()
        answer.CopyFrom(model)  # the router's merged copy is shared: not changed in place
        answer.default_version = routed
        return answer
