"""The Grafana dashboard (deploy/grafana/dashboards/playrec.json) queries only metrics a worker exports.

The ground truth is a real worker's registry (built offline; every labelled metric given one child so
its samples and label names show): each `playrec_*` name in an `expr` (and in the templating queries)
must be a sample name the worker exposes (`_total` for counters, `_bucket`/`_sum`/`_count` for
histograms), and every label a query groups or filters by must be one of that metric's labels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stream.settings import WorkerSettings
from stream.worker import StreamWorker

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "playrec.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
#: Labels Prometheus adds to every scraped series, and histogram buckets' own.
TARGET_LABELS = {"instance", "job"}
PROMETHEUS_METRICS = {"up"}  # written by Prometheus itself per target
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ")
_NAME = re.compile(r"\bplayrec_[a-zA-Z0-9_]+")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> dict[str, set[str]]:
    """sample name -> its label names, as a worker's GET /metrics renders them."""
    tmp = tmp_path_factory.mktemp("grafana")
    worker = StreamWorker(WorkerSettings(bootstrap="127.0.0.1:9", store=tmp / "store", data_dir=tmp / "data"))
    for metric in vars(worker.metrics).values():
        labels = getattr(metric, "_labelnames", ())
        if labels:
            metric.labels(*["x"] * len(labels))
    out: dict[str, set[str]] = {}
    for line in worker.metrics.render().decode().splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            names = {pair.split("=", 1)[0] for pair in (match.group(2) or "").split(",") if pair}
            out.setdefault(match.group(1), set()).update(names)
    return out


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(items: list[dict]) -> list[dict]:
    out = []
    for panel in items:
        out.append(panel)
        out.extend(panels(panel.get("panels") or []))
    return out


def queries() -> list[tuple[str, str]]:
    """(where, query) of every panel target and templating query."""
    doc = dashboard()
    out = [(f"panel {p['title']!r}", t["expr"]) for p in panels(doc["panels"]) for t in p.get("targets", [])]
    for variable in doc.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            out.append((f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query))
    return out


def problems_of(where: str, expr: str, exposed: dict[str, set[str]]) -> list[str]:
    problems = []
    names = set(_NAME.findall(expr))
    for name in sorted(names):
        if name not in exposed:
            problems.append(f"{where}: {name} is not exported by a worker")
    labels = set().union(*(exposed.get(n, set()) for n in names)) | TARGET_LABELS
    if any(n.endswith("_bucket") for n in names):
        labels.add("le")
    for group in _GROUPING.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            if label not in labels:
                problems.append(f"{where}: groups by {label!r}, which {sorted(names)} do not carry")
    for metric, matchers in _SELECTOR.findall(expr):
        if metric not in names and metric not in PROMETHEUS_METRICS:
            problems.append(f"{where}: selects unknown metric {metric!r}")
            continue
        for matcher in filter(None, (m.strip() for m in matchers.split(","))):
            label = re.split(r"[=!~]", matcher, maxsplit=1)[0].strip()
            if label not in (exposed.get(metric, set()) | TARGET_LABELS):
                problems.append(f"{where}: filters {metric} by {label!r}, which it does not carry")
    return problems


def test_every_query_names_exported_metrics_and_labels(exposed):
    found = queries()
    assert len(found) >= 20
    problems = [p for where, expr in found for p in problems_of(where, expr, exposed)]
    assert problems == []


def test_the_check_catches_a_wrong_name_a_missing_suffix_and_a_wrong_label(exposed):
    assert problems_of("x", "rate(playrec_events_procesed_total[1m])", exposed)
    assert problems_of("x", "rate(playrec_events_processed[1m])", exposed)  # counters are exposed as _total
    assert problems_of("x", "sum by (route) (rate(playrec_events_processed_total[1m]))", exposed)
    assert problems_of("x", 'playrec_consumer_lag{partition="1"}', exposed)
    assert not problems_of("x", "sum by (partition) (playrec_consumer_partition_lag)", exposed)


def test_the_dashboard_covers_the_console_figures():
    exprs = " ".join(expr for _, expr in queries())
    for name in (
        "playrec_events_processed_total",
        "playrec_streams_counted_total",
        "playrec_dead_letters_total",
        "playrec_user_fold_ins_total",
        "playrec_fold_in_seconds_bucket",
        "playrec_consumer_partition_lag",
        "playrec_request_seconds_bucket",
    ):
        assert name in exprs, name


def test_the_dashboard_is_well_formed():
    yaml = pytest.importorskip("yaml")
    doc = dashboard()
    ids = [p["id"] for p in panels(doc["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    uid = {d["uid"] for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    for panel in panels(doc["panels"]):
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uid, f"{panel['title']}: data source {panel['datasource']}"
            assert panel["targets"], panel["title"]
