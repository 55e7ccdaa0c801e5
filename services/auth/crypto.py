"""Secrets at rest: keyed hashes of API keys and encrypted signing keys.

Everything derives from one server secret (TOKENMESH_AUTH_SECRET or the file
named by TOKENMESH_AUTH_SECRET_FILE): API-key secrets are stored only as
HMAC-SHA256 under it, and JWT signing keys are stored AES-GCM encrypted under
a key derived from it. Rotating the server secret invalidates every API key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

API_KEY_PREFIX = "tm_"
SECRET_BYTES = 32


class ServerSecret:
    """ServerSecret hashes API keys and encrypts signing keys.

    Args:
        secret: the server secret (at least 32 bytes of entropy).
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the auth server secret must be at least 32 bytes")
        self._hmac_key = hashlib.sha256(b"tokenmesh-api-key-hmac\x00" + secret).digest()
        self._aead = AESGCM(hashlib.sha256(b"tokenmesh-signing-key-aead\x00" + secret).digest())

    def hash_api_key(self, api_key: str) -> str:
        """Returns the keyed hash under which an API key is indexed (hex)."""
        return hmac.new(self._hmac_key, api_key.encode(), hashlib.sha256).hexdigest()

    def matches(self, api_key: str, stored_hash: str) -> bool:
        """Compares an API key with a stored hash in constant time."""
        return hmac.compare_digest(self.hash_api_key(api_key), stored_hash)

    def encrypt(self, plaintext: bytes, context: bytes) -> str:
        """Returns base64(nonce + AES-GCM ciphertext) bound to `context`."""
        nonce = os.urandom(12)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, plaintext, context)).decode()

    def decrypt(self, token: str, context: bytes) -> bytes:
        """Reverses `encrypt`; raises when the data or context was altered."""
        raw = base64.b64decode(token)
        return self._aead.decrypt(raw[:12], raw[12:], context)


def new_api_key() -> str:
    """Returns a fresh API key: `tm_` + 32 random bytes, URL-safe base64."""
    return API_KEY_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def looks_like_api_key(value: str) -> bool:
    """Tells whether a credential has the API-key shape (not a JWT)."""
    return value.startswith(API_KEY_PREFIX) and 40 <= len(value) <= 64
