"""Which Redis errors mean "the store is unavailable for now", for every service.

Two kinds, both transient: nobody has to fix our code for them to pass, so a
client should retry (UNAVAILABLE + RetryInfo), and no traceback is logged.

- Out of reach: connection refused or lost, a timeout, a Redis still loading its
  data (redis-py's BusyLoadingError is a ConnectionError).
- Answers but refuses for now: READONLY (a replica: the old primary during a
  failover), OOM (maxmemory reached under noeviction), TRYAGAIN (a cluster slot
  being migrated), CLUSTERDOWN and MASTERDOWN (no primary for the slot or the
  replica). These are error replies (ResponseError), which the error boundary
  used to answer INTERNAL with a traceback while the rate limiter called them
  "store unavailable".

Any other error reply (WRONGTYPE, a Lua script's error, NOPERM) is a bug or a
misconfiguration: INTERNAL.
"""

from __future__ import annotations

import re

from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Redis out of reach, or too slow to answer.
STORE_UNREACHABLE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)
#: Redis answered, refusing for now (MasterDownError is a ClusterDownError).
STORE_REFUSALS: tuple[type[Exception], ...] = (
    ReadOnlyError,
    OutOfMemoryError,
    TryAgainError,
    ClusterDownError,
)
#: Either: the store is unavailable for now.
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (*STORE_UNREACHABLE, *STORE_REFUSALS)

#: The codes of those refusals' error replies, as Redis sends them.
REFUSAL_CODES = frozenset({"READONLY", "OOM", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN"})

# Redis before 7 (the bundled redis-server is 6.2) wraps an error a command met
# inside a Lua script in a generic ERR: a refusal as "Error running script (call
# to f_<sha>): @user_script:3: @user_script: 3: -OOM command not allowed ...", a
# command's own error as "... @user_script:4: NOGROUP No such key ...". Neither
# redis-py nor a reply's first word tells the code then; Redis 7 answers with the
# command's own code first ("OOM command not allowed ... script: <sha>, on ...").
# In a pipeline or transaction, redis-py puts "Command # N (<command>) of pipeline
# caused error: " before the reply (a script's refusal in a transaction, e.g. a file's
# creation, read as INTERNAL without it).
_LUA_WRAPPED = re.compile(
    r"(?:Command # \d+ \(.*?\) of pipeline caused error: )?"
    r"(?:(?:ERR )?Error running script \(call to f_[0-9a-f]+\): "
    r"@user_script:\d+: (?:@user_script: \d+: -)?)?",
    re.DOTALL,
)


def reply_code(reply: str) -> str:
    """Returns the code of an error reply ("OOM", "NOGROUP"): its first word, or the
    first word of the error a Lua script met when Redis before 7 wrapped it.

    `reply` is the text as Redis sent it (hiredis' ReplyError) or as a redis-py
    ResponseError keeps it (without a leading "ERR "; in a pipeline, after the
    command's number).
    """
    wrapped = _LUA_WRAPPED.match(reply)  # always matches, maybe nothing
    return reply[wrapped.end() if wrapped else 0 :].split(" ", 1)[0]


def is_refusal_reply(reply: str) -> bool:
    """Tells whether an error reply's text (see `reply_code`) is Redis refusing for now,
    plain (Redis 7, or outside a script) or wrapped by a Lua script (Redis before 7)."""
    return reply_code(reply) in REFUSAL_CODES


def is_store_refusal(exc: BaseException) -> bool:
    """Tells whether `exc` is Redis answering that it refuses for now (see the module)."""
    if isinstance(exc, STORE_REFUSALS):
        return True
    return isinstance(exc, ResponseError) and is_refusal_reply(str(exc))
