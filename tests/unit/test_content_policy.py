"""Content policies: input rules (block, redact, flag, size), pattern checks, the output filter."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator

import pytest
import regex

from services.core.errors import InvalidArgument
from services.inference.pipeline import content
from services.inference.pipeline.policy import (
    CHECK_BUDGET_S,
    REGEX_TIMEOUT_S,
    ContentPolicyViolation,
    InputCheck,
    OutputFilter,
    PatternRule,
    Policy,
    check_input,
    try_check_input,
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


@pytest.mark.parametrize(
    "disguised",
    [
        "a for\u200bbidden word",  # zero-width space
        "a for\u00adbidden word",  # soft hyphen
        "a FOR\u2060BIDDEN word",  # word joiner
        "a forbíddén word",  # accents
        "a ｆｏｒｂｉｄｄｅｎ word",  # fullwidth letters
        "a for\ufe0fbidden word",  # variation selector (a mark of class 0)
        "a for\u034fbidden word",  # combining grapheme joiner
        "a for\x7fbidden word",  # an ASCII control character
        "a for\x01bidden word",
    ],
)
def test_a_keyword_disguised_by_invisible_characters_or_accents_is_still_blocked(disguised):
    """Rules read the raw text, while a tokenizer drops invisible characters and
    accents (all-minilm-l6-v2 embedded these as exactly "a forbidden word")."""
    policy = _policy(block_keywords=(PatternRule("forbidden"),))
    with pytest.raises(ContentPolicyViolation, match="block_keyword:0"):
        check_input([policy], [disguised])


def test_a_keyword_with_accents_matches_its_own_spellings_and_nothing_more():
    policy = _policy(block_keywords=(PatternRule("Café"),), block_patterns=(PatternRule(r"x\d"),))
    for text in ("un café", "un cafe\u0301", "un CAFÉ", "un cafe"):
        with pytest.raises(ContentPolicyViolation, match="block_keyword:0"):
            check_input([policy], [text])
    assert check_input([policy], ["cafés à emporter", "x and ｘ"]).hits == []


def test_a_keyword_of_invisible_characters_only_matches_itself_not_every_text():
    """ "\u202e" folds to nothing, and an empty keyword matched at every non-word
    boundary: "Hello, world" was blocked."""
    policy = _policy(block_keywords=(PatternRule("\u202e"),))
    assert check_input([policy], ["Hello, world.", "a b"]).hits == []
    with pytest.raises(ContentPolicyViolation):
        check_input([policy], ["abc \u202e def"])


def test_a_hindi_keyword_does_not_match_words_that_differ_by_a_vowel_sign():
    """The fold dropped every mark, vowel signs of class 0 too ("है" read as "ह"): the
    keyword लंड blocked "वो लड़ रहे हैं" (they are fighting). Accents still go."""
    policy = _policy(block_keywords=(PatternRule("लंड"),))
    assert check_input([policy], ["वो लड़ रहे हैं"]).hits == []
    with pytest.raises(ContentPolicyViolation):
        check_input([_policy(block_keywords=(PatternRule("forbidden"),))], ["forbíddén"])


def test_a_block_found_in_either_reading_stands():
    """The text read without invisible characters was taken when it showed more PII,
    and a block found only in the text as written went with the switch: an SSN got
    through once an address split by a zero-width space came with it."""
    policy = _policy(pii={"ssn": "block", "email": "redact"})
    text = "my ssn 123-45-6789\u200b0 mail jane.doe.longname@exa\u200bmple.com"
    with pytest.raises(ContentPolicyViolation, match="pii:ssn"):
        check_input([policy], [text])


def test_pii_hidden_by_fullwidth_letters_is_redacted_and_other_text_kept_as_written():
    redact = _policy(pii={"email": "redact"})
    hidden = check_input([redact], ["mail ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ"])
    assert hidden.texts == ["mail [EMAIL]"] and hidden.hits
    # Nothing hidden: the text goes as written (a ZWJ joins emoji, a ZWNJ spells Persian).
    family = "👨\u200d👩\u200d👧 family; می\u200cخواهم; mail a@b.io"
    assert check_input([redact], [family]).texts == [family.replace("a@b.io", "[EMAIL]")]


def test_pii_split_by_an_invisible_character_is_found_and_sent_without_it():
    blocked = _policy(pii={"email": "block"})
    with pytest.raises(ContentPolicyViolation, match="pii:email"):
        check_input([blocked], ["mail jane.doe@exa\u200bmple.com"])
    with pytest.raises(ContentPolicyViolation, match="pii:email"):
        check_input([blocked], ["mail ｊａｎｅ@example.com"])  # fullwidth
    redacted = check_input([_policy(pii={"email": "redact"})], ["mail ja\u200dne@example.com"])
    assert redacted.texts == ["mail [EMAIL]"]


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
    assert len(flt.units) == 1  # one search for both rules
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


def test_a_card_followed_by_its_expiry_is_blocked_and_redacted():
    text = "pay with 4111 1111 1111 1111 12/26 please"
    with pytest.raises(ContentPolicyViolation, match="pii:card"):
        check_input([_policy(pii={"card": "block"})], [text])
    redacted = check_input([_policy(pii={"card": "redact"})], [text])
    assert redacted.texts == ["pay with [CARD] 12/26 please"]


def test_the_admin_regex_budget_is_per_request_not_per_search():
    # Each search of 1,700 letters takes ~10 ms, under the 50 ms limit of one search;
    # 256 of them took 3 s and let the request through. The request's budget ends it.
    import time

    from services.inference.pipeline.policy import CHECK_TIME_RULE

    policy = _policy(block_patterns=(PatternRule(r"[a-z]+\d{4}"),))
    started = time.thread_time()
    with pytest.raises(ContentPolicyViolation) as caught:
        check_input([policy], ["a" * 1700] * 256, "inputs", budget_s=0.2)
    assert caught.value.metadata == {"policy": "acme@3", "rule": CHECK_TIME_RULE}
    assert time.thread_time() - started < 1.0  # the budget plus one search, loosely


def _split(text: str, rng, sizes=(1, 2, 3, 4, 5)) -> list[str]:
    pieces, at = [], 0
    while at < len(text):
        size = rng.choice(sizes)
        pieces.append(text[at : at + size])
        at += size
    return pieces


@pytest.mark.parametrize("gap", [100, 140, 400, 900])
def test_a_match_longer_than_the_window_is_still_caught(gap):
    # The window was the last 64 released characters plus the held ones: a match of
    # more than ~128 characters was never seen, not even late.
    rule = PatternRule(r"(?i)how to make\b.{0,1000}?\bbomb\b", "weapons")
    text = "Sure. Here is how to make " + ("a very " * 200)[:gap] + " bomb at home." + " ok" * 60
    flt: OutputFilter[int] = OutputFilter([_policy(output_block_patterns=(rule,))])
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    sent = "".join(pieces[i] for i in _feed_all(flt, pieces))
    assert flt.match is not None and flt.match.reason == "weapons"
    assert len(sent) < len(text)


def test_boundaries_at_the_window_edges_stop_no_harmless_answer():
    # \b and $ were judged at the window's cut edges: "kill" cut out of "skills" or
    # cut off "killer" was a word, a delta ending a line was the end of the text.
    import random

    import regex

    rules = (PatternRule(r"(?i)\bkill\b", "violence"), PatternRule(r"(?m)^the end$"))
    text = (
        "Our team has a wide range of skills. We reviewed the skillset of each engineer and"
        " the killer feature of the release is speed. Skilled people make the difference."
        " Not the end yet.\n"
    ) * 3
    assert all(regex.search(r.pattern, text) is None for r in rules)
    rng = random.Random(1)
    policy = _policy(output_block_patterns=rules)
    stops = 0
    for _ in range(1000):
        flt: OutputFilter[int] = OutputFilter([policy])
        _feed_all(flt, _split(text, rng))
        stops += flt.match is not None
    assert stops == 0
    flt = OutputFilter([policy])
    assert _feed_all(flt, ["x" * 90, " the kill", "er feature is speed" + " ok" * 30])
    assert flt.match is None


def test_boundaries_still_stop_a_real_match_before_it_is_sent():
    import random

    rule = PatternRule(r"(?i)\bkill\b(?! ?switch)", "violence")
    text = "x " * 60 + "and then we kill it. " + "more words here " * 10
    rng = random.Random(2)
    for _ in range(300):
        flt: OutputFilter[int] = OutputFilter([_policy(output_block_patterns=(rule,))])
        pieces = _split(text, rng)
        sent = "".join(pieces[i] for i in _feed_all(flt, pieces))
        assert flt.match is not None and "kill" not in sent
    # The same word at the very end is judged at flush, where the end is real.
    flt = OutputFilter([_policy(output_block_patterns=(PatternRule(r"\bkill$"),))])
    assert _feed_all(flt, ["x" * 100, " kill"]) == [] and flt.match is not None


def test_output_filter_agrees_with_a_search_of_the_whole_text():
    # Any tokenisation: a match of the whole text (up to MAX_MATCH_CHARS) stops the
    # choice, and one of up to 56 characters before any of it is sent; no match, no stop.
    import random

    import regex

    from services.inference.pipeline.policy import MAX_MATCH_CHARS

    patterns = [
        r"(?i)\bkill\b",
        r"kill(?!er)",
        r"(?i)how to make\b.{0,300}\bbomb\b",
        r"(?s)BEGIN.{0,900}?END",
        r"pass(word)?:\s*\S+",
        r"^Sure",
        r"(?m)\d{3}-\d{4}$",
        r"(\d{3})-(?1)-(?1)",
    ]
    words = (
        "skills killer kills kill the a how to make bomb bombastic BEGIN END Sure password:"
        " hunter2 123-4567 123-456-789 \n x yy killed skillset"
    ).split(" ")
    rng = random.Random(7)
    for _ in range(1500):
        pattern = rng.choice(patterns)
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 300)))
        expected = regex.search(pattern, text)
        rules = (PatternRule("(zz)q"), PatternRule(pattern))  # a group before it
        flt: OutputFilter[int] = OutputFilter([_policy(output_block_patterns=rules)])
        pieces = _split(text, rng, (1, 2, 3, 4, 5, 8, 30))
        sent = "".join(pieces[i] for i in _feed_all(flt, pieces))
        if expected is None:
            assert flt.match is None, (pattern, text)
            continue
        if len(expected.group()) <= MAX_MATCH_CHARS:
            assert flt.match is not None, (pattern, expected.group())
        if len(expected.group()) <= 56:
            assert len(sent) <= expected.start(), (pattern, expected.group())


def test_a_rule_calling_a_numbered_group_still_applies_beside_others():
    # Combined into one alternation, (?1) called the first rule's group: the combined
    # search missed and no rule was tried on its own.
    rules = (PatternRule(r"(zz)"), PatternRule(r"(\d{3})-(?1)-(?1)"))
    flt: OutputFilter[int] = OutputFilter([_policy(output_block_patterns=rules)])
    text = "x" * 80 + "call 123-456-789 now" + " y" * 50
    _feed_all(flt, [text[i : i + 3] for i in range(0, len(text), 3)])
    assert flt.match is not None and flt.match.hit.rule == "output_block_pattern:1"


def test_an_output_rule_that_cannot_match_within_the_window_is_refused():
    with pytest.raises(InvalidArgument) as caught:
        Policy("p", 1, output_block_patterns=(PatternRule(r"a{1100}"),)).check()
    assert caught.value.violations[0].field == "output_block_patterns[0]"
    Policy("p", 1, output_block_patterns=(PatternRule(r"a{1000}\S+"),)).check()


def test_a_sample_is_bounded_in_bytes_and_keeps_a_share_of_every_text():
    from services.inference.pipeline import samples

    big = "lorem ipsum dolor sit amet " * 5000  # ~135 K characters
    sample = samples.build(
        request_id="r",
        tenant="t",
        key_id="k",
        model=("m", "1"),
        rpc="/x",
        input_text="é" * 70_000,
        outputs=[big] * 8 + ["short"],
        finish_reason="stop",
        policy_hits=["acme@1 pii:email redact input"],
    )
    assert len(sample.SerializeToString()) <= 32 * 1024  # MAX_SAMPLE_BYTES, documented
    assert sample.outputs[-1] == "short" and len(sample.input) > 1000
    assert all(len(o) > 1000 for o in sample.outputs[:-1])


@contextlib.contextmanager
def _busy_threads(count: int) -> Iterator[None]:
    """Keeps `count` threads of this process on the CPU (searching with the GIL
    released), as the engine's threads and the other check thread are on a busy
    worker."""
    stop = threading.Event()
    text = "ab" * 100_000

    def burn() -> None:
        digit = regex.compile(r"\d")
        while not stop.is_set():
            digit.search(text, concurrent=True)

    threads = [threading.Thread(target=burn, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def _words_costing(pattern, seconds: float) -> str:
    """Returns harmless prose that `pattern` takes about `seconds` of CPU to search."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog and then some more text".split()
    sample = " ".join(rng.choice(words) for _ in range(4000))
    started = time.thread_time()
    for _ in range(5):
        assert pattern.search(sample) is None
    per_char = (time.thread_time() - started) / (5 * len(sample))
    return (sample + " ") * max(1, round(seconds / per_char / (len(sample) + 1)))


def test_a_harmless_input_is_not_blocked_when_other_threads_use_the_cpu():
    # The regex package's timeout counts the whole process's CPU time: with other
    # threads busy, a search of ~half the 50 ms limit ran out after ~12 ms of its
    # own and the rule "matched" (19 of 20 long prompts blocked under load).
    policy = _policy(block_patterns=(PatternRule(r"(?i)[a-z]+ [a-z]+ [a-z]+ [a-z]+ 42"),))
    (_, pattern, _) = policy.input_rules[0]
    text = _words_costing(pattern, 0.4 * REGEX_TIMEOUT_S)
    blocked = []
    with _busy_threads(3):
        for _ in range(8):
            try:
                check_input([policy], [text], "prompt")
            except ContentPolicyViolation as caught:
                blocked.append(caught.metadata["rule"])
    assert blocked == []


@pytest.mark.parametrize("busy", [0, 3])
def test_a_catastrophic_pattern_is_still_stopped_within_the_budget_under_load(busy):
    # A search tried again after other threads used up its limit is bounded too.
    policy = _policy(block_patterns=(PatternRule(r"(a|aa)+$"),))
    with _busy_threads(busy):
        started = time.thread_time()
        with pytest.raises(ContentPolicyViolation) as caught:
            check_input([policy], ["a" * 40 + "!"], "prompt")
        spent = time.thread_time() - started
    assert caught.value.metadata["rule"] == "block_pattern:0"  # the rule, fail closed
    assert spent < CHECK_BUDGET_S, f"{spent:.2f} s of CPU"


def test_a_check_within_a_small_budget_decides_nothing_once_it_runs_out():
    slow = _policy(block_patterns=(PatternRule(r"[a-z]+\d{4}"),))  # ~10 ms on 1,700 letters
    assert try_check_input([slow], ["a" * 1700], "prompt", 0.002) is None
    assert try_check_input([slow], ["short"], "prompt", 0.002) == InputCheck(["short"])
    keyword = _policy(block_keywords=(PatternRule("forbidden"),))
    with pytest.raises(ContentPolicyViolation):
        try_check_input([keyword], ["a forbidden word"], "prompt", 0.002)


async def test_a_short_input_too_slow_for_the_event_loop_is_decided_on_a_thread():
    # Short inputs are checked on the loop within a few ms; a rule slower than that
    # on them is decided on a check thread: never let through, never blocked for it.
    slow = _policy(block_patterns=(PatternRule(r"[a-z]+\d{4}"),))
    assert (await content._check([slow], ["a" * 1700], "prompt", "t")).hits == []
    catastrophic = _policy(block_patterns=(PatternRule(r"(a|aa)+$"),))
    started = time.thread_time()  # the event loop's thread: this one
    with pytest.raises(ContentPolicyViolation) as caught:
        await content._check([catastrophic], ["a" * 40 + "!"], "prompt", "t")
    assert caught.value.metadata["rule"] == "block_pattern:0"
    held = time.thread_time() - started
    assert held < REGEX_TIMEOUT_S / 2, f"the loop spent {held * 1000:.0f} ms"
