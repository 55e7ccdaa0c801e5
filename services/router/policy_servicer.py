"""RouterService's content-policy and sample RPCs (admin only): protobuf at the edge.

RouterServicer inherits these; the catalogue's logic is services.router.policies,
the samples' stream layout services.inference.pipeline.samples.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import timestamp_pb2

from services.core import contract, identity
from services.core.errors import FieldViolation, InvalidArgument
from services.core.interceptors import Context, request_headers
from services.core.time_fields import timestamp_seconds
from services.inference.pipeline import samples
from services.inference.pipeline.policy import BLOCK, FLAG, REDACT, PatternRule, Policy
from services.router.catalog import now
from services.router.policies import (
    Attachment,
    PolicyCatalog,
    PolicyHead,
    SampleSettings,
    attachments_by_subject,
    subject_of,
)
from tokenmesh.router.v1 import policy_pb2

ACTIONS = {
    policy_pb2.POLICY_ACTION_BLOCK: BLOCK,
    policy_pb2.POLICY_ACTION_REDACT: REDACT,
    policy_pb2.POLICY_ACTION_FLAG: FLAG,
}
ACTION_NUMBERS = {name: number for number, name in ACTIONS.items()}
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def caller(context: Context) -> str:
    """Returns who makes an admin call: the edge-vouched key id, or the peer's identity."""
    key_id = request_headers(context).get(contract.KEY_ID_HEADER, "")
    return key_id or identity.peer_identity(context) or "unknown"


def _rules(items: Sequence[policy_pb2.PatternRule]) -> tuple[PatternRule, ...]:
    return tuple(PatternRule(r.pattern, r.reason) for r in items)


def policy_from_pb(request: policy_pb2.CreatePolicyRequest, created_by: str) -> Policy:
    """Returns the draft a CreatePolicy request describes (version set on creation)."""
    actions: dict[str, str] = {}
    for rule in request.pii_rules:
        if rule.detector in actions:
            raise InvalidArgument([FieldViolation("pii_rules", f"{rule.detector!r} twice")])
        if rule.action not in ACTIONS:
            raise InvalidArgument([FieldViolation("pii_rules.action", "is required")])
        actions[rule.detector] = ACTIONS[rule.action]
    return Policy(
        name=request.name,
        version=0,
        pii=actions,
        block_patterns=_rules(request.block_patterns),
        block_keywords=_rules(request.block_keywords),
        output_block_patterns=_rules(request.output_block_patterns),
        max_input_chars=request.max_input_chars,
        created_by=created_by,
    )


def _pattern_pb(rules: Sequence[PatternRule]) -> list[policy_pb2.PatternRule]:
    return [policy_pb2.PatternRule(pattern=r.pattern, reason=r.reason) for r in rules]


def policy_to_pb(policy: Policy) -> policy_pb2.ContentPolicy:
    """Converts one policy version."""
    return policy_pb2.ContentPolicy(
        name=policy.name,
        version=policy.version,
        pii_rules=[
            policy_pb2.PiiRule(detector=d, action=ACTION_NUMBERS[a])
            for d, a in sorted(policy.pii.items())
        ],
        block_patterns=_pattern_pb(policy.block_patterns),
        block_keywords=_pattern_pb(policy.block_keywords),
        output_block_patterns=_pattern_pb(policy.output_block_patterns),
        max_input_chars=policy.max_input_chars,
        create_time=_timestamp(policy.created_at),
        created_by=policy.created_by,
    )


def attachment_to_pb(attachment: Attachment) -> policy_pb2.PolicyAttachment:
    """Converts an attachment."""
    if attachment.kind == "tenant":
        return policy_pb2.PolicyAttachment(tenant=attachment.subject, policy=attachment.policy)
    return policy_pb2.PolicyAttachment(key_id=attachment.subject, policy=attachment.policy)


def head_to_pb(head: PolicyHead) -> policy_pb2.CatalogPolicy:
    """Converts a policy's head."""
    return policy_pb2.CatalogPolicy(
        name=head.name, latest_version=head.latest, update_time=_timestamp(head.updated_at)
    )


def settings_to_pb(settings: SampleSettings) -> policy_pb2.SampleSettings:
    """Converts a tenant's sample settings."""
    return policy_pb2.SampleSettings(
        tenant=settings.tenant,
        rate=settings.rate,
        consented_by=settings.consented_by,
        consent_time=_timestamp(settings.consented_at),
        consent_note=settings.consent_note,
    )


def _page_size(value: int) -> int:
    if not 0 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgument([FieldViolation("page_size", f"must be 0-{MAX_PAGE_SIZE}")])
    return value or DEFAULT_PAGE_SIZE


def _page_token(token: str) -> str:
    stamp, _, sequence = token.partition("-")
    if token and not (contract.is_version_number(stamp) and contract.is_version_number(sequence)):
        raise InvalidArgument([FieldViolation("page_token", "is not a token this RPC returned")])
    return token


class PolicyRpcs:
    """PolicyRpcs are RouterService's policy and sample RPCs (mixed into RouterServicer)."""

    policy_catalog: PolicyCatalog

    async def CreatePolicy(
        self, request: policy_pb2.CreatePolicyRequest, context: Context
    ) -> policy_pb2.CreatePolicyResponse:
        draft = policy_from_pb(request, caller(context))
        created = await self.policy_catalog.create(draft, now())
        return policy_pb2.CreatePolicyResponse(policy=policy_to_pb(created))

    async def GetPolicy(
        self, request: policy_pb2.GetPolicyRequest, context: Context
    ) -> policy_pb2.GetPolicyResponse:
        if request.version and not contract.is_version_number(request.version):
            raise InvalidArgument([FieldViolation("version", "must be a version number")])
        policy = await self.policy_catalog.get(request.name, int(request.version or 0))
        return policy_pb2.GetPolicyResponse(policy=policy_to_pb(policy))

    async def ListPolicies(
        self, request: policy_pb2.ListPoliciesRequest, context: Context
    ) -> policy_pb2.ListPoliciesResponse:
        heads = await self.policy_catalog.heads()
        attachments = attachments_by_subject(await self.policy_catalog.attachments())
        return policy_pb2.ListPoliciesResponse(
            policies=[head_to_pb(heads[n]) for n in sorted(heads)],
            attachments=[attachment_to_pb(a) for a in attachments],
        )

    async def AttachPolicy(
        self, request: policy_pb2.AttachPolicyRequest, context: Context
    ) -> policy_pb2.AttachPolicyResponse:
        kind, subject = subject_of(request.tenant, request.key_id)
        attachment = await self.policy_catalog.attach(kind, subject, request.policy)
        return policy_pb2.AttachPolicyResponse(attachment=attachment_to_pb(attachment))

    async def DetachPolicy(
        self, request: policy_pb2.DetachPolicyRequest, context: Context
    ) -> policy_pb2.DetachPolicyResponse:
        kind, subject = subject_of(request.tenant, request.key_id)
        attachment = await self.policy_catalog.detach(kind, subject)
        return policy_pb2.DetachPolicyResponse(attachment=attachment_to_pb(attachment))

    async def SetSampleSettings(
        self, request: policy_pb2.SetSampleSettingsRequest, context: Context
    ) -> policy_pb2.SetSampleSettingsResponse:
        settings = SampleSettings(
            tenant=request.tenant,
            rate=request.rate,
            consented_by=caller(context),
            consented_at=now(),
            consent_note=request.consent_note,
        )
        stored = await self.policy_catalog.set_samples(settings)
        return policy_pb2.SetSampleSettingsResponse(settings=settings_to_pb(stored))

    async def ExportSamples(
        self, request: policy_pb2.ExportSamplesRequest, context: Context
    ) -> policy_pb2.ExportSamplesResponse:
        subject_of(request.tenant, "")
        since = timestamp_seconds(request.since, "since") if request.HasField("since") else 0.0
        page, token = await samples.read(
            self.policy_catalog.redis,
            request.tenant,
            int(since * 1000),
            _page_token(request.page_token),
            _page_size(request.page_size),
        )
        return policy_pb2.ExportSamplesResponse(samples=page, next_page_token=token)
