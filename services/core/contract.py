"""The mesh's contract between the edge and the services, in one place.

Every service imports its rules from here, so two modules can never
disagree on them (tests/unit/test_contract.py checks that nobody keeps a
private copy):

- name rules: model names, versions, tenants, worker ids;
- identity headers the edge sets, and the order of the identity tuple;
- component identities (SPIFFE ids in the mTLS certificates) and which of
  them may call which RPC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------
# Name rules
# ---------------------------------------------------------------------------

#: MODEL_NAME: a model (or alias) name; never "." or "..", no "/" or NUL, so
#: it is safe as one path segment of the model repository.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: MODEL_VERSION: a model version, also one safe path segment.
MODEL_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: TENANT: a tenant id.
TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: WORKER_ID: an inference worker's id (also used in request ids).
WORKER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: LEASE_TOKEN: the secret a worker registers with (services/inference/registration.py).
LEASE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,128}$")
#: PREFIX_KEY: the edge's key for a prompt's head (x-tokenmesh-prefix: the hex
#: of at most 64 bytes, after the tenant's name (at most 64) and a zero byte when
#: the caller has one: gateway/model_routing.lua's tenant_prefix).
PREFIX_KEY = re.compile(r"^(?:[0-9a-f]{2}){1,129}$")
#: REQUEST_ID: a client- or edge-supplied request id.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: API_KEY_ID: an API key's id, exactly as the auth service mints it (create and
#: the bootstrap key's adopt: services/auth/keys.py `new_key_id`). It is part of Redis key names
#: (tm:auth:key:<id>): anything else could name another record, e.g. a key's
#: secrets set ("key_x:secrets").
API_KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")

MODEL_NAME_RULE = "1-128 characters of [A-Za-z0-9._-], starting with a letter or digit"
MODEL_VERSION_RULE = "1-64 characters of [A-Za-z0-9._-], starting with a letter or digit"
TENANT_RULE = "1-64 characters of [A-Za-z0-9._-], starting with a letter or digit"
WORKER_ID_RULE = "1-128 characters of [A-Za-z0-9._:-]"
LEASE_TOKEN_RULE = "32-128 characters of [A-Za-z0-9_-]"
REQUEST_ID_RULE = "1-128 characters of [A-Za-z0-9._:-]"
API_KEY_ID_RULE = '"key_" and 16 lowercase hex digits'
#: MODEL_ALIAS: a catalogue alias of a model version ("stable", "canary").
MODEL_ALIAS = re.compile(r"^[a-z0-9-]{1,32}$")
MODEL_ALIAS_RULE = "1-32 characters of [a-z0-9-]"
#: VERSION_NUMBER: a catalogue version number in a reference ("support@3"). ASCII
#: digits only: str.isdigit() also accepts "²" (which int() refuses: an INTERNAL
#: error) and "٣" (which int() reads as 3). At most as long as an alias, so every
#: selector is 1-32 characters and an all-digit one is always a number.
VERSION_NUMBER = re.compile(r"^[0-9]{1,32}$")
VERSION_NUMBER_RULE = "1-32 digits [0-9]"

#: METADATA_KEY: a request's usage tag key (inference v2 `metadata`), also what
#: usage reports group by (`group_by=tag:<key>`).
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
METADATA_KEY_RULE = "1-64 characters of [A-Za-z0-9_.-]"
MAX_METADATA_ENTRIES = 16
#: The tag OpenAI's `user` parameter is recorded under: not counted against
#: MAX_METADATA_ENTRIES, so an OpenAI request with its full 16 `metadata` pairs
#: and a `user` fits (it was refused: 17 entries).
USER_TAG = "user"
MAX_METADATA_VALUE_CHARS = 256

# NOTE: match only through the is_* helpers below. They use `fullmatch`:
# `re.match` with a trailing `$` also accepts the value followed by "\n".


def is_model_name(value: str) -> bool:
    """Tells whether `value` is a valid model name (safe as a path segment)."""
    return MODEL_NAME.fullmatch(value) is not None


def is_model_version(value: str) -> bool:
    """Tells whether `value` is a valid model version (safe as a path segment)."""
    return MODEL_VERSION.fullmatch(value) is not None


def is_tenant(value: str) -> bool:
    """Tells whether `value` is a valid tenant id."""
    return TENANT.fullmatch(value) is not None


def is_priority_tier(value: str) -> bool:
    """Tells whether `value` is a valid key tier name (its x-tokenmesh-tier header and
    `tier` claim; the scheduler's and the rate limits' per-tier settings): a tenant
    id's characters."""
    return TENANT.fullmatch(value) is not None


def is_model_alias(value: str) -> bool:
    """Tells whether `value` is a valid model alias."""
    return MODEL_ALIAS.fullmatch(value) is not None


def is_version_number(value: str) -> bool:
    """Tells whether `value` is a version number (ASCII digits; int() parses it)."""
    return VERSION_NUMBER.fullmatch(value) is not None


def is_metadata_key(value: str) -> bool:
    """Tells whether `value` is a valid usage tag key."""
    return METADATA_KEY.fullmatch(value) is not None


def is_worker_id(value: str) -> bool:
    """Tells whether `value` is a valid worker id."""
    return WORKER_ID.fullmatch(value) is not None


def is_lease_token(value: str) -> bool:
    """Tells whether `value` is a well-formed worker lease token."""
    return LEASE_TOKEN.fullmatch(value) is not None


def is_prefix_key(value: str) -> bool:
    """Tells whether `value` is a prompt-head key as the edge writes it."""
    return PREFIX_KEY.fullmatch(value) is not None


def is_request_id(value: str) -> bool:
    """Tells whether `value` is a valid request id."""
    return REQUEST_ID.fullmatch(value) is not None


def is_api_key_id(value: str) -> bool:
    """Tells whether `value` is an API key id as the auth service mints them."""
    return API_KEY_ID.fullmatch(value) is not None


# ---------------------------------------------------------------------------
# Identity headers (set only by the edge)
# ---------------------------------------------------------------------------

#: The identity tuple, in this order: the headers the edge sets from a
#: verified JWT or API key. Services honour them only from the edge identity.
IDENTITY_HEADERS = (
    "x-tokenmesh-key-id",
    "x-tokenmesh-tenant",
    "x-tokenmesh-scopes",
    "x-tokenmesh-models",
    "x-tokenmesh-tier",
    "x-tokenmesh-rpm",
    "x-tokenmesh-tpm",
    "x-tokenmesh-monthly-tokens",
    "x-tokenmesh-pins",
)
(
    KEY_ID_HEADER,
    TENANT_HEADER,
    SCOPES_HEADER,
    MODELS_HEADER,  # the models the caller's key may use; empty = all
    TIER_HEADER,
    RPM_HEADER,
    TPM_HEADER,
    MONTHLY_TOKENS_HEADER,
    PINS_HEADER,
) = IDENTITY_HEADERS
#: Sent by the jobs service with each attempt at a job item (delegated calls may
#: carry it beside the identity headers): the Unix time until which the item may
#: run again, its job's deadline. A worker remembers the item's budget charge that
#: long (a replay is charged once, as the usage meter bills it once), not an hour.
REPLAY_UNTIL_HEADER = "x-tokenmesh-replay-until"
#: Sent by the jobs service with an item a v1 Complete handed over (`Prefer:
#: respond-async` on /v1/...:complete): "v1". The item runs on the worker's v2
#: Complete, and its usage was metered as v2, so v1's callers went uncounted in
#: reports by API version. A worker honours it from the jobs service only.
API_VERSION_HEADER = "x-tokenmesh-api-version"
#: The headers a delegate (the jobs service) may send: the owner's identity,
#: REPLAY_UNTIL_HEADER and API_VERSION_HEADER; no routing or other edge-only ones.
DELEGATED_HEADERS = (*IDENTITY_HEADERS, REPLAY_UNTIL_HEADER, API_VERSION_HEADER)
#: Every header with this prefix is the edge's to set (identity, routing, prefix):
#: a request from any other peer that carries one is refused.
EDGE_HEADER_PREFIX = "x-tokenmesh-"
#: A response header a service sets on an error that REST clients must get with
#: another status than the transcoder's mapping of its gRPC code (410 for an API
#: version past its sunset, which gRPC calls UNIMPLEMENTED); the edge applies it
#: and removes it.
HTTP_STATUS_HEADER = "x-tokenmesh-http-status"
#: The subject (QuotaFailure's: "key key_...", "tenant acme") of the rate-limit
#: filter's 429, from the limiter: the edge's REST JSON prints it in its details as
#: a worker's refusal carries it, and removes the header from every answer.
QUOTA_SUBJECT_HEADER = "x-tokenmesh-quota-subject"
# gRPC's own field for an error's google.rpc.Status (its details), base64 in HTTP/2:
# the edge's refusals carry it as a service's errors do.
STATUS_DETAILS_HEADER = "grpc-status-details-bin"
#: ErrorInfo reasons of refusals the edge answers itself for a service, as the
#: service would (gateway/refusal_details.py): a bad credential, too many failed
#: authentications (the auth service), a key over its request rate (the limiter).
INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
AUTH_FAILURES_RATE_LIMITED = "AUTH_FAILURES_RATE_LIMITED"
RATE_LIMITED = "RATE_LIMITED"
#: Trailing metadata of an OpenAI-surface error (tokenmesh.openai.v1): OpenAI's
#: error JSON, which the edge makes the REST body and removes.
OPENAI_ERROR_HEADER = "x-tokenmesh-openai-error"
#: Response header of a worker's inference answer: how the response cache
#: served it, "hit", "miss", "coalesced" or "bypass" (services.inference.pipeline.cache).
CACHE_HEADER = "x-tokenmesh-cache"
#: Set by the edge's mirror policy on the copy of a request it sends to a model's
#: shadow version (`tokenmesh models shadow`): the version that serves the copy.
#: Envoy discards the copy's answer; the worker meters it to SHADOW_TENANT (never
#: to the caller's key, budgets or limits). Edge-only: clients' copies are removed
#: on arrival and any other peer sending it is refused (EDGE_HEADER_PREFIX).
#: NOTE: Envoy also appends "-shadow" to the copy's :authority, but grpc.aio does
#: not show a servicer the authority, so this header is the mark.
SHADOW_HEADER = "x-tokenmesh-shadow"
#: Set by a shadowed model's routes on the live request: the version its copies
#: go to; the worker then keeps a comparison record of the request.
SHADOWED_HEADER = "x-tokenmesh-shadowed"
# Envoy's count of the tries of a request (1, then 2... on its retries), set by the
# edge on every upstream request (a client's copy is removed on arrival).
ATTEMPT_COUNT_HEADER = "x-envoy-attempt-count"
#: Read by OpenAI's SDKs before their own retry rules (openai-python's
#: _base_client._should_retry): "false" on an error that a retry must not repeat
#: (work started, or a refusal a retry soon cannot pass).
SHOULD_RETRY_HEADER = "x-should-retry"
#: What OpenAI's SDKs send on each try of a request (0, then the retries taken).
OPENAI_RETRY_COUNT_HEADER = "x-stainless-retry-count"
#: A unary answer's response headers ride its final batch (services.core.interceptors,
#: HeadersAtEnd): in its trailing metadata, with this trailer naming them, which the
#: edge lifts back into the response headers (gateway/edge_lua.py). An answer over
#: HEADERS_AT_END_MAX_BYTES sends them first, as before, with this header set to
#: HEADERS_SENT: the edge buffers a unary answer to lift its headers, and a large
#: one would pass its buffer limit (gateway.envoy_config.Limits.connection_buffer_bytes).
#: A REST answer is buffered as JSON, up to ~8x its protobuf size (usage buckets):
#: a transcoded call's bound is REST_HEADERS_AT_END_MAX_BYTES (a sixteenth of 1 MiB).
RESPONSE_HEADERS_TRAILER = "x-tokenmesh-response-headers"
HEADERS_SENT = "sent"
HEADERS_AT_END_MAX_BYTES = 256 * 1024
REST_HEADERS_AT_END_MAX_BYTES = 64 * 1024
#: In the event id of a job item's attempt the jobs service will try again (cut by a
#: timeout or a restart): billed nothing and not one of the caller's requests
#: (services.inference.admission.set_attempt_apart; the meter skips its counters).
UNFINISHED_ATTEMPT_MARK = ":unfinished:"
#: The account shadow copies are metered to (usage reports: tenant tokenmesh.shadow).
SHADOW_TENANT = "tokenmesh.shadow"
#: Tenants the mesh writes as itself (SHADOW_TENANT, the rollout decisions' audit
#: log `tokenmesh.system`): no API key may be created for one.
RESERVED_TENANT_PREFIX = "tokenmesh."
ADMIN_SCOPE = "admin"


def is_reserved_tenant(tenant: str) -> bool:
    """Tells whether a tenant is one of the mesh's own accounts (in any case)."""
    return tenant.lower().startswith(RESERVED_TENANT_PREFIX)


# ---------------------------------------------------------------------------
# Worker leases
# ---------------------------------------------------------------------------

#: The longest a worker's channel to the router waits between two connection
#: attempts (gRPC's default backoff grows by 1.6x up to 120 s: after a few
#: seconds' outage a worker's next attempt came seconds after the router was
#: back). The router counts expired leases as live for a lease and two of these
#: after it starts (services/router/service.py), so a worker reconnects and
#: renews within that grace however long the router was away.
ROUTER_RECONNECT_MAX_S = 1.0


# ---------------------------------------------------------------------------
# Component identities and who may call what
# ---------------------------------------------------------------------------

EDGE = "edge"
WORKER = "worker"
AUTH = "auth"
ROUTER = "router"
USAGE = "usage"
JOBS = "jobs"
OPERATOR = "operator"
IDENTITIES = (EDGE, AUTH, ROUTER, USAGE, WORKER, JOBS, OPERATOR)
#: A worker pool's identity is `worker-<pool>`: a certificate per pool (GPU
#: type, team, tenant) instead of the one every worker shares, so a model
#: placed on pools (`tokenmesh models pools`) is registered, routed and
#: connected to only by workers holding one of those pools' certificates.
WORKER_POOL_PREFIX = WORKER + "-"
WORKER_POOL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
WORKER_POOL_RULE = "1-32 characters of [a-z0-9-], starting and ending with a letter or digit"
#: MAX_WORKER_POOLS: the pools one model may be placed on.
MAX_WORKER_POOLS = 16
#: The identity each service's server presents (and the Envoy cluster verifies).
SERVICE_IDENTITY = {
    "inference": WORKER,
    "auth": AUTH,
    "router": ROUTER,
    "usage": USAGE,
    "jobs": JOBS,
}


def worker_pool_of(identity: str | None) -> str | None:
    """Returns the worker pool an identity names ("" for the shared `worker`
    identity), or None when it is no worker's."""
    if identity == WORKER:
        return ""
    if identity is None or not identity.startswith(WORKER_POOL_PREFIX):
        return None
    pool = identity[len(WORKER_POOL_PREFIX) :]
    return pool if is_worker_pool(pool) else None


def is_worker_pool(value: str) -> bool:
    """Tells whether `value` is a valid worker pool name."""
    return WORKER_POOL.fullmatch(value) is not None


def worker_identity(pool: str) -> str:
    """Returns the identity of a worker pool ("": the shared `worker` identity)."""
    return f"{WORKER_POOL_PREFIX}{pool}" if pool else WORKER


def role_of(identity: str | None) -> str | None:
    """Returns the component an identity acts as: `worker` for every worker pool's,
    the identity itself otherwise."""
    return WORKER if worker_pool_of(identity) is not None else identity


def is_identity(name: str) -> bool:
    """Tells whether `name` is a component identity (a worker pool's included)."""
    return name in IDENTITIES or worker_pool_of(name) is not None


@dataclass(frozen=True)
class CallerRule:
    """CallerRule says which component identities may call an RPC.

    Attributes:
        identities: identities that may call it.
        edge_for_admin: the edge may also call it, but only for a caller whose
            verified scopes (x-tokenmesh-scopes) hold `admin`.
        own_address: the caller may only name its own address (worker registry).
        anyone: any caller, even one without a certificate (health checks).
        delegates: identities that may also send the edge's identity headers
            (x-tokenmesh-key-id, -tenant, -scopes, ...) to act for the key they
            name: the jobs service runs a job's items as its owner. Only the
            identity headers, only at `delegated_priority`, and only when the
            vouched scopes hold `delegated_scope`: a delegate never gains what
            the owner's key lacks.
        delegated_scope: the scope the owner's key must hold for a delegated call.
        delegated_priority: the priority enum value name a delegated request must
            carry in its `priority` field (when its message has one).
    """

    identities: frozenset[str]
    edge_for_admin: bool = False
    own_address: bool = False
    anyone: bool = False
    delegates: frozenset[str] = frozenset()
    delegated_scope: str = ""
    delegated_priority: str = ""

    def describe(self) -> str:
        """Returns the rule in words, for PERMISSION_DENIED messages (no internals)."""
        if self.anyone:
            return "may be called by anyone"
        who = " or ".join(sorted(self.identities)) or "nobody"
        if self.edge_for_admin:
            who += ", or the edge for an admin caller"
        return f"may be called only by {who}"


def _rule(*identities: str, edge_for_admin: bool = False, own_address: bool = False) -> CallerRule:
    return CallerRule(frozenset(identities), edge_for_admin, own_address)


def _delegated(scope: str) -> CallerRule:
    """An inference RPC the edge calls, and the jobs service for a job's owner at batch priority."""
    return CallerRule(
        frozenset({EDGE, JOBS}),
        delegates=frozenset({JOBS}),
        delegated_scope=scope,
        delegated_priority="PRIORITY_BATCH",
    )


#: Health carries no data, and probes (Kubernetes, grpc_health_probe) have no identity.
ANY_CALLER = CallerRule(frozenset(), anyone=True)
_ADMIN = _rule(OPERATOR, edge_for_admin=True)
#: Who may call each gRPC service (by "/package.Service/" prefix) or method
#: (full path, which wins over its service's rule). A method with no rule is
#: refused: every server checks its methods against this table at start.
CALLER_RULES: dict[str, CallerRule] = {
    "/grpc.health.v1.Health/": ANY_CALLER,
    "/grpc.reflection.v1alpha.ServerReflection/": _rule(EDGE, OPERATOR),
    "/grpc.reflection.v1.ServerReflection/": _rule(EDGE, OPERATOR),
    # Public APIs arrive through the edge (which authenticated the client).
    # The auth service checks API keys itself, so the operator CLI may call it.
    "/tokenmesh.auth.v1.AuthService/": _rule(EDGE, OPERATOR),
    "/tokenmesh.inference.v1.InferenceService/": _rule(EDGE),
    "/tokenmesh.inference.v2.InferenceService/": _rule(EDGE),
    "/tokenmesh.openai.v1.OpenAIService/": _rule(EDGE),
    "/tokenmesh.router.v1.RouterService/": _rule(EDGE, OPERATOR),
    "/tokenmesh.usage.v1.UsageService/": _rule(EDGE),
    "/tokenmesh.usage.v2.UsageService/": _rule(EDGE),
    "/tokenmesh.jobs.v1.JobsService/": _rule(EDGE),
    # OpenAI's files and batches, and Prefer: respond-async, served by the jobs service.
    "/tokenmesh.openai.v1.OpenAIBatchService/": _rule(EDGE),
    "/tokenmesh.jobs.v1.HandoverService/": _rule(EDGE),
    # A job's items run as its owner: the jobs service forwards the owner's
    # identity headers, at batch priority, for the scope each RPC needs
    # (gateway/edge_auth.RPC_SCOPES; tests/unit/test_mesh_contract.py checks).
    "/tokenmesh.inference.v2.InferenceService/Generate": _delegated("inference:generate"),
    "/tokenmesh.inference.v2.InferenceService/Complete": _delegated("inference:generate"),
    "/tokenmesh.inference.v2.InferenceService/Embed": _delegated("inference:embed"),
    # The edge's own callouts and its control plane.
    "/envoy.service.auth.v3.Authorization/": _rule(EDGE),
    "/envoy.service.ratelimit.v3.RateLimitService/": _rule(EDGE),
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/": _rule(EDGE),
    # Admin RPCs.
    "/tokenmesh.inference.v1.InferenceAdminService/": _ADMIN,
    "/tokenmesh.router.v1.RouterService/RegisterModelVersion": _ADMIN,
    "/tokenmesh.router.v1.RouterService/SetTrafficSplit": _ADMIN,
    "/tokenmesh.router.v1.RouterService/PinModelVersion": _ADMIN,
    "/tokenmesh.router.v1.RouterService/DeprecateModelVersion": _ADMIN,
    "/tokenmesh.router.v1.RouterService/SetFallbackModel": _ADMIN,
    "/tokenmesh.router.v1.RouterService/SetModelWorkerPools": _ADMIN,
    "/tokenmesh.router.v1.RouterService/SetModelAlias": _ADMIN,
    "/tokenmesh.router.v1.RouterService/SetModelPrice": _ADMIN,
    "/tokenmesh.router.v1.RouterService/StartRollout": _ADMIN,
    "/tokenmesh.router.v1.RouterService/GetRollout": _ADMIN,
    "/tokenmesh.router.v1.RouterService/PauseRollout": _ADMIN,
    "/tokenmesh.router.v1.RouterService/ResumeRollout": _ADMIN,
    "/tokenmesh.router.v1.RouterService/AbortRollout": _ADMIN,
    "/tokenmesh.router.v1.RouterService/SetShadowTraffic": _ADMIN,
    "/tokenmesh.router.v1.RouterService/CompareModelVersions": _ADMIN,
    "/tokenmesh.router.v1.RouterService/CreatePromptTemplate": _ADMIN,
    "/tokenmesh.router.v1.RouterService/SetPromptTemplateAlias": _ADMIN,
    **{
        f"/tokenmesh.router.v1.RouterService/{rpc}": _ADMIN
        for rpc in (
            "CreatePolicy",
            "GetPolicy",
            "ListPolicies",
            "AttachPolicy",
            "DetachPolicy",
            "SetSampleSettings",
            "ExportSamples",
        )
    },
    "/tokenmesh.usage.v1.UsageService/ListAuditEntries": _ADMIN,
    # A worker also drains itself on SIGTERM (the router checks it is its own host).
    "/tokenmesh.router.v1.WorkerRegistryService/DrainWorker": _rule(
        OPERATOR, WORKER, edge_for_admin=True
    ),
    "/tokenmesh.router.v1.WorkerRegistryService/ListWorkers": _ADMIN,
    # Only a worker registers, and only itself.
    "/tokenmesh.router.v1.WorkerRegistryService/RegisterWorker": _rule(WORKER, own_address=True),
    "/tokenmesh.router.v1.WorkerRegistryService/RenewLease": _rule(WORKER, own_address=True),
}


def caller_rule(method: str) -> CallerRule | None:
    """Returns the rule for a full method path ("/pkg.Service/Method"), or None."""
    rule = CALLER_RULES.get(method)
    if rule is None:
        rule = CALLER_RULES.get(method[: method.rfind("/") + 1])
    return rule
