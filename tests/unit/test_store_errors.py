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


@pytest.mark.parametrize(
    "reply",
    [
        "OOM command not allowed when used memory > 'maxmemory'.",  # outside a script
        # Redis 7 inside a script: the command's own code first.
        "READONLY You can't write against a read only replica. script: 3e1f, on @user_script:2.",
        "ERR " + WRAPPED.format("OOM"),  # Redis 6 inside a script, as the lean client reads it
        WRAPPED.format("READONLY"),  # ... and as redis-py's ResponseError keeps it
        WRAPPED.format("TRYAGAIN"),
    ],
)
def test_a_refusal_reads_alike_plain_or_wrapped_by_a_script(reply):
    assert store_errors.is_refusal_reply(reply)


@pytest.mark.parametrize(
    "reply",
    [
        "ERR Error running script (call to f_1): @user_script:11: WRONGTYPE Operation",
        "NOSCRIPT No matching script. Please use EVAL.",
        "ERR Error running script (call to f_ab): @user_script:5: OOMish",  # a script's own
    ],
)
def test_other_replies_are_no_refusal(reply):
    assert not store_errors.is_refusal_reply(reply)


def test_a_wrapped_reply_tells_the_code_a_script_met():
    # A command's own error (not a refusal) keeps a shorter wrapping on Redis 6.
    wrapped = "Error running script (call to f_6017c3): @user_script:4: NOGROUP No such key 'x'"
    assert store_errors.reply_code(wrapped) == "NOGROUP"
    assert store_errors.reply_code("ERR " + WRAPPED.format("MASTERDOWN")) == "MASTERDOWN"
    assert store_errors.reply_code("WRONGTYPE Operation against a key") == "WRONGTYPE"
