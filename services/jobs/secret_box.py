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
"""

from __future__ import annotations

import base64
import binascii
import os
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
    """SecretBox seals and opens webhook secrets with one AES-256-GCM key.

    Args:
        key: 32 bytes.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the webhook secrets key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_hex(cls, value: str) -> SecretBox:
        """Returns a box for a key written as 64 hex digits; raises ValueError."""
        try:
            return cls(bytes.fromhex(value.strip()))
        except ValueError:
            raise ValueError(
                f"the webhook secrets key must be {KEY_BYTES * 2} hex digits"
            ) from None

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        """Returns a box for the key in `path`, creating the file (0600) when missing."""
        secret_files.create_secret(path, os.urandom(KEY_BYTES).hex().encode())
        return cls.from_hex(path.read_text())

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
        if not stored.startswith(SEALED_PREFIX):
            return stored
        try:
            raw = base64.urlsafe_b64decode(stored[len(SEALED_PREFIX) :])
            opened = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], key_id.encode())
        except (InvalidTag, binascii.Error, ValueError):
            raise SecretUnreadable(f"the webhook secret of {key_id} does not open") from None
        return opened.decode()
