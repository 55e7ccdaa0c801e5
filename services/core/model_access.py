"""Which models a caller's key may use, as the edge vouched (the `x-tokenmesh-models`
identity header): the workers' lookups and requests and the router's catalogue
reads refuse the others alike, so a restricted key learns nothing of them."""

from __future__ import annotations

from collections.abc import Mapping

from services.core import contract
from services.core.errors import PermissionDenied


def allowed_models(headers: Mapping[str, str]) -> frozenset[str] | None:
    """Returns the models the caller's key may use (None: any)."""
    value = headers.get(contract.MODELS_HEADER, "").strip()
    return frozenset(m for m in value.split(",") if m) or None


def check_model_allowed(headers: Mapping[str, str], model: str) -> None:
    """Raises PERMISSION_DENIED when the caller's key does not cover `model` (checked
    before the model is looked up: whether it exists is not the caller's to learn)."""
    allowed = allowed_models(headers)
    if allowed is not None and model not in allowed:
        raise PermissionDenied(
            f"this key may not use model {model!r}",
            reason="MODEL_NOT_ALLOWED",
            metadata={"model": model},
        )
