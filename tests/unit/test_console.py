"""The operator console's server side (stream/console.py), offline: metric samples and quantiles, the
model store's versions with their retrain reports, the page's assets."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from batch.model_store import ModelStore
from stream.console import (
    ASSETS,
    CONSOLE_ROUTE,
    CSP,
    MetricSampler,
    ModelSummaries,
    asset,
    histogram_quantile,
    route_latencies,
    sample_metrics,
    version_summary,
)
from stream.metrics import WorkerMetrics


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 10.0), (0.2, 20.0), (0.4, 20.0), (float("inf"), 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == 0.1  # in +Inf: the highest bound


def test_a_sample_holds_the_counters_the_page_charts():
    metrics = WorkerMetrics()
    metrics.events.inc(7)
    metrics.streams.inc(5)
    metrics.dead_letters.labels("undecodable").inc(2)
    metrics.dead_letters.labels("timestamp").inc()
    metrics.user_fold_ins.inc(4)
    metrics.fold_in_seconds.observe(0.5)
    metrics.fold_in_seconds.observe(0.25)
    metrics.request_seconds.labels("similar").observe(0.01)
    metrics.request_seconds.labels(CONSOLE_ROUTE).observe(3.0)  # the console's own: not API latency
    metrics.partition_lag.labels("3").set(12)
    sample = sample_metrics(metrics.registry, now=100.0)
    assert sample["t"] == 100.0
    assert (sample["events"], sample["streams"], sample["user_fold_ins"]) == (7, 5, 4)
    assert sample["dead_letters"] == {"undecodable": 2, "timestamp": 1}
    assert (sample["fold_in_runs"], sample["fold_in_seconds"]) == (2, 0.75)
    assert (sample["requests"], sample["request_seconds"]) == (1, 0.01)
    assert sample["lag"] == {"3": 12}
    json.dumps(sample)
    routes = route_latencies(metrics.registry)
    assert set(routes) == {"similar", CONSOLE_ROUTE}
    assert routes["similar"]["requests"] == 1 and routes["similar"]["mean_s"] == pytest.approx(0.01)
    assert 0.005 < routes["similar"]["p95_s"] <= 0.01


def test_the_sampler_keeps_a_bounded_window():
    metrics = WorkerMetrics()
    sampler = MetricSampler(metrics.registry, window_s=10, every_s=2)
    for _ in range(20):
        metrics.events.inc()
        sampler.tick()
    window = sampler.window()
    assert len(window) == 7  # 6 kept + the one taken now
    assert [s["events"] for s in window] == [15, 16, 17, 18, 19, 20, 20]


def publish(store: ModelStore, report: dict | None, metrics: dict | None, source: dict) -> str:
    rng = np.random.default_rng(0)

    def extra(directory):
        if report is not None:
            (directory / "report.json").write_text(json.dumps(report))
        return {"report": {"files": ["report.json"], "gate": (report or {}).get("gate")}} if report else {}

    return store.publish(
        np.array(["u0", "u1"]),
        np.array(["t0", "t1", "t2"]),
        rng.random((2, 4)),
        rng.random((3, 4)),
        manifest={"input": source, "metrics": {"holdout": 0.2, "model": metrics, "popularity": None}},
        extra=extra,
    )


def test_versions_carry_their_input_figures_and_gate(tmp_path):
    store = ModelStore(tmp_path, keep=5)
    first = publish(store, None, {"ndcg": 0.3, "precision": 0.1}, {"path": "/data/plays.tsv", "plays": 6})
    gate = {"published": True, "reason": "candidate ndcg 0.3100 vs live 0.3000: passes the gate (tolerance 2%)"}
    report = {"gate": gate, "live_version": first, "live": {"ndcg": 0.3}, "new": {"ndcg": 0.31}}
    offsets = {"0": 10, "1": 5}
    second = publish(store, report, {"ndcg": 0.31}, {"source": "history+stream", "offsets": offsets, "plays": 9})
    summaries = ModelSummaries(store)
    versions, current = summaries.read()
    assert current == second and [v["version"] for v in versions] == [second, first]
    newest, oldest = versions
    assert newest["gate"] == gate and newest["judged_against"] == first
    assert newest["judged_against_metrics"] == {"ndcg": 0.3}
    assert newest["watermark"] == offsets and newest["plays"] == 9 and newest["source"] == "history+stream"
    assert (newest["users"], newest["tracks"], newest["factors"]) == (2, 3, 4)
    assert oldest["gate"] is None and oldest["source"] == "file" and oldest["metrics"]["ndcg"] == 0.3
    # a damaged report: the version is still listed, without the report's figures
    (store.models / second / "report.json").write_text("{not json")
    assert version_summary(store, second)["judged_against"] is None
    # a pruned version leaves the list
    shutil.rmtree(store.models / first)
    assert [v["version"] for v in summaries.read()[0]] == [second]


def test_a_damaged_manifest_is_named_not_raised(tmp_path):
    store = ModelStore(tmp_path)
    version = publish(store, None, None, {})
    (store.models / version / "manifest.json").write_text("{")
    summary = version_summary(store, version)
    assert summary["version"] == version and "not valid JSON" in summary["error"]


def test_the_page_loads_only_its_own_assets_and_renders_no_html():
    page = asset("console.html")
    for path in ASSETS:
        assert f'"{path}"' in page, path
    assert "<script>" not in page and not re.search(r"\son\w+=", page), "inline script (the CSP blocks it)"
    assert "http://" not in page.replace('"http://www.w3.org', "") and "https://" not in page
    script = asset("console.js")
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "localStorage", "new Function"):
        assert forbidden not in script, forbidden
    assert not re.search(r"\beval\b", script)
    assert "script-src 'self'" in CSP and "connect-src 'self'" in CSP
