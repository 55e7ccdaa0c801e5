"""Webhook signing secrets sealed at rest: AES-256-GCM under a key Redis never sees.

A webhook secret must be read back to sign each event (HMAC), so it cannot
be hashed like an API key. Without sealing, whoever reads the jobs Redis (a
dump, a replica, a backup) could sign events that every customer endpoint
would accept. Sealed, a stored secret is "sealed:v1:" and the URL-safe
base64 of a random 96-bit nonce followed by the ciphertext and its tag; the
API key id it belongs to is the associated data, so a sealed value copied
into another key's hash does not open.

A plain value stored before sealing was turned on ("whsec_...") is still
read, and is replaced by a sealed one when the key's secret is rotated.

The sealing key rotates without a format change: a box seals with its
current key and opens with it or any previous key it was given (GCM's tag
tells a wrong key apart), and `python -m services.jobs.reseal` re-seals every
stored secret under the current key, after which the previous key can go
(docs/runbook.md, "Rotate the webhook sealing key").
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.core import secret_files

SEALED_PREFIX = "sealed:v1:"
KEY_BYTES = 32
NONCE_BYTES = 12


class SecretUnreadable(Exception):
    """SecretUnreadable: a stored webhook secret does not open with this key (another
    key, or changed in Redis). Never shown to clients: deliveries fail and retry."""


class SecretBox:
    """SecretBox seals webhook secrets with its current AES-256-GCM key and opens
    them with that key or a previous one.

    Args:
        key: 32 bytes, the current key.
        previous: keys that sealed secrets still stored (32 bytes each), tried
            in order after the current one.
    """

    def __init__(self, key: bytes, previous: Sequence[bytes] = ()) -> None:
        for one in (key, *previous):
            if len(one) != KEY_BYTES:
                raise ValueError(f"a webhook secrets key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        self._previous = tuple(AESGCM(one) for one in previous if one != key)

    @classmethod
    def from_hex(cls, value: str, previous: Sequence[str] = ()) -> SecretBox:
        """Returns a box for keys written as 64 hex digits each; raises ValueError."""
        return cls(key_of_hex(value), [key_of_hex(one) for one in previous])

    @classmethod
    def from_file(cls, path: Path, previous: Sequence[str] = ()) -> SecretBox:
        """Returns a box for the key in `path`, creating the file (0600) when missing."""
        secret_files.create_secret(path, os.urandom(KEY_BYTES).hex().encode())
        return cls.from_hex(path.read_text(), previous)

    def seal(self, secret: str, key_id: str) -> str:
        """Returns the stored form of `secret`, bound to the API key `key_id`."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode(), key_id.encode())
        return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, stored: str, key_id: str) -> str:
        """Returns the secret a stored value holds (a plain legacy value as it is).

        Raises:
            SecretUnreadable: it was sealed with another key, for another API
                key, or changed since.
        """
        return self.open_with_age(stored, key_id)[0]

    def open_with_age(self, stored: str, key_id: str) -> tuple[str, bool]:
        """Returns the secret a stored value holds, and whether it should be sealed
        again under the current key (a previous key opened it, or it is plain).

        Raises:
            SecretUnreadable: as `open`.
        """
        if not stored.startswith(SEALED_PREFIX):
            return stored, True
        try:
            raw = base64.urlsafe_b64decode(stored[len(SEALED_PREFIX) :])
        except (binascii.Error, ValueError):
            raise SecretUnreadable(f"the webhook secret of {key_id} does not open") from None
        nonce, sealed, bound = raw[:NONCE_BYTES], raw[NONCE_BYTES:], key_id.encode()
        for age, aead in enumerate((self._aead, *self._previous)):
            try:
                return aead.decrypt(nonce, sealed, bound).decode(), age > 0
            except (InvalidTag, ValueError):
                continue
        raise SecretUnreadable(f"the webhook secret of {key_id} does not open")


def key_of_hex(value: str) -> bytes:
    """Returns a sealing key written as 64 hex digits; raises ValueError."""
    try:
        key = bytes.fromhex(value.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a webhook secrets key must be {KEY_BYTES * 2} hex digits")
    return key
