"""Prompt templates: compiled once, rendered in a sandbox, deterministically, within bounds.

The template language is Jinja (`ImmutableSandboxedEnvironment`,
`StrictUndefined`), cut down to what a prompt needs:

- no file access: no loader, and `{% include %}`, `{% import %}`,
  `{% from %}`, `{% extends %}`, `{% macro %}` and `{% call %}` are refused
  when the template is compiled (macros would allow unbounded recursion);
- no attribute tricks: the sandbox refuses `_`-prefixed and internal
  attributes (`''.__class__`), and the immutable sandbox refuses methods that
  change lists and dicts; either fails the render with a message naming it;
- deterministic: no `random` filter, no `lipsum`, `cycler` or `joiner`
  globals, nothing reads the clock; the same template, variables and
  messages always give the same text;
- bounded: at most MAX_OUTPUT_CHARS characters of output (rendering stops
  there) and MAX_RENDERED_CHARS produced in all (text a `{% set %}` or
  `{% filter %}` block captures counts too), MAX_LOOP_ITERATIONS loop
  iterations per render, no value a render builds bigger than
  MAX_OUTPUT_CHARS, `range` up to MAX_RANGE, and only filters whose output
  grows at most linearly. A value's size counts every item each time it
  appears (`[row] * 1000` is 1000 times the size of `row`, as its text is):
  `~`, `+`, `*`, list, tuple and dict literals, `dict()`, the `join` and
  `replace` filters and filters that make text are checked, and `map` counts
  what it adds to its items, so printing a value or turning it into text is
  linear in what the bounds allow. Measuring is linear too: a render remembers
  the sizes it measured or built (appending to a list in a loop measures only
  what is appended), and spends at most MAX_MEASURE_STEPS on it.

A render sees each declared variable (a string), `system` (the rendered
system prompt) and `messages` (a list of `{role, content}`; empty unless the
request is a chat). Errors are `InvalidArgument` naming the field a client
can fix: `variables.<name>`, `messages[<i>].role`, or `template` (reason
TEMPLATE_RENDER_FAILED for what a render raises from its inputs: a filter given
a value or argument it refuses, say `truncate(1)` or `dictsort` of a string).

Special tokens: given a tokenizer's `marks` (services.inference.tokenizer), a
render replaces each special token's spelling in the template's own text (its
literal text and string constants) with the token's mark, which the tokenizer
reads as that token; values and messages are data and keep their spelling,
which the tokenizer reads as text.

Rendering is pure CPU and short (microseconds for a typical prompt, tens of
milliseconds at the limits); `Prompt` objects are immutable and thread-safe.
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from services.core.errors import FieldViolation, InvalidArgument

MAX_SOURCE_BYTES = 64 * 1024  # template source and system prompt, each
MAX_VARIABLES = 32
DEFAULT_MAX_LENGTH = 4096  # characters of a variable's value unless declared
MAX_VARIABLE_LENGTH = 64 * 1024
MAX_OUTPUT_CHARS = 256 * 1024
#: Characters a render may produce in all, counting blocks captured by `{% set %}`
#: or `{% filter %}` (a captured block that is printed counts twice).
MAX_RENDERED_CHARS = 4 * MAX_OUTPUT_CHARS
MAX_LOOP_ITERATIONS = 100_000
#: Items a render may visit measuring values (each item `_measure` looks at is one step,
#: a container whose size it already knows is one). Sizes are remembered, so measuring
#: is linear in what a render builds; this bounds the CPU a render spends on it (~1 s).
MAX_MEASURE_STEPS = 2 * MAX_RENDERED_CHARS
MAX_RANGE = 10_000
MAX_MESSAGES = 1024
ROLES = ("system", "user", "assistant")
#: Names a render always provides; a variable cannot take them.
RESERVED_NAMES = frozenset({"messages", "system"})
VARIABLE_NAME_RULE = "1-64 characters of [A-Za-z0-9_], starting with a letter"
_VARIABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_INTERNAL_PREFIX = "_tm_"  # names of the bound-keeping helpers the compiler inserts
#: Used for a model version whose config.json has no chat_template.
DEFAULT_CHAT_TEMPLATE = (
    "{% if system %}System: {{ system }}\n{% endif %}"
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
    "Assistant:"
)


@dataclass(frozen=True)
class TemplateId:
    """TemplateId names the template version that rendered a prompt (responses and usage
    events report it): a catalogue version ("support", 3) or a model version's chat
    template."""

    name: str
    version: int


#: DEFAULT_CHAT_TEMPLATE's name in responses; the version goes up if its text ever changes.
DEFAULT_CHAT_TEMPLATE_ID = TemplateId("tokenmesh.default-chat", 1)


def model_chat_template_id(model: str, version: str) -> TemplateId:
    """Names the chat template a model version's config.json sets: "<model>.<version>.chat",
    version 1 (model versions are immutable, so their chat templates never change)."""
    return TemplateId(f"{model}.{version}.chat", 1)


_FORBIDDEN_TAGS: dict[type[nodes.Node], str] = {
    nodes.Extends: "{% extends %}",
    nodes.Include: "{% include %}",
    nodes.Import: "{% import %}",
    nodes.FromImport: "{% from ... import %}",
    nodes.Macro: "{% macro %}",
    nodes.CallBlock: "{% call %}",
}
# Filters whose output is at most linear in their input (others, such as
# center, indent, format, wordwrap or batch, take sizes from the template).
_SAFE_FILTERS = (
    "abs capitalize count d default dictsort e escape first float groupby int items "
    "last length list lower map max min reject rejectattr reverse round select "
    "selectattr sort striptags sum title tojson trim truncate unique upper wordcount"
).split()
# String methods a template may call; the rest (format, center, zfill, ljust,
# expandtabs, encode, ...) take sizes or formats from the template.
_STR_METHODS = frozenset(
    (
        "capitalize casefold count endswith find index isalnum isalpha isdigit islower "
        "isspace istitle isupper lower lstrip partition removeprefix removesuffix rfind "
        "rindex rpartition rsplit rstrip split splitlines startswith strip swapcase title upper"
    ).split()
)
# Filters that turn any value into text (str() of a list of 1000 references to one
# big list is 1000 times its text): a value that is not a string is measured first.
_TEXT_FILTERS = "capitalize e escape lower striptags title trim upper wordcount".split()
_MAX_INT_BITS = 4096


def is_variable_name(name: str) -> bool:
    """Tells whether `name` may name a template variable (VARIABLE_NAME_RULE)."""
    return _VARIABLE_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class Variable:
    """Variable is one declared template variable.

    Attributes:
        name: the name templates use (VARIABLE_NAME_RULE).
        required: a request must give it.
        default: the value of an optional variable a request leaves out.
        max_length: the most characters a value may have (1-MAX_VARIABLE_LENGTH).
    """

    name: str
    required: bool = False
    default: str = ""
    max_length: int = DEFAULT_MAX_LENGTH


@dataclass(frozen=True)
class Message:
    """Message is one chat turn: `role` is system, user or assistant."""

    role: str
    content: str


class RenderTooLong(Exception):
    """A render's output went past the `max_chars` its caller gave (`Prompt.render`)."""

    def __init__(self, max_chars: int) -> None:
        super().__init__(f"the output exceeds {max_chars} characters")
        self.max_chars = max_chars


class _Refused(Exception):
    """A render did something the sandbox does not allow (the message says what)."""

    reason = "TEMPLATE_UNSAFE"


class _LimitExceeded(_Refused):
    """A render went over one of its bounds (the message says which)."""

    reason = "TEMPLATE_TOO_LARGE"


# Remembered sizes keep their containers alive: at most this much of them (sizes plus
# _ENTRY_WEIGHT each) is held per render, the least recently used going first.
_HELD_WEIGHT = 4 * MAX_OUTPUT_CHARS
_ENTRY_WEIGHT = 16  # an entry's own memory, in size units
# A container is remembered once measuring it took this many steps (smaller ones cost
# as little to measure again as to look up).
_REMEMBER_AFTER = 8


class _Sizes:
    """The sizes of the containers a render measured or built, so that measuring one
    again costs one step (`ns.msgs + [m]` in a loop walked the whole list each time).

    Keyed by id(), each entry keeps its container alive so that the id cannot name
    another object while the entry exists. Only lists, tuples and dicts of strings,
    numbers, None and other such containers are remembered: the sandbox refuses
    every method that changes a list or dict, so their sizes never change, and the
    memory an entry keeps alive is linear in its size.
    """

    def __init__(self) -> None:
        self.steps = MAX_MEASURE_STEPS  # left to spend
        self._known: OrderedDict[int, tuple[Any, int]] = OrderedDict()
        self._held = 0

    def get(self, value: Any) -> int | None:
        entry = self._known.get(id(value))
        if entry is None or entry[0] is not value:
            return None
        self._known.move_to_end(id(value))
        return entry[1]

    def remember(self, value: Any, size: int) -> None:
        if id(value) in self._known:
            return
        self._known[id(value)] = (value, size)
        self._held += size + _ENTRY_WEIGHT
        while self._held > _HELD_WEIGHT:
            _, (_, dropped) = self._known.popitem(last=False)
            self._held -= dropped + _ENTRY_WEIGHT


class _Budget:
    """The loop iterations, characters and measuring steps a render has left."""

    def __init__(self) -> None:
        self.iterations = MAX_LOOP_ITERATIONS
        self.rendered = MAX_RENDERED_CHARS
        self.sizes = _Sizes()


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")


def _bounded_loop(iterable: Iterable[Any]) -> Iterator[Any]:
    budget = _BUDGET.get()
    for item in iterable:
        budget.iterations -= 1
        if budget.iterations < 0:
            raise _LimitExceeded(f"more than {MAX_LOOP_ITERATIONS} loop iterations")
        yield item


class _Close:
    """Marks, on `_walk`'s stack, the end of a container's items (its size is then known)."""

    __slots__ = ("container", "opaque", "size", "steps")

    def __init__(self, container: Any, size: int, steps: int, opaque: int) -> None:
        self.container = container
        self.size = size
        self.steps = steps
        self.opaque = opaque


def _walk(value: Any, limit: int, printing: bool) -> tuple[int, bool]:
    """Returns the size of `value` (see `_measure`), or a size above `limit` once it
    passes it, and whether the value is plain (its sizes can be remembered).

    Remembers the size of each plain container that took _REMEMBER_AFTER steps.
    """
    sizes = _BUDGET.get().sizes
    size = steps = opaque = 0
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is _Close:
            if item.opaque == opaque and steps - item.steps >= _REMEMBER_AFTER:
                sizes.remember(item.container, size - item.size)
            continue
        steps += 1
        if kind is str or isinstance(item, str):  # most items are strings: checked first
            size += len(item) or 1
        elif isinstance(item, int):
            size += item.bit_length() // 3 + 1  # at least its decimal digits
        elif item is None or isinstance(item, float):
            size += 1
        elif isinstance(item, list | tuple | dict):
            known = sizes.get(item)
            if known is not None:
                size += known
            elif not item:
                size += 1
            elif size + len(item) > limit:  # each item counts at least one
                size += len(item)
            else:
                pending.append(_Close(item, size, steps, opaque))
                pending.extend(item.keys() if isinstance(item, dict) else item)
                if isinstance(item, dict):
                    pending.extend(item.values())
        else:
            # Not remembered: it may hold anything (a namespace, an Undefined's object).
            if printing and not isinstance(item, jinja2.Undefined):
                raise _Refused(
                    f"a {type(item).__name__} cannot be printed; print strings and numbers"
                )
            opaque += 1
            size += 1
        if size > limit:
            break
        if steps > sizes.steps:
            raise _LimitExceeded(f"measuring values took more than {MAX_MEASURE_STEPS} steps")
    sizes.steps -= steps
    return size, opaque == 0


def _measure(value: Any, limit: int = MAX_OUTPUT_CHARS, printing: bool = False) -> int:
    """Returns the size of `value`: the characters of its strings, the digits of its
    numbers, at least one per item, counting an item each time it appears (a list
    holding one list 1000 times is as big as its text). Raises _LimitExceeded past
    `limit`.

    A container measured or built before in this render costs one step (its size is
    remembered), so measuring is linear in what a render builds, and every step
    counts against MAX_MEASURE_STEPS.

    With `printing`, also raises _Refused for what has no deterministic text
    (object reprs with addresses).
    """
    return _measured(value, limit, printing)[0]


def _measured(
    value: Any, limit: int = MAX_OUTPUT_CHARS, printing: bool = False
) -> tuple[int, bool]:
    """Returns `_measure(value)` and whether the value is plain (see `_walk`)."""
    size, plain = _walk(value, limit, printing)
    if size > limit:
        raise _LimitExceeded(f"a value would exceed {MAX_OUTPUT_CHARS} characters or items")
    return size, plain


def _remember(result: Any, size: int) -> Any:
    """Returns `result` (built by `+` or `*` from plain values of known sizes) and
    remembers its size, so using it again costs one step."""
    if len(result) >= _REMEMBER_AFTER:
        _BUDGET.get().sizes.remember(result, size)
    return result


def _built(value: Any) -> Any:
    """Returns `value` (a list, tuple or dict literal, or `dict()`) if it is within bounds."""
    _measure(value)
    return value


def _bounded_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    value = dict(*args, **kwargs)
    _measure(value)
    return value


def _emit(value: Any) -> Any:
    """Returns `value`, to be printed, once it is counted against the render's budget
    (the sandbox's `finalize`: every printed value, and the text of captured blocks)."""
    budget = _BUDGET.get()
    # Strings (most of what a prompt prints) are measured inline: this runs per output piece.
    budget.rendered -= len(value) if type(value) is str else _measure(value, printing=True)
    if budget.rendered < 0:
        raise _LimitExceeded(
            f"a render produces more than {MAX_RENDERED_CHARS} characters in all "
            "(blocks captured by set or filter count too)"
        )
    return value


def _bounded_concat(*parts: Any) -> str:
    size = 0
    for part in parts:
        size += _measure(part, MAX_OUTPUT_CHARS - size, printing=True)
    return "".join(map(str, parts))


def _bounded_range(*args: int) -> range:
    values = range(*args)
    if len(values) > MAX_RANGE:
        raise _LimitExceeded(f"range() of more than {MAX_RANGE} items")
    return values


def _check_int(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _LimitExceeded(f"a number above {_MAX_INT_BITS} bits")
    return value


def _bounded_mul(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int):
        return _check_int(_check_int(left) * _check_int(right))
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, str) and isinstance(times, int):
            if len(seq) * max(times, 0) > MAX_OUTPUT_CHARS:
                raise _LimitExceeded(f"a repetition would exceed {MAX_OUTPUT_CHARS} items")
        elif isinstance(seq, list | tuple) and isinstance(times, int):
            size, plain = _measured(seq)
            if size * max(times, 0) > MAX_OUTPUT_CHARS:
                raise _LimitExceeded(f"a repetition would exceed {MAX_OUTPUT_CHARS} items")
            result = left * right
            return _remember(result, size * times if result else 1) if plain else result
    return left * right


def _bounded_add(left: Any, right: Any) -> Any:
    if isinstance(left, str):
        _measure(right, MAX_OUTPUT_CHARS - len(left))
    elif isinstance(left, list | tuple):
        # Costs what `right` adds: `ns.msgs + [m]` in a loop stays linear.
        left_size, left_plain = _measured(left)
        right_size, right_plain = _measured(right, MAX_OUTPUT_CHARS - left_size)
        result = left + right
        if left_plain and right_plain:
            # An empty list or tuple counts one, but adds nothing to another.
            size = (left_size if left else 0) + (right_size if right else 0)
            return _remember(result, size if result else 1)
        return result
    return left + right


def _bounded_pow(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int):
        if right > 0 and _check_int(left).bit_length() * right > _MAX_INT_BITS:
            raise _LimitExceeded(f"a number above {_MAX_INT_BITS} bits")
    return left**right


def _no_string_percent(left: Any, right: Any) -> Any:
    if isinstance(left, str):
        raise _Refused("'%' formatting of strings is not allowed; use ~ or filters")
    return left % right


def _bounded_join(value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    items = []
    size = 0
    for item in _bounded_loop(value):
        # Measured before it becomes text: str() of a list sharing items is quadratic.
        size += len(d) + _measure(item, max(MAX_OUTPUT_CHARS - size, 0), printing=True)
        if size > MAX_OUTPUT_CHARS:
            raise _LimitExceeded(f"join() would exceed {MAX_OUTPUT_CHARS} characters")
        items.append(str(item))
    return d.join(items)


@jinja2.pass_context
def _bounded_map(context: jinja2.runtime.Context, value: Any, *args: Any, **kwargs: Any) -> Any:
    """Jinja's `map`, counting one loop iteration per item and what it adds to its input.

    map is lazy and what it yields is mostly its input or part of it
    (`map(attribute='content')`): those are measured where they are combined or
    printed, not here (summing them limited the conversation, not the template).
    A result bigger than its item (`map('default', row, true)` repeats `row`,
    `map('replace', 'x', big)` builds text) counts the difference, up to
    MAX_OUTPUT_CHARS a call.
    """
    if not value:  # as Jinja's: an empty input never looks at the arguments
        return
    current: list[Any] = [None]

    def items() -> Iterator[Any]:
        for item in _bounded_loop(value):
            current[0] = item
            yield item

    added = 0
    for result in jinja2.filters.sync_do_map(context, items(), *args, **kwargs):
        item = current[0]
        if result is not item:
            item_size = _walk(item, MAX_OUTPUT_CHARS, printing=False)[0]
            budget = MAX_OUTPUT_CHARS - added
            added += max(_walk(result, item_size + budget, printing=False)[0] - item_size, 0)
            if added > MAX_OUTPUT_CHARS:
                raise _LimitExceeded(f"map() would add more than {MAX_OUTPUT_CHARS} characters")
        yield result


def _measured_text(text_filter: Callable[..., Any]) -> Callable[..., Any]:
    """Returns `text_filter` measuring its value (as if printed) before it becomes text."""

    def bounded(value: Any, *args: Any, **kwargs: Any) -> Any:
        if type(value) is not str:
            _measure(value, printing=True)
        return text_filter(value, *args, **kwargs)

    return bounded


@jinja2.pass_environment
def _number_sum(
    environment: jinja2.Environment, iterable: Iterable[Any], attribute: Any = None, start: Any = 0
) -> Any:
    # Python's sum() of lists copies the running total at each step: quadratic.
    if not isinstance(start, int | float):
        raise _Refused("sum() adds numbers; use + or join for lists and strings")
    return jinja2.filters.sync_do_sum(environment, iterable, attribute, start)


def _bounded_replace(value: str, old: str, new: str, count: int | None = None) -> str:
    value = str(value)
    grows = max(len(new) - len(old), 0) * (value.count(old) if old else len(value) + 1)
    if len(value) + grows > MAX_OUTPUT_CHARS:
        raise _LimitExceeded(f"replace() would exceed {MAX_OUTPUT_CHARS} characters")
    return value.replace(old, new, -1 if count is None else count)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox every template runs in (one shared instance; it is immutable once built)."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def __init__(self) -> None:
        super().__init__(
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            loader=None,
            finalize=_emit,
        )
        self.filters = {name: self.filters[name] for name in _SAFE_FILTERS}
        for name in _TEXT_FILTERS:
            self.filters[name] = _measured_text(self.filters[name])
        self.filters["join"] = _bounded_join
        self.filters["replace"] = _bounded_replace
        self.filters["map"] = _bounded_map
        self.filters["sum"] = _number_sum
        self.globals = {
            "range": _bounded_range,
            "dict": _bounded_dict,
            "namespace": jinja2.utils.Namespace,
            f"{_INTERNAL_PREFIX}loop": _bounded_loop,
            f"{_INTERNAL_PREFIX}concat": _bounded_concat,
            f"{_INTERNAL_PREFIX}built": _built,
            f"{_INTERNAL_PREFIX}text": str,
        }
        self.binop_table = {
            **self.binop_table,
            "*": _bounded_mul,
            "+": _bounded_add,
            "**": _bounded_pow,
            "%": _no_string_percent,
        }

    def wrap_str_format(self, value: Any) -> None:
        return None  # str.format takes widths from the template: refused like any method

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str):
            return attr in _STR_METHODS
        if isinstance(obj, int | float | complex | bytes | bytearray):
            return False  # e.g. int.to_bytes(10**9)
        return super().is_safe_attribute(obj, attr, value)


class _Bounder(NodeTransformer):
    """Routes every loop, `~`, literal and captured block through the bound-keeping helpers
    (printed values go through `finalize`)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _helper_call("loop", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _helper_call("concat", list(node.nodes), node.lineno)

    def visit_AssignBlock(self, node: nodes.AssignBlock) -> nodes.Node:
        self.generic_visit(node)
        return _text_counted(node)

    def visit_FilterBlock(self, node: nodes.FilterBlock) -> nodes.Node:
        self.generic_visit(node)
        return _text_counted(node)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        self.generic_visit(node)
        return _helper_call("built", [node], node.lineno)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        self.generic_visit(node)
        return _helper_call("built", [node], node.lineno)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        if node.ctx != "load":  # a loop's or set's targets
            return node
        return _helper_call("built", [node], node.lineno)


def _text_counted(block: nodes.Node) -> nodes.Node:
    """Routes the literal text of a `{% set %}` or `{% filter %}` block through `finalize`
    (printed values always go through it), so it counts against MAX_RENDERED_CHARS.

    The output bound in `Prompt._run` sees only what reaches the output: a block's
    text goes to a buffer, and a loop could otherwise fill it with gigabytes.
    Only blocks pay for the extra call, not every piece of output.
    """
    for output in block.find_all(nodes.Output):
        output.nodes = [
            _helper_call("text", [nodes.Const(child.data, lineno=child.lineno)], child.lineno)
            if isinstance(child, nodes.TemplateData)
            else child
            for child in output.nodes
        ]
    return block


def _helper_call(name: str, args: Sequence[nodes.Node], lineno: int) -> nodes.Call:
    func = nodes.Name(f"{_INTERNAL_PREFIX}{name}", "load", lineno=lineno)
    return nodes.Call(func, [cast(nodes.Expr, a) for a in args], [], None, None, lineno=lineno)


@functools.cache
def _sandbox() -> _Sandbox:
    return _Sandbox()


def _violation(field: str, description: str, reason: str = "INVALID_TEMPLATE") -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)], reason=reason)


def _parse(source: str, field: str) -> nodes.Template:
    """Parses `source` and refuses what the sandbox does not allow."""
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise _violation(field, f"is {len(source.encode())} bytes; at most {MAX_SOURCE_BYTES}")
    try:
        tree = _sandbox().parse(source)
    except jinja2.TemplateSyntaxError as error:
        raise _violation(field, f"line {error.lineno}: {error.message}") from None
    for kind, tag in _FORBIDDEN_TAGS.items():
        found = next(tree.find_all(kind), None)
        if found is not None:
            raise _violation(
                field, f"line {found.lineno}: {tag} is not allowed in a prompt template"
            )
    for loop in tree.find_all(nodes.For):
        if loop.recursive:
            raise _violation(field, f"line {loop.lineno}: recursive loops are not allowed")
    for name in tree.find_all(nodes.Name):
        if name.name.startswith(_INTERNAL_PREFIX):
            raise _violation(
                field, f"line {name.lineno}: names starting {_INTERNAL_PREFIX!r} are reserved"
            )
    return tree


class _Marker(NodeTransformer):
    """Replaces each special token's spelling in a template's literal text and string
    constants with its mark (and a mark character already there with U+FFFD: only
    a spelling of the template's own may become a special token)."""

    def __init__(self, marks: Mapping[str, str]) -> None:
        self._marks = marks
        self._pattern = _marks_pattern(marks)

    def _marked(self, text: str) -> str:
        return self._pattern.sub(lambda found: self._marks.get(found[0], "\ufffd"), text)

    def visit_TemplateData(self, node: nodes.TemplateData) -> nodes.Node:
        node.data = self._marked(node.data)
        return node

    def visit_Const(self, node: nodes.Const) -> nodes.Node:
        if isinstance(node.value, str):
            node.value = self._marked(node.value)
        return node


def _marks_pattern(marks: Mapping[str, str]) -> re.Pattern[str]:
    """Matches the spellings `marks` maps (the longest first where one starts another, as
    tokenizers match them) and their mark characters."""
    spellings = sorted(marks, key=len, reverse=True)
    return re.compile("|".join([*map(re.escape, spellings), *map(re.escape, marks.values())]))


#: A Prompt keeps its templates marked for at most this many tokenizers (one per model
#: version that renders it; more come only as versions are loaded and unloaded).
_MAX_MARKED = 8
# Nodes a template made only of text and values ({{ name }}, {{ m.content }}) has.
_SUBSTITUTION_NODES = (
    nodes.Output,
    nodes.TemplateData,
    nodes.Name,
    nodes.Getattr,
    nodes.Getitem,
    nodes.Const,
)


def _substitutes_only(tree: nodes.Template) -> bool:
    """Tells whether `tree` only prints its text and values as they are: its output is then
    its text plus its values (each as often as it is printed), and cheap to build."""
    return all(isinstance(node, _SUBSTITUTION_NODES) for node in tree.find_all(nodes.Node))


def _compile(source: str, field: str, marks: Mapping[str, str] | None = None) -> jinja2.Template:
    return _compile_tree(_parse(source, field), field, marks)


def _compile_tree(
    tree: nodes.Template, field: str, marks: Mapping[str, str] | None = None
) -> jinja2.Template:
    """Compiles a tree `_parse` returned (changing it: parse again to compile it again)."""
    bounded = _Bounder().visit(tree)
    if marks:
        bounded = _Marker(marks).visit(bounded)
    bounded.set_environment(_sandbox())
    env = _sandbox()
    try:
        code = env.compile(bounded)
    except jinja2.TemplateError as error:  # e.g. an unknown or refused filter
        raise _violation(field, getattr(error, "message", None) or str(error)) from None
    return env.template_class.from_code(env, code, env.make_globals(None), None)


def used_variables(source: str, field: str = "template") -> set[str]:
    """Returns the names `source` reads from the render context (not globals or reserved)."""
    try:
        names = jinja2.meta.find_undeclared_variables(_parse(source, field))
    except jinja2.TemplateError as error:  # e.g. an unknown or refused filter
        raise _violation(field, getattr(error, "message", None) or str(error)) from None
    return {n for n in names if n not in RESERVED_NAMES and n not in _sandbox().globals}


def check_declarations(variables: Sequence[Variable]) -> None:
    """Raises InvalidArgument (field `variables[i]...`) unless every declaration is valid."""
    violations: list[FieldViolation] = []
    if len(variables) > MAX_VARIABLES:
        violations.append(
            FieldViolation("variables", f"at most {MAX_VARIABLES} variables ({len(variables)})")
        )
    seen: set[str] = set()
    for i, var in enumerate(variables):
        at = f"variables[{i}]"
        if _VARIABLE_NAME.fullmatch(var.name) is None:
            violations.append(FieldViolation(f"{at}.name", f"must be {VARIABLE_NAME_RULE}"))
        elif var.name in RESERVED_NAMES:
            violations.append(FieldViolation(f"{at}.name", f"{var.name!r} is reserved"))
        elif var.name in seen:
            violations.append(FieldViolation(f"{at}.name", f"{var.name!r} is declared twice"))
        seen.add(var.name)
        if not 1 <= var.max_length <= MAX_VARIABLE_LENGTH:
            violations.append(
                FieldViolation(f"{at}.max_length", f"must be 1-{MAX_VARIABLE_LENGTH}")
            )
        elif len(var.default) > var.max_length:
            violations.append(
                FieldViolation(f"{at}.default_value", f"is longer than max_length {var.max_length}")
            )
        if var.required and var.default:
            violations.append(
                FieldViolation(f"{at}.default_value", "a required variable has no default")
            )
    if violations:
        raise InvalidArgument(violations, reason="INVALID_TEMPLATE")


def declare(source: str, system: str, variables: Sequence[Variable]) -> tuple[Variable, ...]:
    """Returns `variables` plus each one the template or system prompt uses undeclared.

    An undeclared variable is required, with DEFAULT_MAX_LENGTH; the result
    is checked (names, limits, at most MAX_VARIABLES).

    Raises:
        InvalidArgument: on a bad declaration, a syntax error or a refused tag.
    """
    declared = {v.name for v in variables}
    used = used_variables(source, "template") | used_variables(system, "system_prompt")
    implicit = [Variable(name, required=True) for name in sorted(used - declared)]
    result = (*variables, *implicit)
    check_declarations(result)
    return result


def check_messages(messages: Sequence[Message]) -> None:
    """Raises InvalidArgument (field `messages[i].role`) unless every message is valid."""
    if len(messages) > MAX_MESSAGES:
        raise _violation("messages", f"at most {MAX_MESSAGES} messages ({len(messages)})")
    violations = [
        FieldViolation(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        for i, m in enumerate(messages)
        if m.role not in ROLES
    ]
    violations += [
        FieldViolation(f"messages[{i}].content", f"at most {MAX_OUTPUT_CHARS} characters")
        for i, m in enumerate(messages)
        if len(m.content) > MAX_OUTPUT_CHARS
    ]
    if violations:
        raise InvalidArgument(violations, reason="INVALID_MESSAGES")


def bind_variables(
    declared: Sequence[Variable], given: Mapping[str, str], label: str
) -> dict[str, str]:
    """Returns every declared variable's value (given or default) after checking `given`.

    Args:
        declared: the template's variables.
        given: the request's values.
        label: "name@version", for messages.

    Raises:
        InvalidArgument: one violation per bad variable, field `variables.<name>`.
    """
    by_name = {v.name: v for v in declared}
    if len(given) > MAX_VARIABLES:
        raise _violation("variables", f"at most {MAX_VARIABLES} variables", "INVALID_VARIABLES")
    violations: list[FieldViolation] = []
    for name in sorted(set(given) - set(by_name)):
        takes = ", ".join(sorted(by_name)) or "none"
        violations.append(
            FieldViolation(f"variables.{name}", f"is not a variable of {label} (takes: {takes})")
        )
    values: dict[str, str] = {}
    for var in declared:
        value = given.get(var.name)
        if value is None:
            if var.required:
                violations.append(
                    FieldViolation(f"variables.{var.name}", f"is required by {label}")
                )
            values[var.name] = var.default
        elif len(value) > var.max_length:
            violations.append(
                FieldViolation(
                    f"variables.{var.name}",
                    f"is {len(value)} characters; {label} allows at most {var.max_length}",
                )
            )
        else:
            values[var.name] = value
    if violations:
        raise InvalidArgument(violations, reason="INVALID_VARIABLES")
    return values


@dataclass(frozen=True)
class _Compiled:
    """A Prompt's templates as one tokenizer's marks render them."""

    template: jinja2.Template
    system: jinja2.Template | None


# What a render raises when a template meets inputs it cannot handle. Jinja's filters
# and Python's operations raise these for bad values: `truncate(1)` and a negative
# leeway fail an assert, `dictsort` of a string has no .items() (AttributeError),
# printing a list nested thousands deep recurses too far (RecursionError), `x // 0`,
# `'inf' | float | int`, a missing key. MemoryError is not one: the bounds exist so that no
# render comes near it, so one that does is a bug to be logged.
_RENDER_ERRORS = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    ArithmeticError,
    LookupError,
    AttributeError,
    AssertionError,
    RecursionError,
)
# Of those, what this module's own code raises only by mistake.
_BUG_ERRORS = (AttributeError, AssertionError)


def _raised_here(error: BaseException) -> bool:
    """Tells whether `error` was raised by a line of this module (a helper's bug), not by
    Jinja's filters or the template's code."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and traceback.tb_frame.f_code.co_filename == __file__


class Prompt:
    """Prompt is a compiled template with its system prompt and variables; render() is pure.

    Args:
        label: how errors name it ("support@3", "demo-lm:1 chat template").
        source: the template.
        system: the system prompt (a template too, rendered first).
        variables: the declared variables (see `declare`).

    Raises:
        InvalidArgument: the source or system prompt does not compile or is refused.
    """

    def __init__(
        self, label: str, source: str, system: str = "", variables: Sequence[Variable] = ()
    ) -> None:
        self.label = label
        self.variables = tuple(variables)
        self._source = source
        self._system_source = system
        tree = _parse(source, "template")
        system_tree = _parse(system, "system_prompt") if system else None
        #: The template only prints its text and values (no tags, filters or operators):
        #: its output is no bigger than its text and inputs, and costs microseconds.
        self.substitutes_only = _substitutes_only(tree) and (
            system_tree is None or _substitutes_only(system_tree)
        )
        self._plain = _Compiled(
            _compile_tree(tree, "template"),
            None if system_tree is None else _compile_tree(system_tree, "system_prompt"),
        )
        # Compiled with a tokenizer's marks, by id(marks) (the marks kept alive with them).
        self._marked: dict[int, tuple[Mapping[str, str], _Compiled]] = {}

    def render(
        self,
        variables: Mapping[str, str] | None = None,
        messages: Sequence[Message] = (),
        *,
        marks: Mapping[str, str] | None = None,
        max_chars: int | None = None,
    ) -> str:
        """Returns the rendered prompt.

        Args:
            variables: values by name (checked against the declarations).
            messages: the chat turns, seen by the template as `messages`.
            marks: the tokenizer's marks (`Tokenizer.special_marks`): a special
                token the template's own text spells is its mark in the output.
            max_chars: refuse an output longer than this (the most a model's
                context can hold), as it is rendered.

        Raises:
            InvalidArgument: `variables.<name>` or `messages[i].role` for bad input;
                `template` when rendering fails (an unsafe attribute, an undefined
                name, a bound exceeded, a filter refusing its input).
            RenderTooLong: the output went past `max_chars`.
        """
        values = bind_variables(self.variables, variables or {}, self.label)
        check_messages(messages)
        compiled = self._compiled(marks)
        token = _BUDGET.set(_Budget())
        try:
            system = self._run(compiled.system, values, "system_prompt") if compiled.system else ""
            context = {
                **values,
                "system": system,
                "messages": [{"role": m.role, "content": m.content} for m in messages],
            }
            return self._run(compiled.template, context, "template", len(system), max_chars)
        finally:
            _BUDGET.reset(token)

    def _compiled(self, marks: Mapping[str, str] | None) -> _Compiled:
        """Returns the templates to render with `marks` (compiled once per marks object)."""
        if not marks:
            return self._plain
        found = self._marked.get(id(marks))
        if found is not None and found[0] is marks:
            return found[1]
        pattern = _marks_pattern(marks)
        if pattern.search(self._source) or pattern.search(self._system_source):
            system = self._system_source
            compiled = _Compiled(
                _compile(self._source, "template", marks),
                _compile(system, "system_prompt", marks) if system else None,
            )
        else:  # the usual template: no special token's spelling
            compiled = self._plain
        if len(self._marked) >= _MAX_MARKED:
            self._marked.clear()
        self._marked[id(marks)] = (marks, compiled)
        return compiled

    def _run(
        self,
        template: jinja2.Template,
        context: Mapping[str, Any],
        field: str,
        used: int = 0,
        max_chars: int | None = None,
    ) -> str:
        parts: list[str] = []
        size = used
        limit = MAX_OUTPUT_CHARS if max_chars is None else min(max_chars + used, MAX_OUTPUT_CHARS)
        try:
            for chunk in template.generate(context):
                size += len(chunk)
                if size > limit:
                    if max_chars is not None and size - used > max_chars:
                        raise RenderTooLong(max_chars)
                    raise _LimitExceeded(f"the output exceeds {MAX_OUTPUT_CHARS} characters")
                parts.append(chunk)
        except jinja2.exceptions.SecurityError as error:
            raise _violation(field, f"{self.label}: {error}", "TEMPLATE_UNSAFE") from None
        except _Refused as error:
            raise _violation(field, f"{self.label}: {error}", error.reason) from None
        except _RENDER_ERRORS as error:
            # The template's own mistake (or one its inputs trigger): the client's to fix.
            if isinstance(error, _BUG_ERRORS) and _raised_here(error):
                raise  # our helpers never mean these: a bug, for the error boundary to log
            message = f"{self.label}: {type(error).__name__}: {error}"
            raise _violation(field, message, "TEMPLATE_RENDER_FAILED") from None
        return "".join(parts)


@functools.lru_cache(maxsize=64)
def chat_prompt(source: str | None = None, label: str = "chat template") -> Prompt:
    """Returns the compiled chat template `source` (DEFAULT_CHAT_TEMPLATE when None).

    Chat templates take `messages` and `system` and no variables.
    """
    return Prompt(label, DEFAULT_CHAT_TEMPLATE if source is None else source)
