"""Seals every stored webhook secret under the current sealing key.

    python -m services.jobs.reseal

The second step of rotating the key that seals webhook signing secrets
(docs/runbook.md, "Rotate the webhook sealing key"): with the new key in
TOKENMESH_WEBHOOK_SECRETS_KEY (or its file) and the old one in
TOKENMESH_WEBHOOK_SECRETS_PREVIOUS_KEYS, every secret a previous key sealed,
and every plain one from before sealing, is sealed again under the new key.
It reads the jobs service's settings from the environment, can run while
the service serves, and can run again. Exit status: 0 when every secret now
opens with the current key; 1 when some open with none of the keys (their
key ids are printed: rotate those keys' webhook secrets, which drops the
ones no key opens; replaced secrets whose overlap has ended are not checked);
2 when the configuration is invalid or names no sealing key.
"""

from __future__ import annotations

import asyncio
import os
import sys

import redis.asyncio as aioredis

from services.core.settings import SettingsError, load
from services.jobs.service import JobsSettings
from services.jobs.store import JobStore, Resealed


async def reseal(settings: JobsSettings) -> Resealed:
    """Re-seals the secrets in the settings' Redis with the settings' keys."""
    client = aioredis.from_url(settings.redis_url, socket_timeout=5.0)
    try:
        store = JobStore(client, int(settings.retention_days * 86400), settings.secret_box())
        return await store.reseal_secrets()
    finally:
        await client.aclose()


def main() -> int:
    try:
        settings = load(JobsSettings, os.environ)
    except SettingsError as exc:
        print(f"reseal: invalid configuration: {exc}", file=sys.stderr)
        return 2
    key_file = settings.webhook_secrets_key_file
    if not settings.webhook_secrets_key and (key_file is None or not key_file.is_file()):
        # Never a new key: the service creates a missing key file, but secrets
        # sealed under a key only this run knew would open nowhere.
        print("reseal: no sealing key (TOKENMESH_WEBHOOK_SECRETS_KEY or _FILE)", file=sys.stderr)
        return 2
    done = asyncio.run(reseal(settings))
    print(
        f"reseal: {done.checked} secrets open, {done.resealed} sealed again under the current key"
    )
    if done.unreadable:
        keys = ", ".join(sorted(set(done.unreadable)))
        print(f"reseal: secrets that open with no configured key (rotate them): {keys}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
