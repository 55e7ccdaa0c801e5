"""The worker registry: where inference workers are, what they serve, and their leases.

A worker registers its address and model versions, then renews a lease
(the heartbeat). A worker whose lease ran out is not routed to and is
forgotten; a draining worker is not routed to but keeps its entry until it
exits, so operators can watch it finish. An operator's drain also asks the
worker to stop (its heartbeat answers `drain`); a worker's drain of itself
(its preStop hook, or its own SIGTERM) only takes it out of the endpoints: it
stops when its own signal says so, and a heartbeat that told it to stop cut
the streams its preStop hook was waiting for.

Every change is a compare-and-set of the worker's entry (a Lua script that
writes only if the entry is still the one the change was computed from, else
the change is computed again), so a heartbeat never writes back a worker that
an operator drained in the meantime, and two workers claiming one id never
both win.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from services.core import contract, identity
from services.core.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.core.redis_service import known_fields, text
from services.router import load_weights
from services.router.catalog import ModelEntry, check_name, check_version, pools_admit
from services.router.descriptions import model_of
from services.router.load_weights import ClusterWeight, LoadReport, WeightState

WORKERS_KEY = "tokenmesh:router:workers"
# Each worker's hot prompt heads per version, apart from its entry: every
# heartbeat reads every entry (weights are relative), and the heads would make
# those reads several times larger. Only the snapshot builder needs them.
# ":2": each head also carries its prompt tokens (four fields where routers of an
# earlier version unpack three, and would fail every build). Mid-upgrade those
# read their own key, no longer written: their heads go cold and fall back to the
# hash until they are upgraded, and nothing fails.
HEAT_KEY = "tokenmesh:router:worker-heat:2"
_ADDRESS = re.compile(r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$")
# A lease this long past its end is deleted (kept briefly so ListWorkers shows it went).
_FORGET_AFTER_S = 60.0
# A forgotten registration's id stays bound to its lease token and host this long
# (`tokenmesh:router:worker-left:<id>`): see WorkerRegistry.register.
LEFT_TTL_S = 86400
LEFT_KEY_PREFIX = "tokenmesh:router:worker-left:"
# The most model versions one registration or heartbeat may name: each becomes an
# endpoint of a cluster on every edge (a worker named 150 in one call).
MAX_MODELS = 256

SERVING = "serving"
DRAINING = "draining"
# The Redis-clock time of a recent route build outside the lease grace, by any router
# replica (written at most every BUILT_AT_EVERY_S): a router starting, or back from a
# Redis outage, counts as live only the leases that ended after it. One that ended
# before, a router hearing heartbeats saw end: the worker died. Counted, a restart put
# every worker that died in the last minute back in the endpoints for the grace.
BUILT_AT_KEY = "tokenmesh:router:built-at"
BUILT_AT_EVERY_S = 1.0
# KEYS: BUILT_AT_KEY; ARGV: the build's time (the replica's Redis-clock estimate).
# Writes it, no later than Redis's own clock (an estimate ahead by δ dropped, in
# another replica's grace, live workers whose leases lapsed within δ of it), and only
# forward (an older build's write, landing late, moved it back).
_MARK_BUILT = """
local t = redis.call('TIME')
local at = math.min(tonumber(ARGV[1]), tonumber(t[1]) + tonumber(t[2]) / 1000000)
local was = tonumber(redis.call('GET', KEYS[1]) or '')
if was == nil or at > was then redis.call('SET', KEYS[1], string.format('%.6f', at)) end
return 0
"""

# KEYS: the workers hash (and the heat hash); ARGV: worker id, the entry the
# change was computed from ("" = none), the new entry (and its hot heads).
# Returns 1 if written, 0 if the entry changed.
_COMPARE_AND_SET = """
if (redis.call('HGET', KEYS[1], ARGV[1]) or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[4] then redis.call('HSET', KEYS[2], ARGV[1], ARGV[4]) end
return 1
"""

# KEYS: the workers hash, then each worker's "left" mark; ARGV: the marks' ttl s,
# then worker id, entry, its mark ("": none) for each worker.
# Deletes each worker whose entry is still the given one, leaving its mark (its
# lease token's hash and host: WorkerRegistry.register); returns how many.
_FORGET_UNCHANGED = """
local deleted = 0
for i = 2, #ARGV, 3 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    deleted = deleted + redis.call('HDEL', KEYS[1], ARGV[i])
    if ARGV[i + 2] ~= '' then
      redis.call('SET', KEYS[1 + (i + 1) / 3], ARGV[i + 2], 'EX', tonumber(ARGV[1]))
    end
  end
end
return deleted
"""


@dataclass(frozen=True)
class WorkerEntry:
    """WorkerEntry is one registered worker."""

    worker_id: str
    host: str
    port: int
    models: tuple[tuple[str, str], ...]
    state: str = SERVING
    lease_expires_at: float = 0.0
    # The last load report (None: none yet), the worker's own weight (the lowest of its
    # clusters': ListWorkers, the `inference` cluster) and its weight in each of its
    # model versions' clusters (see `weight_in`).
    load: LoadReport | None = None
    weight: WeightState = WeightState()
    cluster_weights: tuple[ClusterWeight, ...] = ()
    # Per model version outcome counters the worker reported (see services.router.rollouts).
    outcomes: tuple[VersionCounts, ...] = ()
    # SHA-256 (hex) of the lease token the worker registered with ("" = none).
    token_sha256: str = ""
    # The worker's models as it describes them (serialized tokenmesh.inference.v2.Model,
    # base64; services.inference.mesh_models). Empty: it described none.
    served: tuple[str, ...] = ()
    # The registration has described its models in a heartbeat (served_models): a
    # worker that does lists every version it has in every heartbeat, so from it an
    # empty list means none, not "unchanged" (see WorkerRegistry.renew).
    describes_models: bool = False
    # Drained by the worker itself (with its lease token), not by an operator: it
    # left the endpoints and stops on its own signal, so heartbeats do not ask it to.
    self_drained: bool = False
    # The worker pool its certificate named when it registered (`worker-<pool>`);
    # "" for the shared `worker` identity. A model placed on pools is routed only
    # to workers of those pools (`serves`).
    pool: str = ""

    @property
    def address(self) -> str:
        """Returns host:port."""
        return f"{self.host}:{self.port}"

    def routable(self, now: float, ended_after: float | None = None) -> bool:
        """Tells whether the edge may send new requests to the worker.

        With `ended_after` (the router's lease grace, just after it or its
        Redis came back: see BUILT_AT_KEY) a lease that ended after that time
        still counts: workers could not renew while the router was away, and
        dropping them all would empty the mesh.
        """
        ends = self.lease_expires_at
        return self.state == SERVING and (
            ends > now or (ended_after is not None and ends > ended_after)
        )

    @property
    def asked_to_stop(self) -> bool:
        """Tells whether the worker's heartbeat should tell it to stop: an operator
        drained it (a worker that drained itself stops when its own signal says so)."""
        return self.state == DRAINING and not self.self_drained

    def to_json(self) -> str:
        """Serialises the worker for Redis."""
        return json.dumps(
            {
                "host": self.host,
                "port": self.port,
                "models": [list(m) for m in self.models],
                "state": self.state,
                "lease_expires_at": self.lease_expires_at,
                "load": None if self.load is None else asdict(self.load),
                "weight": asdict(self.weight),
                "cluster_weights": [
                    {"model": c.model, "version": c.version, **asdict(c.state)}
                    for c in self.cluster_weights
                ],
                "outcomes": [c.to_json() for c in self.outcomes],
                "token_sha256": self.token_sha256,
                "served": list(self.served),
                "self_drained": self.self_drained,
                "describes_models": self.describes_models,
                "pool": self.pool,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, worker_id: str, raw: str | bytes) -> WorkerEntry:
        """Parses a worker stored by `to_json`."""
        data: dict[str, Any] = json.loads(raw)
        return cls(
            worker_id=worker_id,
            host=str(data["host"]),
            port=int(data["port"]),
            models=tuple((str(n), str(v)) for n, v in data["models"]),
            state=str(data["state"]),
            lease_expires_at=float(data["lease_expires_at"]),
            # Entries written before load reports existed have none.
            load=LoadReport(**known_fields(LoadReport, data["load"])) if data.get("load") else None,
            weight=WeightState(**known_fields(WeightState, data.get("weight") or {})),
            # Entries written before per-cluster weights have none (see `weight_in`).
            cluster_weights=tuple(
                ClusterWeight(str(c["model"]), str(c["version"]), _weight_state(c))
                for c in data.get("cluster_weights", ())
            ),
            outcomes=tuple(VersionCounts.from_json(c) for c in data.get("outcomes", ())),
            # Entries written before lease tokens existed have none.
            token_sha256=str(data.get("token_sha256", "")),
            # Entries written before workers described their models have none.
            served=tuple(str(m) for m in data.get("served", ())),
            # Entries drained before this field: asked to stop, as they were then.
            self_drained=bool(data.get("self_drained", False)),
            describes_models=bool(data.get("describes_models", False)),
            # Entries written before worker pools: the shared `worker` identity's.
            pool=str(data.get("pool", "")),
        )

    def serves(self, model: str, version: str, placement: ModelEntry | None) -> bool:
        """Tells whether requests for (model, version) may go to this worker: it lists
        the version, and the model's catalogue entry (None: a model the catalogue does
        not know) admits its pool. Every reader that places traffic asks this, so a
        model placed on pools, or placed anew, is served by those pools only."""
        return (model, version) in self.models and (
            placement is None or placement.admits(self.pool)
        )

    def weight_in(self, model: str, version: str) -> WeightState:
        """Returns the worker's weight in one model version's cluster (its own weight
        where it has none there yet: an entry written before per-cluster weights, or a
        version it just added)."""
        for cluster in self.cluster_weights:
            if (cluster.model, cluster.version) == (model, version):
                return cluster.state
        return self.weight

    def holds(self, lease_token: str) -> bool:
        """Tells whether `lease_token` is this registration's (any token when it has none)."""
        if not self.token_sha256:
            return True
        return hmac.compare_digest(self.token_sha256, token_sha256(lease_token))


class HotPrefix(NamedTuple):
    """HotPrefix is one of a version's busiest prompt heads on a worker."""

    prefix: str  # the edge's key (x-tokenmesh-prefix)
    requests: float  # decayed
    seen_at: float  # when the latest of them arrived: unix seconds, the router's clock
    prompt_tokens: int = 0  # that request's prompt length (0: not reported)


@dataclass(frozen=True)
class VersionCounts:
    """VersionCounts are one model version's outcome counters on one worker.

    Attributes:
        model, version: the model version.
        requests: finished generation requests since the version loaded.
        errors: those that ended in a server error.
        ttft_bounds_ms: TTFT bucket bounds (ascending); `ttft_counts` has one more.
        ttft_counts: requests per TTFT bucket (the last: above every bound).
        hot_prefixes: the version's busiest prompt heads on the worker
            (services.router.prefix_pins).
        prefix_cache_tokens: the capacity of the version's prefix cache on the
            worker, in tokens (0: it has none).
        counters_id: this run of the counters (a new one each time the version
            loads on the worker; "" from a worker that sends none).
        batch_requests, batch_errors: those of `requests` and `errors` at batch
            priority (the TTFT histogram leaves them out; 0 from a worker that
            sends none).
    """

    model: str
    version: str
    requests: int = 0
    errors: int = 0
    ttft_bounds_ms: tuple[float, ...] = ()
    ttft_counts: tuple[int, ...] = ()
    hot_prefixes: tuple[HotPrefix, ...] = ()
    prefix_cache_tokens: int = 0
    counters_id: str = ""
    batch_requests: int = 0
    batch_errors: int = 0

    def to_json(self) -> dict[str, Any]:
        """Serialises the counters for the worker's entry (the hot heads go apart:
        HEAT_KEY)."""
        data = asdict(self)
        del data["hot_prefixes"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VersionCounts:
        """Parses counters stored by `to_json`."""
        return cls(
            model=str(data["model"]),
            version=str(data["version"]),
            requests=int(data["requests"]),
            errors=int(data["errors"]),
            ttft_bounds_ms=tuple(float(b) for b in data["ttft_bounds_ms"]),
            ttft_counts=tuple(int(c) for c in data["ttft_counts"]),
            prefix_cache_tokens=int(data.get("prefix_cache_tokens", 0)),  # absent before
            counters_id=str(data.get("counters_id", "")),  # absent before
            batch_requests=int(data.get("batch_requests", 0)),  # absent before
            batch_errors=int(data.get("batch_errors", 0)),
        )


def check_worker_id(worker_id: str) -> None:
    """Raises InvalidArgument unless `worker_id` is well-formed."""
    if not contract.is_worker_id(worker_id):
        raise InvalidArgument([FieldViolation("worker_id", f"must be {contract.WORKER_ID_RULE}")])


def parse_address(address: str) -> tuple[str, int]:
    """Returns (host, port) of a worker address; raises InvalidArgument."""
    if not _ADDRESS.match(address) or not 1 <= int(address.rsplit(":", 1)[1]) <= 65535:
        raise InvalidArgument([FieldViolation("address", "must be host:port (port 1-65535)")])
    host, port = address.rsplit(":", 1)
    return host, int(port)


def token_sha256(lease_token: str) -> str:
    """Returns the digest the registry keeps of a lease token ("" for none)."""
    return hashlib.sha256(lease_token.encode()).hexdigest() if lease_token else ""


def check_lease_token(lease_token: str) -> None:
    """Raises InvalidArgument unless `lease_token` is empty or well-formed."""
    if lease_token and not contract.is_lease_token(lease_token):
        rule = f"must be {contract.LEASE_TOKEN_RULE}"
        raise InvalidArgument([FieldViolation("lease_token", rule)])


@dataclass(frozen=True)
class WorkerCaller:
    """WorkerCaller is a worker acting for its own registration (heartbeat, drain).

    Every worker shares the `worker` identity, so the registration tells them
    apart: its address's host must be one of `hosts` (what the caller's
    certificate and connection vouch for), and a registration made with a
    lease token needs that token. Checked on the entry a change is computed
    from, inside the compare-and-set loop: a registration replaced meanwhile
    is checked again, so no change lands on one the caller does not own.
    """

    lease_token: str
    hosts: frozenset[str]
    pool: str = ""  # the worker pool its certificate names ("": the shared identity)

    def require_owner(self, rpc: str, entry: WorkerEntry) -> None:
        """Raises PermissionDenied unless `entry` is this caller's registration."""
        identity.require_host_among(rpc, entry.address, self.hosts)
        if entry.pool != self.pool:
            raise PermissionDenied(
                f"{rpc}: a worker may act only for its own registration "
                "(registered with another worker pool's certificate)",
                reason="NOT_LEASE_HOLDER",
            )
        if not entry.holds(self.lease_token):
            raise PermissionDenied(
                f"{rpc}: a worker may act only for its own registration "
                "(the lease token it registered with)",
                reason="NOT_LEASE_HOLDER",
            )


def _require_owner(rpc: str, entry: WorkerEntry, caller: WorkerCaller | None) -> None:
    """Raises PermissionDenied unless `caller` (None: an operator) owns `entry`."""
    if caller is not None:
        caller.require_owner(rpc, entry)


def _left_mark(entry: WorkerEntry) -> str:
    """Returns what a registration leaves bound to its id once its lease lapsed: its
    lease token's hash and its host ("": it had no token, the id is free)."""
    return json.dumps([entry.token_sha256, entry.host]) if entry.token_sha256 else ""


def _require_same_worker(worker_id: str, left: str, host: str, lease_token: str) -> None:
    """Raises AlreadyExists unless a registration of an id whose last holder's lease
    lapsed (`left`: its `_left_mark`) is that worker again: its lease token, or its
    host (a restarted worker that lost its token file runs where it ran).

    Without it any holder of the shared worker certificate registered a crashed
    worker's id from its own address once the lease lapsed, took its traffic, and
    kept the restarted worker out (WORKER_ID_IN_USE) for as long as it renewed.
    """
    if not left:
        return
    sha, left_host = json.loads(left)
    if hmac.compare_digest(sha, token_sha256(lease_token)) or left_host == host:
        return
    raise AlreadyExists(
        f"worker id {worker_id!r} was last registered from another host with another "
        "lease token; use a unique TOKENMESH_WORKER_ID (or the id's own token file)",
        reason="WORKER_ID_IN_USE",
    )


def check_models(models: Sequence[tuple[str, str]]) -> None:
    """Raises InvalidArgument unless every (name, version) is well-formed and they are
    at most MAX_MODELS.

    None at all is well-formed: a worker between unloading its last version and
    loading the next, or whose loads all failed, serves nothing for now (it is in
    no model's cluster). Refused, such a worker took the refusal for good and
    turned NOT_SERVING.
    """
    if len(models) > MAX_MODELS:
        raise InvalidArgument(
            [FieldViolation("models", f"at most {MAX_MODELS} model versions per worker")]
        )
    for name, version in models:
        check_name(name)
        check_version(version, "models.version")


class Renewal(NamedTuple):
    """Renewal is a heartbeat's outcome."""

    worker: WorkerEntry  # after the heartbeat
    models_changed: bool  # its set of model versions changed
    others: tuple[WorkerEntry, ...]  # every other routable worker, as read


class WorkerRegistry:
    """WorkerRegistry keeps workers and their leases in Redis."""

    def __init__(self, redis: aioredis.Redis, lease_s: float) -> None:
        self.redis = redis
        self.lease_s = lease_s
        self._compare_and_set = redis.register_script(_COMPARE_AND_SET)
        self._forget = redis.register_script(_FORGET_UNCHANGED)
        self._mark_built = redis.register_script(_MARK_BUILT)

    async def register(
        self,
        worker_id: str,
        address: str,
        models: Sequence[tuple[str, str]],
        now: float,
        lease_token: str = "",
        pool: str = "",
    ) -> WorkerEntry:
        """Registers (or re-registers) a serving worker with a fresh lease.

        While a registration's lease lasts, only the worker holding its lease
        token (if it has one) may register its id again, and while it is
        routable, only at the same address. `pool`: the worker pool its
        certificate names (see `WorkerEntry.pool`).
        """
        check_worker_id(worker_id)
        host, port = parse_address(address)
        check_models(models)
        check_lease_token(lease_token)
        entry = WorkerEntry(
            worker_id,
            host,
            port,
            tuple(models),
            SERVING,
            now + self.lease_s,
            token_sha256=token_sha256(lease_token),
            pool=pool,
        )
        while True:
            raw = await self.redis.hget(WORKERS_KEY, worker_id)
            if raw is not None:
                current = WorkerEntry.from_json(worker_id, raw)
                live = current.lease_expires_at > now
                if (
                    (current.routable(now) and current.address != address)
                    or (live and not current.holds(lease_token))
                    # Another pool's certificate on the host: not this worker, unless
                    # its lease token says it is (restarted with its pool's certificate).
                    or (live and current.pool != pool and not current.token_sha256)
                ):
                    # Two live workers with one id would steal each other's endpoint.
                    raise AlreadyExists(
                        f"worker id {worker_id!r} is held by a live worker at "
                        f"{current.address}; use a unique TOKENMESH_WORKER_ID (this one can "
                        "register once that lease ends)",
                        reason="WORKER_ID_IN_USE",
                    )
                _require_same_worker(worker_id, _left_mark(current), host, lease_token)
            else:
                left = await self.redis.get(LEFT_KEY_PREFIX + worker_id)
                _require_same_worker(worker_id, text(left) if left else "", host, lease_token)
            # NOTE: a registration is a new worker process, so it serves even if
            # the entry it replaces was draining (that process exits on its own).
            if await self._swap(worker_id, raw, entry):
                return entry

    async def get(self, worker_id: str) -> WorkerEntry:
        """Returns one worker; raises NotFound."""
        _, entry = await self._read(worker_id)
        return entry

    async def renew(
        self,
        worker_id: str,
        models: Sequence[tuple[str, str]],
        now: float,
        load: LoadReport | None = None,
        outcomes: Sequence[VersionCounts] = (),
        caller: WorkerCaller | None = None,
        served: Sequence[str] = (),
        describes: bool = False,
        placements: Mapping[str, frozenset[str]] | None = None,
    ) -> Renewal:
        """Extends a worker's lease (a draining worker stays draining), takes its load
        and its models' descriptions (`served`: see WorkerEntry).

        Empty `models` or `served` keep the last ones from a worker that never
        described its models (one from before descriptions sent no models when
        they had not changed). Once a registration has described them (`describes`:
        this heartbeat carried descriptions, even ones left out as malformed), its
        `models` are every version it serves, none included: a worker that unloaded
        its last version stayed in that version's cluster, and READY in every
        other worker's ListModels, for as long as it lived.

        The worker's weight moves one heartbeat's step (services.router.load_weights),
        relative to the other routable workers' costs as they are now.
        `caller`: the worker calling for itself, checked against the entry it
        changes (None: an operator, who may renew any). `placements`: the worker
        pools of each placed model; what the entry keeps (its versions, counters
        and descriptions) is only what its pool may serve, whatever the heartbeat
        brought or the entry held from before a placement.

        Returns the worker, whether its set of model versions changed, and the others.
        """
        check_models(models)
        check_worker_id(worker_id)
        while True:
            # One read of every entry: this worker's (to compare and set) and the
            # others' costs (its weight is relative to them).
            stored = {text(k): v for k, v in (await self.redis.hgetall(WORKERS_KEY)).items()}
            raw = stored.get(worker_id)
            if raw is None:
                raise _not_registered(worker_id)
            entry = WorkerEntry.from_json(worker_id, raw)
            _require_owner("RenewLease", entry, caller)
            others = tuple(
                other
                for other_id, value in stored.items()
                if other_id != worker_id
                and (other := WorkerEntry.from_json(other_id, value)).routable(now)
            )
            complete = describes or entry.describes_models
            current = tuple(models) if complete else tuple(models) or entry.models

            def placed(model: str, pool: str = entry.pool) -> bool:
                return pools_admit((placements or {}).get(model), pool)

            current = tuple(ref for ref in current if placed(ref[0]))
            # Only counters of versions the worker serves: rollouts and pins sum every
            # worker's, and a worker reported made-up outcomes of any model's canary.
            serving = {ref for ref in (*models, *entry.models) if placed(ref[0])}
            # The worker's cost is one (its load); its weight is per cluster.
            cost = load_weights.smoothed_cost(entry.weight.cost, load)
            clusters = _cluster_weights(entry, current, load, cost, others)
            renewed = replace(
                entry,
                models=current,
                lease_expires_at=now + self.lease_s,
                load=load,
                weight=load_weights.overall(cost, clusters),
                cluster_weights=clusters,
                outcomes=tuple(o for o in outcomes if (o.model, o.version) in serving),
                served=tuple(
                    item
                    for item in _served_now(entry, served, current, complete)
                    if not placements or placed(model_of(item))
                ),
                describes_models=complete,
            )
            if await self._swap(worker_id, raw, renewed, _heads_json(renewed.outcomes)):
                changed = set(renewed.models) != set(entry.models)
                return Renewal(renewed, changed, tuple(sorted(others, key=lambda o: o.worker_id)))

    async def drain(self, worker_id: str, caller: WorkerCaller | None = None) -> WorkerEntry:
        """Marks a worker draining: the edge stops sending it new requests.

        `caller`: as for `renew`. An operator's drain (None) also asks the worker
        to stop (`WorkerEntry.asked_to_stop`), also one that drained itself before;
        the worker's own drain never takes back an operator's request to stop.
        """
        while True:
            raw, entry = await self._read(worker_id)
            _require_owner("DrainWorker", entry, caller)
            by_itself = caller is not None and (entry.state != DRAINING or entry.self_drained)
            drained = replace(entry, state=DRAINING, self_drained=by_itself)
            if await self._swap(worker_id, raw, drained):
                return drained

    async def _read(self, worker_id: str) -> tuple[bytes | str, WorkerEntry]:
        """Returns a worker's stored entry and its parsed form; raises NotFound."""
        check_worker_id(worker_id)
        raw = await self.redis.hget(WORKERS_KEY, worker_id)
        if raw is None:
            raise _not_registered(worker_id)
        return raw, WorkerEntry.from_json(worker_id, raw)

    async def _swap(
        self, worker_id: str, read: bytes | str | None, entry: WorkerEntry, heads: str = ""
    ) -> bool:
        """Stores `entry` (and `heads`, its hot prompt heads, if given) if the stored one
        is still `read` (None: absent); False if not."""
        expected = b"" if read is None else read
        keys, args = [WORKERS_KEY], [worker_id, expected, entry.to_json()]
        if heads:
            keys, args = [WORKERS_KEY, HEAT_KEY], [*args, heads]
        return bool(await self._compare_and_set(keys=keys, args=args))

    async def built_at(self) -> float:
        """Returns when a router last built outside its grace (BUILT_AT_KEY); -inf if none
        did (every lease that ended counts in the grace)."""
        raw = await self.redis.get(BUILT_AT_KEY)
        return float(raw) if raw is not None else -math.inf

    async def mark_built(self, at: float) -> None:
        """Records a build outside the grace at `at` (Redis clock): no later than Redis's
        clock says now, and never before the build it records already (_MARK_BUILT)."""
        await self._mark_built(keys=[BUILT_AT_KEY], args=[repr(at)])

    async def all(self, now: float, forget: bool = False) -> list[WorkerEntry]:
        """Returns every known worker (with its hot prompt heads); with `forget`, forgets
        those whose lease ended long ago.

        Only the route build forgets, and not in the router's lease grace (workers
        could not renew while it or its Redis was away): a rollout tick or an admin's
        ListWorkers right after a minute's outage forgot every worker, and the edges
        got empty endpoints until each registered again.
        """
        raw = await self.redis.hgetall(WORKERS_KEY)
        heat = await self.redis.hgetall(HEAT_KEY)
        heads = {text(k): _heads_from_json(v) for k, v in heat.items()}
        workers = [
            _with_heads(WorkerEntry.from_json(text(k), v), heads.get(text(k), {}))
            for k, v in raw.items()
        ]
        gone = [
            w.worker_id for w in workers if forget and w.lease_expires_at + _FORGET_AFTER_S < now
        ]
        if gone:
            # Only entries still as read: a worker that re-registered meanwhile stays.
            left = {w.worker_id: _left_mark(w) for w in workers if w.worker_id in gone}
            stale = [(text(k), v) for k, v in raw.items() if text(k) in gone]
            await self._forget(
                keys=[WORKERS_KEY, *(LEFT_KEY_PREFIX + k for k, _ in stale)],
                args=[LEFT_TTL_S, *(x for k, v in stale for x in (k, v, left[k]))],
            )
            await self.redis.hdel(HEAT_KEY, *gone)  # a re-registered one sends its own again
        return sorted((w for w in workers if w.worker_id not in gone), key=lambda w: w.worker_id)


def _served_now(
    entry: WorkerEntry, served: Sequence[str], models: Sequence[tuple[str, str]], complete: bool
) -> tuple[str, ...]:
    """A heartbeat's descriptions of the worker's models, as the entry keeps them.

    None keep the last ones, unless the worker describes its models (`complete`) and
    serves no version: it has none left at all (descriptions left out as malformed
    or oversized, from a worker still serving, keep the last ones).
    """
    if served:
        return tuple(served)
    return () if complete and not models else entry.served


def _cluster_weights(
    entry: WorkerEntry,
    models: Sequence[tuple[str, str]],
    load: LoadReport | None,
    cost: float | None,
    others: Sequence[WorkerEntry],
) -> tuple[ClusterWeight, ...]:
    """A heartbeat's weight of the worker in each of its versions' clusters, each set
    against the routable workers of that cluster only (services.router.load_weights).

    Not one weight against every worker sharing any version: a worker of m1 and m2
    fell to the floor next to a fast worker of m2 only, in m1's cluster too, where an
    equally fast worker of m1 alone kept 100 and took ~91% of m1's traffic and pins.
    And not against every worker: a fast worker of a small model made a large
    model's workers all look slow, and they all fell to the floor (an even split).
    """
    return tuple(
        ClusterWeight(
            model,
            version,
            load_weights.settle(
                entry.weight_in(model, version),
                load,
                cost,
                [o.weight.cost for o in others if (model, version) in o.models],
            ),
        )
        for model, version in dict.fromkeys(models)
    )


def _weight_state(data: Mapping[str, Any]) -> WeightState:
    return WeightState(**known_fields(WeightState, data))


def _heads_json(outcomes: Sequence[VersionCounts]) -> str:
    """A heartbeat's hot heads per version as stored in HEAT_KEY ("{}": none, which
    replaces the last ones all the same)."""
    heads = {f"{c.model}@{c.version}": c.hot_prefixes for c in outcomes if c.hot_prefixes}
    return json.dumps(heads, sort_keys=True)


def _heads_from_json(raw: str | bytes) -> dict[tuple[str, str], tuple[HotPrefix, ...]]:
    data: dict[str, list[list[Any]]] = json.loads(raw)
    return {
        (ref.split("@", 1)[0], ref.split("@", 1)[1]): tuple(
            HotPrefix(str(p), float(n), float(seen), int(tokens)) for p, n, seen, tokens in heads
        )
        for ref, heads in data.items()
    }


def _with_heads(
    entry: WorkerEntry, heads: Mapping[tuple[str, str], tuple[HotPrefix, ...]]
) -> WorkerEntry:
    """The entry with its stored hot heads on its outcome counters."""
    if not heads:
        return entry
    outcomes = tuple(
        replace(c, hot_prefixes=heads.get((c.model, c.version), ())) for c in entry.outcomes
    )
    return replace(entry, outcomes=outcomes)


def _not_registered(worker_id: str) -> NotFound:
    return NotFound(f"worker {worker_id!r} is not registered", reason="WORKER_NOT_FOUND")
