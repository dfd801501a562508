"""Admin routes of a stream worker: everything that changes state, behind a bearer token.

    POST   /admin/model/reload              {"version": "..."} optional; default: the store's CURRENT
    PUT    /admin/tracks/{track}/takedown   {"reason": "..."} optional
    DELETE /admin/tracks/{track}/takedown
    GET    /admin/takedowns

Every request needs `Authorization: Bearer <token>` with the token the worker was started with
(`--admin-token-file` or `PLAYREC_ADMIN_TOKEN`); a worker started without one answers 403 to all of
them, a missing or wrong token is 401. Take-downs go to the compacted `track-takedowns` topic, so
every worker (and every later one) applies them. Nothing from a request is used as a path: a model
version must be one of the store's listed versions.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

from faust import web

from stream.events import id_problem

if TYPE_CHECKING:
    from stream.worker import StreamWorker

log = logging.getLogger(__name__)

MAX_ADMIN_BODY_BYTES = 4096
MAX_REASON_CHARS = 500


class AdminError(Exception):
    """An admin request that cannot be served: (status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_token(configured: str | None, authorization: str | None) -> None:
    """Raise AdminError unless `authorization` is `Bearer <configured>` (constant-time comparison)."""
    if configured is None:
        raise AdminError(
            403, "admin routes are disabled on this worker: start it with --admin-token-file or PLAYREC_ADMIN_TOKEN"
        )
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), configured.encode()):
        raise AdminError(401, "admin routes need the header `Authorization: Bearer <admin token>`")


async def read_json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.content.read(MAX_ADMIN_BODY_BYTES + 1)
    if len(raw) > MAX_ADMIN_BODY_BYTES:
        raise AdminError(400, f"request body exceeds {MAX_ADMIN_BODY_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AdminError(400, "body must be a JSON object") from None
    if not isinstance(body, dict):
        raise AdminError(400, "body must be a JSON object")
    return body


def register_admin_views(worker: StreamWorker) -> None:
    """Attach the admin routes to `worker.app`."""
    app = worker.app

    class Admin(web.View):
        async def admin(self, request: web.Request, handler: Any, *args: Any) -> web.Response:
            try:
                check_token(worker.settings.admin_token, request.headers.get("Authorization"))
                return await handler(request, *args)
            except AdminError as exc:
                if exc.status == 401:
                    log.warning("admin: rejected %s %s from %s", request.method, request.path, request.remote)
                headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
                response = self.json({"error": str(exc), "status": exc.status}, status=exc.status)
                if headers:
                    response.headers.update(headers)
                return response
            except Exception:  # a bug: logged with its traceback here, never sent to the client
                log.exception("%s %s failed", request.method, request.path)
                return self.json({"error": "internal error; the worker log has the details", "status": 500}, status=500)

    def valid_track(track: str) -> str:
        problem = id_problem("track id", track)
        if problem:
            raise AdminError(400, problem)
        return track

    @app.page("/admin/model/reload")
    class Reload(Admin):
        async def post(self, request: web.Request) -> web.Response:
            return await self.admin(request, self.reload)

        async def reload(self, request: web.Request) -> web.Response:
            body = await read_json_body(request)
            version = body.get("version")
            if version is not None and (not isinstance(version, str) or version not in worker.store.versions()):
                raise AdminError(404, f"no model version {str(version)[:80]!r} in the store")
            log.warning("admin: model reload (%s) requested from %s", version or "CURRENT", request.remote)
            await worker._load_and_refold(version)
            live = worker.live
            if live is None or (version is not None and live.version != version):
                raise AdminError(409, f"could not load {version or 'CURRENT'}; see the worker log")
            return self.json({"version": live.version})

    @app.page("/admin/tracks/{track}/takedown")
    class Takedown(Admin):
        async def put(self, request: web.Request, track: str) -> web.Response:
            return await self.admin(request, self.take_down, track)

        async def delete(self, request: web.Request, track: str) -> web.Response:
            return await self.admin(request, self.restore, track)

        async def take_down(self, request: web.Request, track: str) -> web.Response:
            valid_track(track)
            reason = (await read_json_body(request)).get("reason", "")
            if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
                raise AdminError(400, f'"reason" must be a string of at most {MAX_REASON_CHARS} characters')
            log.warning("admin: take-down of track %r from %s (%s)", track, request.remote, reason)
            await worker.publish_takedown(track, True, reason)
            return self.json({"track": track, "taken_down": True}, status=202)

        async def restore(self, request: web.Request, track: str) -> web.Response:
            valid_track(track)
            log.warning("admin: restore of track %r from %s", track, request.remote)
            await worker.publish_takedown(track, False)
            return self.json({"track": track, "taken_down": False}, status=202)

    @app.page("/admin/takedowns")
    class Takedowns(Admin):
        async def get(self, request: web.Request) -> web.Response:
            return await self.admin(request, self.listing)

        async def listing(self, request: web.Request) -> web.Response:
            return self.json({"tracks": sorted(t for t, down in worker.takedowns.items() if down)})
