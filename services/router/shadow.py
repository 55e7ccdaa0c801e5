"""Shadow traffic at the edge: Envoy mirrors a share of a model's live requests to a version.

`tokenmesh models shadow MODEL VERSION --percent P` stores the shadow in the
model's catalogue entry (services.router.catalog.set_shadow); the snapshot
adds to each of the model's routes that serves another version:

- a request mirror policy to the shadow version's cluster, for P% of requests
  (runtime_fraction). Envoy sends the copy after the route's filters ran
  (authentication) and before any worker decided the live request's limits
  (inference requests' rates and token budgets are decided in the live
  worker: services.inference.request_limits, admission), streams its answer
  into nothing, and never makes the caller wait for it. So the copy's worker
  reads the caller's windows and budgets, counting nothing, and drops the
  copy of a caller at its limit (services.inference.shadow);
- on the copy only, SHADOW_HEADER naming the version it must serve (the
  worker meters it to the shadow account and keeps a comparison record);
- on the live request, SHADOWED_HEADER: its worker keeps a record too, so
  `tokenmesh models compare` pairs the two by request id (x-request-id, which
  the copy shares with the live request). Every live request of the model gets
  it (which ones Envoy mirrors is not known here): the pair store keeps the
  records no copy pairs with apart, briefly (services.router.shadow_pairs).

Only inference requests are mirrored. A model lookup (OpenAI's `GET
/models/{id}`, gateway.model_routing.MODEL_LOOKUP_PATHS) is routed by its model
too, so it matched the mirrored routes: each copy cost the shadow version's
workers a lookup and the live one a record no copy would ever pair with. Each
mirrored route is preceded by a copy of the model's route (no mirror, no
SHADOWED_HEADER) matching only the lookup paths.

Nothing here does I/O.
"""

from __future__ import annotations

from typing import Any

from gateway.model_routing import (
    FALLBACK_MODEL_HEADER,
    FALLBACK_VERSION_HEADER,
    MODEL_LOOKUP_PATHS,
)
from services.core import contract
from services.router.catalog import ModelEntry


def _set(name: str, value: str) -> dict[str, Any]:
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def mirror_policy(cluster: str, version: str, percent: int) -> dict[str, Any]:
    """Builds a request mirror policy sending `percent`% of a route's requests to `cluster`."""
    return {
        "cluster": cluster,
        "runtime_fraction": {"default_value": {"numerator": percent, "denominator": "HUNDRED"}},
        # The copy serves the shadow version, never a fallback, and records as a shadow.
        "request_headers_mutations": [
            {"append": _set(contract.SHADOW_HEADER, version)},
            {"remove": contract.SHADOWED_HEADER},
            {"remove": FALLBACK_MODEL_HEADER},
            {"remove": FALLBACK_VERSION_HEADER},
        ],
    }


def with_shadow(
    route: dict[str, Any],
    entry: ModelEntry,
    now: float,
    cluster: str,
    serves: frozenset[str],
) -> list[dict[str, Any]]:
    """Returns `route` mirroring the model's shadow share, unless it serves only the shadow,
    preceded by its unmirrored copies for model lookups (Envoy takes the first match).

    Args:
        route: one of the model's routes (with a "route" action, matching a prefix).
        entry: the model.
        now: the time (a sunset shadow version is no shadow).
        cluster: the shadow version's cluster.
        serves: the versions the route sends live requests to.
    """
    shadow = entry.shadow(now)
    if shadow is None or serves <= {shadow[0]}:
        return [route]
    version, percent = shadow
    mirrors = [mirror_policy(cluster, version, percent)]
    action = {**route["route"], "request_mirror_policies": mirrors}
    headers = [*route.get("request_headers_to_add", []), _set(contract.SHADOWED_HEADER, version)]
    mirrored = {**route, "route": action, "request_headers_to_add": headers}
    return [*(_lookups_only(route, path) for path in MODEL_LOOKUP_PATHS), mirrored]


def _lookups_only(route: dict[str, Any], path: str) -> dict[str, Any]:
    """Returns `route` (unmirrored) matching only requests to `path`, with the same headers."""
    match = {k: v for k, v in route["match"].items() if k != "prefix"}
    return {**route, "match": {**match, "path": path}}
