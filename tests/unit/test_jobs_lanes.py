"""Which stream errors mean "this lane's stream is gone" to a jobs runner."""

from __future__ import annotations

from redis.exceptions import ResponseError

from services.jobs.store import is_missing_group


def test_a_missing_group_and_redis_7s_unblocked_read_are_both_a_gone_stream() -> None:
    # Redis 7 answers a read blocked on a stream that was deleted with UNBLOCKED
    # (Redis 6.2 leaves it blocked until its timeout).
    assert is_missing_group(ResponseError("NOGROUP No such key 'tm:jobs:work:t.a'"))
    assert is_missing_group(ResponseError("UNBLOCKED the stream key no longer exists"))
    assert not is_missing_group(ResponseError("ERR wrong number of arguments"))
