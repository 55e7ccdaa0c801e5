"""Standard Webhooks signatures (https://www.standardwebhooks.com).

A secret is "whsec_" + base64 of 32 random bytes; the HMAC key is the
decoded bytes. Each request carries `webhook-id`, `webhook-timestamp` (Unix
seconds) and `webhook-signature`: space-separated "v1,<base64 HMAC-SHA256 of
'<id>.<timestamp>.<body>'>" entries, one per secret in use (the current one,
and each replaced one whose overlap lasts: at most 3 of those), so any
Standard Webhooks library verifies it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    """Returns a fresh webhook secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """Returns the HMAC key of a "whsec_..." secret."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """Returns one "v1,<base64>" signature of a message."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(
    secrets_in_use: Sequence[str], message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Returns the three Standard Webhooks headers of a message signed with each secret."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(
            signature(secret, message_id, timestamp, body) for secret in secrets_in_use
        ),
    }
