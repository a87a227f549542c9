"""The appliance as a real process: TLS 1.3 mutual auth, durable acks, bad
input dropped with nothing journaled, kill -9 and restart mid-stream.

The appliance runs as ``python -m nicsplit.appliance --data DIR run``; the
test client (`CardClient`) holds the card certificate.  Journal contents are
read back through the CLI (``journal dump --json`` / ``journal replay``).
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nicsplit.testing.appliance import ApplianceProcess, CardClient, make_batch
from nicsplit.core.records import Op
from nicsplit.core import pki
from nicsplit.testing.datadir import init_data, vdisk
from nicsplit.testing.procs import wait_for
from nicsplit.wire import envelope, frames as F


def appliance_cli(data: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "nicsplit", "--data", str(data), *args],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def dump(data: Path, cg: str) -> list[dict]:
    return json.loads(appliance_cli(data, "journal", "dump", cg, "--json").stdout)["records"]


@pytest.fixture
def adata(tmp_path: Path) -> Path:
    data = init_data(tmp_path / "data")
    cfg = data / "nicsplit.toml"
    text = cfg.read_text()
    assert "heartbeat_interval = 5\n" in text
    cfg.write_text(text.replace("heartbeat_interval = 5\n", "heartbeat_interval = 0.2\n"))
    vdisk(data, "disk-a", "8M")
    vdisk(data, "disk-b", "8M")
    appliance_cli(data, "pki", "init")
    return data


@pytest.fixture
def appliance(adata: Path):
    started: list[ApplianceProcess] = []

    def start(*args: str) -> ApplianceProcess:
        a = ApplianceProcess(adata, *args).start()
        started.append(a)
        return a

    yield start
    for a in started:
        if a.proc is not None and a.proc.poll() is None:
            assert a.stop() == 0, f"appliance exited non-zero on SIGTERM; log:\n{a.log()}"


def card(data: Path, app: ApplianceProcess, name: str = "card") -> CardClient:
    return CardClient.connect(app.host_port, pki.client_context(data / "pki", name))


def key(data: Path) -> bytes:
    return pki.load_batch_key(data / "pki")


def vdisk_ids(data: Path) -> dict[str, int]:
    from nicsplit.host.datastore import Datastore

    return {v.name: v.id for v in Datastore.open(data / "datastore").list_vdisks()}


def writes(ids: dict[str, int], first_seq: int, n: int, rng) -> list[F.Record]:
    """Writes alternating between the two vdisks, self-describing payloads."""
    out = []
    for seq in range(first_seq, first_seq + n):
        name = "disk-a" if seq % 2 else "disk-b"
        off = rng.randrange(0, 8 * 1024 * 1024 // 4096 - 4) * 4096
        data = f"{name}:{seq}:".encode().ljust(8192, b".")
        out.append(F.Record(seq, 10_000 + seq, ids[name], Op.WRITE, 0, off, len(data), 1_700_000_000_000_000_000 + seq, data))
    return out


def test_durable_acks_dump_and_replay(adata: Path, appliance, tmp_path: Path, rng):
    app = appliance()
    ids = vdisk_ids(adata)
    k = key(adata)
    recs = writes(ids, 1, 12, rng)
    recs.insert(6, F.Record(7, 99, ids["disk-a"], Op.ZERO, 0, 0, 65536, 1_700_000_000_000_000_007))
    recs = [F.Record(i + 1, r.io_id, r.vdisk_id, r.op, r.flags, r.offset, r.length, r.time_ns, r.data)
            for i, r in enumerate(recs)]
    batches = [make_batch(b + 1, "db", recs[b * 4 : b * 4 + 4], k) for b in range(3)] + \
              [make_batch(4, "db", recs[12:], k)]
    with card(adata, app) as c:
        ack = c.hello(("db", "other"))
        assert ack.version == F.PROTOCOL_VERSION and ack.resume == {"db": 0, "other": 0}
        assert ack.appliance_id.startswith("appliance-")
        for b in batches:  # pipelined
            c.send(b)
        acks = [c.recv() for _ in batches]
    assert [(a.batch_id, a.cg, a.last_seq, a.durable) for a in acks] == \
           [(b.batch_id, "db", b.last_seq, True) for b in batches]
    assert set(acks[0].known) == {F.fingerprint(r.data[i : i + 4096]) for r in recs[:4] if r.op == Op.WRITE
                                  for i in range(0, r.length, 4096)}
    names = {v: k for k, v in ids.items()}
    rows = dump(adata, "db")
    assert rows == [{"seq": r.seq, "vdisk": names[r.vdisk_id], "offset": r.offset, "length": r.length,
                     "op": "write" if r.op == Op.WRITE else "zero", "time": r.time_ns / 1e9, "gap": False} for r in recs]
    # replay == what the writes produce on zeroed images
    out = tmp_path / "replay"
    appliance_cli(adata, "journal", "replay", "db", "--out", str(out))
    expect = {n: bytearray(8 * 1024 * 1024) for n in ids}
    for r in recs:
        img = expect[names[r.vdisk_id]]
        img[r.offset : r.offset + r.length] = r.data if r.op == Op.WRITE else bytes(r.length)
    for n, img in expect.items():
        assert (out / f"{n}.raw").read_bytes() == img, n
    # --upto
    appliance_cli(adata, "journal", "replay", "db", "--out", str(tmp_path / "r3"), "--upto", "3")
    assert json.loads(appliance_cli(adata, "journal", "dump", "db", "--json", "--upto", "3").stdout)["records"] == rows[:3]


def test_dedup_reference_over_the_wire(adata: Path, appliance, tmp_path: Path):
    app = appliance()
    ids = vdisk_ids(adata)
    k = key(adata)
    block = os.urandom(4096)
    r1 = F.Record(1, 1, ids["disk-a"], Op.WRITE, 0, 0, 4096, 1, block)
    with card(adata, app) as c:
        c.hello(("db",))
        c.send(make_batch(1, "db", [r1], k))
        ack = c.recv()
        assert ack.known == (F.fingerprint(block),)
        r2 = F.Record(2, 2, ids["disk-b"], Op.WRITE, 0, 8192, 8192, 2, b"n" * 4096, ((0, ack.known[0]),))
        c.send(make_batch(2, "db", [r2], k))
        assert c.recv().last_seq == 2
        # a reference to a block the appliance never held: refused, not journaled
        r3 = F.Record(3, 3, ids["disk-b"], Op.WRITE, 0, 0, 4096, 3, b"", ((0, b"\x42" * 16),))
        c.send(make_batch(3, "db", [r3], k))
        err = c.recv()
        assert isinstance(err, F.Error) and err.code == F.ErrorCode.BAD_BATCH and "does not hold" in err.message
        assert c.recv() is None
    out = tmp_path / "img"
    appliance_cli(adata, "journal", "replay", "db", "--out", str(out))
    assert (out / "disk-b.raw").read_bytes()[8192:16384] == block + b"n" * 4096
    assert [r["seq"] for r in dump(adata, "db")] == [1, 2]


def test_heartbeats_flow(adata: Path, appliance):
    app = appliance()
    with card(adata, app) as c:
        c.hello(("db",))
        dec = c.dec
        while True:  # raw receive: CardClient.recv() skips heartbeats
            ev = dec.next_event()
            if ev is F.NEED_DATA:
                dec.receive_data(c.sock.recv(65536))
                continue
            assert isinstance(ev, F.Heartbeat)
            break
        c.send(F.Heartbeat(1))


def _refused(c_factory) -> bool:
    """True if the connection fails during or right after the handshake."""
    try:
        c = c_factory()
    except (ssl.SSLError, OSError):
        return True
    with c:
        try:
            c.send(F.Hello("intruder", F.PROTOCOL_VERSION, ("db",)))
            return c.recv() is None  # TLS 1.3: the refusal arrives as an alert on the first read
        except (ssl.SSLError, OSError):
            return True


def test_certificate_from_another_ca_is_refused(adata: Path, appliance, tmp_path: Path):
    app = appliance()
    other = tmp_path / "other-pki"
    pki.init_pki(other)
    # the intruder trusts our CA for the server, but presents a card cert of its own CA
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(adata / "pki" / "ca.crt"))
    ctx.load_cert_chain(str(other / "card.crt"), str(other / "card.key"))
    assert _refused(lambda: CardClient.connect(app.host_port, ctx, timeout=10))
    # no certificate at all
    anon = ssl.create_default_context(cafile=str(adata / "pki" / "ca.crt"))
    assert _refused(lambda: CardClient.connect(app.host_port, anon, timeout=10))
    # plain TCP (no TLS)
    assert _refused(lambda: CardClient.connect(app.host_port, None, timeout=10))
    wait_for(lambda: app.log().count("TLS handshake failed") >= 3, 10, "three logged handshake refusals")
    # a certificate of our CA with a CN that may not ship (the appliance's own)
    with CardClient.connect(app.host_port, pki.client_context(adata / "pki", "appliance")) as c:
        err = c.recv()
        assert isinstance(err, F.Error) and err.code == F.ErrorCode.UNAUTHENTICATED
    assert not (adata / "appliance" / "journal" / "db").exists()
    # the appliance still serves its card
    with card(adata, app) as c:
        assert c.hello(("db",)).resume == {"db": 0}


BAD_INPUTS = {
    "garbage": lambda k, good: b"GET / HTTP/1.1\r\n\r\n",
    "bad crc": lambda k, good: F.encode(good)[:-1] + bytes([F.encode(good)[-1] ^ 1]),
    "flipped ciphertext": lambda k, good: F.encode(F.Batch(good.batch_id, good.cg, good.first_seq, good.last_seq,
                                                           good.t_first_ns, good.t_last_ns,
                                                           good.body[:20] + bytes([good.body[20] ^ 1]) + good.body[21:])),
    "header changed (aad)": lambda k, good: F.encode(F.Batch(good.batch_id, good.cg, good.first_seq, good.last_seq + 1,
                                                             good.t_first_ns, good.t_last_ns, good.body)),
    "unencrypted body": lambda k, good: F.encode(make_batch(2, "db", [F.Record(2, 1, 1, Op.BARRIER, 0, 0, 0, 5)], None)),
    "undecodable records": lambda k, good: F.encode(_sealed_raw(k, b"\x00\x00\x00\x05junk")),
    "cg not in hello": lambda k, good: F.encode(make_batch(2, "nothello", [F.Record(2, 1, 1, Op.BARRIER, 0, 0, 0, 5)], k)),
    "second hello": lambda k, good: F.encode(F.Hello("x", 1, ("db",))),
    "ack from a card": lambda k, good: F.encode(F.Ack(1, "db", 1, True, ())),
    "oversized header": lambda k, good: b"NSPF\x01\x03\x00\x00\x7f\xff\xff\xff\x00\x00\x00\x00",
}


def _sealed_raw(k: bytes, plain: bytes) -> F.Batch:
    head = F.Batch(2, "db", 2, 2, 5, 5, b"")
    return F.Batch(2, "db", 2, 2, 5, 5, envelope.seal(plain, k, F.batch_aad(head)))


@pytest.mark.parametrize("what", list(BAD_INPUTS))
def test_bad_input_dropped_and_nothing_journaled(adata: Path, appliance, what: str):
    app = appliance()
    k = key(adata)
    good = make_batch(1, "db", [F.Record(1, 1, 1, Op.BARRIER, 0, 0, 0, 5)], k)
    with card(adata, app) as c:
        c.hello(("db",))
        c.send(good)
        assert c.recv().last_seq == 1
        c.send_raw(BAD_INPUTS[what](k, make_batch(2, "db", [F.Record(2, 1, 1, Op.BARRIER, 0, 0, 0, 6)], k)))
        err = c.recv()
        assert isinstance(err, F.Error), err
        assert c.recv() is None, "connection not dropped"
    assert [r["seq"] for r in dump(adata, "db")] == [1]
    wait_for(lambda: "dropping" in app.log(), 10, "the drop to be logged")
    # the next connection is served normally
    with card(adata, app) as c:
        assert c.hello(("db",)).resume == {"db": 1}


def test_batch_before_hello_and_bad_version(adata: Path, appliance):
    app = appliance()
    with card(adata, app) as c:
        c.send(make_batch(1, "db", [F.Record(1, 1, 1, Op.BARRIER, 0, 0, 0, 5)], key(adata)))
        err = c.recv()
        assert isinstance(err, F.Error) and err.code == F.ErrorCode.PROTOCOL and "before Hello" in err.message
    with card(adata, app) as c:
        c.send(F.Hello("card", 99, ("db",)))
        err = c.recv()
        assert isinstance(err, F.Error) and err.code == F.ErrorCode.VERSION
    with card(adata, app) as c:  # a bad CG is left out of resume (the session lives); a batch for it is refused
        assert c.hello(("../etc",)).resume == {}
        c.send(make_batch(1, "../etc", [F.Record(1, 1, 1, Op.BARRIER, 0, 0, 0, 5)], key(adata)))
        err = c.recv()
        assert isinstance(err, F.Error) and err.code == F.ErrorCode.UNKNOWN_CG
    assert not (adata / "appliance" / "journal" / "db").exists()


def test_kill9_restart_mid_stream(adata: Path, appliance, rng):
    """Acked batches survive kill -9; resending everything acks all and
    stores each write exactly once."""
    app = appliance()
    ids = vdisk_ids(adata)
    k = key(adata)
    recs = writes(ids, 1, 240, rng)
    batches = [make_batch(b + 1, "db", recs[b * 4 : b * 4 + 4], k) for b in range(60)]
    acked_seq = 0
    with card(adata, app) as c:
        c.hello(("db",))
        for b in batches:
            c.send(b)
        for _ in range(20):
            a = c.recv()
            assert isinstance(a, F.Ack) and a.durable
            acked_seq = a.last_seq
        os.kill(app.pid, signal.SIGKILL)
        app.proc.wait()
    app2 = appliance()
    with card(adata, app2) as c:
        resume = c.hello(("db",)).resume["db"]
        assert resume >= acked_seq, f"acked up to {acked_seq} but the appliance resumes after {resume}"
        for b in batches:  # resend everything, duplicates included
            c.send(b)
        acks = [c.recv() for _ in batches]
    assert all(isinstance(a, F.Ack) and a.durable for a in acks)
    assert [a.batch_id for a in acks] == [b.batch_id for b in batches]
    rows = dump(adata, "db")
    assert [r["seq"] for r in rows] == list(range(1, 241)), "a write is missing or stored twice"
    assert [r["offset"] for r in rows] == [r.offset for r in recs]


def test_sigterm_stops_cleanly_and_restart_resumes(adata: Path, appliance):
    app = appliance()
    assert (adata / "run" / "appliance.pid").read_text() == str(app.pid)
    with card(adata, app) as c:
        c.hello(("db",))
        c.send(make_batch(1, "db", [F.Record(1, 1, 1, Op.BARRIER, 0, 0, 0, 5)], key(adata)))
        assert c.recv().durable
        assert app.stop() == 0
        err = c.recv()
        assert err is None or (isinstance(err, F.Error) and err.code == F.ErrorCode.SHUTDOWN)
    assert "appliance stopping" in app.log()
    assert not (adata / "run" / "appliance.pid").exists()
    app2 = appliance()
    with card(adata, app2) as c:
        assert c.hello(("db",)).resume == {"db": 1}


def test_cli_errors_are_one_line(adata: Path, tmp_path: Path):
    p = appliance_cli(adata, "journal", "dump", "nope", check=False)
    assert p.returncode == 1 and p.stderr.strip() == f"nicsplit: error: no journal for CG 'nope' (looked in {adata}/appliance/journal/nope)"
    bare = init_data(tmp_path / "bare")
    shutil.rmtree(bare / "pki")  # init creates it; without it the appliance cannot serve
    p = appliance_cli(bare, "appliance", "run", "--listen", "127.0.0.1:0", check=False)
    assert p.returncode == 1 and "run 'nicsplit pki init'" in p.stderr and "Traceback" not in p.stderr


def test_corrupt_journal_stops_the_start_with_a_clear_error(adata: Path, appliance):
    app = appliance()
    with card(adata, app) as c:
        c.hello(("db",))
        for b in (1, 2):
            c.send(make_batch(b, "db", [F.Record(b, 1, 1, Op.WRITE, 0, 0, 4096, 5, bytes([b]) * 4096)], key(adata)))
            assert c.recv().durable
    assert app.stop() == 0
    seg = adata / "appliance" / "journal" / "db" / "00000001.seg"
    raw = bytearray(seg.read_bytes())
    raw[24 + 12 + 200] ^= 0xFF  # inside the first committed record
    seg.write_bytes(raw)
    p = subprocess.run([sys.executable, "-m", "nicsplit", "--data", str(adata), "appliance", "run", "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "corrupt entry in segment 00000001.seg at offset 24 (entry CRC mismatch)" in p.stderr
    assert seg.read_bytes() == raw


def test_group_commit_window_holds_acks_for_later_batches(adata: Path, appliance, rng):
    """[appliance] commit_window_us: a batch's durable ack waits up to the
    window for more batches of its CG (one fdatasync for all); batches that
    arrive in it are acked with it, in order, and are all journaled."""
    cfg = adata / "nicsplit.toml"
    cfg.write_text(cfg.read_text().replace("commit_window_us = 2000\n", "commit_window_us = 1000000\n"))
    app = appliance()
    ids = vdisk_ids(adata)
    k = key(adata)
    recs = writes(ids, 1, 6, rng)
    b1, b2, b3 = (make_batch(i + 1, "db", recs[i * 2 : i * 2 + 2], k) for i in range(3))
    with card(adata, app) as c:
        c.hello(("db",))
        t0 = time.monotonic()
        c.send(b1)
        c.send(b2)
        acks = [c.recv(), c.recv()]
        held = time.monotonic() - t0
        c.send(b3)
        acks.append(c.recv())
    assert [(a.batch_id, a.last_seq, a.durable) for a in acks] == [(1, 2, True), (2, 4, True), (3, 6, True)]
    assert held >= 0.9, f"acked after {held:.3f} s: the 1 s commit window was not waited for"
    assert [r["seq"] for r in dump(adata, "db")] == [1, 2, 3, 4, 5, 6]


def test_commit_window_must_be_a_sane_integer(adata: Path):
    cfg = adata / "nicsplit.toml"
    cfg.write_text(cfg.read_text().replace("commit_window_us = 2000\n", "commit_window_us = -1\n"))
    p = appliance_cli(adata, "appliance", "run", "--listen", "127.0.0.1:0", check=False)
    assert p.returncode != 0 and "commit_window_us = -1: must be an integer 0..1000000" in p.stderr


def test_a_silent_card_is_dropped_and_a_talking_one_is_not(adata: Path, appliance, rng):
    """[appliance] idle_timeout: a card that sends nothing (no frame, no
    heartbeat) for that long gets Error(PROTOCOL) "peer silent"; one that
    keeps sending batches and heartbeats stays connected longer than that."""
    cfg = adata / "nicsplit.toml"
    text = cfg.read_text()
    assert "idle_timeout = 30\n" in text
    cfg.write_text(text.replace("idle_timeout = 30\n", "idle_timeout = 0.6\n"))
    app = appliance()
    ids = vdisk_ids(adata)
    k = key(adata)
    with card(adata, app) as c:  # talking: a batch or a heartbeat every 0.2 s for 1.8 s
        c.hello(("db",))
        recs = writes(ids, 1, 4, rng)
        for i in range(9):
            if i < 4:
                c.send(make_batch(i + 1, "db", [recs[i]], k))
                ack = c.recv()
                assert isinstance(ack, F.Ack) and ack.last_seq == i + 1, ack
            else:
                c.send(F.Heartbeat(i))
            time.sleep(0.2)  # ok-sleep: the card's pace is what is tested
        c.send(make_batch(5, "db", writes(ids, 5, 1, rng), k))
        ack = c.recv()
        assert isinstance(ack, F.Ack) and ack.last_seq == 5, ack
    with card(adata, app) as c:  # silent after its Hello
        c.hello(("db",))
        t0 = time.monotonic()
        err = c.recv()
        took = time.monotonic() - t0
        assert isinstance(err, F.Error) and err.code == F.ErrorCode.PROTOCOL and "peer silent" in err.message, err
        assert 0.5 <= took < 5, took
