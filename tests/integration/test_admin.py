"""Admin routes on the real broker: token checks, take-downs reaching every worker (also one started
later), restore, and model reloads that accept only the store's own versions."""

from __future__ import annotations

import json

import pytest

from batch.als import AlsParams

from ..faults.harness import publish_model, publish_version, unique_names
from .workers import WorkerProcess, wait_for

pytestmark = pytest.mark.integration

TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def top_tracks(worker: WorkerProcess, user: str = "u0") -> list[str]:
    status, body = worker.request(f"/users/{user}/recommendations?k=10")
    return [item["track"] for item in body["items"]] if status == 200 else []


def test_admin_routes(kafka_bootstrap, tmp_path):
    store = publish_model(tmp_path)
    prefix, app_id = unique_names()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    a = WorkerProcess(
        kafka_bootstrap, store.root, prefix, app_id, tmp_path / "a", session_timeout=6, admin_token_file=token_file
    )
    workers = [a]
    try:
        a.wait_ready(120)
        track = top_tracks(a)[0]
        path = f"/admin/tracks/{track}/takedown"

        status, body = a.request(path, "PUT")
        assert status == 401 and "Authorization: Bearer" in body["error"]
        assert a.request(path, "PUT", headers={"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
        assert a.request(path, "PUT", headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
        assert a.request("/admin/takedowns")[0] == 401
        assert a.request("/admin/tracks/bad%00id/takedown", "PUT", headers=AUTH)[0] == 400

        status, body = a.request(path, "PUT", json.dumps({"reason": "licence ended"}).encode(), AUTH)
        assert (status, body) == (202, {"track": track, "taken_down": True})
        wait_for(lambda: a.request(f"/tracks/{track}/similar")[0] == 404, 30, "the take-down to apply")
        assert track not in top_tracks(a) and len(top_tracks(a)) == 10
        assert a.request("/admin/takedowns", headers=AUTH) == (200, {"tracks": [track]})

        # a worker started later (without a token: its admin routes are off) applies it before it is ready
        b = WorkerProcess(kafka_bootstrap, store.root, prefix, app_id, tmp_path / "b", session_timeout=6)
        workers.append(b)
        b.wait_ready(120)
        assert b.request(f"/tracks/{track}/similar")[0] == 404
        status, body = b.request(path, "DELETE", headers=AUTH)
        assert status == 403 and "disabled" in body["error"]

        assert a.request(path, "DELETE", headers=AUTH) == (202, {"track": track, "taken_down": False})
        wait_for(lambda: b.request(f"/tracks/{track}/similar")[0] == 200, 30, "the restore to reach worker b")
        wait_for(lambda: track in top_tracks(a), 30, "the track to be recommended again")

        # reload: only versions the store lists, never a path
        for version in ("../../etc/passwd", "/etc", "20990101T000000.000000Z-abcdef", 7):
            status, body = a.request("/admin/model/reload", "POST", json.dumps({"version": version}).encode(), AUTH)
            assert status == 404, (version, status, body)
        new = publish_version(store, plays_seed=6, params=AlsParams(factors=8, iterations=2, seed=4))
        status, body = a.request("/admin/model/reload", "POST", None, AUTH)
        assert (status, body) == (200, {"version": new})
    finally:
        for worker in workers:
            worker.stop()


def test_admin_routes_fuzz_never_answer_5xx(kafka_bootstrap, tmp_path):
    """Property-based admin requests (random ids, bodies and Authorization headers): never 5xx."""
    import urllib.parse

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    store = publish_model(tmp_path)
    prefix, app_id = unique_names()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    worker = WorkerProcess(kafka_bootstrap, store.root, prefix, app_id, tmp_path / "w", admin_token_file=token_file)
    try:
        worker.wait_ready(120)
        ids = st.text(min_size=1, max_size=300).filter(lambda t: t not in (".", ".."))
        headers = st.one_of(
            st.just(AUTH),
            st.builds(
                lambda h: {"Authorization": h}, st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E))
            ),
        )
        bodies = st.one_of(
            st.none(),
            st.binary(max_size=200),
            st.builds(
                lambda v: json.dumps(v).encode(),
                st.dictionaries(st.sampled_from(["version", "reason", "x"]), st.one_of(st.text(), st.integers())),
            ),
        )

        def check(status, body) -> None:
            assert 0 < status < 500, (status, body)
            assert "Traceback" not in str(body)

        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
        @given(track=ids, auth=headers, body=bodies)
        def run(track, auth, body):
            path = f"/admin/tracks/{urllib.parse.quote(track, safe='')}/takedown"
            check(*worker.request(path, "PUT", body, auth))
            check(*worker.request(path, "DELETE", None, auth))
            check(*worker.request("/admin/model/reload", "POST", body, auth))
            check(*worker.request("/admin/takedowns", "GET", None, auth))

        run()
        assert worker.request("/admin/model/reload", "POST", b"x" * 10_000, AUTH)[0] == 400
    finally:
        worker.stop()
