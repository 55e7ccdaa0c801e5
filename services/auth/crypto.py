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
import string

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


#: The fewest different characters a chosen key's random part may have: 48 hex digits
#: (`openssl rand -hex 24`) or 43 of URL-safe base64 have about 16 and 30, while
#: `tm_aaaa...` or a word repeated to length have a handful.
MIN_DISTINCT_KEY_CHARACTERS = 10
_KEY_ALPHABET = frozenset(string.ascii_letters + string.digits + "-_")


def weak_api_key(value: str) -> str:
    """Returns why an API key chosen by an operator (the bootstrap admin key) is weak,
    or "" if it looks random: the API-key shape, a random part of URL-safe base64
    (hex included) with MIN_DISTINCT_KEY_CHARACTERS different characters at least,
    and no shorter string repeated."""
    if not looks_like_api_key(value):
        return f"must look like {API_KEY_PREFIX}<43 characters>"
    body = value[len(API_KEY_PREFIX) :]
    if not set(body) <= _KEY_ALPHABET:
        return "must be letters, digits, '-' and '_' after the prefix"
    repeated = any(
        body == (body[:n] * len(body))[: len(body)] for n in range(1, len(body) // 2 + 1)
    )
    if len(set(body)) < MIN_DISTINCT_KEY_CHARACTERS or repeated:
        return "looks chosen, not random: make one with `openssl rand -hex 24` after tm_"
    return ""
