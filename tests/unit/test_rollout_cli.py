"""`tokenmesh models rollout`'s words (services/cli/rollouts.py)."""

from __future__ import annotations

import pytest

from services.cli.rollouts import parse_words


def test_a_model_named_like_an_operation_is_rolled_out_with_start():
    # `rollout status 2` is the status of model "2"; a model named "status" needed a way.
    assert parse_words(["status", "2"]) == ("status", "2", "")
    assert parse_words(["start", "status", "2"]) == ("start", "status", "2")
    assert parse_words(["demo-lm", "2"]) == ("start", "demo-lm", "2")
    assert parse_words(["abort", "demo-lm"]) == ("abort", "demo-lm", "")


@pytest.mark.parametrize("words", [["demo-lm"], ["status", "a", "b"], ["a", "b", "c", "d"]])
def test_other_word_counts_are_refused_with_the_usage(words):
    with pytest.raises(SystemExit, match=r"\[start\] MODEL VERSION"):
        parse_words(words)
