"""One selector rule ("support@3", "support@stable") wherever a selector is checked or parsed.

A version number is ASCII digits: str.isdigit() also accepts "²" (int() refuses it:
the worker answered INTERNAL) and "٣" (int() reads it as 3).
"""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument, NotFound
from services.inference.v2.validation import GenerationSpec
from services.router import prompts
from services.router.prompts import PromptHead
from tokenmesh.inference.v2 import inference_service_pb2 as pb

#: selector -> the version number it names (None: an alias, "latest" or empty).
VALID: dict[str, int | None] = {
    "": None,
    "latest": None,
    "stable": None,
    "canary-2": None,
    "3": 3,
    "03": 3,
    "9" * 32: int("9" * 32),
}
INVALID = ("²", "٣", "１", "3²", "1" * 33, "1" * 5000, "Stable", "a b", "a" * 33, "stable\n")
HEAD = PromptHead(name="support", latest=3, aliases={"stable": 2, "canary-2": 1})


def _accepts(check, value: str) -> bool:
    try:
        check(value)
    except InvalidArgument:
        return False
    except NotFound:
        return True  # well-formed, just not there
    return True


def _v2(selector: str) -> None:
    GenerationSpec.from_pb(pb.CompleteRequest(model="m", template=f"support@{selector}"))


CHECKS = {
    "check_selector": prompts.check_selector,
    "parse_reference": lambda s: prompts.parse_reference(f"support@{s}"),
    "PromptHead.resolve": HEAD.resolve,
    "v2 validation": _v2,
}


@pytest.mark.parametrize("where", CHECKS)
def test_every_check_accepts_exactly_the_selector_rule(where):
    check = CHECKS[where]
    assert [s for s in VALID if not _accepts(check, s)] == []
    assert [s for s in INVALID if _accepts(check, s)] == []


def test_only_ascii_digits_are_version_numbers():
    assert {s: prompts.version_number(s) for s in VALID} == VALID
    assert {s: prompts.version_number(s) for s in INVALID} == dict.fromkeys(INVALID)
    assert [HEAD.resolve(s) for s in ("", "latest", "stable", "03")] == [3, 3, 2, 3]


def test_an_invalid_reference_names_the_template_field():
    with pytest.raises(InvalidArgument) as error:
        _v2("²")
    assert [v.field for v in error.value.violations] == ["template"]


@pytest.mark.parametrize("alias", ["9", "0123", "1" * 32])
def test_an_alias_cannot_look_like_a_version_number(alias):
    with pytest.raises(InvalidArgument):
        prompts.set_alias(HEAD, alias, 1, 0.0)
