"""The worker's model registry: which model versions it serves, and how."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from services.core.errors import NotFound
from services.inference.engine import DeterministicTestEngine, Engine, Tokenizer, WordTokenizer
from tokenmesh.inference.v1 import inference_pb2


@dataclass(frozen=True)
class ModelDefaults:
    """ModelDefaults fill sampling fields a request leaves unset."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class LoadedModel:
    """LoadedModel is one model version ready to serve."""

    name: str
    version: str
    kind: inference_pb2.ModelKind.ValueType
    engine: Engine
    tokenizer: Tokenizer
    context_length: int
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    description: str = ""
    ready: bool = False

    def version_pb(self) -> inference_pb2.ModelVersion:
        """Returns this version as a protobuf message."""
        state = (
            inference_pb2.MODEL_VERSION_STATE_READY
            if self.ready
            else inference_pb2.MODEL_VERSION_STATE_LOADING
        )
        return inference_pb2.ModelVersion(
            version=self.version,
            state=state,
            engine=self.engine.name,
            context_length=self.context_length,
            max_tokens_default=self.defaults.max_tokens,
        )


class ModelRegistry:
    """ModelRegistry holds the loaded versions of every model, by name."""

    def __init__(self, models: Iterable[LoadedModel] = ()) -> None:
        self._models: dict[str, dict[str, LoadedModel]] = {}
        for model in models:
            self.add(model)

    def add(self, model: LoadedModel) -> None:
        """Adds (or replaces) a model version."""
        self._models.setdefault(model.name, {})[model.version] = model

    def names(self) -> list[str]:
        """Returns the model names, sorted."""
        return sorted(self._models)

    def versions(self, name: str) -> list[LoadedModel]:
        """Returns a model's versions, oldest label first; NotFound if unknown."""
        versions = self._models.get(name)
        if not versions:
            raise NotFound(
                f"model {name!r} is not served here",
                reason="MODEL_NOT_FOUND",
                metadata={"model": name},
            )
        return [versions[v] for v in sorted(versions, key=_version_key)]

    def resolve(self, name: str, version: str) -> LoadedModel:
        """Returns the version asked for, or the default (newest) when `version` is empty."""
        versions = self.versions(name)
        if not version:
            return versions[-1]
        for model in versions:
            if model.version == version:
                return model
        raise NotFound(
            f"model {name!r} has no version {version!r}",
            reason="MODEL_VERSION_NOT_FOUND",
            metadata={"model": name, "version": version},
        )

    def all_ready(self) -> bool:
        """Tells whether every loaded version finished its warm-up."""
        return all(m.ready for versions in self._models.values() for m in versions.values())

    def to_pb(self, name: str) -> inference_pb2.Model:
        """Returns a model with all its versions as a protobuf message."""
        versions = self.versions(name)
        return inference_pb2.Model(
            name=name,
            kind=versions[-1].kind,
            default_version=versions[-1].version,
            versions=[m.version_pb() for m in versions],
            description=versions[-1].description,
        )

    def all(self) -> list[LoadedModel]:
        """Returns every loaded version."""
        return [m for name in self.names() for m in self.versions(name)]


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


def deterministic_test_model(name: str, version: str, step_s: float) -> LoadedModel:
    """Builds a version served by the deterministic test engine."""
    tokenizer = WordTokenizer()
    return LoadedModel(
        name=name,
        version=version,
        kind=inference_pb2.MODEL_KIND_GENERATIVE,
        engine=DeterministicTestEngine(vocab_size=len(tokenizer.words), step_s=step_s),
        tokenizer=tokenizer,
        context_length=512,
        description="Deterministic test engine: seeded vocabulary words, not a language model.",
    )
