"""The operator's console: a page the worker serves, and the read-only JSON it draws (docs/CONSOLE.md).

    GET /  and  GET /console        the page (plain HTML; its script and style below, nothing else fetched)
    GET /console/console.js         the page's script
    GET /console/console.css        the page's style
    GET /console/live.json          this worker's metrics, sampled every SAMPLE_S over the last WINDOW_S
    GET /console/model.json         the live model and every version in the store, with its retrain report
    GET /console/workers.json       the consumer group's members and the partitions of `plays` each owns
    GET /console/takedowns.json     the tracks taken down (changed through the admin routes, with the token)

The page calls the public API for a user (plays, recommendations, explanations) and a track (similar
tracks), and the admin routes with a token the operator types in (kept in the page, never stored).
Every route here is read-only and answers errors as the rest of stream/web.py does.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import threading
import time
from collections.abc import Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any

from faust import web

from batch.model_store import ModelStoreError

if TYPE_CHECKING:
    from stream.worker import StreamWorker

log = logging.getLogger(__name__)

#: Seconds between two samples of the metrics (the page's charts have one point per sample).
SAMPLE_S = 2.0
#: Seconds of samples kept (and sent to the page, so its charts are full as soon as it opens).
WINDOW_S = 300.0
#: Most taken-down tracks listed (the total is always given).
MAX_LISTED_TAKEDOWNS = 1000
#: report.json files larger than this are not read (a report holds a few kB).
MAX_REPORT_BYTES = 1 << 20
#: Route label of the console's own requests in `playrec_request_seconds`; left out of the page's API latency.
CONSOLE_ROUTE = "console"
#: The page's assets: route -> (file under stream/static, content type).
ASSETS = {
    "/console/console.js": ("console.js", "application/javascript"),
    "/console/console.css": ("console.css", "text/css"),
}
#: The page loads only its own script, style and JSON: no inline script, nothing from another origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def asset(name: str) -> str:
    """A file of the page (stream/static/), shipped as package data."""
    return (resources.files("stream") / "static" / name).read_text(encoding="utf-8")


# -- metrics --------------------------------------------------------------------------------------
def read_registry(registry: Any) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a prometheus_client registry: sample name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
    for family in registry.collect():
        for sample in family.samples:
            out[sample.name].append((sample.labels, float(sample.value)))
    return out


def _total(samples: dict, name: str, skip: tuple[str, str] | None = None) -> float:
    return sum(v for labels, v in samples.get(name, ()) if skip is None or labels.get(skip[0]) != skip[1])


def _by(samples: dict, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in samples.get(name, ()):
        out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + value
    return out


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile of a cumulative histogram [(upper bound, count)], interpolated linearly inside its
    bucket as Prometheus' `histogram_quantile` does; None without observations, the highest finite bound
    when it falls in the +Inf bucket."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return bound if inside <= 0 else lower + (bound - lower) * (rank - below) / inside
        lower, below = bound, count
    return lower


def sample_metrics(registry: Any, now: float | None = None) -> dict[str, Any]:
    """One sample of the counters the page charts (cumulative since the worker started; the page plots
    the differences between samples)."""
    s = read_registry(registry)
    api = ("route", CONSOLE_ROUTE)
    return {
        "t": round(time.time() if now is None else now, 3),
        "events": _total(s, "playrec_events_processed_total"),
        "streams": _total(s, "playrec_streams_counted_total"),
        "duplicates": _total(s, "playrec_duplicate_events_total"),
        "forwarded": _total(s, "playrec_plays_forwarded_total"),
        "dead_letters": _by(s, "playrec_dead_letters_total", "kind"),
        "user_fold_ins": _total(s, "playrec_user_fold_ins_total"),
        "track_fold_ins": _total(s, "playrec_track_fold_ins_total"),
        "fold_in_runs": _total(s, "playrec_fold_in_seconds_count"),
        "fold_in_seconds": round(_total(s, "playrec_fold_in_seconds_sum"), 6),
        "requests": _total(s, "playrec_request_seconds_count", skip=api),
        "request_seconds": round(_total(s, "playrec_request_seconds_sum", skip=api), 6),
        "lag": {p: int(v) for p, v in sorted(_by(s, "playrec_consumer_partition_lag", "partition").items())},
    }


def route_latencies(registry: Any) -> dict[str, dict[str, float | None]]:
    """Per route since start: requests, mean, median and 95th percentile latency (seconds)."""
    s = read_registry(registry)
    counts, sums = _by(s, "playrec_request_seconds_count", "route"), _by(s, "playrec_request_seconds_sum", "route")
    buckets: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for labels, value in s.get("playrec_request_seconds_bucket", ()):
        buckets[labels.get("route", "")].append((float(labels["le"]), value))
    out = {}
    for route, count in sorted(counts.items()):
        if count <= 0:
            continue
        out[route] = {
            "requests": int(count),
            "mean_s": sums.get(route, 0.0) / count,
            "p50_s": histogram_quantile(0.5, buckets[route]),
            "p95_s": histogram_quantile(0.95, buckets[route]),
        }
    return out


class MetricSampler:
    """The last WINDOW_S of `sample_metrics`, one sample per `tick` (a worker timer every SAMPLE_S)."""

    def __init__(self, registry: Any, window_s: float = WINDOW_S, every_s: float = SAMPLE_S) -> None:
        self.registry = registry
        self.every_s = every_s
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=int(window_s / every_s) + 1)

    def tick(self) -> None:
        self.samples.append(sample_metrics(self.registry))

    def window(self) -> list[dict[str, Any]]:
        """The kept samples and a fresh one (taken now), oldest first."""
        return [*self.samples, sample_metrics(self.registry)]


# -- the model store ------------------------------------------------------------------------------
def version_summary(store: Any, version: str) -> dict[str, Any]:
    """What the console shows of one version: its manifest's input, size and metrics, and the figures of
    its retrain report (report.json: the gate's decision, the live model it was judged against)."""
    try:
        manifest = store.read_manifest(version)
    except ModelStoreError as exc:
        return {"version": version, "error": str(exc)}
    source = manifest.get("input") or {}
    metrics = manifest.get("metrics") or {}
    report = read_report(store, version, manifest)
    gate = report.get("gate") or (manifest.get("report") or {}).get("gate")
    return {
        "version": version,
        "created_at": manifest.get("created_at"),
        "users": (manifest.get("rows") or {}).get("users"),
        "tracks": (manifest.get("rows") or {}).get("items"),
        "factors": manifest.get("factors"),
        "plays": source.get("plays"),
        "source": source.get("source") or ("file" if source.get("path") else None),
        "path": source.get("path"),
        "topic": source.get("topic"),
        "watermark": source.get("offsets"),
        "records": source.get("records"),
        "holdout": metrics.get("holdout"),
        "metrics": metrics.get("model"),
        "popularity": metrics.get("popularity"),
        "gate": gate,
        "judged_against": report.get("live_version"),
        "judged_against_metrics": report.get("live"),
        "parameters": manifest.get("parameters"),
        "engine": (manifest.get("training") or {}).get("engine"),
    }


def read_report(store: Any, version: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The version's report.json (written by a retrain), or {} when it has none or it cannot be read."""
    if "report.json" not in (manifest.get("files") or {}):
        return {}
    path = store.models / version / "report.json"
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            return {}
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return {}
    return body if isinstance(body, dict) else {}


class ModelSummaries:
    """`version_summary` of every version in the store, each read once (a published version never changes)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._cache: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # requests read in executor threads

    def read(self) -> tuple[list[dict[str, Any]], str | None]:
        """(summaries newest first, CURRENT or None); reads the disk: call it off the event loop."""
        with self._lock:
            return self._read()

    def _read(self) -> tuple[list[dict[str, Any]], str | None]:
        versions = self.store.versions()
        for gone in set(self._cache) - set(versions):  # pruned
            del self._cache[gone]
        for version in versions:
            if version not in self._cache or "error" in self._cache[version]:
                self._cache[version] = version_summary(self.store, version)
        try:
            current = self.store.current_version()
        except ModelStoreError:
            current = None
        return [self._cache[v] for v in reversed(versions)], current


# -- the routes -----------------------------------------------------------------------------------
def register_console_views(worker: StreamWorker, api: type) -> None:
    """Attach the page and its JSON routes to `worker.app`; `api` is stream.web's view base (errors, timing)."""
    app = worker.app
    sampler = MetricSampler(worker.metrics.registry)
    summaries = ModelSummaries(worker.store)
    page = asset("console.html")
    files = {route: (asset(name), kind) for route, (name, kind) in ASSETS.items()}

    @app.timer(SAMPLE_S)
    async def sample_metrics_for_console() -> None:
        sampler.tick()

    def secured(response: web.Response) -> web.Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    class Console(api):
        route_name = CONSOLE_ROUTE

    class Page(Console):
        async def get(self, request: web.Request) -> web.Response:
            return await self.guarded(request, self.answer)

        async def answer(self, request: web.Request) -> web.Response:
            return secured(self.text(page, content_type="text/html"))

    class Asset(Console):
        content: str
        content_type: str

        async def get(self, request: web.Request) -> web.Response:
            return await self.guarded(request, self.answer)

        async def answer(self, request: web.Request) -> web.Response:
            return secured(self.text(self.content, content_type=self.content_type))

    replace_faust_index(app)
    for path, name in (("/", "console_index"), ("/console", "console_page")):
        app.page(path, name=name)(type(name, (Page,), {}))
    for path, (body, kind) in files.items():
        name = "console_" + path.rsplit("/", 1)[1].replace(".", "_")
        app.page(path, name=name)(type(name, (Asset,), {"content": body, "content_type": kind}))

    @app.page("/console/live.json")
    class Live(Console):
        async def get(self, request: web.Request) -> web.Response:
            return await self.guarded(request, self.answer)

        async def answer(self, request: web.Request) -> web.Response:
            ready, reason = worker.readiness()
            live = worker.live
            body = {
                "worker": str(app.conf.canonical_url),
                "ready": ready,
                "reason": reason,
                "version": live.version if live else None,
                "partitions": worker.assigned_partitions(),
                "interval_s": SAMPLE_S,
                "samples": sampler.window(),
                "routes": route_latencies(worker.metrics.registry),
            }
            return secured(self.json(body))

    @app.page("/console/model.json")
    class ModelView(Console):
        async def get(self, request: web.Request) -> web.Response:
            return await self.guarded(request, self.answer)

        async def answer(self, request: web.Request) -> web.Response:
            versions, current = await asyncio.get_running_loop().run_in_executor(None, summaries.read)
            live = worker.live
            body = {
                "serving": live.version if live else None,
                "current": current,
                "new_tracks": len(live.new_ids) if live else 0,
                "versions": versions,
            }
            return secured(self.json(body))

    @app.page("/console/workers.json")
    class Workers(Console):
        async def get(self, request: web.Request) -> web.Response:
            return await self.guarded(request, self.answer)

        async def answer(self, request: web.Request) -> web.Response:
            return secured(self.json(workers_summary(worker)))

    @app.page("/console/takedowns.json")
    class Takedowns(Console):
        async def get(self, request: web.Request) -> web.Response:
            return await self.guarded(request, self.answer)

        async def answer(self, request: web.Request) -> web.Response:
            down = sorted(t for t, taken_down in worker.takedowns.items() if taken_down)
            listed = [{"track": t, "reason": worker.takedown_reasons.get(t, "")} for t in down[:MAX_LISTED_TAKEDOWNS]]
            return secured(self.json({"total": len(down), "tracks": listed}))


FAUST_INDEX = "faust.web.apps.production_index:blueprint"


def replace_faust_index(app: Any) -> None:
    """Take faust's own `GET /` (`{"status": "OK"}`, a blueprint mounted when the web server starts) out
    of the app's blueprints, so that `/` is the console's (faust-streaming is pinned: stream/versions.py)."""
    manager = app.web.blueprints
    enabled = getattr(manager, "_enabled", None)
    if not isinstance(enabled, list):
        raise RuntimeError("faust's BlueprintManager has no `_enabled` list: check the faust-streaming version")
    manager._enabled = [(prefix, bp) for prefix, bp in enabled if bp != FAUST_INDEX]


def workers_summary(worker: StreamWorker) -> dict[str, Any]:
    """The consumer group's members as faust's assignor last distributed the partitions (every member
    receives the whole distribution), each with the partitions of `plays` it owns; this worker's own
    assignment, generation and per-partition lag from its consumer."""
    app, topic = worker.app, worker.topics.plays
    me = str(app.conf.canonical_url)
    try:
        distribution = app.router.external_topics_metadata()
    except Exception:  # no assignment received yet
        distribution = {}
    members = {str(url): sorted(topics.get(topic, [])) for url, topics in distribution.items()}
    members[me] = worker.assigned_partitions()  # this worker's consumer is the authority on its own
    lag = {
        labels["partition"]: int(v)
        for labels, v in read_registry(worker.metrics.registry).get("playrec_consumer_partition_lag", ())
    }
    return {
        "self": me,
        "topic": topic,
        "partitions": worker.settings.partitions,
        "generation": app.consumer_generation_id,
        "rebalancing": bool(app.rebalancing),
        "members": [{"url": url, "self": url == me, "partitions": parts} for url, parts in sorted(members.items())],
        "lag": lag,
    }
