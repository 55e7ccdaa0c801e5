"""Name rules live only in services/core/contract.py: no module keeps a private copy.

Two checks back each other up. A source scan finds any regular expression
literal under services/ or gateway/ that behaves like a name rule (it
accepts model, tenant and version names but refuses spaces, slashes and
NUL), however it is spelled. A behavioural check feeds the same names to
every module's validator and requires the contract's answer, so a rule
written without a regex cannot drift either.
"""

from __future__ import annotations

import ast
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.auth import servicer as auth_servicer
from services.core import contract
from services.core.errors import InvalidArgument
from services.inference import validation
from services.router import catalog, registry
from tokenmesh.auth.v1 import auth_service_pb2

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "services" / "core" / "contract.py"
#: Names every name rule accepts (model names, versions, tenants, aliases).
NAMES = ("demo-lm", "acme", "all-minilm-l6-v2", "v1", "2")
#: Values every name rule refuses: none is one safe path segment.
NOT_NAMES = ("a b", "a/b", "a\x00b", "a\nb")
#: The contract's compiled name rules, by the name other modules would use.
CONTRACT_PATTERNS = {
    name: value.pattern
    for name, value in vars(contract).items()
    if isinstance(value, re.Pattern) and name.isupper()
}


def _sources() -> Iterator[Path]:
    for top in ("services", "gateway"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path != CONTRACT and not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                yield path


def _string_literals(source: str) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def _is_name_rule(literal: str) -> bool:
    """Tells whether `literal`, used as a regex, behaves like a name rule."""
    if literal in CONTRACT_PATTERNS.values():
        return True
    try:
        # Any literal is tried: Lua sources ("[[...]]") make re warn of nested sets.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pattern = re.compile(literal)
    except (re.error, RecursionError, OverflowError):
        return False
    accepts = all(pattern.fullmatch(name) for name in NAMES)
    return accepts and not any(pattern.fullmatch(bad) for bad in NOT_NAMES)


def private_name_rules(source: str) -> list[tuple[int, str]]:
    """Returns (line, literal) of every string in `source` that is a name rule."""
    return [(line, s) for line, s in _string_literals(source) if _is_name_rule(s)]


def test_the_detector_finds_copies_however_they_are_spelled():
    copies = [
        '_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")',  # verbatim
        '_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")',  # the catalogue's old, looser copy
        '_TENANT = re.compile(r"[\\w.-]{1,64}")',
        'PATTERN = "^[a-zA-Z0-9_.-]+$"\nok = re.match(PATTERN, value)',
        'ok = re.fullmatch(r"[0-9A-Za-z][-.\\w]*", value)',
    ]
    for source in copies:
        assert private_name_rules(source), source


def test_the_detector_leaves_other_strings_alone():
    others = [
        '_ADDRESS = re.compile(r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$")',
        'ANY = re.compile(r".*")',
        'WORD = re.compile(r"\\S+")',  # accepts "a/b": not a name rule
        '"""A docstring that mentions [A-Za-z0-9] names."""',
        'HEADER = "x-tokenmesh-tenant"',
    ]
    for source in others:
        assert private_name_rules(source) == [], source


def test_no_module_keeps_its_own_name_rule():
    found = [
        f"{path.relative_to(ROOT)}:{line}: {literal!r}"
        for path in _sources()
        for line, literal in private_name_rules(path.read_text())
    ]
    assert found == [], "import these rules from services/core/contract.py instead"


class _PatternUse(ast.NodeVisitor):
    """Finds `contract.X.match(...)`-style calls that bypass the fullmatch helpers."""

    def __init__(self) -> None:
        self.found: list[int] = []

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr in ("match", "search")
            and _names_contract_pattern(func.value)
        ):
            self.found.append(node.lineno)
        self.generic_visit(node)


def _names_contract_pattern(node: ast.expr) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name in CONTRACT_PATTERNS


def test_contract_patterns_are_used_only_through_the_fullmatch_helpers():
    # `re.match` with a trailing `$` also accepts "demo\n".
    assert re.compile(contract.MODEL_NAME.pattern).match("demo\n")
    assert not contract.is_model_name("demo\n")
    found = []
    for path in _sources():
        visitor = _PatternUse()
        visitor.visit(ast.parse(path.read_text()))
        found += [f"{path.relative_to(ROOT)}:{line}" for line in visitor.found]
    assert found == [], "use contract.is_model_name() and friends (fullmatch)"


# Behaviour: every module answers as the contract does.

SAMPLES = (
    *NAMES,
    *NOT_NAMES,
    "",
    ".",
    "..",
    "-x",
    ".hidden",
    "_x",
    "demo\n",
    "../../tmp/evil",
    "x\x00",
    "UPPER.case_1",
    "w-1:8000",
    "a" * 64,
    "a" * 65,
    "a" * 128,
    "a" * 129,
)


def _accepts(check: Callable[[str], object], value: str) -> bool:
    try:
        check(value)
    except InvalidArgument:
        return False
    return True


def _auth_tenant(value: str) -> None:
    auth_servicer._validate_create(
        auth_service_pb2.CreateApiKeyRequest(tenant=value, scopes=["models:read"])
    )


def _auth_allowed_model(value: str) -> None:
    auth_servicer._validate_create(
        auth_service_pb2.CreateApiKeyRequest(
            tenant="acme", scopes=["models:read"], allowed_models=[value]
        )
    )


def _auth_pinned_version(value: str) -> None:
    auth_servicer._validate_create(
        auth_service_pb2.CreateApiKeyRequest(
            tenant="acme", scopes=["models:read"], pinned_versions={"demo-lm": value}
        )
    )


CHECKS: list[tuple[str, Callable[[str], object], Callable[[str], bool]]] = [
    ("inference model", validation.validate_model_name, contract.is_model_name),
    (
        "inference version",
        lambda v: validation.validate_model_version("m", v),
        contract.is_model_version,
    ),
    ("catalogue model", catalog.check_name, contract.is_model_name),
    ("catalogue version", catalog.check_version, contract.is_model_version),
    (
        "catalogue alias",
        lambda a: catalog.set_alias(catalog.ModelEntry("m"), a, ""),
        contract.is_model_alias,
    ),
    ("registry worker id", registry.check_worker_id, contract.is_worker_id),
    ("auth tenant", _auth_tenant, contract.is_tenant),
    ("auth allowed model", _auth_allowed_model, contract.is_model_name),
    ("auth pinned version", _auth_pinned_version, contract.is_model_version),
]


@pytest.mark.parametrize(("what", "check", "rule"), CHECKS, ids=[c[0] for c in CHECKS])
def test_every_module_answers_as_the_contract(what, check, rule):
    disagree = [s for s in SAMPLES if _accepts(check, s) != rule(s)]
    assert disagree == [], f"{what} disagrees with services/core/contract.py"
