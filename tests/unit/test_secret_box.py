"""Webhook secrets sealed at rest: bound to their key id, refused when changed."""

from __future__ import annotations

import stat

import pytest

from services.core.settings import SettingsError, load
from services.jobs import signing
from services.jobs.secret_box import SEALED_PREFIX, SecretBox, SecretUnreadable
from services.jobs.service import JobsSettings

KEY = bytes(range(32))


def test_a_sealed_secret_opens_to_itself_and_does_not_show_it():
    box, secret = SecretBox(KEY), signing.new_secret()
    stored = box.seal(secret, "key_a")
    assert stored.startswith(SEALED_PREFIX) and secret not in stored
    assert box.open(stored, "key_a") == secret
    assert box.seal(secret, "key_a") != stored  # a fresh nonce every time


def test_a_sealed_secret_does_not_open_for_another_key_id_or_another_key():
    stored = SecretBox(KEY).seal(signing.new_secret(), "key_a")
    with pytest.raises(SecretUnreadable):
        SecretBox(KEY).open(stored, "key_b")  # copied into another key's hash
    with pytest.raises(SecretUnreadable):
        SecretBox(bytes(32)).open(stored, "key_a")


@pytest.mark.parametrize("stored", [f"{SEALED_PREFIX}AAAA", f"{SEALED_PREFIX}!!not base64!!"])
def test_a_changed_or_garbled_value_is_refused(stored):
    with pytest.raises(SecretUnreadable):
        SecretBox(KEY).open(stored, "key_a")


def test_a_value_stored_before_sealing_is_read_as_it_is():
    secret = signing.new_secret()
    assert SecretBox(KEY).open(secret, "key_a") == secret


def test_the_key_file_is_created_once_readable_only_by_its_owner(tmp_path):
    path = tmp_path / "state" / "webhook-secrets-key"
    first = SecretBox.from_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = first.seal("whsec_x", "key_a")
    assert SecretBox.from_file(path).open(stored, "key_a") == "whsec_x"  # the same key again


@pytest.mark.parametrize("value", ["", "00" * 31, "zz" * 32])
def test_a_key_that_is_not_32_bytes_of_hex_is_refused(value):
    with pytest.raises(ValueError, match="64 hex digits|32 bytes"):
        SecretBox.from_hex(value)


def test_a_bad_key_in_the_environment_is_refused_at_start_naming_the_variable():
    with pytest.raises(SettingsError, match="^TOKENMESH_WEBHOOK_SECRETS_KEY: .*64 hex digits"):
        load(JobsSettings, {"TOKENMESH_WEBHOOK_SECRETS_KEY": "zz" * 32})
    settings = load(JobsSettings, {"TOKENMESH_WEBHOOK_SECRETS_KEY": "00" * 32})
    assert isinstance(settings.secret_box(), SecretBox)


NEW = bytes(range(32, 64))


def test_a_box_opens_what_a_previous_key_sealed_and_seals_under_its_current_key():
    secret = signing.new_secret()
    sealed_before = SecretBox(KEY).seal(secret, "key_a")
    rotated = SecretBox(NEW, previous=[KEY])
    assert rotated.open(sealed_before, "key_a") == secret
    sealed_now = rotated.seal(secret, "key_a")
    assert SecretBox(NEW).open(sealed_now, "key_a") == secret
    with pytest.raises(SecretUnreadable):
        SecretBox(KEY).open(sealed_now, "key_a")  # the old key does not open new seals


def test_open_with_age_tells_which_values_want_sealing_again():
    rotated, secret = SecretBox(NEW, previous=[KEY]), signing.new_secret()
    assert rotated.open_with_age(rotated.seal(secret, "key_a"), "key_a") == (secret, False)
    assert rotated.open_with_age(SecretBox(KEY).seal(secret, "key_a"), "key_a") == (secret, True)
    assert rotated.open_with_age(secret, "key_a") == (secret, True)  # plain, from before sealing
    with pytest.raises(SecretUnreadable):
        rotated.open_with_age(SecretBox(bytes(32)).seal(secret, "key_a"), "key_a")


def test_a_bad_previous_key_is_refused_at_start_naming_the_variable():
    variable = "TOKENMESH_WEBHOOK_SECRETS_PREVIOUS_KEYS"
    with pytest.raises(SettingsError, match=f"^{variable}: .*64 hex digits"):
        load(JobsSettings, {"TOKENMESH_WEBHOOK_SECRETS_KEY": "00" * 32, variable: "ab" * 31})
    settings = load(JobsSettings, {"TOKENMESH_WEBHOOK_SECRETS_KEY": NEW.hex(), variable: KEY.hex()})
    box = settings.secret_box()
    assert box is not None
    assert box.open(SecretBox(KEY).seal("whsec_x", "key_a"), "key_a") == "whsec_x"
