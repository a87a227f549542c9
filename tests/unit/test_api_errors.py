"""How the API turns what an operation raises into a reply (in-process app,
aiohttp's test client on loopback): a domain error's kind gives 404, 409 or
400; an OSError naming a path is a 400 that names it; anything else is a 500
whose body says only that, while the console's log keeps the traceback."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from nicsplit.console.server import make_app
from nicsplit.control import ops
from nicsplit.core.cgs import CGConflict, UnknownCG
from nicsplit.core.config import Config
from nicsplit.recovery.errors import RecoveryError

TOKEN = "a" * 64


def get_cgs(raising: BaseException) -> tuple[int, dict]:
    async def run() -> tuple[int, dict]:
        client = TestClient(TestServer(make_app(Config(data=Path("/nonexistent")), TOKEN)))
        await client.start_server()
        try:
            r = await client.get("/api/v1/cgs", headers={"Authorization": f"Bearer {TOKEN}"})
            return r.status, await r.json()
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.fixture
def raising(monkeypatch):
    def set_(exc: BaseException) -> None:
        def boom(*_a, **_k):
            raise exc
        monkeypatch.setattr(ops, "cgs_doc", boom)
    return set_


@pytest.mark.parametrize("exc,status", [
    (UnknownCG("unknown consistency group 'x'"), 404),
    (CGConflict("consistency group 'x' already exists"), 409),
    (RecoveryError("consistency group x has no journal yet"), 400),
    (ops.OpError("bad owner 'me'"), 400),
    (ops.OpConflict("the running host refused it"), 409),
])
def test_a_domain_error_is_its_kind(raising, exc, status):
    raising(exc)
    assert get_cgs(exc) == (status, {"error": str(exc)})


def test_an_os_error_naming_a_path_is_a_400_that_names_it(raising):
    exc = FileNotFoundError(2, "No such file or directory", "/srv/nowhere/x.raw")
    raising(exc)
    assert get_cgs(exc) == (400, {"error": "No such file or directory: /srv/nowhere/x.raw"})


def test_anything_else_is_a_500_without_details_and_logged(raising, caplog):
    exc = ZeroDivisionError("secret internals")
    raising(exc)
    with caplog.at_level(logging.ERROR, logger="nicsplit.console.api"):
        status, body = get_cgs(exc)
    assert status == 500
    assert body == {"error": "internal error (the console's log has the details)"}
    (rec,) = [r for r in caplog.records if r.name == "nicsplit.console.api"]
    assert rec.exc_info and rec.exc_info[0] is ZeroDivisionError and rec.getMessage() == "boom failed"
