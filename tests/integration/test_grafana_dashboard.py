"""Every metric the Grafana dashboard queries is declared in a running relay's ``/metrics``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.relay import StartRelay

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "matrix-media-relay.json"

# The sample names each metric type exposes in the text format (prometheus_client).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created", ""),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")  # label matchers; braces never nest in PromQL
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "and", "or", "unless", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana ``label_values`` query) selects."""
    text = _VARIABLE.sub("x", _STRING.sub('""', expr))
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", text)))
    names = set()
    for m in _IDENT.finditer(text):
        # An identifier followed by "(" is a function or aggregation, not a metric.
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    # label_values(metric, label): the second argument is a label, not a metric.
    lv = re.fullmatch(r"\s*label_values\((\w+)[^,]*,\s*(\w+)\)\s*", _MATCHERS.sub("", expr))
    if lv:
        names.discard(lv.group(2))
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (status) (rate(relay_served_requests_total{job=~"$job"}[5m]))',
         {"relay_served_requests_total"}),
        ("sum(rate(a_total[$__rate_interval])) / (sum(rate(a_total[1m])) + sum(rate(b_total[1m])))",
         {"a_total", "b_total"}),
        ("histogram_quantile(0.95, sum by (le) (rate(x_seconds_bucket{a=\"b,c\"}[5m])))",
         {"x_seconds_bucket"}),
        ('process_open_fds{instance=~"$instance"}', {"process_open_fds"}),
        ('label_values(relay_served_bytes_total{job=~"$job"}, instance)',
         {"relay_served_bytes_total"}),
        ("up offset 5m > bool 1", {"up"}),
    ],
)  # fmt: skip
def test_metric_names(expr: str, names: set[str]) -> None:
    """The PromQL name extractor finds metrics, not functions, labels, ranges or variables."""
    assert metric_names(expr) == names


def _queries(node: Any) -> Iterator[str]:
    """Every ``expr`` of a panel target and every templating query in the dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, dict) and "query" in value:
                yield str(value["query"])
            else:
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def test_dashboard_is_importable_json() -> None:
    """The dashboard has a uid, a datasource variable and panels that each query something."""
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "matrix-media-relay"
    assert "datasource" in {v["name"] for v in board["templating"]["list"]}
    graphs = [p for p in board["panels"] if p["type"] != "row"]
    assert len(graphs) >= 12
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in graphs:
        assert panel["targets"], panel["title"]
        assert all(t["expr"] for t in panel["targets"]), panel["title"]


async def _exposed(session: aiohttp.ClientSession, url: str) -> set[str]:
    """The sample names that the metric families declared at ``url`` can have."""
    async with session.get(url) as resp:
        assert resp.status == 200
        families = list(text_string_to_metric_families(await resp.text()))
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}


@pytest.mark.synapse
async def test_every_queried_metric_is_exposed(
    start_relay: StartRelay, http_session: aiohttp.ClientSession
) -> None:
    """Each metric name in the dashboard's queries is a sample name of a family in /metrics."""
    exposed = await _exposed(http_session, (await start_relay()).internal_url + "/metrics")
    queried: dict[str, set[str]] = {}
    for expr in _queries(json.loads(DASHBOARD.read_text())):
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        for name in names:
            queried.setdefault(name, set()).add(expr)
    missing = {name: sorted(exprs) for name, exprs in queried.items() if name not in exposed}
    assert not missing, f"queried but not in /metrics: {missing}"
    # The panels cover every area the operator watches, process metrics included.
    watched = {
        "relay_served_requests_total",
        "relay_upstream_requests_total",
        "relay_transactions_total",
        "process_resident_memory_bytes",
    }
    assert watched <= set(queried)
