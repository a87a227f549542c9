"""Issue 9: 1 MiB writes through a real host, card (acker + pipeline worker)
and appliance (`nicsplit up`), written by a real client (qemu-io) at QD1 with
the default split timeout (1 ms). Each is acked by the card (split, not
marked, not late-refused), none fails the payload checksum the pipeline
worker now verifies off the ack path, and the data reaches the replica
intact: the latest PIT equals production. Each payload was received in
place in the card's ring (a reservation, checksummed as it streamed in)."""

from __future__ import annotations

import subprocess

import pytest

from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.testing.procs import UpProcess, env_with_libnbd, run_cli, wait_for
from nicsplit.testing.stack import cg_data, cg_status, latest_pit_equals_production, wait_caught_up

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 64 << 20
N = 24  # 1 MiB writes: well inside the 256 MiB hidden volume, so a slow appliance cannot fill it


def test_1mib_writes_are_acked_and_reach_the_replica_intact(tmp_path, seed):
    data = cg_data(tmp_path, SIZE, ("a",), timeout_us=1000)  # the default split timeout
    with UpProcess(data) as up:
        wait_for(lambda: cg_status(data)["state"] == "protected", 60, "the CG protected")
        cmds = []
        for i in range(N):
            cmds += ["-c", f"write -P {(seed + 7 * i) & 0xFF:#x} {(i * 5 % 48) << 20} 1M"]
        subprocess.run(["qemu-io", "-f", "raw", "-t", "writeback", *cmds, up.uri("a")], check=True,
                       capture_output=True, timeout=120)
        sp = request(Layout(data).host_sock, {"cmd": "stats"})["stats"]["vdisks"]["a"]["split"]
        print(f"seed {seed}: split {sp['split']}, late {sp['late']}, marked {sp['marked']}, "
              f"split p50 {sp['split_p50_us']:.0f} us")
        # acked (a loaded box may make an ack late: still in flight, acked later), none marked;
        # split also counts the flush qemu-io sends when it closes
        assert sp["split"] + sp["late"] >= N and sp["marked"] == 0 and sp["state"] == "protected", sp
        card = request(Layout(data).card_ctl_sock, {"cmd": "stats"})["stats"]
        assert card["endpoint"]["handoff"]["bad_checksum"] == 0
        assert card["endpoint"]["bytes"] == N << 20  # every payload acked OK by the card, nothing else
        ring = request(Layout(data).host_sock, {"cmd": "stats"})["stats"]["card_transport"]
        print(f"ring: {ring}")
        # received into the ring in place (or moved), never left held; none dropped
        assert ring["in_place"] + ring["moved"] == N and ring["held"] == 0 and ring["dropped"] == 0, ring
        latest_pit_equals_production(data, "cg1", "a", up.uri("a"), tmp_path)


def test_1mib_writes_over_tls_are_received_in_place_intact(tmp_path, seed):
    """The same over NBD TLS: the payload is decrypted straight into the
    ring (SSL read_into), checksummed as it lands; the card's worker checks
    every checksum and qemu-io reads its patterns back."""
    data = cg_data(tmp_path, SIZE, ("a",), timeout_us=1000)
    cdir = tmp_path / "client"
    run_cli(data, "pki", "nbd-client", str(cdir), "--name", "nbd-client")
    with UpProcess(data, "--tls", "require") as up:
        wait_for(lambda: cg_status(data)["state"] == "protected", 60, "the CG protected")
        obj = f"tls-creds-x509,id=tls0,dir={cdir},endpoint=client"
        opts = f"driver=nbd,host=127.0.0.1,port={up.port},export=a,tls-creds=tls0"
        n = 8
        pat = [(seed + 11 * i) & 0xFF for i in range(n)]
        writes = [c for i in range(n) for c in ("-c", f"write -P {pat[i]:#x} {i << 20} 1M")]
        reads = [c for i in range(n) for c in ("-c", f"read -P {pat[i]:#x} {i << 20} 1M")]
        p = subprocess.run(["qemu-io", "--object", obj, "-t", "writeback", "--image-opts", opts, *writes, *reads],
                           capture_output=True, text=True, timeout=120, env=env_with_libnbd())
        print(f"seed {seed}: {p.stdout[-300:]}")
        assert p.returncode == 0 and "Pattern verification failed" not in p.stdout + p.stderr, p.stdout + p.stderr
        ring = request(Layout(data).host_sock, {"cmd": "stats"})["stats"]["card_transport"]
        assert ring["in_place"] == n and ring["held"] == 0 and ring["dropped"] == 0, ring
        wait_for(lambda: request(Layout(data).card_ctl_sock, {"cmd": "stats"})["stats"]["endpoint"]["bytes"] == n << 20,
                 30, "the card holding every payload")
        wait_caught_up(data)  # the worker took (and checked) every write: the journal holds them
        card = request(Layout(data).card_ctl_sock, {"cmd": "stats"})["stats"]
        assert card["endpoint"]["handoff"]["bad_checksum"] == 0, card["endpoint"]["handoff"]


def test_large_writes_on_four_connections_reach_the_replica_intact(tmp_path, rng, seed):
    """nbdcopy on 4 connections, 1 MiB requests, 4 in flight each: many
    reservations are held at once; a delay filter above the splitter (0-3 ms
    of seeded jitter per write) makes later payloads reach the splitter
    first, so some reservations are overtaken and moved (copied) instead of
    published in place; every one is released, and the latest PIT equals
    production."""
    delay = {"name": "delay", "write_ms": 0, "jitter_ms": 3, "seed": seed}
    filters = ["stats", delay, {"name": "split", "split_timeout_us": 100_000}]  # a slow box must not mark
    data = cg_data(tmp_path, SIZE, ("a",), vdisks={"a": {"filters": filters}})
    src = tmp_path / "src.img"
    src.write_bytes(rng.randbytes(32 << 20))
    with UpProcess(data) as up:
        wait_for(lambda: cg_status(data)["state"] == "protected", 60, "the CG protected")
        p = subprocess.run(["nbdcopy", "--connections=4", "--requests=4", "--request-size=1048576",
                            str(src), up.uri("a")], capture_output=True, text=True, timeout=120, env=env_with_libnbd())
        assert p.returncode == 0, p.stderr
        ring = request(Layout(data).host_sock, {"cmd": "stats"})["stats"]["card_transport"]
        sp = request(Layout(data).host_sock, {"cmd": "stats"})["stats"]["vdisks"]["a"]["split"]
        print(f"seed {seed}: ring {ring}; split {sp['split']}, marked {sp['marked']}")
        assert sp["marked"] == 0 and ring["held"] == 0 and ring["dropped"] == 0, (ring, sp)
        assert ring["in_place"] + ring["moved"] == ring["reserved"] == 32 and ring["moved"] >= 1, ring
        latest_pit_equals_production(data, "cg1", "a", up.uri("a"), tmp_path)
        got = subprocess.run(["nbdcopy", up.uri("a"), "-"], capture_output=True, timeout=120, env=env_with_libnbd())
        assert got.returncode == 0 and got.stdout[: 32 << 20] == src.read_bytes()
