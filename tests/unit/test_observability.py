"""deploy/observability: alert rules pass promtool, dashboards parse, queries stay honest.

Every metric a dashboard, an alert rule or an autoscaler queries must be one
the services define (their prometheus_client metrics, with the labels the
query matches on), one alerts.yml records, an Envoy stat (checked against a
running edge by tests/e2e/test_observability_names.py), one Prometheus adds
(`up`), or one of the few documented as pending.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import observability as obs
from tools import dashboards

ROOT = obs.ROOT
RUNBOOK = ROOT / "docs" / "runbook.md"
OBSERVABILITY_DOC = ROOT / "docs" / "observability.md"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make promtool` (Debian's prometheus package)")
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_alert_rules_pass_promtool_check():
    result = _promtool("check", "rules", str(obs.ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_tests() -> list[Path]:
    return sorted(obs.ALERTS.parent.glob("alerts_test*.yml"))


def test_alert_rules_pass_their_promtool_unit_tests():
    result = _promtool("test", "rules", *map(str, _alert_tests()))
    assert result.returncode == 0, result.stdout + result.stderr


def _anchors(markdown: str) -> set[str]:
    """Returns GitHub's anchors of the document's headings."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section():
    anchors = _anchors(RUNBOOK.read_text())
    alerts = [r for r in obs.alert_rules() if "alert" in r]
    assert len(alerts) >= 10
    for rule in alerts:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"page", "warning", "ticket"}, name
        assert rule["annotations"]["summary"], name
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "docs/runbook.md" and name.lower().startswith(anchor), name
        assert anchor in anchors, f"docs/runbook.md has no section for {name}"


def test_every_alert_is_exercised_by_a_promtool_unit_test():
    tests = [t for p in _alert_tests() for t in yaml.safe_load(p.read_text())["tests"]]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    untested = {r["alert"] for r in obs.alert_rules() if "alert" in r} - tested
    assert not untested, untested


def test_dashboards_are_what_tools_dashboards_builds():
    files = {p.name: p.read_text() for p in obs.dashboard_files()}
    built = {f"{d.uid}.json": dashboards.render(d) for d in dashboards.DASHBOARDS}
    assert files == built, "run `python -m tools.dashboards` after editing tools/dashboards.py"


def test_dashboards_parse_with_unique_ids_and_a_query_per_panel():
    uids = set()
    titles = {"edge", "workers", "tenants", "model versions", "control plane"}
    for path in obs.dashboard_files():
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        titles.discard(dashboard["title"].removeprefix("tokenmesh / "))
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
    assert not titles, f"missing dashboards: {titles}"


def test_every_dashboard_and_autoscaler_query_is_valid_promql(tmp_path: Path):
    # promtool checks a rule file's expressions: each query becomes a recording rule.
    queries = obs.dashboard_queries() + obs.autoscaling_queries()
    rules = [{"record": f"check:query_{i}", "expr": q.expr} for i, q in enumerate(queries)]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_name_extractor_sees_metrics_not_functions_labels_or_durations():
    expr = (
        'histogram_quantile(0.9, sum by (le, model) (rate(a_bucket{model=~"x|y", le!=""}[5m])))'
        " / ignoring(version) group_left sum without (kind) (b offset 1d) and on() vector(0)"
        ' or c:recorded{job="z"} > bool 1e-3'
    )
    assert obs.metric_names(expr) == {"a_bucket", "b", "c:recorded"}
    assert obs.selectors(expr)[0] == ("a_bucket", {"model": '"x|y"', "le": '""'})


def test_every_query_names_only_metrics_that_exist():
    exported = obs.exported_metrics()
    recorded = obs.recorded_names()
    unknown = []
    for query in obs.all_queries():
        for name in obs.metric_names(query.expr):
            known = (
                name in exported
                or name in recorded
                or name in obs.PENDING_METRICS
                or name in obs.PROMETHEUS_NAMES
                or name.startswith("envoy_")  # against a running edge: tests/e2e
            )
            if not known:
                unknown.append(f"{query.where}: {name}")
    assert not unknown, "\n".join(unknown)


def test_every_selector_matches_on_labels_its_metric_has():
    exported = obs.exported_metrics()
    wrong = []
    for query in obs.all_queries():
        for name, matchers in obs.selectors(query.expr):
            if name not in exported:
                continue
            extra = set(matchers) - exported[name] - obs.TARGET_LABELS
            if extra:
                wrong.append(f"{query.where}: {name} has no label {sorted(extra)}")
    assert not wrong, "\n".join(wrong)


def test_pending_metrics_are_documented():
    doc = OBSERVABILITY_DOC.read_text()
    for name in obs.PENDING_METRICS:
        assert name in doc, f"docs/observability.md must say who will export {name}"


#: Metrics with a `priority` label whose batch series wait by design: alerts and
#: autoscalers that protect interactive latency must not read them.
PRIORITY_METRICS = ("tokenmesh_time_to_first_token_seconds", "tokenmesh_queue_depth")


def test_alerts_and_autoscalers_read_interactive_work_only():
    # Job items and shadow copies run at batch priority behind every interactive
    # request: counted in, their waits burned the TTFT SLO and scaled GPU workers out.
    wrong = []
    for query in obs.alert_queries() + obs.autoscaling_queries():
        for name, matchers in obs.selectors(query.expr):
            if name.startswith(PRIORITY_METRICS) and matchers.get("priority") != '"interactive"':
                wrong.append(f"{query.where}: {name} {matchers}")
    assert not wrong, "\n".join(wrong)
    adapter = yaml.safe_load((obs.AUTOSCALING / "hpa" / "prometheus-adapter.yaml").read_text())[
        "data"
    ]["config.yaml"]
    for rule in yaml.safe_load(adapter)["rules"]:
        if rule["seriesQuery"].startswith(PRIORITY_METRICS):
            assert 'priority="interactive"' in rule["metricsQuery"], rule["name"]["as"]
