"""The prompt-template renderer: variables, bounds, the sandbox, determinism, chat messages."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.core.errors import InvalidArgument
from services.inference import templates
from services.inference.templates import Message, Prompt, Variable, chat_prompt, declare
from services.router import prompts


def _violations(error: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in error.value.violations}


def _prompt(source: str, system: str = "", variables: tuple[Variable, ...] = ()) -> Prompt:
    return Prompt("support@1", source, system, declare(source, system, variables))


# --- variables ---------------------------------------------------------------


def test_declared_variables_take_defaults_and_undeclared_ones_are_required():
    prompt = _prompt(
        "Dear {{ customer }}, {{ tone }}.",
        variables=(Variable("tone", default="kindly", max_length=16),),
    )
    assert [v.name for v in prompt.variables] == ["tone", "customer"]
    assert prompt.variables[1] == Variable("customer", required=True, max_length=4096)
    assert prompt.render({"customer": "Ann"}) == "Dear Ann, kindly."
    assert prompt.render({"customer": "Ann", "tone": "warmly"}) == "Dear Ann, warmly."


def test_a_missing_required_variable_is_named():
    with pytest.raises(InvalidArgument) as error:
        _prompt("Dear {{ customer }}").render({})
    assert error.value.reason == "INVALID_VARIABLES"
    assert _violations(error) == {"variables.customer": "is required by support@1"}


def test_a_value_over_its_limit_is_named_with_the_limit():
    prompt = _prompt("{{ customer }}", variables=(Variable("customer", max_length=8),))
    assert prompt.render({"customer": "x" * 8}) == "x" * 8
    with pytest.raises(InvalidArgument) as error:
        prompt.render({"customer": "x" * 9})
    assert _violations(error) == {
        "variables.customer": "is 9 characters; support@1 allows at most 8"
    }


def test_an_unknown_variable_is_refused_and_named():
    with pytest.raises(InvalidArgument) as error:
        _prompt("{{ customer }}").render({"customer": "a", "admin": "yes"})
    assert _violations(error) == {
        "variables.admin": "is not a variable of support@1 (takes: customer)"
    }


def test_declarations_are_checked():
    bad = (
        Variable("1x"),
        Variable("messages"),
        Variable("ok", max_length=0),
        Variable("dup"),
        Variable("dup"),
        Variable("req", required=True, default="d"),
        Variable("long", default="xyz", max_length=2),
    )
    with pytest.raises(InvalidArgument) as error:
        declare("hi", "", bad)
    assert set(_violations(error)) == {
        "variables[0].name",
        "variables[1].name",
        "variables[2].max_length",
        "variables[4].name",
        "variables[5].default_value",
        "variables[6].default_value",
    }


def test_at_most_32_variables():
    source = " ".join(f"{{{{ v{i} }}}}" for i in range(33))
    with pytest.raises(InvalidArgument) as error:
        declare(source, "", ())
    assert "variables" in _violations(error)
    declare(" ".join(f"{{{{ v{i} }}}}" for i in range(32)), "", ())


def test_the_source_is_at_most_64_kib():
    declare("x" * templates.MAX_SOURCE_BYTES, "", ())
    with pytest.raises(InvalidArgument) as error:
        declare("x" * (templates.MAX_SOURCE_BYTES + 1), "", ())
    assert "template" in _violations(error)
    with pytest.raises(InvalidArgument) as error:
        declare("x", "é" * (templates.MAX_SOURCE_BYTES // 2 + 1), ())  # bytes, not characters
    assert "system_prompt" in _violations(error)


def test_the_system_prompt_uses_the_variables_and_is_seen_as_system():
    prompt = _prompt("[{{ system }}] {{ question }}", system="You help {{ customer }}.")
    rendered = prompt.render({"customer": "Ann", "question": "Why?"})
    assert rendered == "[You help Ann.] Why?"


# --- the sandbox ---------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ customer.__class__ }}",
        "{{ customer['__class__'] }}",
        "{{ messages.append(1) }}",
        "{{ self.__init__.__globals__ }}",
        "{{ customer.format(1) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ (1).to_bytes(1000000000, 'big') }}",
        "{{ self }}",
        "{{ '%999999999s' % 1 }}",
    ],
)
def test_attribute_tricks_fail_with_a_clear_error(source):
    prompt = Prompt("support@1", source, variables=[Variable("customer")])
    with pytest.raises(InvalidArgument) as error:
        prompt.render({"customer": "Ann"})
    assert error.value.reason == "TEMPLATE_UNSAFE"
    (description,) = _violations(error).values()
    assert description.startswith("support@1: ")
    assert "Traceback" not in description and ".py" not in description


@pytest.mark.parametrize(
    ("source", "tag"),
    [
        ("{% include 'secrets.txt' %}", "{% include %}"),
        ("{% import 'helpers' as h %}", "{% import %}"),
        ("{% from 'helpers' import x %}", "{% from ... import %}"),
        ("{% extends 'base' %}", "{% extends %}"),
        ("{% macro f(x) %}{{ f(x ~ x) }}{% endmacro %}{{ f('a') }}", "{% macro %}"),
    ],
)
def test_file_access_and_macros_are_refused_when_the_template_is_compiled(source, tag):
    with pytest.raises(InvalidArgument) as error:
        declare(source, "", ())
    assert _violations(error) == {"template": f"line 1: {tag} is not allowed in a prompt template"}


def test_a_syntax_error_names_its_line():
    with pytest.raises(InvalidArgument) as error:
        declare("ok\n{% for %}", "", ())
    assert _violations(error)["template"].startswith("line 2: ")


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'a' * 1000000000 }}",
        "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
        "{% set x = 'a' * 200000 %}{% set x = x ~ x %}{{ x | length }}",
        "{% set x = ['a'] * 200000 %}{{ (x + x) | length }}",
        "{{ range(1000000) | list | length }}",
        "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
        "{% endfor %}{{ ns.x }}",
        "{{ 2 ** 100000 }}",
        "{% for i in range(5000) %}{{ 'x' * 100 }}{% endfor %}",
        "{{ ['x' * 200000, 'y' * 200000] | join }}",
        "{{ ('x' * 1000) | replace('x', 'y' * 1000) }}",
    ],
)
def test_rendering_is_bounded(source):
    with pytest.raises(InvalidArgument) as error:
        Prompt("support@1", source).render()
    assert error.value.reason == "TEMPLATE_TOO_LARGE", _violations(error)


# Each of these rendered (or built their value) on the old bounds, which counted only
# a value's outer items: the text behind them is megabytes.
@pytest.mark.parametrize(
    "source",
    [
        # a list literal, dict() or `~` repeating a big list
        "{% set row = [1] * 100000 %}{% set a = [row, row, row] %}{{ a | length }}",
        "{% set row = [1] * 100000 %}{{ dict(a=row, b=row, c=row) | length }}",
        "{% set row = [1] * 100000 %}{{ (row ~ row ~ row) | length }}",
        # map() repeating one value, turned into text without printing it
        "{% set row = [1] * 1000 %}"
        "{{ ([0] * 1000) | map('default', row, true) | list | upper | length }}",
        # text captured by a block never reached the output bound
        "{% set s %}{% for i in range(100) %}{% for j in range(200) %}"
        + "x" * 100
        + "{% endfor %}{% endfor %}{% endset %}{{ s | length }}",
        "{% filter first %}{% for i in range(100) %}{% for j in range(200) %}{{ 'x' * 100 }}"
        "{% endfor %}{% endfor %}{% endfilter %}",
    ],
)
def test_a_value_counts_every_item_it_repeats(source):
    with pytest.raises(InvalidArgument) as error:
        Prompt("support@1", source).render()
    assert error.value.reason == "TEMPLATE_TOO_LARGE", _violations(error)


# Run in a child with its memory capped: on the old bounds this printed N * N items
# (0.4 s at N=1000, 10 s at 6000; at this N it never finished and took all memory).
_NESTED = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from services.core.errors import InvalidArgument
from services.inference.templates import Prompt
prompt = Prompt("t@1", "{% set row = [1] * N %}{{ [row] * N }}".replace("N", sys.argv[1]))
start = time.process_time()
try:
    prompt.render()
except InvalidArgument as error:
    print(error.reason, time.process_time() - start)
"""


def test_a_list_repeating_a_big_list_is_refused_at_once():
    n = str(templates.MAX_OUTPUT_CHARS)  # the most the outer list alone may hold
    root = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", _NESTED, n], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0 and child.stdout, child.stderr[-2000:]
    reason, seconds = child.stdout.split()
    assert reason == "TEMPLATE_TOO_LARGE"
    # A liveness bound, not a performance target (~0.1 s here; the old bounds never
    # finished): the render is refused before it builds the N * N items.
    assert float(seconds) < 10.0, f"refused after {seconds} s of CPU"


def test_summing_lists_is_refused_it_copies_the_total_at_each_step():
    with pytest.raises(InvalidArgument) as error:
        Prompt("t@1", "{{ ([[1]] * 100000) | sum(start=[]) | length }}").render()
    assert error.value.reason == "TEMPLATE_UNSAFE", _violations(error)
    assert Prompt("t@1", "{{ [1, 2, 3.5] | sum }} {{ ([1] * 1000) | sum }}").render() == (
        "6.5 1000"
    )


def test_values_within_the_bounds_still_render():
    source = (
        "{{ [[1, 2], [3]] }} {{ {'a': [1]} }} {{ (1, 'b') }} {{ dict(a=1) }} "
        "{% for a, b in [(1, 2)] %}{{ a ~ b }}{% endfor %} {% set x, y = 3, 4 %}{{ x + y }} "
        "{% set s %}<{{ who }}>{% endset %}{{ s ~ s }} {% filter upper %}ok{% endfilter %} "
        "{{ ['a', 'b'] | map('upper') | join('-') }} {{ ([[0] * 3] * 2) | length }}"
    )
    assert _prompt(source).render({"who": "Ann"}) == (
        "[[1, 2], [3]] {'a': [1]} (1, 'b') {'a': 1} 12 7 <Ann><Ann> OK A-B 2"
    )
    limit = templates.MAX_OUTPUT_CHARS
    row = f"{{% set row = [1] * {limit // 2} %}}"
    assert Prompt("t@1", row + "{{ ([row] * 2) | length }}").render() == "2"


class _RecordedBudget(templates._Budget):
    """A render's budget that stays readable after the render (the measuring steps it spent)."""

    made: list[_RecordedBudget] = []

    def __init__(self) -> None:
        super().__init__()
        self.made.append(self)


def _measuring_steps(monkeypatch, prompt: Prompt, messages: Sequence[Message] = ()) -> int:
    _RecordedBudget.made = []
    monkeypatch.setattr(templates, "_Budget", _RecordedBudget)
    prompt.render(None, messages)
    (budget,) = _RecordedBudget.made
    return templates.MAX_MEASURE_STEPS - budget.sizes.steps


_APPEND = (
    "{% set ns = namespace(msgs=[]) %}{% for m in messages %}{% if m.role != 'system' %}"
    "{% set ns.msgs = ns.msgs + [ITEM] %}{% endif %}{% endfor %}"
    "{% for m in ns.msgs %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
)


# `+` measured its whole left operand each time: appending in a loop (a common chat
# template pattern) took about n * n / 2 steps, 1 s of CPU per render at 1024 messages.
@pytest.mark.parametrize("item", ["m", "{'role': m.role, 'content': m.content}"])
def test_appending_in_a_loop_costs_steps_linear_in_the_messages(monkeypatch, item):
    prompt = Prompt("t@1", _APPEND.replace("ITEM", item))
    steps = {}
    for n in (256, 1024):
        messages = [Message(("user", "assistant")[i % 2], "hello world " * 10) for i in range(n)]
        steps[n] = _measuring_steps(monkeypatch, prompt, messages)
    assert steps[1024] <= 40 * 1024, steps
    assert steps[1024] <= 5 * steps[256], steps  # 4 times the messages, about 4 times the steps


def test_a_big_value_used_again_costs_one_step(monkeypatch):
    source = (
        "{% set big = [0] * 200000 %}{% for i in range(1000) %}{% set x = [big] %}"
        "{% set y = big + [i] %}{% endfor %}ok"
    )
    # It walked the 200,000 items on each use: 20 ms an iteration, up to 100,000 of them.
    assert _measuring_steps(monkeypatch, Prompt("t@1", source)) <= 20 * 1000


def test_measuring_is_bounded_even_where_sizes_cannot_be_remembered():
    # A namespace in a list may hold anything, so that list's size is never remembered.
    source = (
        "{% set big = [0] * 200000 + [namespace()] %}"
        "{% for i in range(100) %}{% for j in range(1000) %}{% set x = [big] %}{% endfor %}"
        "{% endfor %}ok"
    )
    with pytest.raises(InvalidArgument) as error:
        Prompt("t@1", source).render()
    assert error.value.reason == "TEMPLATE_TOO_LARGE", _violations(error)
    assert "steps" in _violations(error)["template"]


# map() added up everything it yielded: the parts of a long conversation it picks out
# were refused, though the template kept or printed little of them.
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "{% set c = messages | map(attribute='content') | list %}"
            "{% for x in c[-2:] %}{{ x | length }};{% endfor %}",
            "20000;20000;",
        ),
        ("{{ messages | map(attribute='content') | map('length') | sum }}", "400000"),
    ],
)
def test_map_over_a_long_conversation_renders(source, expected):
    messages = [Message("user", "x" * 20_000) for _ in range(20)]
    assert Prompt("t@1", source).render(None, messages) == expected


@pytest.mark.parametrize(
    "source",
    [
        # what map() adds to its items still counts
        "{% set big = 'y' * 200000 %}"
        "{{ (['x'] * 1000) | map('replace', 'x', big) | list | length }}",
        "{% set row = [1] * 1000 %}{{ ([0] * 1000) | map('default', row, true) | sort | length }}",
    ],
)
def test_what_map_adds_is_bounded(source):
    with pytest.raises(InvalidArgument) as error:
        Prompt("t@1", source).render()
    assert error.value.reason == "TEMPLATE_TOO_LARGE", _violations(error)


def test_a_filter_making_text_measures_its_value_first():
    # str() of a list of namespaces printed each one's values: 10 * 200,000 items here.
    source = "{% set ns = namespace(a=[1] * 200000) %}{{ ([ns] * 10) | upper | length }}"
    with pytest.raises(InvalidArgument) as error:
        Prompt("t@1", source).render()
    assert error.value.reason == "TEMPLATE_UNSAFE", _violations(error)
    assert Prompt("t@1", "{{ [1, 'a'] | upper }} {{ 'ab' | upper }}").render() == "[1, 'A'] AB"


def test_output_up_to_the_limit_renders():
    limit = templates.MAX_OUTPUT_CHARS
    assert len(Prompt("t@1", f"{{{{ 'x' * {limit} }}}}").render()) == limit
    with pytest.raises(InvalidArgument):
        Prompt("t@1", f"{{{{ 'x' * {limit} }}}}!").render()


@pytest.mark.parametrize("name", ["center", "indent", "format", "wordwrap", "batch", "random"])
def test_filters_that_take_sizes_or_randomness_are_not_available(name):
    with pytest.raises(InvalidArgument) as error:
        declare(f"{{{{ 'x' | {name}(1000000000) }}}}", "", ())
    assert _violations(error) == {"template": f"No filter named '{name}'."}


def test_nondeterministic_globals_are_gone_and_undefined_names_fail():
    for source in ("{{ lipsum() }}", "{{ cycler }}", "{{ joiner() }}"):
        with pytest.raises(InvalidArgument) as error:
            Prompt("t@1", source).render()
        assert error.value.reason == "TEMPLATE_RENDER_FAILED"


def test_internal_helper_names_are_reserved():
    with pytest.raises(InvalidArgument) as error:
        declare("{% for x in _tm_loop([1]) %}{% endfor %}", "", ())
    assert "reserved" in _violations(error)["template"]


DETERMINISTIC = (
    "{% set data = {'z': 1, 'a': 2} %}{% set words = w.split() %}"
    "{% for k, v in data | dictsort %}{{ k }}={{ v }};{% endfor %}"
    "{{ words | unique | sort | join(',') }}|{{ words | map('upper') | join }}"
    "|{{ 7 / 3 }}|{{ {'b': 1, 'a': 2} | tojson }}|{{ messages | length }}"
)


def test_rendering_is_deterministic():
    # Two compilations (two workers), many renders: one text.
    first, second = (Prompt("t@1", DETERMINISTIC, variables=[Variable("w")]) for _ in range(2))
    inputs = ({"w": "pear apple pear fig"}, [Message("user", "hi")])
    results = {p.render(*inputs) for p in (first, second) for _ in range(10)}
    assert results == {
        'a=2;z=1;apple,fig,pear|PEARAPPLEPEARFIG|2.3333333333333335|{"a": 2, "b": 1}|1'
    }


# --- chat ----------------------------------------------------------------------


def test_the_default_chat_template_renders_roles_and_ends_with_the_assistant_cue():
    messages = [
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello."),
        Message("user", "Why?"),
    ]
    assert chat_prompt().render(messages=messages) == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Why?\nAssistant:"
    )


def test_a_template_renders_messages_with_variables():
    prompt = _prompt(
        "{{ system }}\n{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n"
        "{% endfor %}<assistant>",
        system="You support {{ product }}.",
    )
    rendered = prompt.render({"product": "tokenmesh"}, [Message("user", "Hi {{ product }}")])
    # Message content is data: it is never evaluated as a template.
    assert rendered == "You support tokenmesh.\n<user>Hi {{ product }}</user>\n<assistant>"


def test_bad_message_roles_are_named():
    with pytest.raises(InvalidArgument) as error:
        chat_prompt().render(messages=[Message("user", "a"), Message("root", "b")])
    assert _violations(error) == {"messages[1].role": "must be one of system, user, assistant"}


def test_a_model_version_may_bring_its_own_chat_template():
    from services.inference.repository import model_chat_template

    card = {"chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"}
    assert model_chat_template(card, "m", "1").render(messages=[Message("user", "x")]) == (
        "[user] x"
    )
    assert model_chat_template({}, "m", "1").render(messages=[Message("user", "x")]) == (
        "User: x\nAssistant:"
    )
    from services.core.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="config.json chat_template"):
        model_chat_template({"chat_template": "{% include 'x' %}"}, "m", "1")


# --- references ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "parsed"),
    [
        ("support@3", ("support", "3")),
        ("support@stable", ("support", "stable")),
        ("support", ("support", "")),
    ],
)
def test_references_name_a_version_or_an_alias(reference, parsed):
    assert prompts.parse_reference(reference) == parsed


@pytest.mark.parametrize("reference", ["", "@1", "a/b@1", "support@Stable!", "support@1@2"])
def test_malformed_references_name_the_field(reference):
    with pytest.raises(InvalidArgument) as error:
        prompts.parse_reference(reference)
    assert set(_violations(error)) == {"template"}
