"""The chart's Grafana dashboard (files/dashboard.json) charts metrics that exist: every metric a
query names is checked against a real scrape of the server's `/metrics` and of the controller's
metrics endpoint, each in a process of its own (so neither sees the other's registry)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from functools import cache
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.paths import ROOT
from tests.unit.chart.helm import CHART

DASHBOARD = CHART / "files" / "dashboard.json"

SERVER_SCRAPE = """
    from fastapi.testclient import TestClient
    from opensandbox_platform.server.app import create_app
    from opensandbox_platform.server.config import Config
    from tests.unit.server.test_routes import MemoryRuntime

    with TestClient(create_app(Config(), MemoryRuntime())) as client:
        response = client.get("/metrics")
        assert response.status_code == 200, response.text
        print(response.text)
"""

CONTROLLER_SCRAPE = """
    import asyncio, urllib.request
    import opensandbox_platform.controller.main  # everything the controller registers at import
    from opensandbox_platform.kube.serving import metrics_route, serve

    async def main():
        server = await serve("127.0.0.1", 0, {"/metrics": metrics_route(None)})
        port = server.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/metrics"
        print(await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode()))
        server.close()

    asyncio.run(main())
"""

# PromQL words that are not metric names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}


def scrape(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def series_names(exposition: str) -> set[str]:
    """The sample names a scrape can show, from its families (a family with no sample yet, e.g. a
    labelled histogram nothing observed, counts: Prometheus has it once something happens)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


@cache
def exported() -> dict[str, set[str]]:
    return {"server": series_names(scrape(SERVER_SCRAPE)), "controller": series_names(scrape(CONTROLLER_SCRAPE))}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords,
    label names (inside `{}` or a `by (...)`), durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"\$\{?\w+\}?", "", expr)
    found = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)
    return {name for name in found if name not in KEYWORDS}


def queries() -> list[tuple[str, str]]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_extractor_finds_metrics_and_nothing_else() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, route) "
        '(rate(a_seconds_bucket{status=~"4..", x="rate(b)"}[$__rate_interval])))'
        " / on (route) group_left sum(c_total offset 5m) and d"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "c_total", "d"}


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "opensandbox"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


@pytest.mark.parametrize(("title", "expr"), queries(), ids=[f"{t}:{e[:40]}" for t, e in queries()])
def test_every_query_names_metrics_the_server_or_controller_export(title: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{title}: no metric in {expr!r}"
    known = exported()
    missing = {n for n in names if not any(n in exported_names for exported_names in known.values())}
    assert not missing, f"{title}: {sorted(missing)} are not exported by the server or the controller"


def test_every_exported_family_of_ours_is_on_the_dashboard() -> None:
    """A metric added to the server or the controller gets a panel (or is listed here as not charted)."""
    charted = {name for _, expr in queries() for name in metric_names(expr)}
    not_charted = {"workqueue_adds_total", "workqueue_work_duration_seconds_bucket"}
    ours = {
        name
        for names in exported().values()
        for name in names
        if name.startswith(("opensandbox_", "controller_runtime_", "workqueue_")) and not name.endswith("_created")
    }
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in ours if not n.endswith(("_sum", "_count"))}
    charted_families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in charted | not_charted}
    assert families - charted_families == set()
