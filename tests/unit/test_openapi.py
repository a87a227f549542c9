"""The OpenAPI document (nicsplit.console.openapi) describes exactly the
routes the console's app registers, and is itself well formed: every $ref
resolves, every path parameter is declared, every operation says its
success reply, 401 and 500, and every 4xx it names has an Error body."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from nicsplit.console.openapi import document
from nicsplit.console.server import make_app
from nicsplit.core.config import Config
from nicsplit.testing.api import schema_errors

METHODS = {"get", "post", "put", "patch", "delete"}


def app_routes() -> set[tuple[str, str]]:
    app = make_app(Config(data=Path("/nonexistent")), "t" * 64)
    out = set()
    for r in app.router.routes():
        info = r.resource.get_info() if r.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path and path.startswith("/api/") and r.method != "HEAD":
            out.add((r.method.lower(), path))
    return out


def doc_routes(doc: dict) -> set[tuple[str, str]]:
    return {(m, p) for p, ops in doc["paths"].items() for m in ops if m in METHODS}


def refs(node: object) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def resolve(doc: dict, ref: str) -> object:
    node: object = doc
    for part in ref.lstrip("#/").split("/"):
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def test_every_registered_route_is_documented_and_every_documented_route_exists() -> None:
    app, doc = app_routes(), doc_routes(document())
    assert app, "the app registers no /api route"
    assert not app - doc, f"routes missing from the OpenAPI document: {sorted(app - doc)}"
    assert not doc - app, f"documented routes the app does not serve: {sorted(doc - app)}"


def test_the_document_is_openapi_3_1_and_json() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    assert json.loads(json.dumps(doc)) == doc
    assert doc["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"] == {**doc["components"]["securitySchemes"]["bearer"],
                                                              "type": "http", "scheme": "bearer"}


def test_a_real_validator_accepts_the_document_and_refuses_a_broken_one() -> None:
    """openapi-spec-validator (OpenAPI 3.1 schema, JSON Schema 2020-12 for the schemas)."""
    doc = document()
    validate(doc)
    broken = document()
    broken["paths"]["/api/v1/cgs"]["get"]["responses"]["200"] = {"content": {}}  # a response needs a description
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_every_ref_resolves() -> None:
    doc = document()
    found = refs(doc)
    assert len(found) > 50
    for ref in found:
        resolve(doc, ref)


@pytest.mark.parametrize("method,path", sorted(doc_routes(document())))
def test_every_operation_declares_its_parameters_and_replies(method: str, path: str) -> None:
    doc = document()
    op = doc["paths"][path][method]
    declared = {resolve(doc, p["$ref"])["name"] if "$ref" in p else p["name"]  # type: ignore[index]
                for p in op.get("parameters", []) if (resolve(doc, p["$ref"]) if "$ref" in p else p)["in"] == "path"}  # type: ignore[index]
    assert declared == set(re.findall(r"\{([^}]+)\}", path))
    codes = set(op["responses"])
    ok = [c for c in codes if c.startswith("2")]
    assert len(ok) == 1, codes
    assert {"401", "500"} <= codes
    assert op["summary"]
    for code in codes - set(ok):
        body = resolve(doc, op["responses"][code]["$ref"])
        assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}  # type: ignore[index]
    if method in ("post", "patch"):
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema["additionalProperties"] is False  # the API refuses unknown keys


def test_the_schema_checker_finds_what_is_wrong() -> None:
    """The checker the API tests use can fail: a missing key, a wrong type, an unexpected key."""
    doc = document()
    good = {"name": "a", "seq": 3, "time": 1.5, "locked": False, "consistency": "crash"}
    assert schema_errors(doc, {"$ref": "#/components/schemas/Bookmark"}, good) == []
    assert schema_errors(doc, {"$ref": "#/components/schemas/Bookmark"}, {**good, "seq": "3"})
    assert schema_errors(doc, {"$ref": "#/components/schemas/Bookmark"}, {k: v for k, v in good.items() if k != "seq"})
    body = doc["paths"]["/api/v1/cgs/{cg}/bookmarks/{name}"]["patch"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema_errors(doc, body, {"locked": True}) == []
    assert schema_errors(doc, body, {"locked": True, "lock": True})
    assert schema_errors(doc, {"type": ["integer", "null"]}, None) == []
    assert schema_errors(doc, {"type": "integer"}, True)
