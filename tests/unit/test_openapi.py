"""GET /openapi.json (stream/openapi.py) lists exactly the routes a worker registers, with their methods.

The worker is built offline and its faust web server initialised (routes and faust's blueprints added
to the aiohttp router) without starting; the router is then the ground truth. faust answers HEAD on
every path: that is checked, and HEAD is not listed.
"""

from __future__ import annotations

import json
import re

import pytest

from stream.openapi import openapi_document
from stream.settings import WorkerSettings
from stream.worker import StreamWorker

METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict[str, set[str]]:
    """path -> methods of the routes a worker's aiohttp router holds."""
    tmp = tmp_path_factory.mktemp("openapi")
    worker = StreamWorker(WorkerSettings(bootstrap="127.0.0.1:9", store=tmp / "store", data_dir=tmp / "data"))
    worker.app.web.init_server()
    routes: dict[str, set[str]] = {}
    for route in worker.app.web.web_app.router.routes():
        routes.setdefault(route.resource.canonical, set()).add(route.method.lower())
    return routes


def test_the_document_lists_exactly_the_registered_routes(registered):
    for path, methods in registered.items():
        assert "head" in methods, f"{path}: faust no longer adds HEAD; list it in the document if it is served"
    served = {path: methods - {"head"} for path, methods in registered.items()}
    documented = {path: set(item) & METHODS for path, item in openapi_document()["paths"].items()}
    assert sorted(set(served) - set(documented)) == [], "routes missing from /openapi.json"
    assert sorted(set(documented) - set(served)) == [], "documented routes no worker serves"
    wrong = {p: (documented[p], served[p]) for p in served if documented[p] != served[p]}
    assert wrong == {}, "methods differ (documented, served)"


def test_console_admin_and_api_routes_are_all_there(registered):
    paths = set(openapi_document()["paths"])
    for path in ("/", "/console", "/console/live.json", "/console/model.json", "/console/workers.json",
                 "/console/takedowns.json", "/admin/takedowns", "/admin/tracks/{track}/takedown",
                 "/users/{user}/recommendations", "/openapi.json", "/metrics"):  # fmt: skip
        assert path in paths and path in registered


def test_the_document_is_well_formed():
    doc = openapi_document()
    assert doc["openapi"].startswith("3.")
    text = json.dumps(doc)  # JSON-serialisable as served
    schemas = doc["components"]["schemas"]
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text):
        assert ref in schemas, f"dangling $ref {ref}"
    for path, item in doc["paths"].items():
        templated = set(re.findall(r"{(\w+)}", path))
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            assert op.get("summary") and op.get("responses"), where
            assert all(re.fullmatch(r"[1-5]\d\d", status) for status in op["responses"]), where
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == templated, f"{where}: path parameters {declared} != {templated}"
            for p in op.get("parameters", []):
                assert p["in"] in ("path", "query", "header") and "schema" in p, where
            if path.startswith("/admin/"):
                assert op.get("security") == [{"bearerAuth": []}], f"{where} must say it needs the token"
                assert {"401", "403"} <= set(op["responses"]), where


def test_callers_cannot_change_the_served_document():
    openapi_document()["paths"].clear()
    assert openapi_document()["paths"]
