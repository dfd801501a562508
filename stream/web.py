"""HTTP API of a stream worker (faust web, JSON), DESIGN.md section 3.

    GET  /users/{user}/recommendations?k=10&exclude_streamed=true
    GET  /users/{user}/recommendations/{track}/explanation
    GET  /users/{user}/plays
    GET  /tracks/{track}/similar?k=10
    POST /recommendations            {"tracks": [...]} or {"plays": {track: count}}, "k": 10
    GET  /health  /ready  /metrics
    GET  /openapi.json                   an OpenAPI 3 document of every route (stream/openapi.py)
    GET  /  /console  /console/*         the operator's console (stream/console.py, docs/CONSOLE.md)

User routes are answered by the worker that owns the user's partition; a request reaching another
worker is forwarded there. Unknown tracks are 404, bad parameters 400 with a message.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from faust import web

from batch.serving import UnknownIdError, UnknownTrackError

if TYPE_CHECKING:
    from stream.worker import StreamWorker

log = logging.getLogger(__name__)

MAX_K = 500
MAX_BODY_BYTES = 64 * 1024
MAX_TRACKS = 1000
ROUTED_HEADER = "X-Playrec-Routed"


class NotFoundError(LookupError):
    """An explicit miss that answers 404 (an unknown user for an explanation); any other KeyError is a bug."""


class BadRequestError(ValueError):
    """A request parameter is invalid (400)."""


def parse_k(request: web.Request, default: int = 10) -> int:
    text = request.query.get("k")
    if text is None:
        return default
    try:
        k = int(text)
    except ValueError:
        raise BadRequestError(f"k must be an integer between 1 and {MAX_K}, got {text[:40]!r}") from None
    if not 1 <= k <= MAX_K:
        raise BadRequestError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def parse_bool(request: web.Request, name: str, default: bool) -> bool:
    text = request.query.get(name)
    if text is None:
        return default
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise BadRequestError(f"{name} must be true or false, got {text[:40]!r}")


def register_views(worker: StreamWorker) -> None:
    """Attach the API (and the admin routes, stream.admin) to `worker.app`."""
    from stream.admin import register_admin_views
    from stream.console import register_console_views
    from stream.openapi import openapi_document

    register_admin_views(worker)
    app = worker.app
    metrics = worker.metrics

    def items(scored: list) -> list[dict[str, Any]]:
        return [{"track": s.track, "score": round(float(s.score), 6)} for s in scored]

    class Api(web.View):
        route_name = "api"

        def fail(self, status: int, message: str) -> web.Response:
            return self.json({"error": message, "status": status}, status=status)

        async def guarded(self, request: web.Request, handler: Any, *args: Any) -> web.Response:
            started = time.perf_counter()
            try:
                return await handler(request, *args)
            except BadRequestError as exc:
                return self.fail(400, str(exc))
            except (UnknownIdError, NotFoundError) as exc:  # explicit misses only: a stray KeyError is a bug
                return self.fail(404, str(exc.args[0] if exc.args else exc))
            except NotReadyError as exc:
                return self.fail(503, str(exc))
            except Exception:  # a bug: logged with its traceback here, never sent to the client
                log.exception("%s %s failed", request.method, request.path)
                return self.fail(500, "internal error; the worker log has the details")
            finally:
                metrics.request_seconds.labels(self.route_name).observe(time.perf_counter() - started)

        async def routed(self, request: web.Request, user: str, handler: Any, *args: Any) -> web.Response:
            """Serve here if this worker owns `user`, else forward to the owner. A request that says it was
            routed already (ROUTED_HEADER, set by `forward`) is never forwarded again, but it is served only
            by the owner: the header cannot make a worker answer from partitions it does not hold."""
            try:
                owner = app.router.key_store(worker.users.name, user.encode())
            except Exception:  # no assignment yet (starting or rebalancing)
                return self.fail(503, "partitions are being assigned; retry shortly")
            if (owner.host, owner.port) != (worker.settings.host, worker.settings.port):
                if request.headers.get(ROUTED_HEADER):
                    return self.fail(
                        503,
                        f"this worker does not own user {user!r} (partitions moved, or {ROUTED_HEADER} was "
                        "set by the client); retry without the header",
                    )
                return await self.forward(request, owner)
            return await self.guarded(request, handler, user, *args)

        async def forward(self, request: web.Request, owner: Any) -> web.Response:
            url = request.url.with_host(owner.host).with_port(owner.port)
            headers = {ROUTED_HEADER: "1"}
            try:
                async with app.http_client.request(
                    request.method, url, headers=headers, data=await request.read()
                ) as response:
                    body = await response.read()
                    return self.bytes(body, content_type=response.content_type, status=response.status)
            except Exception as exc:  # the owner is down or restarting
                log.warning("cannot route %s to %s: %s", request.path, owner, exc)
                return self.fail(503, "the worker owning this user is not reachable; retry shortly")

    def live_model():
        live = worker.live
        if live is None:
            raise NotReadyError("no model loaded yet")
        if not worker.takedown_reader.caught_up.is_set():  # until then a taken-down track could be served
            raise NotReadyError("reading take-downs; retry in a moment")
        return live

    def streamed_counts(user: str) -> dict[str, int]:
        return worker.user_state(user).counts

    @app.page("/users/{user}/recommendations")
    class UserRecommendations(Api):
        route_name = "user_recommendations"

        async def get(self, request: web.Request, user: str) -> web.Response:
            return await self.routed(request, user, self.answer)

        async def answer(self, request: web.Request, user: str) -> web.Response:
            k = parse_k(request)
            exclude_streamed = parse_bool(request, "exclude_streamed", True)
            live = live_model()
            counts = streamed_counts(user)
            vector, source = worker.serving_vector(live, user, counts)
            exclude = set(live.full_counts(user, counts)) if exclude_streamed else set()
            recs = live.popular_for(k, exclude) if vector is None else live.recommend_vector(vector, k, exclude)
            return self.json({"user": user, "source": source, "version": live.version, "items": items(recs)})

    @app.page("/users/{user}/plays")
    class UserPlays(Api):
        route_name = "user_plays"

        async def get(self, request: web.Request, user: str) -> web.Response:
            return await self.routed(request, user, self.answer)

        async def answer(self, request: web.Request, user: str) -> web.Response:
            return self.json({"user": user, "plays": streamed_counts(user)})

    @app.page("/users/{user}/recommendations/{track}/explanation")
    class Explanation(Api):
        route_name = "explanation"

        async def get(self, request: web.Request, user: str, track: str) -> web.Response:
            return await self.routed(request, user, self.answer, track)

        async def answer(self, request: web.Request, user: str, track: str) -> web.Response:
            live = live_model()
            if track not in live:
                raise UnknownTrackError(f"unknown track {track!r}")
            full = live.full_counts(user, streamed_counts(user))
            if not any(t in live for t in full):
                raise NotFoundError(f"user {user!r} has no streams of known tracks to explain from")
            body = live.explain_counts(full, track)
            return self.json({"user": user, "version": live.version, **body})

    @app.page("/tracks/{track}/similar")
    class Similar(Api):
        route_name = "similar"

        async def get(self, request: web.Request, track: str) -> web.Response:
            return await self.guarded(request, self.answer, track)

        async def answer(self, request: web.Request, track: str) -> web.Response:
            k = parse_k(request)
            live = live_model()
            return self.json({"track": track, "version": live.version, "items": items(live.similar(track, k))})

    @app.page("/recommendations")
    class Anonymous(Api):
        route_name = "anonymous"

        async def post(self, request: web.Request) -> web.Response:
            return await self.guarded(request, self.answer)

        async def answer(self, request: web.Request) -> web.Response:
            k = parse_k(request)
            raw = await request.content.read(MAX_BODY_BYTES + 1)
            if len(raw) > MAX_BODY_BYTES:
                raise BadRequestError(f"request body exceeds {MAX_BODY_BYTES} bytes")
            plays = parse_anonymous(raw)
            live = live_model()
            vector = live.fold_in(plays)
            if vector is not None:
                recs, source = live.recommend_vector(vector, k, set(plays)), "fold-in"
            else:
                recs, source = live.popular_for(k, set(plays)), "popularity"
            unknown = sorted(t for t in plays if t not in live)[:50]
            return self.json(
                {"source": source, "version": live.version, "unknown_tracks": unknown, "items": items(recs)}
            )

    @app.page("/health")
    class Health(Api):
        async def get(self, request: web.Request) -> web.Response:
            return self.json({"status": "ok"})

    @app.page("/ready")
    class Ready(Api):
        async def get(self, request: web.Request) -> web.Response:
            ready, reason = worker.readiness()
            live = worker.live
            body = {
                "ready": ready,
                "reason": reason,
                "version": live.version if live else None,
                "partitions": worker.assigned_partitions(),
                "restoring": worker.source_replay.restoring(),
            }
            return self.json(body, status=200 if ready else 503)

    @app.page("/metrics")
    class Metrics(Api):
        async def get(self, request: web.Request) -> web.Response:
            return self.bytes(metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/openapi.json")
    class OpenApi(Api):
        async def get(self, request: web.Request) -> web.Response:
            return self.json(openapi_document())

    register_console_views(worker, Api)


class NotReadyError(RuntimeError):
    """The worker cannot answer yet (503)."""


def parse_anonymous(raw: bytes) -> dict[str, float]:
    """`{"tracks": [...]}` (one stream each) or `{"plays": {track: count}}` -> {track: count}."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError('body must be a JSON object: {"tracks": [...]} or {"plays": {"track": count}}')
    if "plays" in body:
        plays = body["plays"]
        if not isinstance(plays, dict):
            raise BadRequestError('"plays" must be an object of track -> count')
        out = {}
        for track, count in plays.items():
            if isinstance(count, bool) or not isinstance(count, int | float) or not 0 <= count < 1e9:
                raise BadRequestError(f"play count of {str(track)[:60]!r} must be a number in [0, 1e9)")
            out[str(track)] = float(count)
    elif "tracks" in body:
        tracks = body["tracks"]
        if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
            raise BadRequestError('"tracks" must be a list of track ids')
        out = {}
        for track in tracks:
            out[track] = out.get(track, 0.0) + 1.0
    else:
        raise BadRequestError('body needs "tracks" (a list) or "plays" (an object)')
    if not out:
        raise BadRequestError("no tracks given")
    if len(out) > MAX_TRACKS:
        raise BadRequestError(f"at most {MAX_TRACKS} distinct tracks per request")
    return out
