"""Delivers jobs' completion webhooks: signed, retried, dead-lettered.

A job that ends with a webhook_url is due at once (`hooks` zset). A replica
leases due webhooks (moving them `lease_s` ahead, so no other replica sends
the same one meanwhile; one that dies leaves them due again: at-least-once,
and `webhook-id` lets receivers deduplicate), POSTs the event signed per
Standard Webhooks, and records the attempt on the job. A 2xx answer is
DELIVERED. Anything else (another status, a timeout, a refused address) is
tried again after the next delay of the schedule, +-20% jitter, and after the
last one the webhook is DEAD_LETTER until RedeliverWebhook starts a new round.

Every attempt checks the URL again (ssrf.resolve: DNS may have changed; every
address the name resolves to must be allowed) and connects to a vetted
address itself, never to a fresh lookup: the first that accepts the
connection, in the resolver's order (a receiver whose first address is down
still gets its event; one that fails after connecting is not sent it again
at the next address). Timeouts are bounded (the whole attempt, the lookup and
every address tried, by twice `timeout_s`), redirects are not followed, and at
most `max_response_bytes` of the answer is read.

A replica keeps up to `concurrency` attempts in flight and claims another due
webhook as soon as one ends: it used to claim a batch and wait for all of it,
so one slow receiver held up the 15 others' successors for a whole attempt
(20 s by default). One API key has at most `per_key` of them (a quarter), so
a key whose receivers are slow, or trickle their answer, cannot take every
slot from the other keys. A claimed webhook of a key at its share waits on
the replica for one of the key's slots while the key's attempts are quick (a
key with many events and a fast receiver keeps its slots busy), at most as
many as the key has slots; the key's others go back to Redis at once, no
attempt counted, each due about when the key's share could take it (its
attempts' duration apart, per slot). Once one of its attempts has run
`slow_attempt_s`, all of the key's other due webhooks go back, for about as
long as its attempts have run. Either way the replica claims past them to
other keys' webhooks: a key's backlog that filled the replica's queue of
waiting webhooks held every other key's webhooks until the whole backlog had
been claimed, with only the key's share of the slots at work.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import ipaddress
import logging
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import httpx
from google.protobuf import timestamp_pb2

from services.jobs import metrics, signing, ssrf, views
from services.jobs.secret_box import SecretUnreadable
from services.jobs.store import (
    HOOK_DEAD,
    HOOK_DELIVERED,
    HOOK_PENDING,
    HOOK_RETRYING,
    JobRecord,
    JobStore,
    now_ms,
)
from tokenmesh.jobs.v1 import jobs_pb2

logger = logging.getLogger(__name__)
#: A webhook attempt's outcome (tokenmesh_job_webhook_attempts_total) by the state it left.
WEBHOOK_OUTCOMES = {
    HOOK_DELIVERED: metrics.DELIVERED,
    HOOK_RETRYING: metrics.RETRYING,
    HOOK_DEAD: metrics.DEAD,
}
USER_AGENT = "tokenmesh-webhooks/1"
#: The default delays between attempts (seconds): 11 attempts over about 23.7 hours.
DEFAULT_SCHEDULE_S = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800)
# How long a key's attempt is taken to run before one of them has ended: short, so a
# key's backlog comes back early rather than leaving its slots idle (a webhook back
# too early is put back again, by then paced by an attempt that ended).
_FIRST_ATTEMPT_GUESS_S = 0.01


@dataclass(frozen=True)
class DeliveryPolicy:
    """DeliveryPolicy bounds webhook delivery.

    Attributes:
        schedule_s: the delays before attempts 2, 3, ...; attempts = len + 1.
        timeout_s: connect, write and read timeout of one attempt (the whole
            attempt is bounded by twice this).
        max_response_bytes: how much of a receiver's answer is read.
        allow_hosts: hosts that may resolve to private and loopback addresses and
            use http (never metadata or link-local: ssrf.is_never_allowed).
        lease_s: how long a replica holds a due webhook before another may send it.
        lookup: resolves receivers' host names (the system's resolver).
        slow_attempt_s: an attempt in flight this long makes its key's other due
            webhooks go back to Redis (for about as long as its attempts have
            run) rather than wait on this replica for a slot of the key's share.
    """

    schedule_s: Sequence[float] = DEFAULT_SCHEDULE_S
    timeout_s: float = 10.0
    max_response_bytes: int = 64 * 1024
    allow_hosts: Collection[str] = ()
    lease_s: float = 60.0
    lookup: ssrf.Lookup = ssrf.system_lookup
    slow_attempt_s: float = 1.0

    def next_delay_s(self, attempt_in_round: int) -> float | None:
        """Returns the wait after a failed attempt (1-based), or None after the last one."""
        if attempt_in_round > len(self.schedule_s):
            return None
        return float(self.schedule_s[attempt_in_round - 1]) * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class Answer:
    """Answer is how one attempt went: the receiver's status (0: none) or the error."""

    http_status: int = 0
    error: str = ""

    @property
    def delivered(self) -> bool:
        """Tells whether the receiver accepted the event."""
        return 200 <= self.http_status < 300


class _KeyShares:
    """_KeyShares tracks each API key's attempts in flight on a replica (their start
    times), its claimed webhooks waiting for a slot of its share, and when those
    it put back are due (one event loop)."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._started: dict[str, list[float]] = {}
        self._waiting: dict[str, collections.deque[tuple[JobRecord, float]]] = {}
        self._took: dict[str, float] = {}  # how long the key's last attempt ran
        self._booked: dict[str, float] = {}  # when its next webhook put back is due

    @property
    def waiting(self) -> int:
        """Webhooks waiting for a slot, all keys together."""
        return sum(len(queue) for queue in self._waiting.values())

    def has_room(self, key_id: str) -> bool:
        """Whether `key_id` may start another attempt."""
        return len(self._started.get(key_id, ())) < self.per_key

    def may_wait(self, key_id: str) -> bool:
        """Whether another webhook of `key_id` may wait here: as many as it has slots."""
        return len(self._waiting.get(key_id, ())) < self.per_key

    def slow_for(self, key_id: str, slow_s: float) -> float | None:
        """How long the key's oldest attempt in flight has run, when that is at least
        `slow_s` (None: it has none, or they are quick so far)."""
        started = self._started.get(key_id)
        if not started:
            return None
        ran_s = time.monotonic() - min(started)
        return ran_s if ran_s >= slow_s else None

    def start(self, key_id: str) -> float:
        """Counts an attempt of the key as started; returns its start time."""
        now = time.monotonic()
        self._started.setdefault(key_id, []).append(now)
        return now

    def end(self, key_id: str, started: float) -> None:
        """Counts the attempt that started at `started` as ended."""
        self._took[key_id] = time.monotonic() - started
        times = self._started.get(key_id, [])
        times.remove(started)
        if not times:
            self._started.pop(key_id, None)

    def book(self, key_id: str) -> float:
        """Books a claimed webhook of the key that may not wait here: returns in how
        many seconds it is due again. That is when the key's share could take it,
        after those booked before it: its attempts' duration, spread over its
        slots. Paced so, each webhook of a backlog goes back once or a few times
        (put back for one attempt's duration instead, a whole backlog would go
        round Redis every attempt)."""
        now = time.monotonic()
        started = self._started.get(key_id)
        took = max(
            self._took.get(key_id, _FIRST_ATTEMPT_GUESS_S),
            now - min(started) if started else 0.0,
        )
        due = max(self._booked.get(key_id, 0.0), now + took)
        self._booked[key_id] = due + took / self.per_key
        return due - now

    def wait(self, record: JobRecord) -> None:
        """Queues a claimed webhook for a slot of its key."""
        queue = self._waiting.setdefault(record.owner.key_id, collections.deque())
        queue.append((record, time.monotonic()))

    def queues(self) -> list[tuple[str, collections.deque[tuple[JobRecord, float]]]]:
        """The keys with waiting webhooks, and their queues (oldest first)."""
        return list(self._waiting.items())

    def forget_idle(self) -> None:
        """Drops the keys whose queue is empty, and the pace of those with nothing in
        flight, waiting or booked."""
        for key_id in [k for k, queue in self._waiting.items() if not queue]:
            del self._waiting[key_id]
        now = time.monotonic()
        for key_id in self._took.keys() | self._booked.keys():
            busy = key_id in self._started or key_id in self._waiting
            if not busy and self._booked.get(key_id, 0.0) <= now:
                self._took.pop(key_id, None)
                self._booked.pop(key_id, None)


def _utc(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).isoformat().replace("+00:00", "Z")


class WebhookSender:
    """WebhookSender sends the due webhooks of every job (any replica may send any).

    Args:
        store: the jobs in Redis.
        policy: retries, timeouts and the allow list.
        concurrency: attempts in flight on this replica.
        per_key: attempts in flight on this replica for one API key (default: a
            quarter of `concurrency`, at least 1).
    """

    def __init__(
        self,
        store: JobStore,
        policy: DeliveryPolicy,
        concurrency: int = 16,
        per_key: int | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.concurrency = concurrency
        self.per_key = per_key if per_key is not None else max(1, concurrency // 4)
        self._tasks: set[asyncio.Task[None]] = set()
        self._shares = _KeyShares(self.per_key)
        # Claimed webhooks waiting here for their key's attempts, all keys together.
        self._max_waiting = 2 * concurrency
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment: we vetted the address ourselves
            timeout=httpx.Timeout(policy.timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=0),
        )

    async def close(self) -> None:
        """Closes the HTTP client."""
        await self._client.aclose()

    async def run_forever(self, poll_s: float) -> None:
        """Sends due webhooks, up to `concurrency` at once, claiming more as each
        attempt ends; polls every `poll_s` seconds when none is due. Cancelled, it
        cancels its attempts (their leases run out and another replica sends them)."""
        try:
            while True:
                await self._start_waiting()
                wanted = min(
                    self.concurrency - len(self._tasks), self._max_waiting - self._shares.waiting
                )
                claimed = await self.send_due(wanted) if wanted > 0 else 0
                if wanted <= 0 or claimed < wanted:  # slots (or room) full, or nothing due
                    await self._wait(poll_s)
        finally:
            await self._cancel_attempts()

    async def send_due(self, count: int) -> int:
        """Claims up to `count` due webhooks and starts an attempt at each whose key
        has room (without waiting for it); the others wait here for their key's
        attempts, or are put back when those are slow. Returns how many it claimed."""
        lease_ms = int(self.policy.lease_s * 1000)
        due = await self.store.claim_due_hooks(lease_ms, count)
        for record in await asyncio.gather(*(self._due_record(job_id) for job_id in due)):
            if record is None:
                continue
            key_id = record.owner.key_id
            if self._shares.has_room(key_id) and len(self._tasks) < self.concurrency:
                self._start(record)
            elif (slow_s := self._shares.slow_for(key_id, self.policy.slow_attempt_s)) is not None:
                await self._put_back(record.job_id, slow_s)
            elif self._shares.may_wait(key_id):
                self._shares.wait(record)
            else:
                # Kept here, a key's backlog filled the replica's room for waiting
                # webhooks, and each claim after that was the backlog's next one.
                await self._defer(record.job_id, self._shares.book(key_id))
        return len(due)

    async def _start_waiting(self) -> None:
        """Starts the waiting webhooks whose key has room; puts back those of keys whose
        attempts turned slow, and those that waited `timeout_s` (every slot busy)."""
        for key_id, queue in self._shares.queues():
            while queue and self._shares.has_room(key_id) and len(self._tasks) < self.concurrency:
                self._start(queue.popleft()[0])
            slow_s = self._shares.slow_for(key_id, self.policy.slow_attempt_s)
            while queue and (slow_s is not None or queue[0][1] < self._patience_limit()):
                await self._put_back(queue.popleft()[0].job_id, slow_s or 0.0)
        self._shares.forget_idle()

    def _patience_limit(self) -> float:
        # A webhook waits here at most this long for a slot (its lease holds it from
        # other replicas meanwhile): then it is due again for any replica.
        return time.monotonic() - self.policy.timeout_s

    async def _put_back(self, job_id: str, slow_s: float) -> None:
        """Makes a claimed webhook due again, no attempt counted, after about as long
        as its key's attempts have taken (at most one attempt's bound)."""
        await self._defer(job_id, min(slow_s, 2 * self.policy.timeout_s))

    async def _defer(self, job_id: str, delay_s: float) -> None:
        """Makes a claimed webhook due in `delay_s`, no attempt counted."""
        await self.store.defer_hook(job_id, now_ms() + int(delay_s * 1000))

    def _start(self, record: JobRecord) -> None:
        key_id = record.owner.key_id
        started = self._shares.start(key_id)
        task = asyncio.create_task(self._attempt(record), name=f"webhook {record.job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # The slot comes back when the task is done, however: a task cancelled before
        # its first step never runs its `finally` (the loop raised before it next
        # yielded, on a record claimed with this one, and cancelled it stopping), and
        # its slot stayed taken for the process's life (the same sender runs the
        # restarted loop).
        task.add_done_callback(lambda _: self._shares.end(key_id, started))

    async def _wait(self, poll_s: float) -> None:
        """Waits until an attempt ends or `poll_s` passes."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(poll_s)

    async def _cancel_attempts(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _attempt(self, record: JobRecord) -> None:
        """Makes one attempt at a claimed webhook. A failure is logged, never raised:
        one hook must not stop the others (nor, raised, the loop: it was restarted,
        and the hook, still leased, failed it again every lease)."""
        try:
            await self._deliver(record)
        except Exception as exc:
            name = type(exc).__name__
            logger.error("webhook of job %s failed: %s: %s", record.job_id, name, exc)

    async def _due_record(self, job_id: str) -> JobRecord | None:
        """Returns the job whose webhook is due (None, and the hook forgotten, when it
        is gone or has nothing to send)."""
        record = await self.store.get(job_id)
        if record is None or record.get("webhook_state") not in (HOOK_PENDING, HOOK_RETRYING):
            await self.store.drop_hook(job_id)
            return None
        return record

    async def deliver(self, job_id: str) -> None:
        """Makes one attempt at a job's webhook and records it."""
        record = await self._due_record(job_id)
        if record is not None:
            await self._deliver(record)

    async def _deliver(self, record: JobRecord) -> None:
        job_id = record.job_id
        number = await self.store.next_attempt(job_id)
        if number is None:
            return  # the job expired since it was read (the script dropped its webhook)
        record.fields["webhook_attempts"] = str(number)
        job = views.job_pb(record, await self.store.attempts(job_id))
        started = time.time()
        body = views.event_body(job, _utc(started))
        answer = await self._signed_post(record, job_id, body)
        attempt = jobs_pb2.WebhookAttempt(
            attempt=number,
            time=_stamp(started),
            http_status=answer.http_status,
            error=answer.error,
            duration_ms=(time.time() - started) * 1000,
        )
        round_start = record.number("round_start")
        # Its place in the retry schedule: after the round's attempts that reached an
        # end (read with the record, under this replica's lease), not its number,
        # which counts the attempts a stop or a restart cut too.
        state, due_ms = self._next(record.number("round_recorded") + 1, answer)
        await self.store.record_attempt(job_id, attempt, state, due_ms, round_start)
        metrics.WEBHOOK_ATTEMPTS.labels(WEBHOOK_OUTCOMES[state]).inc()
        logger.info(
            "webhook of %s attempt %d: %s", job_id, number, answer.http_status or answer.error
        )

    async def _signed_post(self, record: JobRecord, job_id: str, body: bytes) -> Answer:
        """POSTs the event signed with the owner's secrets (an Answer with the error
        when there are none to sign with)."""
        key_id = record.owner.key_id
        try:
            secrets = await self.store.secrets_in_use(key_id)
        except SecretUnreadable as exc:
            # Another replica's key, or a changed value: an operator must look.
            logger.error("webhook of %s not sent: %s", job_id, exc)
            return Answer(error="the key's webhook secret cannot be read; rotate it")
        if not secrets:
            return Answer(error="the key has no webhook secret (tokenmesh webhooks secret create)")
        return await self.post(record.get("webhook_url"), secrets, job_id, body, owner=key_id)

    def _next(self, attempt_in_round: int, answer: Answer) -> tuple[str, int]:
        if answer.delivered:
            return HOOK_DELIVERED, 0
        delay = self.policy.next_delay_s(attempt_in_round)
        if delay is None:
            return HOOK_DEAD, 0
        return HOOK_RETRYING, int((time.time() + delay) * 1000)

    async def post(
        self, url: str, secrets: Sequence[str], job_id: str, body: bytes, owner: str = ""
    ) -> Answer:
        """POSTs a signed event to a vetted address of `url`; `owner` (the API key)
        bounds its lookups in flight. The whole attempt, lookup included, takes at
        most twice `timeout_s`."""
        timeout_s = self.policy.timeout_s
        deadline = asyncio.get_running_loop().time() + 2 * timeout_s
        try:
            target = ssrf.parse(url, self.policy.allow_hosts)
            addresses = await ssrf.resolve(target, timeout_s, self.policy.lookup, owner)
        except ssrf.RefusedUrl as exc:
            return Answer(error=f"refused: {exc}")
        except ssrf.ResolverBusy:
            return Answer(error="the receiver's name could not be looked up now (resolver busy)")
        headers = {
            **signing.headers(secrets, views.event_id(job_id), int(time.time()), body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "host": _host_header(target),
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            async with asyncio.timeout_at(deadline):
                return await self._send_to_one_of(target, addresses, headers, body, extensions)
        except (TimeoutError, httpx.TimeoutException):
            return Answer(error="timeout")
        except httpx.HTTPError as exc:
            return Answer(error=f"connection failed: {type(exc).__name__}")
        except Exception as exc:  # recorded as a failed attempt (retried, then dead)
            logger.warning("webhook of job %s: %s: %s", job_id, type(exc).__name__, exc)
            return Answer(error=f"failed: {type(exc).__name__}")

    async def _send_to_one_of(
        self,
        target: ssrf.WebhookTarget,
        addresses: Sequence[ssrf.IpAddress],
        headers: dict[str, str],
        body: bytes,
        extensions: dict[str, str],
    ) -> Answer:
        """POSTs to the first of the vetted `addresses` that accepts a connection.

        Only the first address was ever tried: a receiver whose name resolved to
        one address that was down and one that was up never got its event. A
        connection refused or timed out (or a failed TLS handshake) sent nothing,
        so the next address is tried; an error after that (a read timeout) ends
        the attempt: the receiver may have the event, and the retry schedule sends
        it again anyway.
        """
        *others, last = addresses
        for address in others:
            try:
                return await self._send(_address_url(target, address), headers, body, extensions)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                logger.info("webhook receiver %s unreachable at %s", target.host, address)
        return await self._send(_address_url(target, last), headers, body, extensions)

    async def _send(
        self, url: str, headers: dict[str, str], body: bytes, extensions: dict[str, str]
    ) -> Answer:
        request = self._client.build_request(
            "POST", url, headers=headers, content=body, extensions=extensions
        )
        response = await self._client.send(request, stream=True)
        try:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read >= self.policy.max_response_bytes:
                    break  # the rest is not ours to buffer
        finally:
            await response.aclose()
        return Answer(http_status=response.status_code)


def _stamp(unix_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_s * 1e9))
    return stamp


def _host_header(target: ssrf.WebhookTarget) -> str:
    default = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == default else f"{host}:{target.port}"


def _address_url(target: ssrf.WebhookTarget, address: ssrf.IpAddress) -> str:
    host = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    return f"{target.scheme}://{host}:{target.port}{target.target}"
