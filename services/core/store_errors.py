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

# Redis before 7 (the bundled redis-server is 6.2) wraps the refusal of a command
# inside a Lua script in a generic ERR, "Error running script (call to f_...):
# @user_script:3: @user_script: 3: -OOM command not allowed ...", which redis-py
# cannot classify; Redis 7 answers with the command's own code (OutOfMemoryError).
_SCRIPT_REFUSAL = re.compile(
    r"@user_script: \d+: -(?:READONLY|OOM|TRYAGAIN|CLUSTERDOWN|MASTERDOWN) "
)


def is_store_refusal(exc: BaseException) -> bool:
    """Tells whether `exc` is Redis answering that it refuses for now (see the module)."""
    if isinstance(exc, STORE_REFUSALS):
        return True
    return isinstance(exc, ResponseError) and _SCRIPT_REFUSAL.search(str(exc)) is not None
