"""Issue 13 item 2: a whole deployment (`nicsplit up`) driven through the
REST API only, with real clients on the data path (qemu-io writes,
qemu-img compare and nbdinfo read) and every reply checked against the
OpenAPI document the console serves:

create a CG and vdisks (one in the CG at creation, one added live to the
running host), write, wait until protected and journaled, bookmark, list
PITs, export the bookmark as an image and compare it with production, close
it, restore to a file and compare, restore in place after production
changed, verify clean, fail over to the bookmark, write at the failover
site, fail back (production holds the failover site's writes), and the
usual bad inputs on the live system: unknown CG 404, malformed JSON 400,
bad seq 400, a bookmark name taken 409, deleting a vdisk the running host
holds 409.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from nicsplit.testing.api import ApiClient, read_token
from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import UpProcess, run_cli, wait_for

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 16 << 20
MiB = 1 << 20


def qemu_io(uri: str, *cmds: str) -> str:
    argv = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for c in cmds:
        argv += ["-c", c]
    p = subprocess.run(argv + [uri], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "failed" not in p.stdout + p.stderr, f"qemu-io {cmds}: {p.stdout}{p.stderr}"
    return p.stdout


def compare(a: str | Path, b: str | Path) -> None:
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, f"qemu-img compare {a} {b}: {p.stdout}{p.stderr}"


def cg_of(api: ApiClient, name: str) -> dict:
    return next(c for c in api.ok("GET", "/api/v1/status")["cgs"] if c["name"] == name)


def caught_up(api: ApiClient, name: str) -> bool:
    c = cg_of(api, name)
    return (c["state"] == "protected" and c["host_last_seq"] is not None
            and (c["last_durable_seq"] or 0) >= c["host_last_seq"])


@pytest.mark.timeout(600)
def test_a_deployment_driven_through_the_api_only(tmp_path: Path, seed: int) -> None:
    data = init_data(tmp_path / "data", filters=["stats", {"name": "split", "split_timeout_us": 1_000_000}],
                     sections={"card": {"transport_options": {"data_size": "256M"}}})
    run_cli(data, "vdisk", "create", "spare", "--size", "1M")  # a datastore with a vdisk: up adds no demo VM
    with UpProcess(data) as up:
        base = up.ready["endpoints"]["api"].removesuffix("/api/v1")
        api = ApiClient(base, read_token(data))
        t0 = time.monotonic()

        # -- catalog: a CG, a vdisk created in it, one created outside and added live
        assert api.ok("POST", "/api/v1/cgs", {"name": "web"}, status=201)["name"] == "web"
        api.ok("POST", "/api/v1/vdisks", {"name": "a", "size": "16M", "cg": "web", "owner": "vm:web1"}, status=201)
        b = api.ok("POST", "/api/v1/vdisks", {"name": "b", "size": SIZE}, status=201)
        assert b["cg"] is None
        joined = api.ok("POST", "/api/v1/cgs/web/vdisks", {"vdisk": "b"})
        assert joined["live"] is True and joined["state"] in ("protected", "initializing"), joined
        assert api.ok("GET", "/api/v1/cgs")["cgs"][0]["vdisks"] == ["a", "b"]

        # -- production writes through the host (qemu-io), journaled
        qemu_io(up.uri("a"), f"write -P 0x{seed % 200 + 1:02x} 0 1M", "write -P 0xa1 5M 256k")
        qemu_io(up.uri("b"), "write -P 0xb1 1M 2M", "write -z 8M 1M")
        wait_for(lambda: caught_up(api, "web"), 120, "web protected and journaled", interval=0.2)

        # -- bookmark, PITs
        mark = api.ok("POST", "/api/v1/cgs/web/bookmarks", {"name": "before-change"}, status=201)
        assert mark["host_down"] is False and mark["locked"] is False
        assert "already exists" in api.error("POST", "/api/v1/cgs/web/bookmarks", {"name": "before-change"},
                                             status=409)
        pits = api.ok("GET", "/api/v1/cgs/web/pits")["pits"]
        (marked,) = [p for p in pits if p["bookmarks"] == ["before-change"]]
        assert marked["seq"] == mark["seq"] and marked["consistent"] and marked["usable"]
        assert api.ok("PATCH", "/api/v1/cgs/web/bookmarks/before-change", {"locked": True})["locked"] is True
        want = {k: v for k, v in mark.items() if k != "host_down"} | {"locked": True}
        assert api.ok("GET", "/api/v1/cgs/web/bookmarks")["bookmarks"] == [want]

        # -- image access at the bookmark: equal to production (nothing written since)
        img = api.ok("POST", "/api/v1/images", {"cg": "web", "bookmark": "before-change"}, status=201)
        assert img["seq"] == mark["seq"] and set(img["exports"]) == {"a", "b"}
        assert [i["id"] for i in api.ok("GET", "/api/v1/images")["images"]] == [img["id"]]
        for n in ("a", "b"):
            compare(img["exports"][n], up.uri(n))
            info = json.loads(subprocess.run(["nbdinfo", "--json", img["exports"][n]], capture_output=True,
                                             text=True, timeout=60, check=True).stdout)
            assert info["exports"][0]["export-size"] == SIZE, info
        assert api.ok("DELETE", f"/api/v1/images/{img['id']}") == {"id": img["id"], "closed": True,
                                                                    "killed": False}
        assert api.ok("GET", "/api/v1/images")["images"] == []

        # -- restore to a file: the bookmark's image
        saved = {}
        for n in ("a", "b"):
            saved[n] = tmp_path / f"{n}-before.raw"
            r = api.ok("POST", f"/api/v1/vdisks/{n}/restore", {"bookmark": "before-change", "to": str(saved[n])})
            assert (r["vdisk"], r["seq"], r["file"], r["size"]) == (n, mark["seq"], str(saved[n]), SIZE)
            compare(saved[n], up.uri(n))
        assert "exists" in api.error("POST", "/api/v1/vdisks/a/restore", {"latest": True, "to": str(saved["a"])},
                                     status=400)
        qcow = tmp_path / "a.qcow2"
        api.ok("POST", "/api/v1/vdisks/a/restore", {"seq": mark["seq"], "to": str(qcow), "format": "qcow2"})
        subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow), str(saved["a"])],
                       check=True, capture_output=True, timeout=120)

        # -- production changes; restore in place brings the bookmark back (and stays protected)
        qemu_io(up.uri("a"), "write -P 0xee 0 2M")
        wait_for(lambda: caught_up(api, "web"), 120, "the change journaled", interval=0.2)
        r = api.ok("POST", "/api/v1/vdisks/a/restore", {"bookmark": "before-change", "in_place": True})
        assert r["in_place"] is True and r["covered_by_seq"] > mark["seq"], r
        compare(saved["a"], up.uri("a"))

        # -- verify: production equals the latest PIT
        wait_for(lambda: caught_up(api, "web"), 120, "the restore journaled", interval=0.2)
        v = api.ok("POST", "/api/v1/cgs/web/verify", {"rounds": 3})
        assert v["clean"] is True and v["differing"] == [] and v["bytes_compared"] == 2 * SIZE, v

        # -- failover to the bookmark, a write at the failover site, failback
        fo = api.ok("POST", "/api/v1/cgs/web/failover", {"bookmark": "before-change"})
        assert fo["seq"] == mark["seq"] and set(fo["exports"]) == {"a", "b"}, fo
        assert "already failed over" in api.error("POST", "/api/v1/cgs/web/failover", {"latest": True}, status=409)
        assert cg_of(api, "web")["role"] == "failed-over"
        compare(fo["exports"]["b"], saved["b"])
        qemu_io(fo["exports"]["b"], "write -P 0xfb 12M 1M")
        fb = api.ok("POST", "/api/v1/cgs/web/failback", {})
        assert not fb.get("aborted") and fb["copied_bytes"] >= MiB, fb
        qemu_io(up.uri("b"), "read -P 0xfb 12M 1M", "read -P 0xb1 1M 2M")
        assert cg_of(api, "web")["role"] == "production"

        # -- bad input on the live system
        assert "unknown consistency group 'nope'" in api.error("GET", "/api/v1/cgs/nope/pits", status=404)
        assert "unknown consistency group 'nope'" in api.error("POST", "/api/v1/images",
                                                               {"cg": "nope", "latest": True}, status=404)
        assert api.error("POST", "/api/v1/cgs/web/bookmarks", raw=b'{"name": ', status=400) == "the body is not JSON"
        assert api.error("POST", "/api/v1/images", {"cg": "web", "seq": 0}, status=400).startswith("bad sequence")
        assert api.error("POST", "/api/v1/images", {"cg": "web", "seq": "12"}, status=400).startswith("bad sequence")
        assert "in use by pid" in api.error("DELETE", "/api/v1/vdisks/a", status=409)  # the host holds the datastore
        print("no PIT at that seq:", api.error("POST", "/api/v1/images", {"cg": "web", "seq": 10**9}, status=400))
        print(f"\nthe API workflow took {time.monotonic() - t0:.1f} s")
