"""The OpenAPI 3 document of a worker's HTTP API, served at `GET /openapi.json`.

Written by hand beside the routes (stream/web.py, stream/admin.py, stream/console.py and faust's own
`/router` and `/table` blueprints); tests/unit/test_openapi.py checks that it lists exactly the routes
a worker registers, with their methods. faust answers `HEAD` on every path as well; it is not listed.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from stream.events import MAX_ID_CHARS
from stream.web import MAX_BODY_BYTES, MAX_K, MAX_TRACKS, ROUTED_HEADER

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _obj(required: list[str] | None = None, **properties: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        body["required"] = required
    return body


STRING = {"type": "string"}
INT = {"type": "integer"}
NUMBER = {"type": "number"}
BOOL = {"type": "boolean"}
NULLABLE_STRING = {"type": "string", "nullable": True}
ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}
COUNTS = {"type": "object", "additionalProperties": INT}


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": ID}


USER = _path("user", "user id (URL-encoded)")
TRACK = _path("track", "track id (URL-encoded)")
K = {
    "name": "k",
    "in": "query",
    "description": "number of tracks",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
}
EXCLUDE_STREAMED = {
    "name": "exclude_streamed",
    "in": "query",
    "description": "leave out the tracks the user streamed (history + stream): true/false, 1/0, yes/no",
    "schema": {"type": "boolean", "default": True},
}
ROUTED = {
    "name": ROUTED_HEADER,
    "in": "header",
    "description": "set by a worker forwarding the request to the user's owner; a request carrying it is never "
    "forwarded again, and answered 503 by a worker that does not own the user",
    "schema": STRING,
}

SERVING_ERRORS = {
    "400": _error("a bad parameter (k, exclude_streamed, body)"),
    "404": _error("unknown track (or user, for an explanation)"),
    "500": _error("a bug: the worker log has the traceback"),
    "503": _error("not ready: no model yet, reading take-downs, partitions being assigned, or the owner unreachable"),
}
ADMIN_ERRORS = {
    "400": _error("a bad track id or body"),
    "401": _error("no or a wrong bearer token (answered with WWW-Authenticate: Bearer)"),
    "403": _error("admin routes are off: the worker was started without an admin token"),
    "500": _error("a bug: the worker log has the traceback"),
}

SCHEMAS: dict[str, Any] = {
    "Error": _obj(["error", "status"], error=STRING, status=INT),
    "ScoredTrack": _obj(["track", "score"], track=STRING, score=NUMBER),
    "Recommendations": _obj(
        ["user", "source", "version", "items"],
        user=STRING,
        source={
            "type": "string",
            "enum": ["model", "fold-in", "popularity"],
            "description": "model: the model's own row (nothing streamed); fold-in: solved from history + "
            "streamed counts; popularity: no known track streamed",
        },
        version=STRING,
        items={"type": "array", "items": _ref("ScoredTrack")},
    ),
    "Plays": _obj(["user", "plays"], user=STRING, plays=COUNTS),
    "Explanation": _obj(
        ["user", "version", "track", "score", "contributions"],
        user=STRING,
        version=STRING,
        track=STRING,
        score=NUMBER,
        contributions={
            "type": "array",
            "description": "the user's streamed tracks that contribute most to the score (Hu et al. section 5)",
            "items": _obj(["track", "contribution", "plays"], track=STRING, contribution=NUMBER, plays=NUMBER),
        },
    ),
    "Similar": _obj(
        ["track", "version", "items"],
        track=STRING,
        version=STRING,
        items={"type": "array", "items": _ref("ScoredTrack")},
    ),
    "AnonymousRequest": {
        "oneOf": [
            _obj(["tracks"], tracks={"type": "array", "items": ID, "description": "one stream each"}),
            _obj(["plays"], plays={"type": "object", "additionalProperties": {"type": "number", "minimum": 0}}),
        ],
        "description": f"at most {MAX_TRACKS} distinct tracks and {MAX_BODY_BYTES} bytes",
    },
    "AnonymousRecommendations": _obj(
        ["source", "version", "unknown_tracks", "items"],
        source={"type": "string", "enum": ["fold-in", "popularity"]},
        version=STRING,
        unknown_tracks={"type": "array", "items": STRING, "description": "at most 50 tracks the model does not know"},
        items={"type": "array", "items": _ref("ScoredTrack")},
    ),
    "Ready": _obj(
        ["ready", "reason", "version", "partitions", "restoring"],
        ready=BOOL,
        reason=STRING,
        version=NULLABLE_STRING,
        partitions={"type": "array", "items": INT, "description": "partitions of plays this worker holds"},
        restoring={"type": "array", "items": INT, "description": "partitions being restored from the source topics"},
    ),
    "Takedown": _obj(["track", "taken_down"], track=STRING, taken_down=BOOL),
    "ConsoleSample": _obj(
        ["t", "events", "streams", "dead_letters", "user_fold_ins", "fold_in_runs", "requests", "lag"],
        t={"type": "number", "description": "unix time (s)"},
        events=NUMBER,
        streams=NUMBER,
        duplicates=NUMBER,
        forwarded=NUMBER,
        dead_letters={"type": "object", "additionalProperties": NUMBER, "description": "by reason kind"},
        user_fold_ins=NUMBER,
        track_fold_ins=NUMBER,
        fold_in_runs=NUMBER,
        fold_in_seconds=NUMBER,
        requests={"type": "number", "description": "API requests (the console's own left out)"},
        request_seconds=NUMBER,
        lag={"type": "object", "additionalProperties": INT, "description": "partition -> records behind"},
    ),
    "ConsoleLive": _obj(
        ["worker", "ready", "reason", "version", "partitions", "interval_s", "samples", "routes"],
        worker=STRING,
        ready=BOOL,
        reason=STRING,
        version=NULLABLE_STRING,
        partitions={"type": "array", "items": INT},
        interval_s=NUMBER,
        samples={
            "type": "array",
            "items": _ref("ConsoleSample"),
            "description": "cumulative counters, oldest first, the last taken at the request",
        },
        routes={
            "type": "object",
            "description": "route -> latency since start",
            "additionalProperties": _obj(
                ["requests", "mean_s"],
                requests=INT,
                mean_s=NUMBER,
                p50_s={"type": "number", "nullable": True},
                p95_s={"type": "number", "nullable": True},
            ),
        },
    ),
    "ModelVersion": _obj(
        ["version"],
        version=STRING,
        created_at=NULLABLE_STRING,
        users={"type": "integer", "nullable": True},
        tracks={"type": "integer", "nullable": True},
        factors={"type": "integer", "nullable": True},
        plays={"type": "integer", "nullable": True, "description": "(user, track) pairs trained on"},
        source={"type": "string", "nullable": True, "description": "stream, history+stream or file"},
        path=NULLABLE_STRING,
        topic=NULLABLE_STRING,
        watermark={
            "type": "object",
            "nullable": True,
            "additionalProperties": INT,
            "description": "changelog partition -> end offset the snapshot read to",
        },
        records={"type": "integer", "nullable": True},
        holdout={"type": "number", "nullable": True},
        metrics={"type": "object", "nullable": True, "description": "holdout metrics (precision, recall, ndcg, mpr)"},
        popularity={"type": "object", "nullable": True, "description": "the popularity baseline's holdout metrics"},
        gate={"type": "object", "nullable": True, "description": "the retrain gate's decision (published, reason)"},
        judged_against=NULLABLE_STRING,
        judged_against_metrics={"type": "object", "nullable": True},
        parameters={"type": "object", "nullable": True},
        engine=NULLABLE_STRING,
        error={"type": "string", "description": "set when the manifest cannot be read"},
    ),
    "ConsoleModel": _obj(
        ["serving", "current", "new_tracks", "versions"],
        serving=NULLABLE_STRING,
        current=NULLABLE_STRING,
        new_tracks=INT,
        versions={"type": "array", "items": _ref("ModelVersion"), "description": "newest first"},
    ),
    "ConsoleWorkers": _obj(
        ["self", "topic", "partitions", "members", "lag"],
        self=STRING,
        topic=STRING,
        partitions=INT,
        generation=INT,
        rebalancing=BOOL,
        members={
            "type": "array",
            "items": _obj(
                ["url", "self", "partitions"], url=STRING, self=BOOL, partitions={"type": "array", "items": INT}
            ),
        },
        lag={"type": "object", "additionalProperties": INT, "description": "this worker's partitions"},
    ),
    "ConsoleTakedowns": _obj(
        ["total", "tracks"],
        total=INT,
        tracks={"type": "array", "items": _obj(["track", "reason"], track=STRING, reason=STRING)},
    ),
}


def _get(summary: str, response: dict[str, Any], *, tags: list[str], parameters: list | None = None, **more: Any):
    op: dict[str, Any] = {"summary": summary, "tags": tags, "responses": {"200": response, **more.pop("errors", {})}}
    if parameters:
        op["parameters"] = parameters
    op.update(more)
    return op


def _text(description: str, media: str) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": STRING}}}


def _paths() -> dict[str, Any]:
    serving, admin, console, ops, faust = ["serving"], ["admin"], ["console"], ["operations"], ["faust"]
    bearer = [{"bearerAuth": []}]
    return {
        "/users/{user}/recommendations": {
            "get": _get(
                "Recommendations for a user (routed to the worker owning the user's partition)",
                _json(_ref("Recommendations"), "top-k tracks"),
                tags=serving,
                parameters=[USER, K, EXCLUDE_STREAMED, ROUTED],
                errors=SERVING_ERRORS,
            )
        },
        "/users/{user}/plays": {
            "get": _get(
                "The user's streamed play counts (>= 30 s) since the model",
                _json(_ref("Plays"), "counts per track"),
                tags=serving,
                parameters=[USER, ROUTED],
                errors=SERVING_ERRORS,
            )
        },
        "/users/{user}/recommendations/{track}/explanation": {
            "get": _get(
                "Why a track scores for a user: the streamed tracks that contribute most",
                _json(_ref("Explanation"), "the explanation"),
                tags=serving,
                parameters=[USER, TRACK, ROUTED],
                errors=SERVING_ERRORS,
            )
        },
        "/tracks/{track}/similar": {
            "get": _get(
                "Tracks closest to a track (cosine)",
                _json(_ref("Similar"), "similar tracks"),
                tags=serving,
                parameters=[TRACK, K],
                errors=SERVING_ERRORS,
            )
        },
        "/recommendations": {
            "post": _get(
                "Recommendations for an anonymous listener from their plays (fold-in)",
                _json(_ref("AnonymousRecommendations"), "top-k tracks"),
                tags=serving,
                parameters=[K],
                requestBody={"required": True, "content": {JSON: {"schema": _ref("AnonymousRequest")}}},
                errors=SERVING_ERRORS,
            )
        },
        "/health": {"get": _get("Liveness", _json(_obj(["status"], status=STRING), "the process answers"), tags=ops)},
        "/ready": {
            "get": _get(
                "Readiness: a model is live, partitions are assigned, tables recovered, take-downs read",
                _json(_ref("Ready"), "ready"),
                tags=ops,
                errors={"503": _json(_ref("Ready"), "not ready; `reason` says why")},
            )
        },
        "/metrics": {"get": _get("Prometheus metrics", _text("text exposition format 0.0.4", "text/plain"), tags=ops)},
        "/openapi.json": {"get": _get("This document", _json({"type": "object"}, "OpenAPI 3.0"), tags=ops)},
        "/admin/model/reload": {
            "post": _get(
                "Load a model version now (default: the store's CURRENT)",
                _json(_obj(["version"], version=STRING), "the version live now"),
                tags=admin,
                security=bearer,
                requestBody={
                    "required": False,
                    "content": {
                        JSON: {"schema": _obj(version={**STRING, "description": "one of the store's versions"})}
                    },
                },
                errors={
                    **ADMIN_ERRORS,
                    "404": _error("no such version in the store"),
                    "409": _error("the version could not be loaded"),
                },
            )
        },
        "/admin/tracks/{track}/takedown": {
            "put": {
                "summary": "Take a track down on every worker (compacted track-takedowns topic)",
                "tags": admin,
                "security": bearer,
                "parameters": [TRACK],
                "requestBody": {
                    "required": False,
                    "content": {JSON: {"schema": _obj(reason={"type": "string", "maxLength": 500})}},
                },
                "responses": {"202": _json(_ref("Takedown"), "announced to every worker"), **ADMIN_ERRORS},
            },
            "delete": {
                "summary": "Restore a track taken down",
                "tags": admin,
                "security": bearer,
                "parameters": [TRACK],
                "responses": {"202": _json(_ref("Takedown"), "announced to every worker"), **ADMIN_ERRORS},
            },
        },
        "/admin/takedowns": {
            "get": _get(
                "Tracks taken down",
                _json(_obj(["tracks"], tracks={"type": "array", "items": STRING}), "sorted track ids"),
                tags=admin,
                security=bearer,
                errors=ADMIN_ERRORS,
            )
        },
        "/": {
            "get": _get(
                "The operator's console (the same page as /console)", _text("the page", "text/html"), tags=console
            )
        },
        "/console": {"get": _get("The operator's console", _text("the page", "text/html"), tags=console)},
        "/console/console.js": {
            "get": _get("The console's script", _text("script", "application/javascript"), tags=console)
        },
        "/console/console.css": {"get": _get("The console's style", _text("style sheet", "text/css"), tags=console)},
        "/console/live.json": {
            "get": _get(
                "This worker's metrics over the last minutes, for the console's charts",
                _json(_ref("ConsoleLive"), "samples"),
                tags=console,
                errors={"500": SERVING_ERRORS["500"]},
            )
        },
        "/console/model.json": {
            "get": _get(
                "The live model and every version in the store with its retrain report",
                _json(_ref("ConsoleModel"), "versions"),
                tags=console,
                errors={"500": SERVING_ERRORS["500"]},
            )
        },
        "/console/workers.json": {
            "get": _get(
                "The consumer group's members and the partitions of plays each owns",
                _json(_ref("ConsoleWorkers"), "members"),
                tags=console,
                errors={"500": SERVING_ERRORS["500"]},
            )
        },
        "/console/takedowns.json": {
            "get": _get(
                "Tracks taken down (read-only; changing them needs the admin token)",
                _json(_ref("ConsoleTakedowns"), "tracks"),
                tags=console,
                errors={"500": SERVING_ERRORS["500"]},
            )
        },
        # faust's own blueprints, served by every faust app (faust.web.apps.router / .tables)
        "/router/": {
            "get": _get(
                "faust: the workers holding each table's partitions", _json({"type": "object"}, "url -> tp"), tags=faust
            )
        },
        "/router/topics": {
            "get": _get(
                "faust: the workers holding each topic's partitions", _json({"type": "object"}, "url -> tp"), tags=faust
            )
        },
        "/router/{name}/": {
            "get": _get(
                "faust: the workers holding one table's partitions",
                _json({"type": "object"}, "url -> partitions"),
                tags=faust,
                parameters=[_path("name", "table name")],
            )
        },
        "/router/{name}/{key}/": {
            "get": _get(
                "faust: the worker holding a key of a table",
                _json({"type": "string"}, "its URL"),
                tags=faust,
                parameters=[_path("name", "table name"), _path("key", "table key")],
            )
        },
        "/table/": {"get": _get("faust: the app's tables", _json({"type": "array"}, "name and help"), tags=faust)},
        "/table/{name}/": {
            "get": _get(
                "faust: one table",
                _json({"type": "object"}, "name and help"),
                tags=faust,
                parameters=[_path("name", "table name")],
            )
        },
        "/table/{name}/{key}/": {
            "get": _get(
                "faust: the value of a table key (routed to its owner)",
                _json({}, "the value"),
                tags=faust,
                parameters=[_path("name", "table name"), _path("key", "table key")],
            )
        },
    }


@cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "playrec stream worker",
            "version": "1",
            "description": "Recommendations from a playrec stream worker (README.md, docs/STREAM.md). User routes are "
            "answered by the worker owning the user's partition; any worker forwards them there. Admin routes need "
            '`Authorization: Bearer <token>`. Errors are JSON `{"error", "status"}`.',
        },
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


def openapi_document() -> dict[str, Any]:
    """The document (a copy: callers may change it)."""
    return copy.deepcopy(_document())
