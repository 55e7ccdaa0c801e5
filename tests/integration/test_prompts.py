"""Prompt templates: the router's catalogue RPCs over mTLS and the workers' cache, on real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.core.errors import NotFound
from services.core.server import RunningServer, serving
from services.core.tasks import Supervisor
from services.inference.template_cache import TemplateCache
from services.router import prompts
from services.router.prompts import PromptCatalog
from services.router.service import RouterService, RouterSettings
from tests import mtls
from tokenmesh.router.v1 import router_pb2
from tokenmesh.router.v1 import router_service_pb2 as pb
from tokenmesh.router.v1 import router_service_pb2_grpc as rpc

SUPPORT = "Dear {{ customer }},\n{{ system }}\n{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.fixture
async def router(redis_url) -> AsyncIterator[RunningServer]:
    settings = RouterSettings(
        pki_dir=mtls.pki_dir(), metrics_port=-1, grace_s=0.5, redis_url=redis_url
    )
    async with serving(RouterService(settings), settings) as running:
        yield running


@pytest.fixture
async def admin(router) -> AsyncIterator[_with_metadata]:
    """RouterService as the edge calls it for a caller with the admin scope."""
    async with mtls.aio_channel(router.port, peer="router") as channel:
        yield _with_metadata(rpc.RouterServiceStub(channel), mtls.EDGE_FOR_ADMIN)


@pytest.fixture
async def redis_client(redis_url) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def name() -> str:
    return f"support-{uuid.uuid4().hex[:8]}"


class _with_metadata:
    """Calls a stub's RPCs with fixed metadata (the identity headers the edge sets)."""

    def __init__(self, stub, metadata) -> None:
        self._stub, self._metadata = stub, list(metadata)

    def __getattr__(self, rpc_name):
        method = getattr(self._stub, rpc_name)
        return lambda request, **kw: method(request, metadata=self._metadata, timeout=10, **kw)


def _create(name: str, template: str = SUPPORT, **fields) -> pb.CreatePromptTemplateRequest:
    return pb.CreatePromptTemplateRequest(name=name, template=template, **fields)


async def _error(call) -> tuple[grpc.StatusCode, dict[str, str], str]:
    """Awaits a failing call; returns its code, BadRequest violations and ErrorInfo reason."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    status = await rpc_status.aio.from_call(call)
    violations: dict[str, str] = {}
    reason = ""
    for detail in status.details if status else ():
        bad, error_info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
        if detail.Unpack(bad):
            violations.update({v.field: v.description for v in bad.field_violations})
        elif detail.Unpack(error_info):
            reason = error_info.reason
    return info.value.code(), violations, reason


async def test_each_create_adds_an_immutable_numbered_version(admin, name):
    first = await admin.CreatePromptTemplate(
        _create(
            name,
            system_prompt="Be kind.",
            variables=[router_pb2.PromptVariable(name="customer", max_length=64, required=True)],
        )
    )
    second = await admin.CreatePromptTemplate(_create(name, template="v2 {{ topic }}"))
    assert (first.template.version, second.template.version) == (1, 2)
    assert first.template.create_time.seconds > 0
    got = (
        await admin.GetPromptTemplate(pb.GetPromptTemplateRequest(name=name, version="1"))
    ).template
    assert (got.template, got.system_prompt) == (SUPPORT, "Be kind.")
    assert [(v.name, v.required, v.max_length) for v in got.variables] == [("customer", True, 64)]
    # An undeclared variable is declared for the client: required, 4096 characters.
    latest = (await admin.GetPromptTemplate(pb.GetPromptTemplateRequest(name=name))).template
    assert latest.version == 2
    assert [(v.name, v.required, v.max_length) for v in latest.variables] == [("topic", True, 4096)]


async def test_aliases_point_at_versions_and_move(admin, name):
    for _ in range(2):
        await admin.CreatePromptTemplate(_create(name))
    alias = pb.SetPromptTemplateAliasRequest(name=name, alias="stable", version=1)
    head = (await admin.SetPromptTemplateAlias(alias)).template
    assert (head.latest_version, dict(head.aliases)) == (2, {"stable": 1})
    get = pb.GetPromptTemplateRequest(name=name, version="stable")
    assert (await admin.GetPromptTemplate(get)).template.version == 1
    alias.version = 2
    await admin.SetPromptTemplateAlias(alias)
    assert (await admin.GetPromptTemplate(get)).template.version == 2
    listed = await admin.ListPromptTemplates(pb.ListPromptTemplatesRequest())
    entry = next(t for t in listed.templates if t.name == name)
    assert (entry.latest_version, dict(entry.aliases)) == (2, {"stable": 2})
    alias.version = 0  # removes it
    assert dict((await admin.SetPromptTemplateAlias(alias)).template.aliases) == {}


async def test_bad_input_is_invalid_argument_naming_the_field(admin, name):
    cases = [
        (_create("a/b"), "name"),
        (_create(name, template="{% include 'x' %}"), "template"),
        (_create(name, template="x" * (64 * 1024 + 1)), "template"),
        (
            _create(name, variables=[router_pb2.PromptVariable(name="x", max_length=70000)]),
            "variables[0].max_length",
        ),
        (
            _create(name, variables=[router_pb2.PromptVariable(name="messages")]),
            "variables[0].name",
        ),
    ]
    for request, field in cases:
        code, violations, _ = await _error(admin.CreatePromptTemplate(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in violations, violations
    await admin.CreatePromptTemplate(_create(name))
    for alias, version, field in (("9", 1, "alias"), ("latest", 1, "alias"), ("ok", 5, "version")):
        request = pb.SetPromptTemplateAliasRequest(name=name, alias=alias, version=version)
        code, violations, _ = await _error(admin.SetPromptTemplateAlias(request))
        assert (code, list(violations)) == (grpc.StatusCode.INVALID_ARGUMENT, [field])


async def test_missing_templates_versions_and_aliases_are_not_found(admin, name):
    missing = pb.GetPromptTemplateRequest(name=name, version="1")
    assert (await _error(admin.GetPromptTemplate(missing)))[::2] == (
        grpc.StatusCode.NOT_FOUND,
        "PROMPT_TEMPLATE_VERSION_NOT_FOUND",
    )
    await admin.CreatePromptTemplate(_create(name))
    for version, reason in (
        ("2", "PROMPT_TEMPLATE_VERSION_NOT_FOUND"),
        ("canary", "PROMPT_TEMPLATE_ALIAS_NOT_FOUND"),
    ):
        request = pb.GetPromptTemplateRequest(name=name, version=version)
        code, _, got = await _error(admin.GetPromptTemplate(request))
        assert (code, got) == (grpc.StatusCode.NOT_FOUND, reason)
    alias = pb.SetPromptTemplateAliasRequest(name=f"{name}-nope", alias="stable", version=1)
    assert (await _error(admin.SetPromptTemplateAlias(alias)))[::2] == (
        grpc.StatusCode.NOT_FOUND,
        "PROMPT_TEMPLATE_NOT_FOUND",
    )


async def test_writes_need_admin_and_reads_reach_any_edge_caller_and_the_operator(router, name):
    reader = [("x-tokenmesh-scopes", "models:read")]
    async with mtls.aio_channel(router.port, peer="router") as channel:
        stub = _with_metadata(rpc.RouterServiceStub(channel), reader)
        code, _, reason = await _error(stub.CreatePromptTemplate(_create(name)))
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")
    async with mtls.aio_channel(router.port, peer="router", caller="operator") as channel:
        operator = _with_metadata(rpc.RouterServiceStub(channel), [])
        await operator.CreatePromptTemplate(_create(name))
    async with mtls.aio_channel(router.port, peer="router") as channel:
        stub = _with_metadata(rpc.RouterServiceStub(channel), reader)
        got = await stub.GetPromptTemplate(pb.GetPromptTemplateRequest(name=name, version="1"))
        assert got.template.version == 1
        assert name in [
            t.name
            for t in (await stub.ListPromptTemplates(pb.ListPromptTemplatesRequest())).templates
        ]
    async with mtls.aio_channel(router.port, peer="router", caller="worker") as channel:
        stub = _with_metadata(rpc.RouterServiceStub(channel), [])
        code, _, _ = await _error(stub.CreatePromptTemplate(_create(name)))
        assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_the_catalogue_is_shared_across_tenants_and_only_admins_change_it(router, name):
    # The contract (proto, docs/security.md): templates are catalogue objects an admin
    # (a platform-wide scope) writes and every tenant's models:read key reads, as models.
    alpha_admin = [
        ("x-tokenmesh-key-id", "key-alpha"),
        ("x-tokenmesh-tenant", "alpha"),
        ("x-tokenmesh-scopes", "admin"),
    ]
    beta_reader = [
        ("x-tokenmesh-key-id", "key-beta"),
        ("x-tokenmesh-tenant", "beta"),
        ("x-tokenmesh-scopes", "models:read inference:generate"),
    ]
    async with mtls.aio_channel(router.port, peer="router") as channel:
        alpha = _with_metadata(rpc.RouterServiceStub(channel), alpha_admin)
        beta = _with_metadata(rpc.RouterServiceStub(channel), beta_reader)
        await alpha.CreatePromptTemplate(_create(name, system_prompt="Be kind."))
        got = (await beta.GetPromptTemplate(pb.GetPromptTemplateRequest(name=name))).template
        assert (got.version, got.template, got.system_prompt) == (1, SUPPORT, "Be kind.")
        listed = await beta.ListPromptTemplates(pb.ListPromptTemplatesRequest())
        assert name in [t.name for t in listed.templates]
        # Another tenant cannot change a shared template: neither a version nor an alias.
        alias = pb.SetPromptTemplateAliasRequest(name=name, alias="stable", version=1)
        for call in (beta.CreatePromptTemplate(_create(name)), beta.SetPromptTemplateAlias(alias)):
            code, _, reason = await _error(call)
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")
        head = next(
            t
            for t in (await alpha.ListPromptTemplates(pb.ListPromptTemplatesRequest())).templates
            if t.name == name
        )
        assert (head.latest_version, dict(head.aliases)) == (1, {})


async def test_concurrent_creates_get_distinct_versions_and_no_alias_is_lost(admin, name):
    created = await asyncio.gather(
        *(admin.CreatePromptTemplate(_create(name, template=f"v{i}")) for i in range(12))
    )
    versions = sorted(c.template.version for c in created)
    assert versions == list(range(1, 13))
    for c in created:  # each number holds the source its create sent
        got = await admin.GetPromptTemplate(
            pb.GetPromptTemplateRequest(name=name, version=str(c.template.version))
        )
        assert got.template.template == c.template.template
    # Aliases set at once, interleaved with creates: every alias survives.
    await asyncio.gather(
        *(
            admin.SetPromptTemplateAlias(
                pb.SetPromptTemplateAliasRequest(name=name, alias=f"a{i}", version=i + 1)
            )
            for i in range(8)
        ),
        *(admin.CreatePromptTemplate(_create(name)) for _ in range(4)),
    )
    head = (await admin.GetPromptTemplate(pb.GetPromptTemplateRequest(name=name))).template
    assert head.version == 16
    listed = await admin.ListPromptTemplates(pb.ListPromptTemplatesRequest())
    entry = next(t for t in listed.templates if t.name == name)
    assert dict(entry.aliases) == {f"a{i}": i + 1 for i in range(8)}


# --- the workers' cache ----------------------------------------------------------


async def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_the_cache_fetches_an_immutable_version_once(admin, redis_client, name):
    await admin.CreatePromptTemplate(_create(name))
    cache = TemplateCache(PromptCatalog(redis_client))
    results = await asyncio.gather(*(cache.get(name, "1") for _ in range(20)))
    assert {r.label for r in results} == {f"{name}@1"}
    assert cache.stats.version_fetches == 1  # concurrent misses share one fetch
    # The version no longer needs Redis at all: even with its key gone it is served.
    await redis_client.hdel(prompts.VERSIONS_KEY, f"{name}@1")
    template = await cache.get(name, "1")
    assert template.render({"customer": "Ann"}) == "Dear Ann,\n\n"
    assert cache.stats.version_fetches == 1


async def test_the_cache_sees_an_alias_move_within_a_second(admin, redis_client, name):
    for _ in range(2):
        await admin.CreatePromptTemplate(_create(name))
    alias = pb.SetPromptTemplateAliasRequest(name=name, alias="stable", version=1)
    await admin.SetPromptTemplateAlias(alias)
    supervisor = Supervisor("test")
    cache = TemplateCache(PromptCatalog(redis_client))
    cache.start(supervisor)
    try:
        assert (await cache.get(name, "stable")).version == 1
        alias.version = 2
        await admin.SetPromptTemplateAlias(alias)
        # The background refresh (every 0.5 s) moves it; requests then read memory only.
        await _wait_for(lambda: _version_is(cache, name, "stable", 2), timeout_s=2.0)
        fetches = cache.stats.head_fetches
        for _ in range(50):
            assert (await cache.get(name, "stable")).version == 2
        assert cache.stats.head_fetches == fetches == 1  # only the first use read a head
        # A new version is "latest" after the next refresh, too.
        await admin.CreatePromptTemplate(_create(name, template="three"))
        assert (await cache.get(name, "latest")).version in (2, 3)
        await _wait_for(lambda: _version_is(cache, name, "", 3), timeout_s=2.0)
    finally:
        await supervisor.stop()


async def test_without_the_background_task_heads_expire_after_the_ttl(admin, redis_client, name):
    now = [0.0]
    await admin.CreatePromptTemplate(_create(name))
    await admin.SetPromptTemplateAlias(
        pb.SetPromptTemplateAliasRequest(name=name, alias="canary", version=1)
    )
    cache = TemplateCache(PromptCatalog(redis_client), ttl_s=1.0, clock=lambda: now[0])
    assert (await cache.get(name, "canary")).version == 1
    await admin.CreatePromptTemplate(_create(name))
    await admin.SetPromptTemplateAlias(
        pb.SetPromptTemplateAliasRequest(name=name, alias="canary", version=2)
    )
    now[0] = 0.9
    assert (await cache.get(name, "canary")).version == 1  # still fresh: memory only
    now[0] = 1.1
    assert (await cache.get(name, "canary")).version == 2
    assert cache.stats.head_fetches == 2


async def test_the_cache_reports_missing_templates_and_remembers_them_briefly(redis_client, name):
    now = [0.0]
    cache = TemplateCache(PromptCatalog(redis_client), clock=lambda: now[0])
    for _ in range(3):
        with pytest.raises(NotFound):
            await cache.get(name, "stable")
        with pytest.raises(NotFound):
            await cache.get(name, "7")
    assert (cache.stats.head_fetches, cache.stats.version_fetches) == (1, 1)


async def _version_is(cache: TemplateCache, name: str, selector: str, version: int) -> bool:
    return (await cache.get(name, selector)).version == version


async def test_only_selectors_that_resolved_are_kept_for_prefetching(admin, redis_client, name):
    await admin.CreatePromptTemplate(_create(name))
    for alias in ("stable", "canary"):
        await admin.SetPromptTemplateAlias(
            pb.SetPromptTemplateAliasRequest(name=name, alias=alias, version=1)
        )
    cache = TemplateCache(PromptCatalog(redis_client), clock=lambda: 0.0)
    for selector in ("stable", "canary", "", "latest"):
        assert (await cache.get(name, selector)).version == 1
    # Selectors come from clients: unknown aliases must not pile up (each was kept, and
    # scanned by every refresh, for as long as the template was used).
    for i in range(20_000):
        with pytest.raises(NotFound):
            await cache.get(name, f"junk{i}")
    assert cache.prefetched(name) == {"stable", "canary", "", "latest"}
    # An alias an operator removes leaves the set at the next refresh.
    await admin.SetPromptTemplateAlias(
        pb.SetPromptTemplateAliasRequest(name=name, alias="canary", version=0)
    )
    await cache.refresh()
    assert cache.prefetched(name) == {"stable", "", "latest"}


async def test_a_version_must_be_ascii_digits_on_the_router(admin, name):
    await admin.CreatePromptTemplate(_create(name))
    # "²".isdigit() is True but int() refuses it: it was INTERNAL (a ValueError).
    for version in ("²", "٣", "1" * 5000):
        request = pb.GetPromptTemplateRequest(name=name, version=version)
        code, violations, _ = await _error(admin.GetPromptTemplate(request))
        assert (code, list(violations)) == (grpc.StatusCode.INVALID_ARGUMENT, ["version"]), version
