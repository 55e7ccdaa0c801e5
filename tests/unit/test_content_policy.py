"""Content policies: input rules (block, redact, flag, size), pattern checks, the output filter."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.inference.pipeline.policy import (
    ContentPolicyViolation,
    OutputFilter,
    PatternRule,
    Policy,
    check_input,
)


def _policy(**fields) -> Policy:
    policy = Policy(name="acme", version=3, **fields)
    policy.check()
    return policy


def test_redact_replaces_pii_before_the_model_sees_it_and_counts_a_hit():
    policy = _policy(pii={"email": "redact"})
    result = check_input([policy], ["write to jane@example.com", "no pii here"])
    assert result.texts == ["write to [EMAIL]", "no pii here"]
    assert [h.label for h in result.hits] == ["acme@3 pii:email redact input"]


def test_flag_lets_the_text_through_and_counts_a_hit():
    result = check_input([_policy(pii={"ip": "flag"})], ["server 10.0.0.1"])
    assert result.texts == ["server 10.0.0.1"]
    assert [(h.rule, h.action) for h in result.hits] == [("pii:ip", "flag")]


def test_block_names_the_rule_and_never_the_text():
    with pytest.raises(ContentPolicyViolation) as caught:
        check_input([_policy(pii={"card": "block"})], ["card 4111 1111 1111 1111"], "prompt")
    error = caught.value
    assert error.reason == "CONTENT_POLICY"
    assert error.metadata == {"policy": "acme@3", "rule": "pii:card"}
    assert "4111" not in error.message and "acme@3" in error.message
    assert error.violations[0].field == "prompt"


def test_block_pattern_and_keyword_with_reasons():
    policy = _policy(
        block_patterns=(PatternRule(r"project\s+x\d+", "internal code names"),),
        block_keywords=(PatternRule("Bomb"),),
    )
    with pytest.raises(ContentPolicyViolation) as caught:
        check_input([policy], ["about project  x42"])
    assert caught.value.metadata["rule"] != ""
    with pytest.raises(ContentPolicyViolation, match="block_keyword:0"):
        check_input([policy], ["a bomb"])
    assert check_input([policy], ["bombastic project"]).hits == []  # whole words only


def test_max_input_chars_counts_every_text():
    policy = _policy(max_input_chars=10)
    check_input([policy], ["12345", "12345"])
    with pytest.raises(ContentPolicyViolation, match="max_input_chars"):
        check_input([policy], ["12345", "123456"])


def test_policies_apply_in_order_redaction_first_then_the_next_policy():
    redacting = _policy(pii={"email": "redact"})
    blocking = Policy(name="strict", version=1, block_patterns=(PatternRule("@"),))
    # The first policy redacted the address: the second no longer sees an "@".
    assert check_input([redacting, blocking], ["a@b.io"]).texts == ["[EMAIL]"]


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"pii": {"passport": "block"}}, "pii"),
        ({"pii": {"email": "delete"}}, "pii.email"),
        ({"block_patterns": (PatternRule("(unclosed"),)}, "block_patterns[0]"),
        ({"block_patterns": (PatternRule("x" * 300),)}, "block_patterns[0]"),
        ({"output_block_patterns": (PatternRule("a*"),)}, "output_block_patterns[0]"),
        ({"block_patterns": tuple(PatternRule(f"p{i}") for i in range(33))}, "block_patterns"),
    ],
)
def test_unusable_rules_are_refused_naming_the_field(fields, where):
    with pytest.raises(InvalidArgument) as caught:
        Policy(name="p", version=1, **fields).check()
    assert caught.value.violations[0].field == where


def test_a_catastrophic_pattern_is_cut_off_and_fails_closed():
    # (a|aa)+$ on "aaaa...!" backtracks exponentially: the search time limit stops it.
    policy = _policy(block_patterns=(PatternRule(r"(a|aa)+$"),))
    with pytest.raises(ContentPolicyViolation):
        check_input([policy], ["a" * 40 + "!"])


def test_policy_round_trips_through_json():
    policy = _policy(
        pii={"email": "redact", "card": "block"},
        block_patterns=(PatternRule("x+y", "why"),),
        output_block_patterns=(PatternRule("secret"),),
        max_input_chars=100,
        created_by="key_1",
    )
    assert Policy.from_json("acme", 3, policy.to_json()) == policy


def _feed_all(flt: OutputFilter[int], pieces: list[str]) -> list[int]:
    sent: list[int] = []
    for index, piece in enumerate(pieces):
        sent += flt.feed(piece, index)
        if flt.match:
            return sent
    return sent + flt.flush()


def test_output_filter_releases_whole_items_once_the_window_has_passed():
    flt: OutputFilter[int] = OutputFilter(
        [_policy(output_block_patterns=(PatternRule("zzz"),))], 8, step=1
    )
    assert flt.feed("hello ", 0) == []  # held: fewer than 8 characters came after it
    assert flt.feed("world, ", 1) == []
    assert flt.feed("and more", 2) == [0, 1]
    assert flt.flush() == [2]
    assert "".join(flt.released_text) == "hello world, and more"


def test_output_filter_catches_a_match_before_any_of_it_is_sent():
    policy = _policy(output_block_patterns=(PatternRule(r"pass(word)?:\s*\S+", "credentials"),))
    flt: OutputFilter[int] = OutputFilter([policy], 16)
    pieces = ["The ", "admin ", "pass", "word", ": ", "hunter2", " ok"]
    sent = _feed_all(flt, pieces)
    assert flt.match is not None
    assert flt.match.hit.rule == "output_block_pattern:0"
    assert "hunter2" not in flt.match.message() and "credentials" in flt.match.message()
    assert "pass" not in "".join(pieces[i] for i in sent)


def test_output_filter_without_rules_is_inactive():
    assert not OutputFilter([_policy(pii={"email": "redact"})]).active


@pytest.mark.parametrize("step", [1, 16])
@pytest.mark.parametrize("size", [1, 3, 7])
def test_output_filter_never_sends_any_part_of_a_match_within_the_window(step, size):
    # The match is cut into deltas of every size; two rules scan as one alternation.
    rules = (PatternRule(r"s3cr3t-[0-9]{4}"), PatternRule("unrelated"))
    text = "some harmless preamble " * 4 + "s3cr3t-1234" + " and the rest of it" * 3
    flt: OutputFilter[int] = OutputFilter([_policy(output_block_patterns=rules)], 16, step)
    assert flt.combined is not None
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    sent = "".join(pieces[i] for i in _feed_all(flt, pieces))
    assert flt.match is not None and flt.match.hit.rule == "output_block_pattern:0"
    assert "s" not in sent[len("some harmless preamble ") * 4 :]


def test_output_filter_without_rules_releases_at_once_and_records_the_text():
    flt: OutputFilter[int] = OutputFilter([_policy(pii={"email": "redact"})])
    assert flt.feed("a", 0) == [0] and flt.feed("bc", 1) == [1] and flt.flush() == []
    assert "".join(flt.released_text) == "abc"


def test_a_flagged_detector_s_span_does_not_hide_a_redacted_or_blocked_one_s():
    # A token-looking email: the secret detector outranks the email one where their
    # spans overlap, so with secrets only flagged the address went to the model.
    text = "write to ghp_abcdefghijklmnopqrstuvwxyz0123456789@example.com"
    result = check_input([_policy(pii={"secret": "flag", "email": "redact"})], [text])
    assert result.texts == ["write to [EMAIL]"]
    assert [(h.rule, h.action) for h in result.hits] == [
        ("pii:email", "redact"),
        ("pii:secret", "flag"),
    ]
    with pytest.raises(ContentPolicyViolation):
        check_input([_policy(pii={"secret": "flag", "email": "block"})], [text])
