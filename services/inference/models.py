"""The worker's loaded model versions and the registry that resolves requests to them."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.core.errors import AlreadyExists, NotFound
from services.inference import quality
from services.inference.embedder import Embedder
from services.inference.load_report import VersionOutcomes
from services.inference.model_merge import version_key
from services.inference.scheduler import Scheduler
from services.inference.templates import DEFAULT_CHAT_TEMPLATE_ID, Prompt, TemplateId, chat_prompt
from services.inference.tokenizer import Tokenizer
from tokenmesh.inference.v1 import inference_pb2


@dataclass(frozen=True)
class ModelDefaults:
    """ModelDefaults fill sampling fields a request leaves unset."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass(eq=False)
class LoadedModel:
    """LoadedModel is one model version on this worker: a scheduler or an embedder."""

    name: str
    version: str
    kind: inference_pb2.ModelKind.ValueType
    tokenizer: Tokenizer
    context_length: int
    engine_name: str
    scheduler: Scheduler | None = None
    embedder: Embedder | None = None
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    description: str = ""
    embedding_dimensions: int = 0
    # Renders chat `messages` into this version's prompt (config.json chat_template, else
    # templates.DEFAULT_CHAT_TEMPLATE).
    chat_template: Prompt = field(default_factory=chat_prompt)
    # What responses and usage events name chat_template as.
    chat_template_id: TemplateId = DEFAULT_CHAT_TEMPLATE_ID
    ready: bool = False
    unloading: bool = False  # finishing its requests before it goes (UnloadModel)
    # How its requests ended and began, for the router's weights and rollouts.
    outcomes: VersionOutcomes = field(default_factory=VersionOutcomes)

    @property
    def engine_failing(self) -> bool:
        """Tells whether its engine steps keep failing (services/inference/step_health.py):
        its health entries say NOT_SERVING until a retry succeeds."""
        return self.scheduler is not None and self.scheduler.engine_failing

    async def start(self) -> None:
        """Allocates, warms up and starts serving this version."""
        if self.scheduler is not None:
            await self.scheduler.start()
        if self.embedder is not None:
            await self.embedder.warm_up()
        self.ready = True

    def stop_admitting(self) -> None:
        """Refuses new work at once (before an unload's first await: a request reaching
        submit meanwhile started, and ran to MODEL_UNLOADED instead of being refused
        MODEL_UNLOADING and tried elsewhere)."""
        self.ready = False
        if self.scheduler is not None:
            self.scheduler.stop_admitting()
        if self.embedder is not None:
            self.embedder.stop_admitting()

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stops admitting, refuses the generations still waiting (MODEL_UNLOADING: they
        never started), lets running work finish (up to the timeout), frees the engine."""
        self.ready = False
        if self.scheduler is not None:
            await self.scheduler.stop(drain_timeout_s)
        if self.embedder is not None:
            await self.embedder.stop(drain_timeout_s)
        # Its drift gauges go with it (the scheduler's went in its stop).
        quality.forget(self)

    def version_pb(self) -> inference_pb2.ModelVersion:
        """Returns this version as a protobuf message."""
        if self.unloading:  # it said LOADING while it drained
            state = inference_pb2.MODEL_VERSION_STATE_UNLOADING
        elif self.ready:
            state = inference_pb2.MODEL_VERSION_STATE_READY
        else:
            state = inference_pb2.MODEL_VERSION_STATE_LOADING
        return inference_pb2.ModelVersion(
            version=self.version,
            state=state,
            engine=self.engine_name,
            context_length=self.context_length,
            max_tokens_default=self.defaults.max_tokens if self.scheduler else 0,
            embedding_dimensions=self.embedding_dimensions,
        )


@dataclass(frozen=True)
class VersionStatus:
    """VersionStatus is a version this worker is loading (LOADING) or failed to load
    (FAILED, with the error's public message): described, never served."""

    version: str
    state: inference_pb2.ModelVersionState.ValueType
    message: str = ""

    def version_pb(self) -> inference_pb2.ModelVersion:
        """Returns this version as a protobuf message."""
        return inference_pb2.ModelVersion(
            version=self.version, state=self.state, message=self.message
        )


class ModelRegistry:
    """ModelRegistry holds the loaded versions of every model, by name.

    Apart from them it keeps the versions being loaded and those whose load failed
    (`VersionStatus`): lookups (`to_pb`, `described_names`) show them, as the API
    says (LOADING while a load runs, minutes for an engine build; FAILED with the
    reason until the next load or unload of the version), but requests never
    resolve to them (`names`, `versions`, `resolve`, `has`, `all`: loaded only).
    """

    def __init__(self) -> None:
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self._statuses: dict[str, dict[str, VersionStatus]] = {}

    def add(self, model: LoadedModel) -> None:
        """Adds a model version; AlreadyExists when another object holds its place.

        Replacing a loaded version silently would leak its engine (its thread
        and KV cache): unload it first.
        """
        held = self._models.get(model.name, {}).get(model.version)
        if held is not None and held is not model:
            raise AlreadyExists(
                f"model {model.name!r} version {model.version!r} is already loaded",
                reason="MODEL_VERSION_LOADED",
            )
        self._models.setdefault(model.name, {})[model.version] = model
        self.clear_status(model.name, model.version)  # loaded: it describes itself

    def loading(self, name: str, version: str) -> None:
        """Marks a version LOADING (until `add`, `failed` or `clear_status`)."""
        self._set_status(name, VersionStatus(version, inference_pb2.MODEL_VERSION_STATE_LOADING))

    def failed(self, name: str, version: str, message: str) -> None:
        """Marks a version FAILED, with the error's public `message`."""
        state = inference_pb2.MODEL_VERSION_STATE_FAILED
        self._set_status(name, VersionStatus(version, state, message))

    def status(self, name: str, version: str) -> VersionStatus | None:
        """Returns a version's load status (None: not loading, no failed load kept)."""
        return self._statuses.get(name, {}).get(version)

    def clear_loading(self, name: str, version: str) -> None:
        """Forgets a version's LOADING status (a FAILED one stays)."""
        status = self.status(name, version)
        if status is not None and status.state == inference_pb2.MODEL_VERSION_STATE_LOADING:
            self.clear_status(name, version)

    def clear_status(self, name: str, version: str) -> bool:
        """Forgets a version's load status; returns whether it had one."""
        statuses = self._statuses.get(name, {})
        if statuses.pop(version, None) is None:
            return False
        if not statuses:
            del self._statuses[name]
        return True

    def _set_status(self, name: str, status: VersionStatus) -> None:
        self._statuses.setdefault(name, {})[status.version] = status

    def described_names(self) -> list[str]:
        """Returns the names of every model this worker describes (loaded, loading or
        failed), sorted."""
        return sorted({*self._models, *self._statuses})

    def remove(self, name: str, version: str) -> LoadedModel:
        """Removes and returns a version; NotFound when it is not loaded."""
        model = self.resolve(name, version)
        self.discard(model)
        return model

    def discard(self, model: LoadedModel) -> bool:
        """Removes `model` if it is still the one registered for its version.

        An unload removes the exact object it stopped, never a version loaded
        again meanwhile. Returns whether it was removed.
        """
        versions = self._models.get(model.name, {})
        if versions.get(model.version) is not model:
            return False
        del versions[model.version]
        if not versions:
            del self._models[model.name]
        return True

    def names(self) -> list[str]:
        """Returns the model names, sorted."""
        return sorted(self._models)

    def versions(self, name: str) -> list[LoadedModel]:
        """Returns a model's versions, oldest label first; NotFound if unknown."""
        versions = self._models.get(name)
        if not versions:
            raise model_not_found(name)
        return [versions[v] for v in sorted(versions, key=version_key)]

    def has(self, name: str, version: str) -> bool:
        """Tells whether this exact version is loaded."""
        return version in self._models.get(name, {})

    def resolve(self, name: str, version: str) -> LoadedModel:
        """Returns the version asked for, or the default (newest ready) when `version` is empty."""
        versions = self.versions(name)
        if not version:
            ready = [m for m in versions if m.ready]
            return (ready or versions)[-1]
        for model in versions:
            if model.version == version:
                return model
        raise NotFound(
            f"model {name!r} has no version {version!r}",
            reason="MODEL_VERSION_NOT_FOUND",
            metadata={"model": name, "version": version},
        )

    def to_pb(self, name: str) -> inference_pb2.Model:
        """Returns a model with all its versions as a protobuf message, those loading
        or failed too; NotFound if it has none."""
        statuses = {
            version: status
            for version, status in self._statuses.get(name, {}).items()
            if not self.has(name, version)  # a loaded version describes itself
        }
        if name not in self._models:
            if not statuses:
                raise model_not_found(name)
            # Nothing loaded: its kind and description come with its first load.
            ordered = [statuses[v] for v in sorted(statuses, key=version_key)]
            return inference_pb2.Model(
                name=name,
                default_version=ordered[-1].version,
                versions=[s.version_pb() for s in ordered],
            )
        loaded = {m.version: m for m in self.versions(name)}
        default = self.resolve(name, "")
        labels = sorted({*loaded, *statuses}, key=version_key)
        return inference_pb2.Model(
            name=name,
            kind=default.kind,
            default_version=default.version,
            versions=[(loaded.get(v) or statuses[v]).version_pb() for v in labels],
            description=default.description,
        )

    def all(self) -> list[LoadedModel]:
        """Returns every loaded version."""
        return [m for name in self.names() for m in self.versions(name)]


def model_not_found(name: str) -> NotFound:
    """Returns the error of a model that nothing here serves."""
    return NotFound(
        f"model {name!r} is not served here", reason="MODEL_NOT_FOUND", metadata={"model": name}
    )
