"""What deploy/observability and the autoscalers query, and what the services export.

Shared by tests/unit/test_observability.py (names against the code's metric
definitions), tests/unit/test_deploy.py (autoscaling queries) and
tests/e2e/test_observability_names.py (Envoy's names against a running edge).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
OBSERVABILITY = ROOT / "deploy" / "observability"
DASHBOARDS = OBSERVABILITY / "grafana" / "dashboards"
ALERTS = OBSERVABILITY / "prometheus" / "alerts.yml"
AUTOSCALING = ROOT / "deploy" / "k8s" / "autoscaling"

#: Names Prometheus itself adds to every scrape.
PROMETHEUS_NAMES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
#: Labels Prometheus' Kubernetes scrape config attaches (targets, not the services).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "container"})
#: Queried by dashboards or alerts before anything exports them (none today; each
#: must be listed in docs/observability.md with who will export it).
PENDING_METRICS: frozenset[str] = frozenset()

_KEYWORDS = frozenset(
    {
        "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
        "and", "or", "unless", "offset", "inf", "nan", "Inf", "NaN",
    }
)  # fmt: skip
_GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_GRAFANA_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\")\s*,?")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")


@dataclass(frozen=True)
class Query:
    """Query is one PromQL expression and where it comes from (for messages)."""

    where: str
    expr: str


def substitute_grafana_variables(expr: str) -> str:
    """Returns `expr` with Grafana's $variables replaced by values PromQL accepts."""
    return _GRAFANA_VARIABLE.sub(lambda m: _GRAFANA_DURATIONS.get(m.group(1), ".*"), expr)


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """Returns (metric name or "", {label: matcher value}) of every selector in `expr`."""
    found = []
    for name, body in _SELECTOR.findall(expr):
        matchers = {label: value for label, _, value in _MATCHER.findall(body)}
        found.append((name, matchers))
    return found


def metric_names(expr: str) -> set[str]:
    """Returns the metric names `expr` reads (not functions, keywords, labels or durations)."""
    names = {name for name, matchers in selectors(expr) if name}
    names |= {m["__name__"].strip('"') for _, m in selectors(expr) if "__name__" in m}
    bare = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", _STRING.sub('""', expr))
    bare = re.sub(r"\[[^\]]*\]", " ", bare)  # ranges, subqueries
    bare = _GROUPING.sub(" ", bare)
    names |= {n for n in _IDENTIFIER.findall(bare) if n not in _KEYWORDS}
    return names


def dashboard_files() -> list[Path]:
    """Returns every dashboard JSON file."""
    return sorted(DASHBOARDS.glob("*.json"))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries() -> list[Query]:
    """Returns every panel target's and template variable's query, Grafana variables filled in."""
    queries = []
    for path in dashboard_files():
        dashboard = json.loads(path.read_text())
        for panel in _panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                where = f"{path.name}: {panel['title']} {target['refId']}"
                queries.append(Query(where, substitute_grafana_variables(target["expr"])))
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert match, f"{path.name}: variable {variable['name']}: use label_values(metric, x)"
            metric, label = match.groups()
            queries.append(Query(f"{path.name}: ${variable['name']}", f'{metric}{{{label}!=""}}'))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    """Returns every rule of alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_queries() -> list[Query]:
    """Returns every rule's expression."""
    return [
        Query(f"alerts.yml: {r.get('alert') or r.get('record')}", r["expr"]) for r in alert_rules()
    ]


def recorded_names() -> set[str]:
    """Returns the names alerts.yml's recording rules define."""
    return {r["record"] for r in alert_rules() if "record" in r}


def autoscaling_queries() -> list[Query]:
    """Returns the KEDA triggers' queries and prometheus-adapter's series and metrics queries."""
    queries = []
    for path in sorted(AUTOSCALING.glob("*/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc.get("kind") == "ScaledObject":
                for trigger in doc["spec"]["triggers"]:
                    if trigger["type"] == "prometheus":
                        queries.append(Query(f"{path.name}: {trigger['name']}",
                                             trigger["metadata"]["query"]))  # fmt: skip
            if doc.get("kind") == "ConfigMap" and "config.yaml" in doc.get("data", {}):
                for rule in yaml.safe_load(doc["data"]["config.yaml"])["rules"]:
                    queries.append(Query(f"{path.name}: {rule['name']['as']}",
                                         rule["seriesQuery"]))  # fmt: skip
    return queries


def all_queries() -> list[Query]:
    """Returns every query of dashboards, alert rules and autoscalers."""
    return dashboard_queries() + alert_queries() + autoscaling_queries()


def import_services() -> None:
    """Imports every services module, so that every metric is defined in REGISTRY."""
    import services

    for module in pkgutil.walk_packages(services.__path__, "services."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)


def exported_metrics() -> dict[str, frozenset[str]]:
    """Returns every sample name the services can export, with its metric's label names."""
    import_services()
    exported: dict[str, frozenset[str]] = {}
    names_to_collectors: dict[str, Any] = REGISTRY._names_to_collectors  # noqa: SLF001
    for name, collector in names_to_collectors.items():
        labels = frozenset(getattr(collector, "_labelnames", ()))
        exported[name] = labels | ({"le"} if name.endswith("_bucket") else frozenset())
    return exported
