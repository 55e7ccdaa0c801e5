"""RouterService's shadow-traffic RPCs: SetShadowTraffic and CompareModelVersions.

Mixed into RouterServicer (services.router.servicer). Shadows live in the
catalogue (services.router.catalog.set_shadow) and reach the edges as mirror
policies (services.router.shadow); the pairs the workers record are read
and summarised by services.router.shadow_pairs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from google.protobuf import timestamp_pb2

from services.core.errors import FieldViolation, InvalidArgument
from services.core.interceptors import Context
from services.core.time_fields import duration_seconds
from services.router import catalog as cat
from services.router import shadow_pairs
from services.router.catalog import Catalog, ModelEntry, now
from services.router.shadow_pairs import Comparison, PairStore, VersionFigures
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as pb

DEFAULT_SINCE_S = 3600.0
MIN_SINCE_S = 1.0


def since_seconds(request: pb.CompareModelVersionsRequest) -> float:
    """Returns the request's window in seconds (unset: one hour)."""
    if not request.HasField("since"):
        return DEFAULT_SINCE_S
    seconds = duration_seconds(request.since, "since")
    if not MIN_SINCE_S <= seconds <= shadow_pairs.RETENTION_S:
        raise InvalidArgument([FieldViolation("since", "must be between 1s and 7 days")])
    return seconds


def check_versions(request: pb.CompareModelVersionsRequest) -> None:
    """Raises InvalidArgument unless the request names two different, well-formed versions."""
    violations = []
    for field_name in ("baseline_version", "candidate_version"):
        value = getattr(request, field_name)
        if not value:
            violations.append(FieldViolation(field_name, "is required"))
        else:
            try:
                cat.check_version(value, field_name)
            except InvalidArgument as error:
                violations.extend(error.violations)
    if not violations and request.baseline_version == request.candidate_version:
        violations.append(FieldViolation("candidate_version", "must differ from the baseline"))
    if violations:
        raise InvalidArgument(violations)


def _latency(latency: shadow_pairs.Latency) -> router_pb2.LatencySummary:
    return router_pb2.LatencySummary(
        p50_ms=latency.p50_ms,
        p99_ms=latency.p99_ms,
        mean_ms=latency.mean_ms,
        samples=latency.samples,
    )


def figures_to_pb(figures: VersionFigures) -> router_pb2.VersionComparison:
    """Converts one version's side of a comparison."""
    mean, p50, p90, p99, longest = figures.output_tokens
    return router_pb2.VersionComparison(
        version=figures.version,
        requests=figures.requests,
        time_to_first_token=_latency(figures.ttft),
        inter_token_latency=_latency(figures.itl),
        total_latency=_latency(figures.total),
        queue_time=_latency(figures.queue),
        error_rate=figures.error_rate,
        finish_reasons=dict(figures.finish_reasons),
        output_tokens=router_pb2.OutputLengthSummary(
            mean=mean, p50=p50, p90=p90, p99=p99, max=longest
        ),
        mean_logprob=figures.mean_logprob,
        mean_confidence=figures.mean_confidence,
    )


def comparison_to_pb(
    model: str, comparison: Comparison, start_s: float
) -> pb.CompareModelVersionsResponse:
    """Converts a comparison."""
    start = timestamp_pb2.Timestamp()
    start.FromMilliseconds(int(start_s * 1000))
    return pb.CompareModelVersionsResponse(
        model=model,
        baseline=figures_to_pb(comparison.baseline),
        candidate=figures_to_pb(comparison.candidate),
        pairs=comparison.pairs,
        seeded_pairs=comparison.reproducible_pairs,
        agreeing_pairs=comparison.agreeing_pairs,
        agreement_rate=comparison.agreement_rate,
        start_time=start,
        reversed_pairs=comparison.reversed_pairs,
    )


class ShadowRpcs:
    """ShadowRpcs are RouterService's shadow-traffic RPCs (mixed into RouterServicer)."""

    catalog: Catalog
    shadow_pairs: PairStore
    _changed: Callable[[ModelEntry], Awaitable[router_pb2.CatalogModel]]

    async def SetShadowTraffic(
        self, request: pb.SetShadowTrafficRequest, context: Context
    ) -> pb.SetShadowTrafficResponse:
        if request.version:
            cat.check_version(request.version)
        model = await self.catalog.update(
            request.model,
            lambda m, _: cat.set_shadow(m, request.version, request.percent, now()),
        )
        return pb.SetShadowTrafficResponse(model=await self._changed(model))

    async def CompareModelVersions(
        self, request: pb.CompareModelVersionsRequest, context: Context
    ) -> pb.CompareModelVersionsResponse:
        check_versions(request)
        start_s = now() - since_seconds(request)
        await self.catalog.get(request.model)  # NotFound for a model the catalogue lacks
        pairs = await self.shadow_pairs.pairs(request.model, int(start_s * 1000))
        comparison = shadow_pairs.compare(
            pairs, request.baseline_version, request.candidate_version
        )
        return comparison_to_pb(request.model, comparison, start_s)
