"""Compares what clients received with what the mesh metered, through the edge.

The clients' ledger is every successful request's `request_id` and tokens. The
mesh's side is the key's `GET /v1/usage` totals and the tenant's audit log
(`GET /v1/usage/audit`, one entry per metered request, with its request_id).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from bench.chaos.load import Outcome
from services.inference.budget import TokenBudgets
from services.usage.reports import month_start


@dataclass(frozen=True)
class Reconciliation:
    """Reconciliation is how the mesh's usage compares with the clients' ledger."""

    lost: int  # successful requests not metered, or metered with fewer tokens
    duplicated: int  # requests metered more than once
    metered_failed: int  # metered requests the client saw fail (e.g. a cut stream's tokens)
    client_requests: int
    metered_requests: int


#: The load's keys have a monthly token budget (far more than a fault uses), so that
#: every request reserves and reconciles one (budget_gap compares it with the meter).
MONTHLY_TOKENS = 1_000_000_000


def create_key(edge_url: str, admin_key: str, tenant: str) -> tuple[str, str]:
    """Creates an API key for `tenant` through the edge; returns its id and secret."""
    body = {
        "tenant": tenant,
        "name": "chaos",
        "scopes": ["inference:generate", "inference:embed", "usage:read"],
        "limits": {"monthly_tokens": MONTHLY_TOKENS},
    }
    reply = httpx.post(
        f"{edge_url}/v1/auth/keys", json=body, headers={"x-api-key": admin_key}, timeout=15
    )
    reply.raise_for_status()
    created = reply.json()
    return str(created["api_key"]["id"]), str(created["secret"])


def budget_gap(
    redis_url: str, key_id: str, edge_url: str, secret: str, since: float, timeout_s: float
) -> int:
    """Waits until the key's month charge equals the tokens metered for it (or
    `timeout_s`); returns charge minus metered tokens.

    Every request reserves prompt + max_tokens and reconciles it to what it used; a
    request whose worker died reconciles nothing, and the workers still alive give
    its reservation back (services/inference/reservation_reaper.py). Positive: a
    reservation left charged; negative: tokens metered but not charged.

    Both sides cover every month from `since`'s to now's: the charge of `since`'s
    month against the usage of this month read a gap for a run that crossed a
    month's end (a key's month is the one its request was reserved in, its usage
    the one it finished in).
    """
    months = list(dict.fromkeys(TokenBudgets.month_key(key_id, at) for at in (since, time.time())))
    start = _from_month_of(since)
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            charged = sum(int(used or 0) for used in client.mget(months))
            try:
                totals = _get(edge_url, "/v1/usage", secret, {"start_time": start})
                metered = int(totals.get("prompt_tokens", 0)) + int(
                    totals.get("completion_tokens", 0)
                )
            except (httpx.HTTPError, ValueError):
                metered = -1
            if (metered >= 0 and charged == metered) or time.monotonic() >= deadline:
                return charged - metered
            time.sleep(0.5)
    finally:
        client.close()


def _from_month_of(since: float) -> str:
    """Returns a report's start_time: the start of the UTC month holding `since`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(month_start(since)))


def reconcile(
    edge_url: str,
    secret: str,
    admin_key: str,
    tenant: str,
    outcomes: Iterable[Outcome],
    timeout_s: float,
    since: float,
) -> Reconciliation:
    """Waits until every successful request is metered (or `timeout_s`); compares.

    Args:
        edge_url: the edge's base URL.
        secret: the key the load used (reads its own usage).
        admin_key: an admin key (reads the tenant's audit log).
        tenant: the key's tenant (one per fault).
        outcomes: what the clients saw.
        timeout_s: how long metering may take to catch up.
        since: when the load started (read from its month on: a run that crossed
            a month's end read this month's totals only, and never settled).

    Returns:
        The comparison once the mesh has metered every successful request and
        its totals agree with its audit log, or as it stands at the deadline.
    """
    outcomes = list(outcomes)
    received = {o.request_id: o for o in outcomes if o.ok}
    deadline = time.monotonic() + timeout_s
    start = _from_month_of(since)
    while True:
        totals, entries = _read(edge_url, secret, admin_key, tenant, start)
        result = _compare(received, outcomes, totals, entries)
        settled = result.lost == 0 and totals.get("requests") == len(set(entries))
        if settled or time.monotonic() >= deadline:
            return result
        time.sleep(0.5)


def _compare(
    received: dict[str, Outcome],
    outcomes: list[Outcome],
    totals: dict[str, int],
    entries: list[tuple[str, int, int]],
) -> Reconciliation:
    counts = Counter(request_id for request_id, _, _ in entries)
    tokens = {request_id: (p, c) for request_id, p, c in entries}
    lost = sum(1 for request_id, o in received.items() if _short(tokens.get(request_id), o))
    duplicated = sum(n - 1 for n in counts.values()) + max(
        0, totals.get("requests", 0) - len(counts)
    )
    failed_ids = {o.request_id for o in outcomes if not o.ok}
    return Reconciliation(
        lost=lost,
        duplicated=duplicated,
        metered_failed=len(failed_ids & counts.keys()),
        client_requests=len(received),
        metered_requests=totals.get("requests", 0),
    )


def _short(metered: tuple[int, int] | None, received: Outcome) -> bool:
    """Tells whether a request's metered tokens fall short of what its client received."""
    if metered is None:
        return True
    return metered[0] < received.prompt_tokens or metered[1] < received.completion_tokens


def _read(
    edge_url: str, secret: str, admin_key: str, tenant: str, start: str
) -> tuple[dict[str, int], list[tuple[str, int, int]]]:
    """Returns the key's usage totals and the tenant's audit entries from `start` on
    (empty on errors)."""
    try:
        totals = _get(edge_url, "/v1/usage", secret, {"start_time": start})
        entries = _audit(edge_url, admin_key, tenant, start)
    except (httpx.HTTPError, KeyError, ValueError):
        return {}, []
    return {k: int(totals.get(k, 0)) for k in ("requests", "prompt_tokens")}, entries


def _audit(edge_url: str, admin_key: str, tenant: str, start: str) -> list[tuple[str, int, int]]:
    entries: list[tuple[str, int, int]] = []
    token = ""
    while True:
        params = {"tenant": tenant, "page_size": "1000", "start_time": start}
        params |= {"page_token": token} if token else {}
        page = _get(edge_url, "/v1/usage/audit", admin_key, params)
        entries.extend(
            (e["request_id"], int(e.get("prompt_tokens", 0)), int(e.get("completion_tokens", 0)))
            for e in page.get("entries", [])
        )
        token = page.get("next_page_token", "")
        if not token:
            return entries


def _get(edge_url: str, path: str, key: str, params: dict[str, str]) -> dict[str, Any]:
    reply = httpx.get(f"{edge_url}{path}", params=params, headers={"x-api-key": key}, timeout=10)
    reply.raise_for_status()
    body: dict[str, Any] = reply.json()
    return body
