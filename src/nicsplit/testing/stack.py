"""A data directory with one protected CG, and what a test asks of the
running stack (`nicsplit up`): status, PITs, the replica, one-line errors.

* `cg_data` — ``nicsplit init`` with the split filter and a 256M ring, one
  CG ``cg1`` holding the named vdisks.
* `wait_caught_up` — wait (with a deadline) until the journal holds every
  write the host made and the replica has applied the journal.
* `replica_in_clear` — a replica image decrypted to a raw file.
* `one_line_error` — a command that must fail with one ``nicsplit: error:``
  line and no traceback.
* `status`, `qemu_io`, `wait_durable` — ``nicsplit status --json``; a
  qemu-io run of commands on an NBD URI; wait until cg1 is protected with
  the journal at the host's last seq.
* `restore_bytes`, `host_card_link`, `switch_keeps_every_pit` — a vdisk
  restored (``nicsplit restore``) as bytes; which card transport the
  running host's link speaks; the transport switch check of issue 12 (each
  start on the next transport restores every earlier PIT as before).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from nicsplit.core.ctl import request
from nicsplit.core.catalog import open_catalog
from nicsplit.core.layout import Layout, vdisk_file
from nicsplit.storage import atrest
from nicsplit.storage.image import open_image
from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import UpProcess, run_cli, wait_for

SIZE = 8 << 20


def cg_data(tmp_path: Path, size: int = SIZE, names: tuple[str, ...] = ("a", "b"), *,
            timeout_us: int = 1_000_000, vdisks: dict | None = None, sections: dict | None = None,
            **host: object) -> Path:
    """A data directory with vdisks ``names`` in CG cg1. The hidden volume
    holds more than a test writes, so a slow appliance cannot fill it (a full
    card rightly marks, which is not what most tests check). ``sections``:
    more nicsplit.toml sections."""
    more = dict(sections or {})
    card = {"transport_options": {"data_size": "256M"}, **more.pop("card", {})}
    data = init_data(tmp_path / "data", filters=["stats", {"name": "split", "split_timeout_us": timeout_us}],
                     vdisks=vdisks, sections={"card": card, **more}, **host)
    run_cli(data, "cg", "create", "cg1")
    for n in names:
        run_cli(data, "vdisk", "create", n, "--size", str(size), "--cg", "cg1")
    return data


def cg_status(data: Path) -> dict:
    (cg,) = json.loads(run_cli(data, "status", "--json").stdout)["cgs"]
    return cg


def latest_seq(data: Path) -> int:
    pits = json.loads(run_cli(data, "pits", "cg1", "--json").stdout)["pits"]
    return pits[-1]["seq"] if pits else 0


def appliance_status(data: Path) -> dict | None:
    """The appliance's own status (its control socket; no process start per poll)."""
    reply = request(Layout(data).appliance_sock, {"cmd": "status"}, 5)
    return None if reply is None else reply["status"]


def wait_caught_up(data: Path, timeout: float = 60) -> int:
    """Journal == production (host's last seq) and the replica == journal; the seq."""
    def journal_done() -> bool:
        st = cg_status(data)
        return st["host_last_seq"] is not None and latest_seq(data) >= st["host_last_seq"]

    wait_for(journal_done, timeout, "the journal to catch up with production", interval=0.2)
    latest = latest_seq(data)

    def replica_done() -> bool:
        d = ((appliance_status(data) or {}).get("cgs", {}).get("cg1") or {}).get("distribution") or {}
        return d.get("applied_seq", -1) >= latest and d.get("lag_records") == 0

    wait_for(replica_done, timeout, f"the replica to reach seq {latest}", interval=0.1)
    return latest


def replica_in_clear(data: Path, n: str, tmp_path: Path) -> Path:
    """The replica image of vdisk ``n`` in clear (a raw file in ``tmp_path``):
    at-rest encryption is on by default, so the file itself is ciphertext."""
    layout = Layout(data)
    p = vdisk_file(layout.replica("cg1"), open_catalog(layout.datastore).get(n).id, ".img")
    size = os.path.getsize(p)
    out = tmp_path / f"replica-{n}.raw"
    with open_image(p, size, atrest.keyring_in(layout.appliance), writable=False) as img:
        assert img.sealed, f"{p} is not sealed at rest"
        out.write_bytes(img.pread(0, size))
    return out


def one_line_error(data: Path, *args: str) -> str:
    p = run_cli(data, *args, check=False)
    assert p.returncode != 0, (args, p.stdout)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nicsplit: error: ") and "Traceback" not in p.stderr, (args, p.stderr)
    return lines[0]


def latest_pit_equals_production(data: Path, cg: str, vdisk: str, production_uri: str, tmp_path: Path) -> None:
    """Wait until the journal holds every seq the host handed out for ``cg``,
    restore ``vdisk`` at the latest PIT and compare it with production
    (``qemu-img compare``: raises on the first difference)."""
    def status() -> dict:
        (c,) = [c for c in json.loads(run_cli(data, "status", "--json").stdout)["cgs"] if c["name"] == cg]
        return c

    last = status()["host_last_seq"]
    wait_for(lambda: (status()["last_durable_seq"] or 0) >= last, 120, f"the journal reaching seq {last}", interval=0.2)
    out_img = tmp_path / f"{vdisk}-latest.raw"
    run_cli(data, "restore", vdisk, "--latest", "--to", str(out_img), "--force", timeout=120)  # may run again
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(out_img), production_uri],
                   check=True, capture_output=True, timeout=120)


def status(data: Path) -> dict:
    return json.loads(run_cli(data, "status", "--json").stdout)


def qemu_io(uri: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run(argv + [uri], check=True, capture_output=True, timeout=120)


def wait_durable(data: Path, timeout: float = 120) -> dict:
    """Until the journal holds every seq the host handed out and cg1 is protected."""
    def done() -> dict | None:
        (cg,) = status(data)["cgs"]
        return cg if cg["state"] == "protected" and (cg.get("last_durable_seq") or 0) >= (cg.get("host_last_seq") or 0) > 0 else None
    return wait_for(done, timeout, "cg1 protected with the journal at the host's last seq", interval=0.5)


def restore_bytes(data: Path, tmp_path: Path, vdisk: str, *how: str) -> bytes:
    """``nicsplit restore VDISK *how`` to a scratch file, returned as bytes."""
    out = tmp_path / f"restore-{vdisk}.raw"
    run_cli(data, "restore", vdisk, *how, "--to", str(out), "--force", timeout=120)
    b = out.read_bytes()
    out.unlink()
    return b


def host_card_link(data: Path) -> str:
    """The kind of the running host's card link, told by its counters."""
    st = json.loads(run_cli(data, "host", "stats", "--json").stdout).get("card_transport", {})
    return "shadow" if "device_submitted" in st else "nvme-pi" if "guard_errors" in st else "ring"


def switch_keeps_every_pit(data: Path, tmp_path: Path, rounds: tuple[tuple[str, int], ...]) -> list[int]:
    """Start ``nicsplit up --transport T`` for each (T, pattern) of
    ``rounds`` in turn (vdisk ``a`` of cg1, `cg_data`): every PIT of the
    earlier starts restores as it did, a 256 KiB write of the pattern at
    MiB ``round`` is journaled after them in the same CG sequence, and the
    latest PIT holds every round's write. Returns the PITs' seqs."""
    digests: dict[int, str] = {}  # PIT seq -> sha256 of vdisk a restored there
    for round_, (transport, pattern) in enumerate(rounds):
        with UpProcess(data, "--transport", transport) as up:
            assert ("card" in up.ready["processes"]) == (transport != "net"), up.ready  # net needs no card
            if transport != "net":
                assert host_card_link(data) == transport
            for seq, digest in digests.items():  # every PIT of the earlier runs restores as it did
                assert hashlib.sha256(restore_bytes(data, tmp_path, "a", "--seq", str(seq))).hexdigest() == digest, seq
            qemu_io(up.uri("a"), f"write -P {pattern:#x} {round_ << 20} 256k", "flush")
            seq = wait_durable(data)["host_last_seq"]
            assert seq > max(digests, default=0)  # the CG's sequence goes on across the switch
            img = restore_bytes(data, tmp_path, "a", "--latest")
            for r, (_, p) in enumerate(rounds[: round_ + 1]):
                assert img[r << 20: (r << 20) + (256 << 10)] == bytes([p]) * (256 << 10), (transport, r)
            digests[seq] = hashlib.sha256(img).hexdigest()
            (v,) = [v for c in status(data)["cgs"] for v in c["vdisks"]]
            assert v.get("transport") == transport and v["state"] == "protected", v
    return sorted(digests)
