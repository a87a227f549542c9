"""Issue 13 acceptance, API auth: `nicsplit console run` on an initialised
data directory answers every /api route 401 (with ``WWW-Authenticate:
Bearer``) without a token or with a wrong one, and 200 with the token
`nicsplit init` wrote. Real clients: curl, and urllib and aiohttp's client."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess

import aiohttp
import pytest

from nicsplit.core.layout import Layout
from nicsplit.testing.api import ApiClient, ConsoleProcess, read_token


@pytest.fixture
def console(data):
    with ConsoleProcess(data) as c:
        yield c


def curl(url: str, *args: str) -> tuple[int, dict[str, str], str]:
    """(status, headers lowercased, body) of one curl call."""
    p = subprocess.run(["curl", "-sS", "-i", "--max-time", "30", *args, url], capture_output=True, text=True,
                       timeout=60, check=True)
    head, _, body = p.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def test_the_token_is_a_private_file_made_by_init(data):
    path = Layout(data).api_token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(read_token(data)) == 64


def test_curl_no_token_and_wrong_token_get_401_right_token_200(console, data):
    url = f"{console.base}/api/v1/status"
    token = read_token(data)
    for args in ([], ["-H", "Authorization: Bearer " + "0" * 64], ["-H", f"Authorization: Bearer {token}x"],
                 ["-H", f"Authorization: Basic {token}"], ["-H", "Authorization: Bearer"],
                 ["-H", f"Authorization: {token}"]):
        status, headers, body = curl(url, *args)
        assert status == 401, (args, status, body)
        assert headers["www-authenticate"].startswith("Bearer"), headers
        assert json.loads(body) == {"error": "missing or wrong bearer token"}
    for scheme in ("Bearer", "bearer"):
        status, headers, body = curl(url, "-H", f"Authorization: {scheme} {token}")
        assert status == 200, (scheme, status, body)
        assert headers["content-type"].startswith("application/json")
        assert set(json.loads(body)) >= {"cgs", "processes", "endpoints"}
    status, _, body = curl(f"{console.base}/api/v1/openapi.json", "--oauth2-bearer", token)
    assert status == 200 and json.loads(body)["openapi"].startswith("3.1"), body


def test_urllib_every_route_refuses_a_missing_or_wrong_token_before_anything_else(console, data):
    """Each documented route (with its real method and a body where it takes
    one) is 401 without the right token, so a caller without it learns
    nothing, not even whether a CG exists; an unknown /api path too."""
    token = read_token(data)
    doc = ApiClient(console.base, token).doc
    routes = [(m.upper(), p.replace("{cg}", "cg1").replace("{vdisk}", "a").replace("{name}", "b").replace("{id}", "x"))
              for p, ops in doc["paths"].items() for m in ops]
    assert len(routes) >= 19
    for bad in (None, "f" * 64, token[:-1]):
        client = ApiClient(console.base, bad)
        for method, path in routes + [("GET", "/api/v1/nothing-here")]:
            status, reply, headers = client.call(method, path, {} if method in ("POST", "PATCH") else None)
            assert status == 401, (bad, method, path, status, reply)
            assert headers["WWW-Authenticate"].startswith("Bearer"), headers
    good = ApiClient(console.base, token)
    assert good.call("GET", "/api/v1/nothing-here")[0] == 404
    good.ok("GET", "/api/v1/status")
    good.ok("GET", "/api/v1/cgs")
    good.ok("GET", "/api/v1/vdisks")
    good.ok("GET", "/api/v1/images")


def test_aiohttp_client_no_token_wrong_token_401_right_token_200(console, data):
    token = read_token(data)

    async def statuses() -> list[tuple[int, str | None]]:
        out = []
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer " + "1" * 64}, {"Authorization": f"Bearer {token}"}):
                async with s.get(f"{console.base}/api/v1/status", headers=headers) as r:
                    await r.read()
                    out.append((r.status, r.headers.get("WWW-Authenticate")))
        return out

    (none, wrong, right) = asyncio.run(statuses())
    assert none[0] == 401 and none[1].startswith("Bearer"), none
    assert wrong[0] == 401 and wrong[1].startswith("Bearer"), wrong
    assert right == (200, None), right
