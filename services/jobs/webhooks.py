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
at the next address). Timeouts are bounded (the whole attempt, every address
tried, by twice `timeout_s`), redirects are not followed, and at most
`max_response_bytes` of the answer is read.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import httpx
from google.protobuf import timestamp_pb2

from services.jobs import signing, ssrf, views
from services.jobs.secret_box import SecretUnreadable
from services.jobs.store import (
    HOOK_DEAD,
    HOOK_DELIVERED,
    HOOK_PENDING,
    HOOK_RETRYING,
    JobRecord,
    JobStore,
)
from tokenmesh.jobs.v1 import jobs_pb2

logger = logging.getLogger(__name__)
USER_AGENT = "tokenmesh-webhooks/1"
#: The default delays between attempts (seconds): 11 attempts over about 23.7 hours.
DEFAULT_SCHEDULE_S = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800)


@dataclass(frozen=True)
class DeliveryPolicy:
    """DeliveryPolicy bounds webhook delivery.

    Attributes:
        schedule_s: the delays before attempts 2, 3, ...; attempts = len + 1.
        timeout_s: connect, write and read timeout of one attempt (the whole
            attempt is bounded by twice this).
        max_response_bytes: how much of a receiver's answer is read.
        allow_hosts: hosts that skip the address check and may use http.
        lease_s: how long a replica holds a due webhook before another may send it.
        lookup: resolves receivers' host names (the system's resolver).
    """

    schedule_s: Sequence[float] = DEFAULT_SCHEDULE_S
    timeout_s: float = 10.0
    max_response_bytes: int = 64 * 1024
    allow_hosts: Collection[str] = ()
    lease_s: float = 60.0
    lookup: ssrf.Lookup = ssrf.system_lookup

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


def _utc(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).isoformat().replace("+00:00", "Z")


class WebhookSender:
    """WebhookSender sends the due webhooks of every job (any replica may send any).

    Args:
        store: the jobs in Redis.
        policy: retries, timeouts and the allow list.
        concurrency: attempts in flight on this replica.
    """

    def __init__(self, store: JobStore, policy: DeliveryPolicy, concurrency: int = 16) -> None:
        self.store = store
        self.policy = policy
        self.concurrency = concurrency
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
        """Sends due webhooks, polling every `poll_s` seconds when none is due."""
        while True:
            if not await self.send_due():
                await asyncio.sleep(poll_s)

    async def send_due(self) -> int:
        """Sends the webhooks due now; returns how many it tried."""
        lease_ms = int(self.policy.lease_s * 1000)
        due = await self.store.claim_due_hooks(lease_ms, self.concurrency)
        # One hook's failure must not stop the others (nor, raised, the loop: it was
        # restarted, and the hook, still leased, failed it again every lease).
        outcomes = await asyncio.gather(
            *(self.deliver(job_id) for job_id in due), return_exceptions=True
        )
        for job_id, outcome in zip(due, outcomes, strict=True):
            if isinstance(outcome, Exception):
                name = type(outcome).__name__
                logger.error("webhook of job %s failed: %s: %s", job_id, name, outcome)
        return len(due)

    async def deliver(self, job_id: str) -> None:
        """Makes one attempt at a job's webhook and records it."""
        record = await self.store.get(job_id)
        if record is None or record.get("webhook_state") not in (HOOK_PENDING, HOOK_RETRYING):
            await self.store.drop_hook(job_id)
            return
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
        await self.store.record_attempt(
            job_id, attempt, *self._next(round_start, number, answer), round_start
        )
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
        return await self.post(record.get("webhook_url"), secrets, job_id, body)

    def _next(self, round_start: int, number: int, answer: Answer) -> tuple[str, int]:
        if answer.delivered:
            return HOOK_DELIVERED, 0
        delay = self.policy.next_delay_s(number - round_start)
        if delay is None:
            return HOOK_DEAD, 0
        return HOOK_RETRYING, int((time.time() + delay) * 1000)

    async def post(self, url: str, secrets: Sequence[str], job_id: str, body: bytes) -> Answer:
        """POSTs a signed event to a vetted address of `url`."""
        try:
            target = ssrf.parse(url, self.policy.allow_hosts)
            addresses = await ssrf.resolve(target, self.policy.timeout_s, self.policy.lookup)
        except ssrf.RefusedUrl as exc:
            return Answer(error=f"refused: {exc}")
        headers = {
            **signing.headers(secrets, views.event_id(job_id), int(time.time()), body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "host": _host_header(target),
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            return await asyncio.wait_for(
                self._send_to_one_of(target, addresses, headers, body, extensions),
                2 * self.policy.timeout_s,
            )
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
