"""tokenmesh.usage.v2.UsageService: usage grouped by a dimension, with its cost.

Who sees what is exactly v1's rule (services.usage.servicer.scope_of): a
caller's own key by default, its tenant on request, other keys and tenants
only with the admin scope.
"""

from __future__ import annotations

from services.core.interceptors import Context
from services.usage.dimensions import parse_group_by
from services.usage.reports_v2 import DimensionReader
from services.usage.servicer import Caller, range_of, scope_of
from tokenmesh.usage.v2 import usage_service_pb2 as pb
from tokenmesh.usage.v2 import usage_service_pb2_grpc


class UsageV2Servicer(usage_service_pb2_grpc.UsageServiceServicer):
    """UsageV2Servicer implements tokenmesh.usage.v2.UsageService."""

    def __init__(self, reader: DimensionReader) -> None:
        self.reader = reader

    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        caller = Caller(context)
        dimension = parse_group_by(request.group_by)
        start, end = range_of(request)
        scope = scope_of(caller, request)
        return await self.reader.report(scope, start, end, request.granularity, dimension)
