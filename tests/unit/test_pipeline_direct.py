"""The card pipeline's direct (steady) path against its staged path.

With merging off, `CardPipeline` moves committed writes from hold into the
batcher as encoded records (`Dedup.encode`, `Batcher.add_encoded`); with
``direct = False`` the same pipeline goes through the staged stages (`Item`,
`Record`, the checked ``frames.encode_record``) and ``resolve_runs = False``
calls `Resolver.resolve` for every write (the direct side checks a run of one
vdisk's writes in `feed`). On seeded random workloads —
several CGs, dedup hits, multi-block and partial-block writes, ZERO / TRIM /
BARRIER, failed and out-of-order outcomes, outcomes before their writes,
missing outcomes (timeouts), resolve rejects, a full hold, a full ship window
— both must send the same batches (headers and plaintext), release the same
io ids in the same order, report the same writes lost and show the same
statistics.
"""

from __future__ import annotations

import random
from dataclasses import asdict, replace

import pytest

from nicsplit.card.pipeline import CardPipeline, PipelineConfig
from nicsplit.core.records import Op, Status
from nicsplit.testing.pipeline import FakeAppliance, FakeCatalog, FakeEndpoint, write
from nicsplit.core.records import Outcome
from nicsplit.wire.frames import NEED_DATA, PROTOCOL_VERSION, Batch, FrameDecoder, Hello, batch_aad
from nicsplit.wire.envelope import unseal

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
MS = 1_000_000
VDISKS = {1: ("cgA", "a1", 1 << 22), 2: ("cgA", "a2", 1 << 22), 3: ("cgB", "b1", 1 << 22), 4: ("cgC", "c1", 1 << 22)}
CG_ID = {1: 1, 2: 1, 3: 2, 4: 3, 9: 1}  # vdisk -> cg id (9: unknown to the catalog)


class Side:
    """One pipeline with its own endpoint, appliance and wire."""

    def __init__(self, cfg: PipelineConfig, direct: bool, catalog=None) -> None:
        self.ep = FakeEndpoint()
        self.lost: list[int] = []
        self.p = CardPipeline(catalog or FakeCatalog(VDISKS), release=self.ep.release,
                              on_lost=lambda w: self.lost.append(w.io_id), key=KEY, config=cfg)
        self.p.direct = direct
        self.p.resolve_runs = direct
        self.p.add_cgs(["cgA", "cgB", "cgC"])
        self.app = FakeAppliance(KEY)
        self.app.connect()
        self.wire: list[bytes] = []
        self.sent: list[tuple] = []  # (header, plaintext) of every batch frame
        self.acks: list = []
        self._dec = FrameDecoder()
        self.p.window.connected(self.app.hello(Hello("c", PROTOCOL_VERSION, self.p.cgs())).resume, self.wire.append)

    def step(self, entries: list, t: int, deliver: bool) -> None:
        self.ep.push(*entries)
        self.p.feed(self.ep.poll(1 << 20), t)
        self.p.tick(t)
        if deliver:
            self.deliver(t)

    def deliver(self, t: int) -> None:
        while self.wire:
            frames = list(self.wire)
            self.wire.clear()
            for f in frames:
                self._dec.receive_data(f)
                while (b := self._dec.next_event()) is not NEED_DATA:
                    assert isinstance(b, Batch)
                    head = replace(b, body=b"")
                    self.sent.append((head, unseal(b.body, KEY, batch_aad(head))))
                for ack in self.app.receive(f):
                    self.acks.append(ack)
                    self.p.window.on_ack(ack)
            self.p.pump(t)

    def observed(self) -> dict:
        return {"sent": self.sent, "acks": self.acks, "released": self.ep.released, "lost": self.lost,
                "stats": asdict(self.p.statistics()), "report": self.p.cg_report(wall_ns=10**18),
                "held": sorted(self.ep.held)}


def lockstep(sides: tuple[Side, Side], entries: list, t: int, deliver: bool, seed: int) -> None:
    """Feed both paths the same entries; they must agree after every step."""
    for side in sides:
        side.step(entries, t, deliver)
    assert sides[0].observed() == sides[1].observed(), f"seed {seed}: diverged at t={t}"


def settle(sides: tuple[Side, Side], t: int, rounds: int) -> None:
    """Past every timer: tick, then drain and deliver `rounds` times."""
    for side in sides:
        side.p.tick(t)
        for _ in range(rounds):
            side.p.drain(t)
            side.deliver(t)


def workload(rng: random.Random, rounds: int):
    """Rounds of entries: writes and outcomes, with the quirks listed above."""
    seq = {1: 0, 2: 0, 3: 0}
    io = 0
    blocks = [bytes([i]) * 2048 + rng.randbytes(2048) for i in range(5)]  # few distinct: dedup hits
    waiting: list[Outcome] = []
    for _ in range(rounds):
        entries: list = []
        for _ in range(rng.randrange(0, 24)):
            io += 1
            vdisk = rng.choice([1, 1, 2, 3, 3, 4, 9] if rng.random() < 0.05 else [1, 1, 2, 3, 3, 4])
            cg_id = CG_ID[vdisk]
            seq[cg_id] += 1
            off = rng.randrange(0, 256) * 4096
            kind = rng.random()
            if kind < 0.7:
                data = rng.choice(blocks)
            elif kind < 0.8:
                data = rng.choice(blocks) + rng.choice(blocks) + rng.randbytes(rng.choice([0, 512, 2048]))
            elif kind < 0.85:
                data = rng.randbytes(rng.choice([512, 4096, 6000]))
            else:
                data = b""
            if data or kind > 0.98:  # (an empty WRITE, too: the transport holds it all the same)
                if rng.random() < 0.02:
                    off = (1 << 22) - 512  # runs past the vdisk: resolve drops it
                w = write(io, seq[cg_id], cg_id=cg_id, vdisk_id=vdisk, offset=off, data=data,
                          ts=rng.randrange(1, 10**6))
            else:
                op = rng.choice([Op.ZERO, Op.TRIM, Op.BARRIER])
                w = write(io, seq[cg_id], cg_id=cg_id, vdisk_id=vdisk, offset=off, op=op,
                          length=0 if op == Op.BARRIER else 8192, ts=rng.randrange(1, 10**6))
            o = Outcome(io, Status.FAILED if rng.random() < 0.1 else Status.COMMITTED)
            r = rng.random()
            if r < 0.03:
                entries.append(o)  # the outcome before its write
                entries.append(w)
            elif r < 0.05:
                entries.append(w)  # never answered: lost after the timeout
            else:
                entries.append(w)
                waiting.append(o)
        rng.shuffle(waiting)
        k = rng.randrange(0, len(waiting) + 1)
        entries += waiting[:k]  # out of order, some a few rounds late
        del waiting[:k]
        yield entries, rng.random() < 0.7
    yield waiting, True


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_direct_path_matches_staged_path(seed):
    print(f"seed {seed}")
    rng = random.Random(seed)
    cfg = PipelineConfig(
        batch_records=rng.choice([1, 3, 8, 64]), batch_bytes=rng.choice([9000, 20000, 256 << 10]),
        batch_delay_us=rng.choice([0, 300, 2000]), batch_max_ready=rng.choice([1, 2, 4]),
        ship_window=rng.choice([1, 2, 8]), dedup_known_max=rng.choice([4, 64]),
        hold_max_writes=rng.choice([40, 10_000]), outcome_timeout_ms=5,
    )
    print(cfg)
    direct, staged = Side(cfg, True), Side(cfg, False)
    t = 0
    for entries, deliver in workload(rng, 120):
        t += rng.randrange(0, 3 * MS)
        lockstep((direct, staged), entries, t, deliver, seed)
    settle((direct, staged), t + 100 * MS, rounds=2)
    a, b = direct.observed(), staged.observed()
    assert a == b
    # the workload did exercise what it claims
    st = a["stats"]
    assert st["dedup"]["ref_blocks"] and st["hold"]["failed"] and st["lost"] and a["sent"]
    assert a["held"] == [], "every payload released exactly once (FakeEndpoint refuses a second release)"


class ChangingCatalog(FakeCatalog):
    """A catalog that changes under the card: every few refreshes vdisk 1
    shrinks or grows and vdisk 2 moves between CGs (as ``nicsplit cg add``
    and a resize do); refresh is what `Resolver.resolve` calls on a vdisk's
    first write, a CG id change, or a write that fails its checks."""

    def __init__(self) -> None:
        super().__init__(VDISKS)
        self.refreshes = 0

    def refresh(self) -> None:
        self.refreshes += 1
        k = self.refreshes // 3
        self.vdisks[1] = ("cgA", "a1", (1 << 22) if k % 2 else (1 << 21))
        self.vdisks[2] = ("cgA", "a2", 1 << 22) if k % 3 else ("cgB", "a2", 1 << 22)


@pytest.mark.parametrize("seed", [21, 22, 23, 24])
def test_runs_of_one_vdisk_resolve_as_resolve_does(seed):
    """Long runs of one vdisk (the steady path's shape), with writes past
    the vdisk's end, wrong payload sizes, a CG id that changes within a run
    and a catalog that changes between and within polls: the run check in
    `feed` passes and drops exactly the writes `Resolver.resolve` would."""
    print(f"seed {seed}")
    rng = random.Random(seed)
    cfg = PipelineConfig(batch_records=rng.choice([4, 64]), batch_delay_us=0, hold_max_writes=10_000,
                         outcome_timeout_ms=5, dedup=False)
    cats = ChangingCatalog(), ChangingCatalog()
    fast, ref = Side(cfg, True, cats[0]), Side(cfg, False, cats[1])
    seqs = {1: 0, 2: 0, 3: 0}
    io = t = 0
    for _ in range(80):
        entries: list = []
        for _ in range(rng.randrange(1, 5)):  # runs of one vdisk
            vdisk = rng.choice([1, 1, 2, 3])
            cg_id = CG_ID[vdisk] if rng.random() < 0.9 else rng.choice([1, 2])
            for _ in range(rng.randrange(1, 40)):
                io += 1
                seqs[cg_id] += 1
                off = rng.randrange(0, 1024) * 4096  # past a shrunk vdisk 1 at times
                data = rng.randbytes(4096)
                w = write(io, seqs[cg_id], cg_id=cg_id, vdisk_id=vdisk, offset=off, data=data, ts=io)
                if rng.random() < 0.03:
                    w.length = 512  # the payload does not match the length
                entries += [w, Outcome(io, Status.COMMITTED)]
        t += rng.randrange(0, 2 * MS)
        lockstep((fast, ref), entries, t, True, seed)
    st = fast.observed()["stats"]
    r = st["resolve"]
    assert r["resolved"] and r["dropped_out_of_range"] and r["dropped_bad_payload"] and fast.lost
    assert cats[0].refreshes == cats[1].refreshes > 3


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_runs_into_an_open_batch_match_record_by_record(seed, monkeypatch):
    """The steady shape (4 KiB writes of a few CGs, outcomes in order, some
    dedup hits, a ZERO now and then, batches that close by size, count and
    delay): the direct path appends runs of records straight to a CG's open
    batch (`Batcher.open_run`) and must send what the staged path sends
    record by record. Most records must take the run (else this tests
    nothing): `Batcher.add_encoded` is counted on the direct side."""
    print(f"seed {seed}")
    rng = random.Random(seed)
    cfg = PipelineConfig(batch_records=rng.choice([16, 64, 4096]), batch_bytes=rng.choice([60_000, 256 << 10]),
                         batch_delay_us=rng.choice([300, 2000]), batch_max_ready=rng.choice([1, 4]),
                         ship_window=rng.choice([2, 64]), hold_max_writes=10_000, outcome_timeout_ms=50)
    print(cfg)
    direct, staged = Side(cfg, True), Side(cfg, False)
    from nicsplit.card.pipeline.batch import Batcher  # the class whose per-record call is counted here
    calls = {"add_encoded": 0}
    real = Batcher.add_encoded

    def counted(self, *a, **k):
        if self is direct.p.batcher:
            calls["add_encoded"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(Batcher, "add_encoded", counted)
    blocks = [rng.randbytes(4096) for _ in range(4)]
    seqs = {1: 0, 2: 0, 3: 0}
    io = t = 0
    for _ in range(60):
        entries: list = []
        for _ in range(rng.randrange(1, 4)):
            vdisk = rng.choice([1, 3, 4])
            cg_id = CG_ID[vdisk]
            for _ in range(rng.randrange(1, 50)):
                io += 1
                seqs[cg_id] += 1
                if rng.random() < 0.03:
                    w = write(io, seqs[cg_id], cg_id=cg_id, vdisk_id=vdisk, offset=0, op=Op.ZERO, length=8192,
                              ts=rng.randrange(1, 10**6))
                else:
                    data = rng.choice(blocks) if rng.random() < 0.1 else rng.randbytes(4096)
                    w = write(io, seqs[cg_id], cg_id=cg_id, vdisk_id=vdisk, offset=rng.randrange(0, 256) * 4096,
                              data=data, ts=rng.randrange(1, 10**6))
                entries += [w, Outcome(io, Status.COMMITTED)]
        t += rng.randrange(0, 3 * MS)
        lockstep((direct, staged), entries, t, rng.random() < 0.7, seed)
    settle((direct, staged), t + 100 * MS, rounds=1)
    a = direct.observed()
    assert a == staged.observed()
    st = a["stats"]
    assert st["dedup"]["ref_blocks"] and a["held"] == []
    print(f"{calls['add_encoded']} of {st['batch']['records']} records by add_encoded")
    assert calls["add_encoded"] < st["batch"]["records"] / 3, "the runs were not taken"
