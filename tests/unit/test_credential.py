"""The auth service reads a credential as the edge's key cache does (gateway/key_cache.py)."""

from __future__ import annotations

from services.auth.authenticator import credential

KEY = "tm_" + "k" * 43


def test_ascii_whitespace_around_a_credential_is_trimmed_like_the_edge_does():
    assert credential({"x-api-key": f" \t{KEY}\r\n"}) == KEY
    assert credential({"authorization": f"Bearer  {KEY} "}) == KEY


def test_unicode_spaces_are_part_of_the_credential_not_trimmed():
    # str.strip() took them: one key verified under many spellings, each cached
    # apart at the edge (no Lua pattern trims them), filling its caches.
    for space in ("\u00a0", "\u2000", "\u3000"):
        assert credential({"x-api-key": KEY + space}) == KEY + space
        assert credential({"authorization": f"Bearer {KEY}{space}"}) == f"{KEY}{space}"
