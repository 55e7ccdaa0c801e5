"""One definition of "the Redis store is unavailable for now" (services/core/store_errors.py).

The error boundary and the rate limiter read it alike: a Redis refusing for now
(READONLY, OOM, TRYAGAIN, CLUSTERDOWN, MASTERDOWN) is transient, any other
error reply is a bug or a misconfiguration.
"""

from __future__ import annotations

import pytest
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

from services.core import store_errors
from services.core.errors import Unavailable
from services.core.interceptors import to_domain_error
from services.usage import ratelimit

# Redis 6 wraps a refusal met inside a Lua script (the bundled redis-server's replies).
WRAPPED = (
    "Error running script (call to f_2e47740b): @user_script:3: @user_script: 3: "
    "-{} command not allowed"
)


def test_the_rate_limiter_reads_the_shared_definition():
    assert set(store_errors.STORE_UNAVAILABLE) <= set(ratelimit.STORE_UNAVAILABLE)


@pytest.mark.parametrize(
    "exc",
    [
        ReadOnlyError("You can't write against a read only replica."),
        OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        MasterDownError("Link with MASTER is down"),
        ResponseError(WRAPPED.format("OOM")),
        ResponseError(WRAPPED.format("READONLY")),
    ],
)
def test_a_refusal_for_now_is_unavailable(exc):
    assert store_errors.is_store_refusal(exc)
    assert isinstance(to_domain_error(exc, "/m"), Unavailable)


@pytest.mark.parametrize(
    "exc",
    [
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        ResponseError("Error running script (call to f_1): @user_script:11: WRONGTYPE Operation"),
        NoPermissionError("this user has no permissions to run the 'eval' command"),
    ],
)
def test_any_other_error_reply_is_not_a_refusal(exc):
    assert not store_errors.is_store_refusal(exc)


def test_an_unreachable_store_is_unavailable_too():
    assert isinstance(to_domain_error(BusyLoadingError("loading"), "/m"), Unavailable)
