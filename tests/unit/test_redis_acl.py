"""The Redis ACL table (services/core/redis_acl.py) against the modules that own the keys.

The table names key patterns as literals (services.core must not import the
services); these tests fail when a module's key names move out of its owner's
grants, or when a user could write what only another component owns.
"""

from __future__ import annotations

import fnmatch
import json
import stat
from pathlib import Path

import pytest

from services.auth import keys as auth_keys
from services.auth import signing
from services.core import redis_acl
from services.inference import usage_log
from services.inference.pipeline import cache, samples
from services.jobs import store as jobs_store
from services.router import catalog, pin_store, policies, prompts, registry, rollouts, shadow_pairs
from services.usage import meter
from services.usage.service import UsageSettings


def _may(user: str, key: str, write: bool) -> bool:
    grants = redis_acl.USERS[user].grants
    return any(fnmatch.fnmatchcase(key, g.pattern) and (g.write or not write) for g in grants)


def _spool_mark(mark: str) -> str:
    return usage_log.spool_mark_key(UsageSettings().usage_stream, "w0.0a1b", mark)


# (user, key, write): what each component does with keys its modules name.
USES = [
    ("auth", auth_keys.key_record_name("key_0123456789abcdef"), True),
    ("auth", auth_keys.LAST_USED, True),
    ("auth", signing.KEYS, True),
    ("auth", signing.LOCK, True),
    ("auth", signing.FENCE, True),
    ("router", registry.WORKERS_KEY, True),
    ("router", registry.HEAT_KEY, True),
    ("router", catalog.CATALOG_KEY, True),
    ("router", pin_store.PINS_KEY, True),
    ("router", rollouts.ROLLOUTS_KEY, True),
    ("router", rollouts.LEASE_KEY, True),
    ("router", rollouts.APPLIED_KEY, True),
    ("router", rollouts.FENCE_KEY, True),
    ("router", f"{meter.PREFIX}audit:{rollouts.AUDIT_TENANT}", True),
    ("router", prompts.HEADS_KEY, True),
    ("router", policies.ATTACHMENTS_KEY, True),
    ("router", shadow_pairs.index_key("demo-lm"), False),
    ("router", samples.stream_key("t1"), False),
    ("usage", UsageSettings().usage_stream, True),
    ("usage", meter.dead_letter_stream(UsageSettings().usage_stream), True),
    ("usage", meter.bucket_key("key:k", "day", 0), True),
    ("usage", "tm:ratelimit:rpm:key_0123456789abcdef", True),
    ("usage", catalog.CATALOG_KEY, False),
    ("inference", "tm:budget:key_0123456789abcdef:tpm", True),
    ("inference", UsageSettings().usage_stream, True),
    ("inference", _spool_mark("shipped"), True),
    ("inference", _spool_mark("applied"), False),
    ("usage", _spool_mark("applied"), True),
    ("inference", f"{cache.KEY_PREFIX}complete:0", True),
    ("inference", samples.stream_key("t1"), True),
    ("inference", shadow_pairs.records_key("demo-lm"), True),
    ("inference", prompts.VERSIONS_KEY, False),
    ("inference", policies.SAMPLES_KEY, False),
    ("jobs", jobs_store.job_key("job-1"), True),
    ("jobs", jobs_store.LANES_KEY, True),
    ("jobs", jobs_store.secret_key("key_0123456789abcdef"), True),
    ("jobs", auth_keys.key_record_name("key_0123456789abcdef"), False),
    ("jobs", registry.WORKERS_KEY, False),
    ("jobs", catalog.CATALOG_KEY, False),
]


@pytest.mark.parametrize(("user", "key", "write"), USES, ids=lambda v: str(v))
def test_each_component_may_touch_the_keys_its_modules_name(user: str, key: str, write: bool):
    assert _may(user, key, write), f"{user} needs {'write' if write else 'read'} on {key}"


# Keys only their owner may write: API keys and signing keys (auth), the registry,
# the catalogue and everything else of the router's.
OWNED = {
    auth_keys.key_record_name("key_0123456789abcdef"): "auth",
    signing.KEYS: "auth",
    f"{auth_keys.PREFIX}secret:digest": "auth",
    registry.WORKERS_KEY: "router",
    catalog.CATALOG_KEY: "router",
    rollouts.ROLLOUTS_KEY: "router",
    policies.ATTACHMENTS_KEY: "router",
    prompts.HEADS_KEY: "router",
}


@pytest.mark.parametrize("key", OWNED)
def test_only_the_owner_may_write_auth_and_router_keys(key: str):
    writers = {u for u in redis_acl.SERVICE_USERS if _may(u, key, write=True)}
    assert writers == {OWNED[key]}


# Auth's keys that hold secrets' digests: no other component reads them.
SECRET_DIGESTS = [
    f"{auth_keys.key_record_name('key_0123456789abcdef')}:secrets",
    f"{auth_keys.PREFIX}secret:digest",
    f"{auth_keys.PREFIX}issued:digest",
]


@pytest.mark.parametrize("key", SECRET_DIGESTS)
def test_only_auth_may_read_its_secrets_digests(key: str):
    # The jobs user read tm:auth:key:*: every key's set of secret digests too.
    readers = {u for u in redis_acl.SERVICE_USERS if _may(u, key, write=False)}
    assert readers == {"auth"}


def test_read_only_grants_are_read_only_on_redis_7_and_widened_on_6():
    records = redis_acl.AUTH_KEY_RECORDS
    line = " ".join(redis_acl.USERS["jobs"].rules(7))
    assert f"%R~{records}" in line and f" ~{records}" not in line
    assert f"~{records}" in redis_acl.USERS["jobs"].rules(6)
    assert f"jobs ~{records}" in redis_acl.widened_grants(6)
    assert redis_acl.widened_grants(7) == []


def test_the_acl_file_holds_hashes_and_turns_default_off():
    passwords = {name: f"secret-{name}" for name in redis_acl.USERS}
    text = redis_acl.render_acl_file(passwords, 7)
    lines = text.splitlines()
    assert [line.split()[1] for line in lines] == [*redis_acl.USERS, "default"]
    assert lines[-1].startswith("user default off")
    assert "secret-" not in text
    assert redis_acl.password_hash("secret-auth") in lines[0]


def test_url_for_replaces_any_credentials():
    url = redis_acl.url_for("redis://old:pw@redis:6379/2", "jobs", "p@ss:/")
    assert url == "redis://jobs:p%40ss%3A%2F@redis:6379/2"


def test_passwords_are_created_private_once_and_kept(tmp_path: Path):
    path = tmp_path / "state" / "passwords.json"
    first = redis_acl.load_passwords(path)
    assert set(first) == set(redis_acl.USERS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert redis_acl.load_passwords(path) == first
    # A user added to the table later gets a password; the others keep theirs.
    path.write_text(json.dumps({k: v for k, v in first.items() if k != "jobs"}))
    again = redis_acl.load_passwords(path)
    assert again["auth"] == first["auth"] and again["jobs"] != first["jobs"]
