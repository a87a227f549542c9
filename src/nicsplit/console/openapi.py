"""The REST API's OpenAPI 3.1 document, served at ``/api/v1/openapi.json``.

Written by hand, next to the handlers (`nicsplit.console.api`): a unit test
checks that every route the app registers is described here and that
nothing here is missing from the app. Response schemas list the keys a
client may rely on; documents may grow keys (``additionalProperties`` is
left open), never lose them.
"""

from __future__ import annotations

import copy
from typing import Any

from nicsplit import __version__

__all__ = ["document"]

S = dict[str, Any]


def _ref(name: str) -> S:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: dict[str, S], optional: dict[str, S] | None = None, description: str | None = None) -> S:
    out: S = {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}
    if description:
        out["description"] = description
    return out


def _body(props: dict[str, S], required: tuple[str, ...] = (), description: str | None = None) -> S:
    """A request body schema: a JSON object with only these keys."""
    out: S = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    if description:
        out["description"] = description
    return out


STR: S = {"type": "string"}
INT: S = {"type": "integer"}
BOOL: S = {"type": "boolean"}
NUM: S = {"type": "number"}
TIME: S = {"type": "number", "description": "seconds since the epoch"}
SEQ: S = {"type": "integer", "minimum": 1, "description": "a journal sequence number"}
NULLABLE_INT: S = {"type": ["integer", "null"]}
EXPORTS: S = {"type": "object", "additionalProperties": STR, "description": "VDISK: NBD URI"}
RUN: S = _obj({"vdisk": STR, "offset": INT, "length": INT})

SELECTOR: dict[str, S] = {
    "at": {"type": ["string", "number"],
           "description": "the latest PIT at or before TIME: seconds since the epoch, ISO 8601, 'now' or -N[smhd]"},
    "seq": SEQ,
    "bookmark": {"type": "string", "description": "the PIT a bookmark names"},
    "latest": {"const": True, "description": "the latest PIT"},
}
SELECTOR_NOTE = "Name the point in time with exactly one of at, seq, bookmark, latest."

# A bookmark says whether its quiesce hooks ran (application) or not (crash),
# and why not (note) and which hooks (hooks) when there were any.
_CONSISTENCY: S = {"enum": ["application", "crash"]}
_BOOKMARK_EXTRA: S = {"note": STR, "hooks": {"type": "object"}}

SCHEMAS: dict[str, S] = {
    "Error": _obj({"error": {"type": "string", "description": "one line saying what is wrong"}}),
    "History": {"type": "object", "description": "{interval, cg, samples: [point]} or {interval, cgs: {CG: [point]}}"},
    "Status": _obj({"cgs": {"type": "array", "items": _obj({"name": STR, "state": STR, "rpo_seconds": {"type": ["number", "null"]},
                                                            "vdisks": {"type": "array", "items": {"type": "object"}}})},
                    "processes": {"type": "object", "additionalProperties": _obj({"pid": NULLABLE_INT})},
                    "endpoints": {"type": "object"}},
                   description="`nicsplit status --json` (docs/operations.md describes every key)"),
    "CG": _obj({"name": STR, "id": INT, "uuid": STR, "vdisks": {"type": "array", "items": STR}}),
    "CGList": _obj({"cgs": {"type": "array", "items": _ref("CG")}}),
    "CGCreated": _obj({"name": STR, "id": INT, "uuid": STR}),
    "CGJoined": _obj({"cg": STR, "vdisk": STR, "live": BOOL, "state": {"type": ["string", "null"]},
                      "dirty_bytes": NULLABLE_INT},
                     description="live: the running host took the vdisk in (state: initializing while it copies "
                                 "dirty_bytes); false: no host runs, it applies the membership when it starts"),
    "Vdisk": _obj({"name": STR, "size": INT, "owner": {"type": ["string", "null"]}, "uuid": STR, "id": INT,
                   "block_size": INT, "readonly": BOOL, "created": TIME, "cg": {"type": ["string", "null"]}}),
    "VdiskList": _obj({"vdisks": {"type": "array", "items": _ref("Vdisk")}}),
    "VdiskDeleted": _obj({"name": STR, "deleted": {"const": True}}),
    "Pit": _obj({"seq": INT, "time": TIME, "consistent": BOOL, "usable": BOOL, "gap": BOOL,
                 "bookmarks": {"type": "array", "items": STR}},
                {"reason": {"type": "string", "description": "why an unusable PIT is unusable"}}),
    "PitList": _obj({"pits": {"type": "array", "items": _ref("Pit")},
                     "damage": {"type": "array", "items": _obj({"message": STR})}}),
    "Bookmark": _obj({"name": STR, "seq": INT, "time": TIME, "locked": BOOL, "consistency": _CONSISTENCY},
                     _BOOKMARK_EXTRA),
    "BookmarkCreated": _obj({"name": STR, "seq": INT, "time": TIME, "locked": BOOL, "host_down": BOOL,
                             "consistency": _CONSISTENCY}, _BOOKMARK_EXTRA,
                            description="host_down: no host ran, so the latest journaled PIT was bookmarked"),
    "BookmarkList": _obj({"bookmarks": {"type": "array", "items": _ref("Bookmark")}}),
    "ImageExported": _obj({"id": STR, "cg": STR, "seq": INT, "time": TIME, "writable": BOOL, "pid": NULLABLE_INT,
                           "exports": EXPORTS, "ready_seconds": NUM,
                           "server_ready_seconds": {"type": ["number", "null"]}, "in_appliance": BOOL}),
    "Image": _obj({"id": STR, "cg": STR, "seq": INT, "time": TIME, "writable": BOOL, "pid": NULLABLE_INT,
                   "alive": BOOL, "exports": EXPORTS, "started": {"type": ["number", "null"]}}),
    "ImageList": _obj({"images": {"type": "array", "items": _ref("Image")}}),
    "ImageClosed": _obj({"id": STR, "closed": {"const": True}, "killed": BOOL}),
    "Restored": _obj({"vdisk": STR, "cg": STR, "seq": INT, "time": TIME, "size": INT},
                     {"file": STR, "format": {"enum": ["raw", "qcow2"]}, "data_bytes": INT, "device": BOOL,
                      "in_place": BOOL, "seconds": NUM, "covered_by_seq": NULLABLE_INT},
                     description="to a file: file, format, data_bytes (device: true for --to-device); in place: "
                                 "in_place, seconds, covered_by_seq (the journal holds the restored data from there)"),
    "FailedOver": _obj({"cg": STR, "seq": INT, "time": TIME, "exports": EXPORTS, "pid": INT,
                        "warnings": {"type": "array", "items": STR}},
                       {"fenced_by": STR, "replica_was_at": NULLABLE_INT, "ready_seconds": NUM, "resumed": BOOL}),
    "FailedBack": _obj({"cg": STR, "seq": NULLABLE_INT, "copied_bytes": INT, "warnings": {"type": "array", "items": STR}},
                       {"aborted": BOOL, "zeroed_bytes": INT, "reverted_bytes": INT, "vdisks": {"type": "object"},
                        "server_killed": BOOL, "seconds": NUM}),
    "Verified": _obj({"cg": STR, "seq": INT, "vdisks": {"type": "array", "items": STR}, "bytes_compared": INT,
                      "differing": {"type": "array", "items": RUN}, "unsettled": {"type": "array", "items": RUN},
                      "rechecked": INT, "seconds": NUM, "clean": BOOL},
                     {"repaired": {"type": "array", "items": RUN}},
                     description="clean: no block differs; repaired (with repair): the runs the first pass found"),
}

PARAMS: dict[str, S] = {
    name: {"name": name, "in": "path", "required": True, "schema": STR, "description": what}
    for name, what in (("cg", "consistency group name"), ("vdisk", "vdisk name"), ("name", "bookmark name"),
                       ("id", "image id"))
}


def _op(summary: str, ok: str, *, status: int = 200, body: S | None = None, errors: tuple[int, ...] = (400,),
        params: tuple[str, ...] = (), query: list[S] | None = None, cli: str = "") -> S:
    out: S = {"summary": summary, "responses": {
        str(status): {"description": "OK" if status == 200 else "Created",
                      "content": {"application/json": {"schema": _ref(ok)}}},
        "401": {"$ref": "#/components/responses/Unauthorized"},
        **{str(code): {"$ref": f"#/components/responses/E{code}"} for code in sorted({*errors, 500})},
    }}
    if cli:
        out["description"] = f"What `nicsplit {cli}` does (its --json output is this response)."
    if body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params or query:
        out["parameters"] = [{"$ref": f"#/components/parameters/{p}"} for p in params] + (query or [])
    return out


PATHS: dict[str, S] = {
    "/api/v1/openapi.json": {"get": _op("This document", "OpenAPI", errors=())},
    "/api/v1/status": {"get": _op("Protection state of every CG, the processes, the endpoints", "Status",
                                  errors=(), cli="status")},
    "/api/v1/history": {"get": _op(
        "The console's samples of each CG (state, RPO, throughput) every [console] history_interval, oldest first "
        "(what the dashboard charts)", "History", errors=(400, 404),
        query=[{"name": "cg", "in": "query", "required": False, "schema": STR,
                "description": "one CG's samples (else every CG's)"},
               {"name": "since", "in": "query", "required": False, "schema": {"type": "number"},
                "description": "only samples after this Unix time"}])},
    "/api/v1/cgs": {
        "get": _op("List consistency groups and their vdisks", "CGList", errors=(), cli="cg list"),
        "post": _op("Create a consistency group", "CGCreated", status=201, errors=(400, 409), cli="cg create NAME",
                    body=_body({"name": STR}, ("name",))),
    },
    "/api/v1/cgs/{cg}/vdisks": {"post": _op(
        "Put a vdisk into the CG (live on a running host: it copies what the vdisk holds)", "CGJoined",
        errors=(400, 404, 409), params=("cg",), cli="cg add CG VDISK", body=_body({"vdisk": STR}, ("vdisk",)))},
    "/api/v1/cgs/{cg}/pits": {"get": _op(
        "The CG's points in time, oldest first", "PitList", errors=(400, 404), params=("cg",), cli="pits CG",
        query=[{"name": "all", "in": "query", "required": False, "schema": {"enum": ["1", "true", "0", "false"]},
                "description": "every PIT the journal holds, also those retention's thinning does not offer"}])},
    "/api/v1/cgs/{cg}/bookmarks": {
        "get": _op("The CG's bookmarks in the order they were added", "BookmarkList", errors=(400, 404),
                   params=("cg",)),
        "post": _op("Bookmark the CG: a barrier through the running host (or the PIT at seq)", "BookmarkCreated",
                    status=201, errors=(400, 404, 409), params=("cg",), cli="bookmark CG NAME",
                    body=_body({"name": STR, "lock": BOOL, "seq": SEQ,
                                "quiesce": {"type": ["boolean", "string"],
                                            "description": "true: the CG's [hooks.CG] pre/post; a string: that pre command"},
                                "thaw": STR, "hook_timeout": {"type": "number"}}, ("name",))),
    },
    "/api/v1/cgs/{cg}/bookmarks/{name}": {"patch": _op(
        "Lock (kept whatever retention says) or unlock a bookmark", "Bookmark", errors=(400, 404),
        params=("cg", "name"), cli="bookmark CG NAME --lock --existing | --unlock",
        body=_body({"locked": BOOL}, ("locked",)))},
    "/api/v1/cgs/{cg}/failover": {"post": _op(
        "Serve the CG from its replicas at a point in time (production fenced), or resume that server",
        "FailedOver", errors=(400, 404, 409), params=("cg",), cli="failover CG",
        body=_body({**SELECTOR, "resume": BOOL, "listen": {"type": "string", "description": "HOST:PORT"}},
                   description=SELECTOR_NOTE + " Or resume: true alone."))},
    "/api/v1/cgs/{cg}/failback": {"post": _op(
        "Copy what changed back to production, unfence it, resume replication", "FailedBack",
        errors=(400, 404, 409), params=("cg",), cli="failback CG",
        body=_body({"production_uri": {"type": "string", "description": "the host's NBD address (default: asked "
                                                                         "from the running host)"}}))},
    "/api/v1/cgs/{cg}/verify": {"post": _op(
        "Compare production with the latest point in time, block by block (repair: resync what differs)",
        "Verified", errors=(400, 404), params=("cg",), cli="verify CG",
        body=_body({"repair": BOOL, "rounds": {"type": "integer", "minimum": 1}, "timeout": {"type": "number"}}))},
    "/api/v1/vdisks": {
        "get": _op("List vdisks", "VdiskList", errors=(), cli="vdisk list"),
        "post": _op("Create a vdisk", "Vdisk", status=201, errors=(400, 404, 409), cli="vdisk create NAME",
                    body=_body({"name": STR, "size": {"type": ["integer", "string"], "description": "bytes, or 64M, 10G"},
                                "owner": {"type": "string", "description": "vm:NAME or container:NAME"},
                                "readonly": BOOL, "cg": {"type": "string", "description": "CG to protect it in"}},
                               ("name", "size"))),
    },
    "/api/v1/vdisks/{vdisk}": {"delete": _op("Delete a vdisk and free its space", "VdiskDeleted",
                                             errors=(400, 404, 409), params=("vdisk",), cli="vdisk delete NAME")},
    "/api/v1/vdisks/{vdisk}/restore": {"post": _op(
        "Write the vdisk at a point in time to a file (or device), or back onto production in place",
        "Restored", errors=(400, 404, 409), params=("vdisk",), cli="restore VDISK",
        body=_body({**SELECTOR, "to": {"type": "string", "description": "absolute path of the new file"},
                    "format": {"enum": ["raw", "qcow2"]}, "force": BOOL, "to_device": BOOL, "in_place": BOOL},
                   description=SELECTOR_NOTE + " Then either to (with format, force, to_device) or in_place: true."))},
    "/api/v1/images": {
        "get": _op("List exported images", "ImageList", errors=(), cli="image list"),
        "post": _op("Export every vdisk of a CG at a point in time over NBD", "ImageExported", status=201,
                    errors=(400, 404, 409), cli="image export CG",
                    body=_body({"cg": STR, **SELECTOR, "writable": BOOL,
                                "listen": {"type": "string", "description": "HOST:PORT"}}, ("cg",),
                               description=SELECTOR_NOTE)),
    },
    "/api/v1/images/{id}": {"delete": _op("Stop an exported image and discard its overlay", "ImageClosed",
                                          errors=(400, 404), params=("id",), cli="image close ID")},
}

_ERRORS = {400: "Bad input: a malformed body or a request the domain refuses",
           404: "An unknown CG, vdisk, bookmark or image", 409: "A conflict with the current state",
           500: "An internal error (logged by the console)"}

DOCUMENT: S = {
    "openapi": "3.1.0",
    "info": {"title": "nicsplit console API", "version": __version__,
             "description": "Everything the nicsplit CLI does, as JSON over HTTP (docs/operations.md, REST API). "
                            "Every route needs Authorization: Bearer TOKEN (DATA/pki/api.token)."},
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}],
    "paths": PATHS,
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "the token in DATA/pki/api.token (nicsplit init makes it)"}},
        "parameters": PARAMS,
        "schemas": {**SCHEMAS, "OpenAPI": {"type": "object", "description": "an OpenAPI 3.1 document"}},
        "responses": {
            "Unauthorized": {"description": "No or a wrong bearer token (WWW-Authenticate: Bearer)",
                             "content": {"application/json": {"schema": _ref("Error")}}},
            **{f"E{code}": {"description": what, "content": {"application/json": {"schema": _ref("Error")}}}
               for code, what in _ERRORS.items()},
        },
    },
}


def document() -> S:
    """A copy of the document (callers may change theirs)."""
    return copy.deepcopy(DOCUMENT)
