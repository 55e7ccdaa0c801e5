"""The model repository: `<repo>/<name>/<version>/` with model.onnx,
tokenizer.json and config.json, loaded into a ready-to-start LoadedModel.

config.json keys: architecture ("gpt-kv", "bert-mean-pool"), kind
("generative", "embedding"), description, context_length, and per kind:
eos_token_id, n_layer, n_head, head_dim, vocab_size, defaults {max_tokens,
temperature, top_p, top_k} — or embedding_dimensions, max_batch_size.
"weights": "../1" reuses another version's model.onnx and tokenizer.json
(a version that differs only in its defaults). A generative version may set
"chat_template" (a sandboxed Jinja template over `messages` and `system`,
see services.inference.templates); without it chat requests use
templates.DEFAULT_CHAT_TEMPLATE.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.inference.embedder import Embedder
from services.inference.engines.base import GenerativeEngine
from services.inference.engines.deterministic import DeterministicTestEngine
from services.inference.models import LoadedModel, ModelDefaults
from services.inference.scheduler import Scheduler, SchedulerLimits
from services.inference.templates import (
    DEFAULT_CHAT_TEMPLATE_ID,
    Prompt,
    TemplateId,
    chat_prompt,
    model_chat_template_id,
)
from services.inference.tokenizer import HuggingFaceTokenizer, WordTokenizer
from tokenmesh.inference.v1 import inference_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """EngineOptions apply to every model a worker loads."""

    engine: str = "onnxruntime"  # resolved: "onnxruntime" or "tensorrt"
    threads: int = 0
    limits: SchedulerLimits = SchedulerLimits()
    plan_cache_dir: Path | None = None
    prefix_cache_tokens: int = 0  # ONNX Runtime only: the TensorRT engine keeps no prefixes
    in_place_decode: bool = True  # ONNX Runtime only (engines/onnx_decode.py)
    # Models whose prefix cache is one scope for every tenant (TOKENMESH_CACHE_SHARED_MODELS,
    # the response cache's shared scope); the others' is scoped by tenant.
    prefix_shared_models: frozenset[str] = frozenset()


def version_directory(repo: Path, name: str, version: str) -> Path:
    """Returns the resolved directory of a version; it is always inside `repo`.

    Defence in depth: the servicer already refuses names that are not one
    safe path segment, but this refuses any path (a symlink included) that
    resolves outside the repository root, before any file in it is opened.
    """
    root = repo.resolve()
    try:
        directory = (root / name / version).resolve()
    except ValueError:  # NUL: no such path can exist
        directory = root
    if directory.parent.parent != root:  # exactly <root>/<name>/<version>
        raise InvalidArgument(
            [
                FieldViolation("model", "must name a model inside the model repository"),
                FieldViolation("version", "must name a version inside the model repository"),
            ],
            reason="MODEL_OUTSIDE_REPOSITORY",
        )
    return directory


def read_card(repo: Path, name: str, version: str) -> tuple[dict[str, Any], Path]:
    """Returns (config.json, directory holding the weights) of a version."""
    directory = version_directory(repo, name, version)
    card_path = directory / "config.json"
    if not card_path.is_file():
        raise NotFound(
            f"model {name!r} version {version!r} is not in the repository",
            reason="MODEL_NOT_IN_REPOSITORY",
            metadata={"model": name, "version": version},
        )
    card: dict[str, Any] = json.loads(card_path.read_text())
    weights = (directory / card.get("weights", ".")).resolve()
    if not weights.is_relative_to(repo.resolve()):
        raise FailedPrecondition(
            f"model {name!r} version {version!r}: config.json weights point outside "
            "the model repository",
            reason="MODEL_OUTSIDE_REPOSITORY",
        )
    if not (weights / "model.onnx").is_file():
        raise FailedPrecondition(
            f"model {name!r} version {version!r} has no model.onnx; run `make models`",
            reason="MODEL_FILES_MISSING",
        )
    return card, weights


def model_chat_template(card: dict[str, Any], name: str, version: str) -> Prompt:
    """Returns the version's chat template (config.json chat_template, else the default)."""
    source = card.get("chat_template")
    try:
        return chat_prompt(
            None if source is None else str(source), f"{name}:{version} chat template"
        )
    except InvalidArgument as error:
        raise FailedPrecondition(
            f"model {name!r} version {version!r}: config.json chat_template: "
            + "; ".join(v.description for v in error.violations),
            reason="MODEL_CHAT_TEMPLATE_INVALID",
        ) from None


def model_chat_template_ref(card: dict[str, Any], name: str, version: str) -> TemplateId:
    """Returns what responses name the version's chat template."""
    if card.get("chat_template") is None:
        return DEFAULT_CHAT_TEMPLATE_ID
    return model_chat_template_id(name, version)


def _generative_engine(
    card: dict[str, Any], weights: Path, options: EngineOptions, name: str = ""
) -> GenerativeEngine:
    shape = {
        key: card[key] for key in ("n_layer", "n_head", "head_dim", "vocab_size", "context_length")
    }
    if options.engine == "tensorrt":
        from services.inference.engines.tensorrt import TensorRTGenerativeEngine

        return TensorRTGenerativeEngine(
            weights / "model.onnx", cache_dir=options.plan_cache_dir, **shape
        )
    from services.inference.engines.onnx import OnnxGenerativeEngine

    return OnnxGenerativeEngine(
        weights / "model.onnx",
        threads=options.threads,
        prefix_cache_tokens=options.prefix_cache_tokens,
        in_place_decode=options.in_place_decode,
        prefix_cache_shared=name in options.prefix_shared_models,
        **shape,
    )


def load_from_repository(
    repo: Path, name: str, version: str, options: EngineOptions
) -> LoadedModel:
    """Builds a LoadedModel from the repository (blocking: call off the event loop)."""
    card, weights = read_card(repo, name, version)
    tokenizer = HuggingFaceTokenizer(
        weights / "tokenizer.json", add_special_tokens=card["kind"] == "embedding"
    )
    if card["kind"] != "embedding":
        tokenizer.piece_bytes()  # now, off the event loop: streams decode by bytes if they can
    common = dict(
        name=name,
        version=version,
        tokenizer=tokenizer,
        description=card.get("description", ""),
        context_length=int(card["context_length"]),
    )
    if card["kind"] == "embedding":
        from services.inference.engines.onnx import OnnxEmbeddingEngine

        dims = int(card["embedding_dimensions"])
        engine = OnnxEmbeddingEngine(weights / "model.onnx", dims, threads=options.threads)
        embedder = Embedder(
            engine, tokenizer, int(card["context_length"]), int(card.get("max_batch_size", 32))
        )
        return LoadedModel(
            kind=inference_pb2.MODEL_KIND_EMBEDDING,
            engine_name=engine.name,
            embedder=embedder,
            embedding_dimensions=dims,
            **common,
        )
    generative = _generative_engine(card, weights, options, name)
    scheduler = Scheduler(generative, int(card["eos_token_id"]), options.limits, (name, version))
    defaults = ModelDefaults(**card.get("defaults", {}))
    return LoadedModel(
        kind=inference_pb2.MODEL_KIND_GENERATIVE,
        engine_name=generative.name,
        scheduler=scheduler,
        defaults=defaults,
        chat_template=model_chat_template(card, name, version),
        chat_template_id=model_chat_template_ref(card, name, version),
        **common,
    )


def deterministic_test_model(
    name: str,
    version: str,
    step_s: float,
    limits: SchedulerLimits,
    error_rate: float = 0.0,
    context_length: int = 512,
) -> LoadedModel:
    """Builds a version served by the deterministic test engine (through the scheduler).

    error_rate: share of its requests that fail (a faulty version, for tests).
    context_length: its context (tests of long answers give it a real LLM's).
    """
    tokenizer = WordTokenizer()
    engine = DeterministicTestEngine(
        vocab_size=len(tokenizer.words),
        context_length=context_length,
        step_s=step_s,
        error_rate=error_rate,
    )
    return LoadedModel(
        name=name,
        version=version,
        kind=inference_pb2.MODEL_KIND_GENERATIVE,
        tokenizer=tokenizer,
        context_length=context_length,
        engine_name=engine.name,
        scheduler=Scheduler(engine, engine.eos_token_id, limits, (name, version)),
        description="Deterministic test engine: seeded vocabulary words, not a language model.",
    )
