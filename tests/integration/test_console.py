"""The operator's console in a real headless Chromium (Chrome DevTools protocol, tests/integration/browser.py),
against two real workers on the real broker: a model trained from a file, plays streamed, a real gated
retrain publishing a second version, then the page loaded while plays keep streaming.

Checks that the charts and tiles hold the worker's real figures, the model panel the retrain's, the
workers table each worker's partitions; that a user lookup (routed to the user's owner) shows the
user's counted plays and explained recommendations and renders a hostile id as text; that a track
lookup answers and a take-down needs the token. Nothing may be fetched from another origin and the
page may log no error. A screenshot is taken every run; with PLAYREC_CONSOLE_SCREENSHOT=path it is also
written there (docs/img/console.png for the README: `make screenshot`).
"""

from __future__ import annotations

import json
import os
import struct
import time
import urllib.request
from pathlib import Path

import pytest

from batch.als import AlsParams
from batch.model_store import ModelStore
from batch.retrain import RetrainConfig, retrain_once
from batch.training import train_and_publish
from stream.announce import announce_model
from stream.events import encode_play
from stream.partitioning import KeyPartitioner

from ..faults.harness import N_MODEL_USERS, N_TRACKS, PARTITIONS, Replay, play_log, unique_names
from ..unit.synthetic import random_plays, synthetic_counts
from .browser import Browser, BrowserError, ensure_chromium
from .workers import ROOT, WorkerProcess, wait_for

pytestmark = pytest.mark.integration

TOKEN = "console-admin-token-0123456789"
PARAMS = AlsParams(factors=8, iterations=4, seed=3)
#: A user id that is HTML (ids are user data): the page must show it as text, never parse it.
HOSTILE_USER = '<img src=x onerror="window.pwned=1">&amp;"\''
HOSTILE_TRACK = "<script>window.pwned=2</script>"
HOSTILE_TRACKS = ("t1", "t2", "t3", "t5", "t8", HOSTILE_TRACK)
DEAD = 5


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        return ensure_chromium()
    except BrowserError as exc:
        pytest.fail(str(exc), pytrace=False)


def js(expression: str) -> str:
    """`expression` with `$(sel)` / `$$(sel)` shorthands for querySelector(All)."""
    return (
        "(() => { const $ = (s) => document.querySelector(s); "
        "const $$ = (s) => [...document.querySelectorAll(s)]; " + f"return ({expression}); }})()"
    )


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_console_in_a_real_browser(kafka_bootstrap, tmp_path, chromium):
    began = time.monotonic()
    store = ModelStore(tmp_path / "store")
    counts = synthetic_counts(random_plays(N_MODEL_USERS, N_TRACKS, 0.08, seed=5))
    v1 = train_and_publish(counts, store, PARAMS, holdout=0.2, show_progress=False).version
    prefix, app_id = unique_names()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    workers = [
        WorkerProcess(
            kafka_bootstrap, store.root, prefix, app_id, tmp_path / name, session_timeout=6, admin_token_file=token_file
        )
        for name in ("a", "b")
    ]
    a = workers[0]
    replays: list[Replay] = []
    try:
        for worker in workers:
            worker.wait_ready(120)
        wait_for(
            lambda: all(len((w.ready() or {}).get("partitions", ())) == 4 for w in workers), 60, "4 + 4 partitions"
        )
        owned = {w.port: w.ready()["partitions"] for w in workers}

        # a few thousand plays (and a hostile listener), every one counted
        log = play_log(3000, seed=11)
        now = int(time.time() * 1000)
        hostile = [encode_play(HOSTILE_USER, t, now + i, 100_000) for i, t in enumerate(HOSTILE_TRACKS)]
        partition_of = KeyPartitioner(PARTITIONS)
        # records that are no play event, on worker a's partitions: dead letters
        keys = [k for k in (f"bad-{i}".encode() for i in range(200)) if partition_of(k) in owned[a.port]][:DEAD]
        garbage = [(key, b"\xc1 not msgpack") for key in keys]
        replays.append(Replay(kafka_bootstrap, prefix + "plays", log.records + hostile + garbage, rate=1500).start())
        expected = {**log.expected, HOSTILE_USER: dict.fromkeys(HOSTILE_TRACKS, 1)}
        a_streams = sum(sum(c.values()) for user, c in expected.items() if partition_of(user.encode()) in owned[a.port])
        wait_for(lambda: a.metric("playrec_streams_counted_total") >= a_streams, 60, "worker a to count its streams")
        wait_for(lambda: a.metric("playrec_dead_letters_total") >= DEAD, 60, "worker a to dead-letter the bad records")

        # a real retrain: snapshot of the workers' changelog, gate against v1, report, publish, announce
        outcome = retrain_once(
            RetrainConfig(
                store=store,
                bootstrap=kafka_bootstrap,
                app_id=app_id,
                params=PARAMS,
                tolerance=0.9,
                forest=None,
                announce=lambda version: announce_model(kafka_bootstrap, version, store.root, topic_prefix=prefix),
            )
        )
        assert outcome.published, outcome.reason
        v2 = outcome.version
        for worker in workers:
            wait_for(lambda w=worker: (w.ready() or {}).get("version") == v2, 60, f"worker {worker.port} to serve {v2}")
        # plays keep streaming while the page is open: events/s is live
        later = play_log(20_000, seed=12)
        replays.append(Replay(kafka_bootstrap, prefix + "plays", later.records, rate=300).start())
        status, text = a.request("/")
        assert status == 200 and "console.js" in text, "GET / serves the console"
        setup_s = time.monotonic() - began

        with Browser(chromium, tmp_path / "chromium") as browser:
            browser.navigate(a.url("/console"))
            # live: tiles and charts with the worker's real figures
            browser.wait_for(js("Number($('#tile-events-rate').dataset.value) > 0"), 30, "events/s above 0")
            browser.wait_for(js(f"Number($('#tile-streams').dataset.value) >= {a_streams}"), 30, "the streams counted")
            browser.wait_for(js("Number($('#tile-fold-ins').dataset.value) > 0"), 30, "users folded in")
            browser.wait_for(js(f"Number($('#tile-dead-letters').dataset.value) === {DEAD}"), 30, "the dead letters")
            charts = browser.wait_for(
                js(
                    "$$('svg.chart').every((c) => Number(c.dataset.points) >= 2) && "
                    "Object.fromEntries($$('svg.chart').map((c) => [c.id, [Number(c.dataset.max), c.dataset.last]]))"
                ),
                30,
                "every chart to have points",
            )
            assert charts["chart-events"][0] > 0, charts
            assert charts["chart-fold-ins"][0] > 0, charts
            assert charts["chart-fold-in-latency"][0] > 0, charts
            dead_legend = browser.evaluate(
                js("$$('#chart-dead-letters text.legend').map((t) => t.textContent.split(' ')[0])")
            )
            assert dead_legend == ["all", "undecodable"], dead_legend
            # (the chart keeps partitions the worker held earlier in its window, before worker b joined)
            lag_legend = browser.evaluate(js("$$('#chart-lag text.legend').map((t) => t.textContent.split(' ')[0])"))
            assert {f"p{p}" for p in owned[a.port]} <= set(lag_legend), lag_legend
            assert browser.evaluate(js("$('#status').textContent")) == "ready"

            # the model: the retrain's version, figures and gate decision, against v1
            browser.wait_for(js(f"$('#model-version').textContent === {json.dumps(v2)}"), 30, "the model panel")
            versions = browser.wait_for(
                js("$$('#versions tbody tr[data-version]').map((r) => [...r.cells].map((c) => c.textContent))"),
                30,
                "the versions table",
            )
            assert [row[0] for row in versions] == [v2, v1], versions
            for row, version in zip(versions, (v2, v1)):
                figures = store.read_manifest(version)["metrics"]["model"]
                assert row[4] == f"{figures['ndcg']:.4f}", (row, figures)
                assert row[3] == f"{figures['precision']:.4f}", (row, figures)
            assert "passes the gate" in versions[0][6] and versions[0][6] == outcome.reason, versions[0]
            watermark = browser.evaluate(js("$('#model-watermark').textContent"))
            offsets = store.read_manifest(v2)["input"]["offsets"]
            assert f"{sum(offsets.values()):,}" in watermark and "history+stream" in watermark, watermark

            # workers: each one's partitions, as faust's assignor distributed them
            members = browser.wait_for(
                js(
                    "$$('#workers-table tbody tr[data-url]').length === 2 && "
                    "$$('#workers-table tbody tr').map((r) => [r.dataset.url, r.dataset.partitions])"
                ),
                30,
                "both workers in the table",
            )
            lag_rows = browser.wait_for(
                js("$$('#lag-table tbody tr').map((r) => Number(r.cells[0].textContent))"), 30, "lag"
            )
            assert lag_rows == owned[a.port], lag_rows
            assert dict(members) == {
                f"http://127.0.0.1:{w.port}": ",".join(map(str, owned[w.port])) for w in workers
            }, members

            # a user lookup: a hostile id, typed in and answered (by its owner, forwarded if need be), as text
            browser.type("#user-id", HOSTILE_USER)
            browser.press_enter()
            browser.wait_for(js("$$('#user-recs td span[data-done]').length === 10"), 30, "recommendations explained")
            plays = browser.evaluate(
                js("$$('#user-plays tbody tr').map((r) => [r.cells[0].textContent, r.cells[1].textContent])")
            )
            assert sorted(plays) == sorted([t, "1"] for t in HOSTILE_TRACKS), plays
            recs = browser.evaluate(
                js("$$('#user-recs tbody tr').map((r) => [r.dataset.source, r.cells[3].textContent])")
            )
            assert {source for source, _ in recs} == {"fold-in"}, recs
            assert all(any(t in because for t in HOSTILE_TRACKS) for _, because in recs), recs
            assert browser.evaluate(js("[$$('img').length, $$('script').length, window.pwned === undefined]")) == [
                0,
                1,
                True,
            ], "an id was parsed as HTML"
            assert HOSTILE_USER in browser.evaluate(js("$('#user-status').textContent + $('#user-id').value"))

            # a track lookup
            browser.type("#track-id", "t1")
            browser.press_enter()
            similar = browser.wait_for(
                js("$$('#similar tbody tr[data-track]').map((r) => r.dataset.track)"), 30, "similar"
            )
            assert len(similar) == 10 and "t1" not in similar, similar

            # a take-down: refused without the right token, applied by every worker with it
            target = browser.evaluate(js("$('#user-recs tbody tr').dataset.track"))
            browser.type("#takedown-track", target)
            browser.type("#takedown-reason", "licence ended")
            browser.type("#admin-token", "wrong-token-0123456789")
            browser.click("#takedown-form button[type=submit]")
            browser.wait_for(js("$('#takedown-status').textContent.startsWith('401')"), 30, "the wrong token refused")
            browser.type("#admin-token", TOKEN)
            browser.click("#takedown-form button[type=submit]")
            browser.wait_for(js("$('#takedown-status').dataset.kind === 'ok'"), 30, "the take-down accepted")
            listed = browser.wait_for(
                js("$$('#takedowns-table tbody tr[data-track]').map((r) => [...r.cells].map((c) => c.textContent))"),
                30,
                "the take-down listed",
            )
            assert listed == [[target, "licence ended"]], listed
            for worker in workers:
                wait_for(lambda w=worker: w.request(f"/tracks/{target}/similar")[0] == 404, 30, "the take-down applied")

            # the user the README's screenshot shows: a stream listener with the most plays
            listener = max((u for u in log.expected if u.startswith("f")), key=lambda u: sum(log.expected[u].values()))
            browser.type("#user-id", listener)
            browser.press_enter()
            browser.wait_for(
                js("$$('#user-recs td span[data-done]').length === 10"), 30, "the listener's recommendations"
            )
            browser.wait_for(js("Number($('#tile-p95').dataset.value) > 0"), 30, "API latency measured")

            refused = f"status of 401 (Unauthorized) ({a.url('/admin/tracks/')}"  # the wrong token, above
            problems = [p for p in browser.problems() if refused not in p]
            assert problems == [], problems
            foreign = [url for url in browser.requests() if not url.startswith(a.url("/"))]
            assert foreign == [], f"the page fetched from elsewhere: {foreign}"
            target_path = os.environ.get("PLAYREC_CONSOLE_SCREENSHOT")
            if target_path:  # the README's picture: let the charts fill (a minute of samples) first
                browser.wait_for(js("Number($('#chart-events').dataset.points) >= 25"), 120, "a minute of samples")
            shot = browser.screenshot(tmp_path / "console.png", full_page=True)
            assert png_size(shot)[0] == 1280
        browser_s = time.monotonic() - began - setup_s
        if target_path:
            save_screenshot(shot, ROOT / target_path)
        print(f"console test: setup {setup_s:.1f} s, browser {browser_s:.1f} s")
    finally:
        for replay in replays:
            replay.stop()
        for worker in workers:
            worker.stop()


def save_screenshot(png: bytes, path: Path) -> None:
    """Write the screenshot as a small palette PNG (Pillow comes with matplotlib)."""
    import io

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)


def test_console_routes_answer_json_and_the_page_is_locked_down(kafka_bootstrap, tmp_path):
    """Without a browser: the JSON routes' shapes on a worker with no model yet, and the page's headers."""
    prefix, app_id = unique_names()
    worker = WorkerProcess(kafka_bootstrap, tmp_path / "empty-store", prefix, app_id, tmp_path / "w")
    try:
        wait_for(lambda: worker.request("/health")[0] == 200, 60, "the worker to answer")
        request = urllib.request.Request(worker.url("/console"))
        with urllib.request.urlopen(request, timeout=10) as response:
            headers = response.headers
            assert response.headers.get_content_type() == "text/html"
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert worker.request("/", "HEAD")[0] == 200 and worker.request("/console/console.js", "HEAD")[0] == 200
        model = worker.get("/console/model.json")
        assert model == {"serving": None, "current": None, "new_tracks": 0, "versions": []}
        live = worker.get("/console/live.json")
        assert live["version"] is None and live["ready"] is False and live["samples"][-1]["events"] == 0
        assert worker.get("/console/takedowns.json") == {"total": 0, "tracks": []}
        assert worker.get("/console/workers.json")["topic"] == prefix + "plays"
        assert worker.request("/console/nope.json")[0] == 404
        served = worker.get("/openapi.json")
        assert served["openapi"].startswith("3.") and "/console/live.json" in served["paths"]
    finally:
        worker.stop()
