"""Validates job requests once, at the service's edge.

Each item is checked by the inference v2 rules (the same code the workers
run), so a bad item fails the submission at once with its JSON path
(`items[3].complete.sampling.temperature`) instead of failing later. Limits
match proto/tokenmesh/jobs/v1/jobs_service.proto.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from google.protobuf import duration_pb2

from services.core import contract
from services.core.errors import FieldViolation, InvalidArgument, PermissionDenied
from services.core.time_fields import duration_seconds
from services.inference.v2 import validation as v2_validation
from tokenmesh.jobs.v1 import jobs_pb2
from tokenmesh.jobs.v1 import jobs_service_pb2 as pb

MIN_WINDOW_S = 60.0
MAX_WINDOW_S = 7 * 86400.0
MAX_OVERLAP_S = 7 * 86400.0
# A 10,000-item job of bad items must not make a status too large for Envoy.
MAX_VIOLATIONS = 20
#: The scope each kind of item needs from the job's owner (as the edge requires
#: for the same RPC: gateway/edge_auth.RPC_SCOPES).
ITEM_SCOPES = {
    "complete": "inference:generate",
    "generate": "inference:generate",
    "embed": "inference:embed",
}


#: The idempotency keys of OpenAI batch creations (`<prefix><Idempotency-Key>`),
#: which CreateJob refuses: both APIs key one namespace of a key's jobs.
BATCH_IDEMPOTENCY_PREFIX = "openai-batch:"


def validate_create(request: pb.CreateJobRequest, max_items: int) -> None:
    """Raises InvalidArgument naming every bad field of a CreateJobRequest (up to 20)."""
    out: list[FieldViolation] = []
    if not 1 <= len(request.items) <= max_items:
        out.append(FieldViolation("items", f"must hold 1-{max_items} items"))
    for index, item in enumerate(request.items):
        _check_item(index, item, out)
        if len(out) >= MAX_VIOLATIONS:
            break
    v2_validation.check_metadata(request.metadata, out)
    if request.idempotency_key and not contract.is_request_id(request.idempotency_key):
        out.append(FieldViolation("idempotency_key", contract.REQUEST_ID_RULE))
    elif request.idempotency_key.startswith(BATCH_IDEMPOTENCY_PREFIX):
        # The OpenAI batch creations' own (openai_servicer): a job's taken them, and
        # POST /batches with the same Idempotency-Key answered 404 for its create.
        out.append(
            FieldViolation("idempotency_key", f"must not start with {BATCH_IDEMPOTENCY_PREFIX!r}")
        )
    if out:
        raise InvalidArgument(out[:MAX_VIOLATIONS])


def _check_item(index: int, item: jobs_pb2.JobItem, out: list[FieldViolation]) -> None:
    kind = item.WhichOneof("request")
    path = f"items[{index}]"
    if kind is None:
        out.append(FieldViolation(path, "must set one of complete, embed or generate"))
        return
    try:
        if kind == "embed":
            v2_validation.validate_embed(item.embed)
        else:
            v2_validation.validate_generation(getattr(item, kind))
    except InvalidArgument as bad:
        out.extend(
            FieldViolation(f"{path}.{kind}.{v.field}", v.description) for v in bad.violations
        )


def check_item_scopes(
    items: Collection[jobs_pb2.JobItem],
    scopes: Collection[str],
    named: Callable[[int], str] = lambda index: f"items[{index}]",
) -> None:
    """Raises PermissionDenied when the owner's key lacks the scope an item needs (the
    item `named` as its caller knows it: an OpenAI batch's by its input line)."""
    if contract.ADMIN_SCOPE in scopes:
        return
    for index, item in enumerate(items):
        needed = ITEM_SCOPES.get(item.WhichOneof("request") or "", "")
        if needed and needed not in scopes:
            raise PermissionDenied(
                f"{named(index)} needs the scope {needed!r}, which this key lacks",
                reason="MISSING_SCOPE",
                metadata={"scope": needed},
            )


def item_model(item: jobs_pb2.JobItem) -> str:
    """Returns the model an item names ("" for an item with no request)."""
    kind = item.WhichOneof("request")
    return str(getattr(item, kind).model) if kind is not None else ""


def item_models(items: Collection[jobs_pb2.JobItem]) -> dict[str, int]:
    """Returns each model the items name, with the index of the first item naming it."""
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.WhichOneof("request") is not None:
            first.setdefault(item_model(item), index)
    return first


def completion_window_s(window: duration_pb2.Duration, has_window: bool, default_s: float) -> float:
    """Returns the job's completion window in seconds (1 minute to 7 days)."""
    if not has_window:
        return default_s
    seconds = duration_seconds(window, "completion_window")
    if not MIN_WINDOW_S <= seconds <= MAX_WINDOW_S:
        raise InvalidArgument(
            [FieldViolation("completion_window", "must be between 60s and 604800s (7 days)")]
        )
    return seconds


def overlap_s(overlap: duration_pb2.Duration, has_overlap: bool) -> float:
    """Returns a secret rotation's overlap in seconds (0 to 7 days; unset: 24 hours)."""
    if not has_overlap:
        return 86400.0
    seconds = duration_seconds(overlap, "overlap")
    if not 0 <= seconds <= MAX_OVERLAP_S:
        raise InvalidArgument([FieldViolation("overlap", "must be between 0s and 604800s")])
    return seconds


def page_size(value: int, default: int, maximum: int, field: str = "page_size") -> int:
    """Returns a page size (0 or absent: the default); `field` names it in the error
    (the OpenAI surface's callers know it as `limit`)."""
    if value == 0:
        return default
    if not 1 <= value <= maximum:
        raise InvalidArgument([FieldViolation(field, f"must be 1-{maximum} (absent: {default})")])
    return value


def identity_of(headers: Mapping[str, str]) -> dict[str, str]:
    """Returns the identity headers the edge set, to forward with every item."""
    return {name: headers[name] for name in contract.IDENTITY_HEADERS if headers.get(name)}
