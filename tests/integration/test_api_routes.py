"""The REST API's catalog routes and its error replies, against a real
`nicsplit console run` (no host: what needs one is in
tests/e2e/test_api_workflow.py). Every reply is checked against the
OpenAPI document the console serves; every error is ``{"error"}`` with the
status the domain error's kind gives: 400 bad input, 404 unknown names,
409 conflicts. The CLI and the API return the same documents."""

from __future__ import annotations

import json
import re

import pytest

from nicsplit.testing.api import ApiClient, ConsoleProcess, read_token
from nicsplit.testing.procs import run_cli


@pytest.fixture
def api(data):
    with ConsoleProcess(data) as c:
        yield ApiClient(c.base, read_token(data))


def test_cgs_and_vdisks_through_the_api_are_what_the_cli_sees(api, data):
    assert api.ok("GET", "/api/v1/cgs") == {"cgs": []}
    cg = api.ok("POST", "/api/v1/cgs", {"name": "cg1"}, status=201)
    assert cg["name"] == "cg1" and cg["id"] == 1
    a = api.ok("POST", "/api/v1/vdisks", {"name": "a", "size": "8M", "cg": "cg1", "owner": "vm:web"}, status=201)
    assert (a["size"], a["cg"], a["owner"], a["readonly"]) == (8 << 20, "cg1", "vm:web", False)
    b = api.ok("POST", "/api/v1/vdisks", {"name": "b", "size": 4 << 20, "readonly": True}, status=201)
    assert (b["size"], b["cg"], b["readonly"]) == (4 << 20, None, True)
    joined = api.ok("POST", "/api/v1/cgs/cg1/vdisks", {"vdisk": "b"})
    assert joined == {"cg": "cg1", "vdisk": "b", "live": False, "state": None, "dirty_bytes": None}

    cgs = api.ok("GET", "/api/v1/cgs")
    assert cgs["cgs"][0]["vdisks"] == ["a", "b"]
    assert cgs == json.loads(run_cli(data, "cg", "list", "--json").stdout)
    vdisks = api.ok("GET", "/api/v1/vdisks")
    assert [v["name"] for v in vdisks["vdisks"]] == ["a", "b"]
    assert vdisks == json.loads(run_cli(data, "vdisk", "list", "--json").stdout)

    assert api.ok("GET", "/api/v1/cgs/cg1/pits") == {"pits": [], "damage": []}
    assert api.ok("GET", "/api/v1/cgs/cg1/pits?all=1") == {"pits": [], "damage": []}
    assert "all=1" in api.error("GET", "/api/v1/cgs/cg1/pits?all=yes", status=400)
    assert api.ok("GET", "/api/v1/cgs/cg1/bookmarks") == {"bookmarks": []}
    assert api.ok("DELETE", "/api/v1/vdisks/b") == {"name": "b", "deleted": True}
    assert [v["name"] for v in api.ok("GET", "/api/v1/vdisks")["vdisks"]] == ["a"]
    assert "no vdisk 'b'" in api.error("DELETE", "/api/v1/vdisks/b", status=404)


def test_unknown_names_are_404(api):
    api.ok("POST", "/api/v1/cgs", {"name": "cg1"}, status=201)
    api.ok("POST", "/api/v1/vdisks", {"name": "a", "size": "4M", "cg": "cg1"}, status=201)
    sel = {"latest": True}
    for method, path, body in (
        ("GET", "/api/v1/cgs/nope/pits", None),
        ("GET", "/api/v1/cgs/nope/bookmarks", None),
        ("POST", "/api/v1/cgs/nope/bookmarks", {"name": "x"}),
        ("PATCH", "/api/v1/cgs/nope/bookmarks/x", {"locked": True}),
        ("POST", "/api/v1/cgs/nope/vdisks", {"vdisk": "a"}),
        ("POST", "/api/v1/cgs/nope/failover", sel),
        ("POST", "/api/v1/cgs/nope/failback", {}),
        ("POST", "/api/v1/cgs/nope/verify", {}),
        ("POST", "/api/v1/vdisks", {"name": "c", "size": "4M", "cg": "nope"}),
        ("POST", "/api/v1/images", {"cg": "nope", **sel}),
    ):
        assert "unknown consistency group 'nope'" in api.error(method, path, body, status=404), (method, path)
    assert "unknown bookmark 'x'" in api.error("PATCH", "/api/v1/cgs/cg1/bookmarks/x", {"locked": True}, status=404)
    assert "unknown bookmark 'x'" in api.error("POST", "/api/v1/images", {"cg": "cg1", "bookmark": "x"}, status=404)
    assert "no vdisk 'zz'" in api.error("POST", "/api/v1/cgs/cg1/vdisks", {"vdisk": "zz"}, status=404)
    assert "no vdisk 'zz'" in api.error("POST", "/api/v1/vdisks/zz/restore", {**sel, "to": "/tmp/x"}, status=404)
    assert "no vdisk 'zz'" in api.error("DELETE", "/api/v1/vdisks/zz", status=404)
    assert "unknown image id 'abc'" in api.error("DELETE", "/api/v1/images/abc", status=404)


def test_conflicts_are_409(api):
    api.ok("POST", "/api/v1/cgs", {"name": "cg1"}, status=201)
    api.ok("POST", "/api/v1/cgs", {"name": "cg2"}, status=201)
    api.ok("POST", "/api/v1/vdisks", {"name": "a", "size": "4M", "cg": "cg1"}, status=201)
    assert "already exists" in api.error("POST", "/api/v1/cgs", {"name": "cg1"}, status=409)
    assert "already exists" in api.error("POST", "/api/v1/vdisks", {"name": "a", "size": "4M"}, status=409)
    assert "already in consistency group cg1" in api.error("POST", "/api/v1/cgs/cg2/vdisks", {"vdisk": "a"}, status=409)
    assert "not failed over" in api.error("POST", "/api/v1/cgs/cg1/failback", status=409)
    assert "not failed over" in api.error("POST", "/api/v1/cgs/cg1/failover", {"resume": True}, status=409)


def test_bad_input_is_400_with_one_line(api):
    api.ok("POST", "/api/v1/cgs", {"name": "cg1"}, status=201)
    api.ok("POST", "/api/v1/vdisks", {"name": "a", "size": "4M", "cg": "cg1"}, status=201)
    restore = "/api/v1/vdisks/a/restore"
    assert api.error("POST", "/api/v1/cgs", raw=b"{not json", status=400) == "the body is not JSON"
    assert api.error("POST", restore, raw=b'{"latest": tru', status=400) == "the body is not JSON"
    assert api.error("POST", "/api/v1/cgs", ["cg9"], status=400) == "the body must be a JSON object"
    for seq in (0, -4, "7", 1.5, True):
        msg = api.error("POST", restore, {"seq": seq, "to": "/tmp/r.raw"}, status=400)
        assert msg.startswith("bad sequence number"), (seq, msg)
        assert api.error("POST", "/api/v1/images", {"cg": "cg1", "seq": seq}, status=400).startswith("bad sequence")
        assert api.error("POST", "/api/v1/cgs/cg1/bookmarks", {"name": "x", "seq": seq}, status=400) \
            .startswith("bad sequence")
    for sel in ({}, {"latest": True, "seq": 3}, {"at": "-1h", "bookmark": "b"}, {"latest": False}):
        assert "exactly one of at, seq, bookmark, latest" in api.error("POST", restore, {**sel, "to": "/tmp/r"},
                                                                       status=400), sel
    assert "bad time" in api.error("POST", restore, {"at": "yesterday-ish", "to": "/tmp/r"}, status=400)
    assert "say where to" in api.error("POST", restore, {"latest": True}, status=400)
    assert "absolute path" in api.error("POST", restore, {"latest": True, "to": "r.raw"}, status=400)
    assert "takes no --to" in api.error("POST", restore, {"latest": True, "in_place": True, "to": "/tmp/r"}, status=400)
    assert "bad format" in api.error("POST", restore, {"latest": True, "to": "/tmp/r", "format": "vmdk"}, status=400)
    assert "'force' must be true or false" in api.error("POST", restore, {"latest": True, "to": "/tmp/r", "force": 1},
                                                        status=400)
    assert "takes no other selector" in api.error("POST", "/api/v1/cgs/cg1/failover", {"resume": True, "seq": 3},
                                                  status=400)
    assert "--rounds must be at least 1" in api.error("POST", "/api/v1/cgs/cg1/verify", {"rounds": 0}, status=400)
    assert "'rounds' must be an integer" in api.error("POST", "/api/v1/cgs/cg1/verify", {"rounds": "2"}, status=400)
    assert "'name' is required" in api.error("POST", "/api/v1/cgs", {}, status=400)
    assert "bad" in api.error("POST", "/api/v1/cgs", {"name": "a b/c"}, status=400)
    assert "bad owner" in api.error("POST", "/api/v1/vdisks", {"name": "c", "size": "4M", "owner": "me"}, status=400)
    assert "bad size" in api.error("POST", "/api/v1/vdisks", {"name": "c", "size": "lots"}, status=400)
    assert "'size' must be" in api.error("POST", "/api/v1/vdisks", {"name": "c", "size": True}, status=400)
    assert "'locked' is required" in api.error("PATCH", "/api/v1/cgs/cg1/bookmarks/x", {}, status=400)
    assert "no journal yet" in api.error("POST", restore, {"latest": True, "to": "/tmp/r"}, status=400)
    assert "takes: no body" in api.error("DELETE", "/api/v1/vdisks/a", {"force": True}, status=400)


def test_each_route_refuses_keys_it_does_not_document(api):
    """A typo is an error, not a silently ignored option; and what each
    route says it takes is exactly what the OpenAPI document lists."""
    for path, ops in api.doc["paths"].items():
        for method, op in ops.items():
            if "requestBody" not in op:
                continue
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            msg = api.error(method.upper(), concrete, {"bogus_key": 1}, status=400)
            taken = msg.split("(this route takes: ", 1)[1].rstrip(")").split(", ")
            documented = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
            assert msg.startswith("unknown key(s) bogus_key"), msg
            assert sorted(taken) == sorted(documented), (method, path, taken, sorted(documented))
