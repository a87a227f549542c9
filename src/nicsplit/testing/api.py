"""The console's REST API as tests use it: the console as a child process,
a small urllib client that checks every reply against the OpenAPI document
the console serves, and the schema check itself (the subset of JSON Schema
the document uses: $ref, type, required, properties, additionalProperties,
items, enum, const, minimum).

Example::

    with ConsoleProcess(data) as console:
        api = ApiClient(console.base, read_token(data))
        api.ok("POST", "/api/v1/cgs", {"name": "cg1"}, status=201)
        assert api.call("GET", "/api/v1/cgs/nope/pits")[0] == 404
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from nicsplit.testing.console import ConsoleProcess, api_token

__all__ = ["ConsoleProcess", "ApiClient", "read_token", "schema_errors"]


read_token = api_token  # the token `nicsplit init` wrote (DATA/pki/api.token)


class ApiClient:
    """Calls ``base`` with ``Authorization: Bearer token``. `ok` asserts the
    status and that the request body and the reply match the OpenAPI
    document (fetched from the console on first use)."""

    def __init__(self, base: str, token: str | None, timeout: float = 300) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._doc: dict | None = None

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        """(status, decoded JSON reply or None, headers); never raises for an HTTP status."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        h = {"Content-Type": "application/json"} if data is not None else {}
        if self.token is not None:
            h["Authorization"] = f"Bearer {self.token}"
        h.update(headers or {})
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                status, text, hdrs = r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            status, text, hdrs = e.code, e.read(), dict(e.headers)
        try:
            reply = json.loads(text) if text else None
        except ValueError:
            reply = text.decode(errors="replace")
        return status, reply, hdrs

    @property
    def doc(self) -> dict:
        if self._doc is None:
            status, doc, _ = self.call("GET", "/api/v1/openapi.json")
            assert status == 200, (status, doc)
            self._doc = doc
        return self._doc

    def operation(self, method: str, path: str) -> dict:
        """The document's operation for a concrete path (``/api/v1/cgs/cg1/pits``)."""
        parts = path.split("?", 1)[0].split("/")
        for template, ops in self.doc["paths"].items():
            want = template.split("/")
            if len(want) == len(parts) and all(w == p or (w.startswith("{") and p) for w, p in zip(want, parts)):
                assert method.lower() in ops, f"{method} {template} is not in the OpenAPI document"
                return ops[method.lower()]
        raise AssertionError(f"{path} matches no path of the OpenAPI document")

    def ok(self, method: str, path: str, body: Any = None, *, status: int = 200) -> Any:
        op = self.operation(method, path)
        if body is not None:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            bad = schema_errors(self.doc, schema, body)
            assert not bad, f"{method} {path}: the request body breaks the document: {bad}"
        got, reply, _ = self.call(method, path, body)
        assert got == status, f"{method} {path}: {got} (wanted {status}): {reply}"
        schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
        bad = schema_errors(self.doc, schema, reply)
        assert not bad, f"{method} {path}: the reply breaks the document: {bad}\n{reply}"
        return reply

    def error(self, method: str, path: str, body: Any = None, *, status: int, raw: bytes | None = None) -> str:
        """The error message of a call that must fail with ``status`` (as the document says it may)."""
        got, reply, _ = self.call(method, path, body, raw=raw)
        assert got == status, f"{method} {path}: {got} (wanted {status}): {reply}"
        assert str(status) in self.operation(method, path)["responses"], f"{method} {path} may not answer {status}"
        assert isinstance(reply, dict) and set(reply) == {"error"} and reply["error"], reply
        return reply["error"]


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def schema_errors(doc: dict, schema: dict, value: Any, where: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (refs resolved in ``doc``); empty when it conforms."""
    if "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return schema_errors(doc, node, value, where)
    out: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            return [f"{where}: {json.dumps(value)[:80]} is not {'/'.join(kinds)}"]
    if "const" in schema and value != schema["const"]:
        out.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        out.append(f"{where}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{where}: no {k!r}" for k in schema.get("required", []) if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                out += schema_errors(doc, props[k], v, f"{where}.{k}")
            elif extra is False:
                out.append(f"{where}: unexpected key {k!r}")
            elif isinstance(extra, dict):
                out += schema_errors(doc, extra, v, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += schema_errors(doc, schema["items"], v, f"{where}[{i}]")
    return out
