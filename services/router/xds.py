"""The xDS control plane: state-of-the-world ADS over gRPC for every edge Envoy.

`ControlPlane` rebuilds the resources from Redis a few times a second (so
lease expiries, catalogue changes made through any router replica, and
worker registrations all show up within a second) and bumps a generation
when their content changed. `AdsServicer` keeps, per Envoy stream and per
resource type, what was sent under which nonce, sends on change (at most
one response per type waits for a slow Envoy: see `Outbox`), treats a
request whose nonce matches the last response as its ACK or NACK, and
ignores stale nonces. Nothing is sent before the first snapshot was read
from Redis: an empty answer would make a reconnecting Envoy drop its routes.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc.aio
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message
from prometheus_client import Gauge
from redis.exceptions import RedisError

from services.core.tasks import SupervisedTask, Supervisor
from services.router.snapshot import CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE, EdgeFlags, Resources

logger = logging.getLogger(__name__)

# An Envoy that rejects a config keeps its previous one: every routing change since
# (a rollout's step or rollback, a new version, a drained worker) is not applied on
# that edge, while the catalogue says it is. Alert TokenmeshEdgeConfigRejected.
REJECTED = Gauge(
    "tokenmesh_xds_rejected_configs",
    "ADS streams whose Envoy rejected (NACKed) the last configuration of a type this "
    "router sent it, and has accepted none since.",
    ["type"],
)
# Sent in this order so an Envoy knows a cluster before its endpoints and routes.
TYPE_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE)
_MESSAGES: Mapping[str, type[Message]] = {
    CLUSTER_TYPE: cluster_pb2.Cluster,
    ENDPOINT_TYPE: endpoint_pb2.ClusterLoadAssignment,
    ROUTE_TYPE: route_pb2.RouteConfiguration,
}
# State of the world: these types are always sent whole, whatever was asked for.
_WILDCARD_TYPES = frozenset({CLUSTER_TYPE})
# A cluster a build drops (a version sunset, a model or fallback removed) outlives the
# routes that named it by this long: make before break. Envoy applies a stream's
# clusters before its routes, so a cluster removed with its routes left them naming a
# cluster Envoy no longer had for a moment (503, "no cluster"). It takes one poll.
CLUSTER_LINGER_S = 5.0


@dataclass(frozen=True)
class PackedResources:
    """PackedResources are one edge flavour's resources, as protobuf Any, by type
    (`source`: the JSON-shaped resources they were packed from)."""

    versions: Mapping[str, str]
    by_type: Mapping[str, Mapping[str, any_pb2.Any]]
    source: Resources


def pack(resources: Resources, previous: PackedResources | None = None) -> PackedResources:
    """Converts JSON-shaped resources to protobuf (raises ValueError on a bad shape).

    What equals `previous`'s source is taken from `previous` as packed, versions
    included: under traffic every heartbeat moves an endpoint weight (and a
    hot head may move a pin), and converting and hashing every resource of every
    type for that was most of a busy router's CPU (~20 ms a change).
    """
    by_type: dict[str, dict[str, any_pb2.Any]] = {}
    versions: dict[str, str] = {}
    for type_url, named in resources.by_type.items():
        before = previous.source.by_type.get(type_url, {}) if previous else {}
        packed_before = previous.by_type.get(type_url, {}) if previous else {}
        if previous is not None and type_url in previous.versions and before == named:
            by_type[type_url] = dict(packed_before)
            versions[type_url] = previous.versions[type_url]
            continue
        packed: dict[str, any_pb2.Any] = {}
        for name, resource in named.items():
            if name in packed_before and before.get(name) == resource:
                packed[name] = packed_before[name]
                continue
            message = json_format.ParseDict(resource, _MESSAGES[type_url]())
            packed[name] = any_pb2.Any()
            packed[name].Pack(message)
        by_type[type_url] = packed
        versions[type_url] = resources.version(type_url)
    return PackedResources(versions, by_type, resources)


@dataclass(frozen=True)
class _Lingering:
    """A cluster a build dropped, kept since `dropped_at` (ControlPlane._before_break)."""

    dropped_at: float
    cluster: dict[str, Any]
    endpoints: dict[str, Any] | None

    def over(self, now: float) -> bool:
        return now - self.dropped_at >= CLUSTER_LINGER_S


class ControlPlane:
    """ControlPlane holds the latest resources and tells streams when they change.

    Args:
        build: reads Redis once and returns the resources for each of the given
            edge flavours, in order.
        poll_s: how often Redis is read.
    """

    def __init__(
        self,
        build: Callable[[Sequence[EdgeFlags]], Awaitable[Sequence[Resources]]],
        poll_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build
        self._poll_s = poll_s
        self._clock = clock
        # Per flavour: clusters the builds dropped, kept a while (CLUSTER_LINGER_S).
        self._lingering: dict[EdgeFlags, dict[str, _Lingering]] = {}
        self._flavours: dict[EdgeFlags, PackedResources] = {}  # filled by the first refresh
        # Connected streams per flavour: a poll rebuilds only these (each flavour is
        # a build of every resource; the default used to be rebuilt for nobody).
        self._users: collections.Counter[EdgeFlags] = collections.Counter()
        # When each flavour's last stream ended: its snapshot and lingering clusters
        # are held (not rebuilt) for CLUSTER_LINGER_S, so an edge that reconnects
        # within it (Envoy's ADS retry backs off 0.5 s and more, several polls) gets
        # make-before-break against what it had, not a build from nothing.
        self._released_at: dict[EdgeFlags, float] = {}
        self._generation = 0
        self._changed = asyncio.Condition()
        self.ready = asyncio.Event()
        self.closing = asyncio.Event()  # set on shutdown: streams end, Envoys reconnect elsewhere
        self._task: SupervisedTask | None = None
        # One build at a time: the poll, the catalogue RPCs and rollouts all refresh,
        # and a slow build that read Redis first, installed last, pushed every edge
        # the older state (a drained worker back in, a rollback undone) until the
        # next poll.
        self._building = asyncio.Lock()

    def start(self, supervisor: Supervisor) -> None:
        """Starts polling Redis in the background, under `supervisor`."""
        self._task = supervisor.spawn("xds-poll", self._poll_forever)

    async def stop(self) -> None:
        """Stops polling."""
        if self._task is not None:
            await self._task.stop(timeout_s=5)

    def resources(self, flags: EdgeFlags) -> PackedResources:
        """Returns the latest resources for an edge with `flags` (a stream's, after `ensure`;
        the default flavour's while no stream is connected)."""
        return self._flavours[flags]

    async def ensure(self, flags: EdgeFlags) -> None:
        """Counts a stream of `flags` in and builds that flavour now unless a poll keeps it
        fresh already; every poll refreshes it after, until `release`."""
        fresh = flags in self._in_use() and flags in self._flavours
        self._users[flags] += 1
        self._released_at.pop(flags, None)
        if fresh:
            return
        async with self._building:
            try:
                built = await self._build([flags])
            except Exception:
                if flags not in self._flavours:
                    raise  # nothing to serve: the stream ends, the edge tries again
                # Redis away (or a build that fails): an edge that (re)starts now gets
                # the flavour's last snapshot, as the connected ones keep theirs. It
                # got none, again and again, and served no route until Redis was back.
                logger.warning(
                    "xDS: could not build a new edge's configuration; serving the last one",
                    exc_info=True,
                )
                return
            # Installed as a poll installs, make before break included: stored as
            # built, a cluster dropped under CLUSTER_LINGER_S ago left the snapshot at
            # once (the reconnecting edge's routes still named it: 503 "no cluster"),
            # and the next poll put it back from the lingering set for a few seconds.
            changed = self._install([flags], built)
        await self._publish(changed)

    def release(self, flags: EdgeFlags) -> None:
        """Counts a stream of `flags` out (a flavour left unused is no longer rebuilt,
        and is dropped CLUSTER_LINGER_S later unless a stream of it comes back)."""
        self._users[flags] -= 1
        if self._users[flags] <= 0:
            del self._users[flags]
            self._released_at[flags] = self._clock()

    def _in_use(self) -> list[EdgeFlags]:
        """The flavours a poll rebuilds: connected streams', or the default while none is."""
        return list(self._users) or [EdgeFlags()]

    async def refresh(self) -> None:
        """Reads Redis now; wakes every stream when anything changed."""
        async with self._building:
            flavours = self._in_use()
            changed = self._install(flavours, await self._build(flavours))
        self.ready.set()
        await self._publish(changed)

    async def _publish(self, changed: bool) -> None:
        """Wakes every stream if an install changed anything (a stream of a flavour
        that `ensure` rebuilt may have read its older snapshot meanwhile)."""
        if changed:
            async with self._changed:
                self._generation += 1
                self._changed.notify_all()

    def _install(self, flavours: Sequence[EdgeFlags], built: Sequence[Resources]) -> bool:
        """Keeps a build's resources; returns whether any flavour changed."""
        changed = False
        now = self._clock()
        for flags, built_resources in zip(flavours, built, strict=True):
            resources = self._before_break(flags, built_resources, now)
            # Converting to protobuf and hashing are not cheap (JSON-encoding every
            # resource was ~40% of an idle router's CPU, 4 polls a second): compare
            # the dicts, and pack and hash only on change.
            last = self._flavours.get(flags)
            if last is None or resources.by_type != last.source.by_type:
                self._flavours[flags] = pack(resources, last)
                changed = True
        # A flavour nobody uses is not kept stale for long: after its hold (or at once,
        # the default's once an edge connects) it is dropped and `ensure` builds it afresh.
        for unused in (set(self._flavours) | set(self._released_at)) - set(self._in_use()):
            released_at = self._released_at.get(unused)
            if released_at is None or now - released_at >= CLUSTER_LINGER_S:
                self._flavours.pop(unused, None)
                self._lingering.pop(unused, None)
                self._released_at.pop(unused, None)
        return changed

    def _before_break(self, flags: EdgeFlags, resources: Resources, now: float) -> Resources:
        """Returns `resources` with the clusters (and endpoints) the last install had and
        this build dropped, until CLUSTER_LINGER_S after they were dropped."""
        lingering = self._lingering.setdefault(flags, {})
        last = self._flavours.get(flags)
        clusters = resources.by_type.get(CLUSTER_TYPE, {})
        if last is not None:
            had = last.source.by_type
            for name, cluster in had.get(CLUSTER_TYPE, {}).items():
                if name not in clusters and name not in lingering:
                    endpoints = had.get(ENDPOINT_TYPE, {}).get(name)
                    lingering[name] = _Lingering(now, cluster, endpoints)
        for name in [n for n, kept in lingering.items() if n in clusters or kept.over(now)]:
            del lingering[name]
        if not lingering:
            return resources
        by_type = dict(resources.by_type)
        by_type[CLUSTER_TYPE] = {**clusters, **{n: k.cluster for n, k in lingering.items()}}
        by_type[ENDPOINT_TYPE] = {
            **resources.by_type.get(ENDPOINT_TYPE, {}),
            **{n: k.endpoints for n, k in lingering.items() if k.endpoints is not None},
        }
        return replace(resources, by_type=by_type)

    async def wait_changed(self, seen: int) -> int:
        """Waits until the generation moves past `seen`; returns the new one."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._generation != seen)
            return self._generation

    @property
    def generation(self) -> int:
        """Returns how many times the resources changed."""
        return self._generation

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                # Keep serving the last snapshot: Envoys keep their config too. (An
                # outage is the Redis health monitor's to report; anything else is a
                # bug that ends the run, for the supervisor to log, restart and count.)
                logger.warning("xDS refresh failed (%s); serving the last snapshot", exc)
            await asyncio.sleep(self._poll_s)


class Outbox:
    """Outbox holds the responses a stream has yet to send: at most one per type.

    A slow Envoy cannot make it grow: a newer response of a type replaces the
    pending one (go-control-plane keeps one pending response per watch the
    same way), and the Envoy gets the latest state once it reads again. Its
    nonce is the subscription's newest, so the replaced one is never ACKed.
    Responses leave in TYPE_ORDER (clusters before their endpoints and routes).
    """

    def __init__(self) -> None:
        self._pending: dict[str, discovery_pb2.DiscoveryResponse] = {}
        self._ready = asyncio.Event()

    def put(self, response: discovery_pb2.DiscoveryResponse) -> None:
        """Queues `response`, replacing any pending response of its type."""
        self._pending[response.type_url] = response
        self._ready.set()

    def empty(self) -> bool:
        """Tells whether nothing is pending."""
        return not self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def get_nowait(self) -> discovery_pb2.DiscoveryResponse:
        """Returns the next pending response (raises asyncio.QueueEmpty when none)."""
        if not self._pending:
            raise asyncio.QueueEmpty
        type_url = min(self._pending, key=_send_rank)
        response = self._pending.pop(type_url)
        if not self._pending:
            self._ready.clear()
        return response

    async def get(self) -> discovery_pb2.DiscoveryResponse:
        """Waits for, then returns, the next pending response."""
        while not self._pending:
            await self._ready.wait()
        return self.get_nowait()


def _send_rank(type_url: str) -> int:
    return TYPE_ORDER.index(type_url) if type_url in TYPE_ORDER else len(TYPE_ORDER)


@dataclass
class _Subscription:
    """What one stream asked for, and was last sent, of one resource type."""

    names: frozenset[str] = frozenset()
    sent_version: str | None = None
    nonce: str = ""
    acked_version: str = ""
    rejected: bool = False  # its last answer was a NACK (counted in REJECTED)

    def answered(self, type_url: str, rejected: bool) -> None:
        """Records whether the stream's Envoy rejected the last config of this type."""
        if rejected != self.rejected:
            REJECTED.labels(type_url.rsplit(".", 1)[-1]).inc(1 if rejected else -1)
            self.rejected = rejected


@dataclass
class _Stream:
    """One Envoy's ADS stream."""

    plane: ControlPlane
    peer: str
    flags: EdgeFlags = EdgeFlags()
    node_id: str = ""
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    outbox: Outbox = field(default_factory=Outbox)
    nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    counted: bool = False  # in the plane's users of `flags` (see ControlPlane.ensure)

    async def on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        """Handles a subscription, an ACK or a NACK."""
        if not self.counted:  # the first request names the node (Envoy always sends it)
            if request.HasField("node"):
                self.node_id = request.node.id
                metadata = json_format.MessageToDict(request.node.metadata)
                self.flags = EdgeFlags.from_metadata(metadata)
            self.counted = True  # before the await: ensure counts it in before its own
            await self.plane.ensure(self.flags)
            logger.info("node %s (%s) subscribed with %s", self.node_id, self.peer, self.flags)
        type_url = request.type_url
        if type_url not in _MESSAGES:
            logger.warning("node %s asked for unsupported type %s", self.node_id, type_url)
            return
        subscription = self.subscriptions.setdefault(type_url, _Subscription())
        if request.response_nonce and request.response_nonce != subscription.nonce:
            return  # an answer to an older response: superseded
        names = frozenset(request.resource_names)
        names_changed = names != subscription.names
        subscription.names = names
        if request.HasField("error_detail"):
            # NACK: Envoy keeps its previous config; resend only when ours changes.
            subscription.answered(type_url, rejected=True)
            logger.error(
                "node %s rejected %s version %s: %s",
                self.node_id,
                type_url.rsplit(".", 1)[-1],
                subscription.sent_version,
                request.error_detail.message,
            )
        elif request.response_nonce:
            subscription.acked_version = request.version_info
            subscription.answered(type_url, rejected=False)
        first = not request.response_nonce
        self.send(type_url, force=first or names_changed)

    def send(self, type_url: str, *, force: bool = False) -> None:
        """Queues the latest resources of `type_url` unless this stream already has them."""
        subscription = self.subscriptions.get(type_url)
        if subscription is None:
            return
        resources = self.plane.resources(self.flags)
        version = resources.versions.get(type_url, "")
        if version == subscription.sent_version and not force:
            return
        named = resources.by_type.get(type_url, {})
        if type_url in _WILDCARD_TYPES or not subscription.names:
            chosen = [named[n] for n in sorted(named)]
        else:
            chosen = [named[n] for n in sorted(subscription.names) if n in named]
        subscription.sent_version = version
        subscription.nonce = str(next(self.nonces))
        self.outbox.put(
            discovery_pb2.DiscoveryResponse(
                version_info=version,
                resources=chosen,
                type_url=type_url,
                nonce=subscription.nonce,
            )
        )

    def send_all(self) -> None:
        """Queues every subscribed type whose resources changed, clusters first."""
        for type_url in TYPE_ORDER:
            self.send(type_url)


def _raise_failure(task: asyncio.Task[Any]) -> None:
    """Re-raises the exception `task` ended with, if it ended with one."""
    if task.done() and not task.cancelled():
        failure = task.exception()
        if failure is not None:
            raise failure


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """AdsServicer serves Envoy's Aggregated Discovery Service (state of the world)."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[
            discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse
        ],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = _Stream(self.plane, context.peer())
        await self.plane.ready.wait()
        tasks = [
            asyncio.create_task(self._read(stream, request_iterator)),
            asyncio.create_task(self._watch(stream)),
            asyncio.create_task(self.plane.closing.wait()),
        ]
        getter: asyncio.Task[discovery_pb2.DiscoveryResponse] | None = None
        try:
            while True:
                getter = asyncio.create_task(stream.outbox.get())
                done, _ = await asyncio.wait([getter, *tasks], return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    # A bug reading requests or queueing changes: the stream ends with
                    # it (the boundary logs it) and the Envoy opens a new one. The
                    # watch's failure went unseen: the stream stayed open and the
                    # Envoy kept its config, every change since never sent.
                    _raise_failure(tasks[0])
                    _raise_failure(tasks[1])
                    break  # the Envoy closed its side, or this router is stopping
                yield getter.result()
        finally:
            # The getter too: an Envoy that went away cancels this handler while it
            # waits, and the getter was left pending for good (one task a stream;
            # "Task was destroyed but it is pending!" in the router's log).
            for task in (*tasks, *([getter] if getter is not None else [])):
                task.cancel()
            if stream.counted:
                self.plane.release(stream.flags)
            for type_url, subscription in stream.subscriptions.items():
                subscription.answered(type_url, rejected=False)  # no longer this router's
            logger.info("ADS stream of node %s (%s) ended", stream.node_id, stream.peer)

    @staticmethod
    async def _read(
        stream: _Stream, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]
    ) -> None:
        async for request in requests:
            await stream.on_request(request)

    async def _watch(self, stream: _Stream) -> None:
        seen = self.plane.generation
        while True:
            seen = await self.plane.wait_changed(seen)
            stream.send_all()
