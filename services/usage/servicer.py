"""UsageService servicer: usage reports and the audit log, scoped to the caller.

The caller's identity comes from the edge (x-tokenmesh-key-id, -tenant,
-scopes; client-sent copies are stripped there). A caller sees its own key by
default, its tenant on request, and other tenants only with the admin scope.
"""

from __future__ import annotations

from services.core import contract
from services.core.errors import FieldViolation, InvalidArgument, PermissionDenied, Unauthenticated
from services.core.identity import peer_identity
from services.core.interceptors import Context, request_headers
from services.core.time_fields import timestamp_millis, timestamp_seconds
from services.usage.meter import MESH_SCOPE
from services.usage.reports import AuditListing, UsageReader, month_start, now, resume_listing
from tokenmesh.usage.v1 import usage_service_pb2 as pb
from tokenmesh.usage.v1 import usage_service_pb2_grpc
from tokenmesh.usage.v2 import usage_service_pb2 as v2_pb

# The selection fields (key_id, tenant, start_time, end_time) are the same in
# every API version: one authorization for all of them.
AnyUsageRequest = pb.GetUsageRequest | v2_pb.GetUsageRequest


class Caller:
    """Caller is the identity the edge vouched for, or an operator (its certificate:
    the only other caller contract.CALLER_RULES lets in, on the admin RPCs), an
    admin. (An operator was let in and then refused: no edge headers.)"""

    def __init__(self, context: Context) -> None:
        headers = request_headers(context)
        self.key_id = headers.get(contract.KEY_ID_HEADER, "")
        self.tenant = headers.get(contract.TENANT_HEADER, "")
        self.scopes = set(headers.get(contract.SCOPES_HEADER, "").split())
        if not self.key_id and peer_identity(context) == contract.OPERATOR:
            self.key_id, self.scopes = contract.OPERATOR, {contract.ADMIN_SCOPE}
        if not self.key_id:
            raise Unauthenticated("usage reports need an authenticated caller", reason="NO_CALLER")

    @property
    def admin(self) -> bool:
        """Tells whether the caller holds the admin scope."""
        return contract.ADMIN_SCOPE in self.scopes


# GetUsage's `tenant` for every tenant and key together (admins only): the meter
# counts each event in the mesh's scope too (meter.scopes).
WHOLE_MESH = "*"


def scope_of(caller: Caller, request: AnyUsageRequest) -> str:
    """Returns the usage scope the caller asks for; raises unless it may see it."""
    if request.key_id and request.tenant:
        raise InvalidArgument([FieldViolation("key_id", "set key_id or tenant, not both")])
    if request.tenant == WHOLE_MESH:
        if not caller.admin:
            raise PermissionDenied("the whole mesh's usage is for admins", reason="OTHER_TENANT")
        return MESH_SCOPE
    if request.tenant:
        if request.tenant != caller.tenant and not caller.admin:
            raise PermissionDenied("a tenant sees only its own usage", reason="OTHER_TENANT")
        if contract.is_reserved_tenant(request.tenant) and not caller.admin:
            # The mesh's own accounts: tokenmesh.shadow holds every tenant's shadow
            # copies and their request tags. A key of it made before the names were
            # reserved read them all with usage:read.
            raise PermissionDenied(
                f"{contract.RESERVED_TENANT_PREFIX}* accounts are the mesh's: admin only",
                reason="RESERVED_TENANT",
            )
        return f"tenant:{request.tenant}"
    if request.key_id and request.key_id != caller.key_id:
        if not caller.admin:
            raise PermissionDenied("a caller sees only its own key's usage", reason="OTHER_KEY")
        return f"key:{request.key_id}"
    return f"key:{caller.key_id}"


def range_of(request: AnyUsageRequest) -> tuple[float, float]:
    """Returns the report's [start, end) in Unix seconds (default: this month so far;
    with only an end, the month that holds the range's last instant, or this month
    for an end to come: an end on the 1st at 00:00 reports the month before, which
    it ends, not a refusal)."""
    end = timestamp_seconds(request.end_time, "end_time") if request.HasField("end_time") else now()
    start = (
        timestamp_seconds(request.start_time, "start_time")
        if request.HasField("start_time")
        else month_start(min(end, now()) - 0.001)
    )
    if start >= end:
        raise InvalidArgument([FieldViolation("start_time", "must be before end_time")])
    return start, end


class UsageServicer(usage_service_pb2_grpc.UsageServiceServicer):
    """UsageServicer implements tokenmesh.usage.v1.UsageService."""

    def __init__(self, reader: UsageReader) -> None:
        self.reader = reader

    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        caller = Caller(context)
        start, end = range_of(request)
        return await self.reader.report(
            scope_of(caller, request), start, end, request.granularity, request.by_version
        )

    async def ListAuditEntries(
        self, request: pb.ListAuditEntriesRequest, context: Context
    ) -> pb.ListAuditEntriesResponse:
        caller = Caller(context)
        if not request.tenant:
            raise InvalidArgument([FieldViolation("tenant", "is required")])
        if not caller.admin:
            raise PermissionDenied("the audit log needs the admin scope", reason="MISSING_SCOPE")
        if not 0 <= request.page_size <= 1000:
            raise InvalidArgument([FieldViolation("page_size", "must be between 0 and 1000")])
        entries, token = await self.reader.audit(audit_listing(request), request.page_size or 100)
        return pb.ListAuditEntriesResponse(entries=entries, next_page_token=token)


def audit_listing(request: pb.ListAuditEntriesRequest) -> AuditListing:
    """Returns the listing a request starts, or resumes with its page token.

    A resumed listing keeps its first page's range: a default end_time is
    "now" once, when the listing starts, so a listing paged to its end holds
    every entry that existed then, whatever is metered between pages. A range
    sent with a token must be the token's (AIP-158: a page token is valid only
    with the request that returned it).
    """
    start = (
        timestamp_millis(request.start_time, "start_time")
        if request.HasField("start_time")
        else None
    )
    end = timestamp_millis(request.end_time, "end_time") if request.HasField("end_time") else None
    if not request.page_token:
        listing = AuditListing(
            request.tenant,
            0 if start is None else start,
            int(now() * 1000) + 1 if end is None else end,
        )
        if listing.start_ms >= listing.end_ms:  # swapped: "no activity" misled the caller
            raise InvalidArgument([FieldViolation("start_time", "must be before end_time")])
        return listing
    listing = resume_listing(request.tenant, request.page_token)
    for name, sent, pinned in (
        ("start_time", start, listing.start_ms),
        ("end_time", end, listing.end_ms),
    ):
        if sent is not None and sent != pinned:
            raise InvalidArgument(
                [FieldViolation(name, "must be the first page's (or left out) with a page_token")]
            )
    return listing
