"""The rate limiter's lease table: sizing, local admission, expiry, settling."""

from __future__ import annotations

import time

from services.usage.leases import Lease, LeaseTable, settle_call

KEY = (("tm:ratelimit:rpm:k", 6400),)


def _lease(free: int, ttl_s: float = 10.0) -> Lease:
    return Lease(
        windows=("tm:ratelimit:rpm:k",),
        counts=[1],
        oldest=[1000],
        free=[f"m:{h}" for h in range(free + 1, 1, -1)],
        deadline=time.monotonic() + ttl_s,
    )


def test_a_lease_holds_at_most_a_64th_of_every_limit_and_none_below_two_slots():
    table = LeaseTable(32)
    assert table.request((("a", 6400),), [6400]) == 32
    assert table.request((("b", 640),), [640]) == 10
    assert table.request((("c", 6400), ("t", 640)), [6400, 640]) == 10
    assert table.request((("d", 100),), [100]) == 0  # 100 // 64 = 1: not worth a lease
    assert LeaseTable(0).request(KEY, [6400]) == 0  # leases off


def test_one_decision_at_a_time_asks_for_a_key_s_lease():
    table = LeaseTable(32)
    assert table.request(KEY, [6400]) == 32
    assert table.request(KEY, [6400]) == 0  # the first one's answer is pending
    table.granted(KEY, None)
    assert table.request(KEY, [6400]) == 32


def test_a_lease_admits_its_slots_then_hands_over_to_redis():
    table = LeaseTable(32)
    table.request(KEY, [6400])
    table.granted(KEY, _lease(free=3))
    first = table.admit(KEY, 1, now_ms=2000)
    assert first is not None and first.counts == [2]
    second = table.admit(KEY, 2, now_ms=2001)
    assert second is not None and second.counts == [4]
    assert table.admit(KEY, 1, now_ms=2002) is None  # used up: ask Redis
    (settled,) = table.due()
    assert settled.used == [("m:2", 2000), ("m:3", 2001), ("m:4", 2001)]
    assert settled.free == []


def test_a_lease_that_cannot_cover_the_hits_is_retired_with_its_free_slots():
    table = LeaseTable(32)
    table.granted(KEY, _lease(free=2))
    assert table.admit(KEY, 3, now_ms=2000) is None
    (settled,) = table.due()
    assert settled.used == [] and settled.free == ["m:3", "m:2"]


def test_an_expired_lease_admits_nothing_and_is_settled():
    table = LeaseTable(32)
    table.granted(KEY, _lease(free=5, ttl_s=-1))
    assert table.admit(KEY, 1, now_ms=2000) is None
    assert [len(lease.free) for lease in table.due()] == [5]
    assert table.due() == []


def test_live_leases_are_settled_only_when_finished_or_at_shutdown():
    table = LeaseTable(32)
    assert not table.holds_any()
    table.granted(KEY, _lease(free=5))
    assert table.holds_any()
    assert table.admit(KEY, 1, now_ms=2000) is not None
    assert table.due() == []  # still live
    (settled,) = table.due(everything=True)
    assert len(settled.used) == 1 and len(settled.free) == 4
    assert not table.holds_any()  # the settler may stop
    assert table.admit(KEY, 1, now_ms=2001) is None


def test_a_new_grant_retires_the_lease_it_replaces():
    table = LeaseTable(32)
    table.granted(KEY, _lease(free=2))
    table.granted(KEY, _lease(free=4))
    assert [len(lease.free) for lease in table.due()] == [2]
    assert table.admit(KEY, 4, now_ms=2000) is not None


def test_settle_call_lays_out_every_lease_after_the_other():
    one = _lease(free=2)
    one.take(1, now_ms=5000)
    two = Lease(("w1", "w2"), [1, 1], [0, 0], free=["x:2"], deadline=0.0)
    keys, args = settle_call([one, two], window_ms=60_000)
    assert keys == ["tm:ratelimit:rpm:k", "w1", "w2"]
    assert args == [60_000, 1, 1, 1, "m:2", 5000, "m:3", 2, 0, 1, "x:2"]


def test_a_slot_given_back_is_free_again_until_its_lease_is_being_settled():
    table = LeaseTable(32)
    table.granted(KEY, _lease(free=3))
    lease = table.admit(KEY, 1, now_ms=2000)
    assert lease is not None
    (member, _), counts = lease.used[-1], list(lease.counts)
    assert lease.give_back(member)
    assert (lease.used, member in lease.free, lease.counts) == ([], True, [counts[0] - 1])
    assert not lease.give_back(member)  # not among its used slots any more
    again = table.admit(KEY, 1, now_ms=2001)
    assert again is lease
    (taken, _) = lease.used[-1]
    table.due(everything=True)  # handed to the settler: Redis has its slots' fate now
    assert not lease.give_back(taken)


def test_no_admission_is_recorded_before_its_lease_was_granted():
    # The wall clock stepped back 45 s after the grant (NTP, a VM's resume): admissions
    # were recorded 45 s before their reservation, the settle moved them there, and
    # they left the window that much early: 650 admitted at rpm=640.
    granted = Lease(("w",), [1], [0], free=["m:2", "m:1"], deadline=time.monotonic() + 10)
    granted.granted_ms = 1_000_000
    assert granted.take(1, now_ms=955_000)
    assert granted.take(1, now_ms=1_000_500)
    assert [at for _, at in granted.used] == [1_000_000, 1_000_500]
